#!/usr/bin/env python3
"""Send one prompt to Mixtral on Triton and print the completion as it arrives (see --help).

    .venv/bin/python client/predict.py "What is mistral wind?" --max-tokens 256
    .venv/bin/python client/predict.py "What is mistral wind?" --url localhost:8001 --temperature 0.2 --no-stream

Ctrl-C cancels the request on the server (the engine stops generating) and exits with 130.
"""
from mixtral_triton.client.cli import main

raise SystemExit(main())
