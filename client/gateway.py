#!/usr/bin/env python3
"""The HTTP gateway in front of Triton: /predict (Truss), /v1/completions, /v1/chat/completions,
/v1/models, /health, /ready, /metrics (see --help).

    .venv/bin/python client/gateway.py --triton-grpc-url localhost:8001 --port 8080
    MIXTRAL_TRITON_API_KEY=secret .venv/bin/python client/gateway.py --tokenizer-dir out/hub/tiny-instruct
"""
from mixtral_triton.gateway.cli import main

raise SystemExit(main())
