#!/usr/bin/env python3
"""Build the TensorRT engines from a converted checkpoint with trtllm-build (see --help).

    python3 build/build_engine.py --checkpoint-dir /ckpt/tp4 --output-dir /engines/tp4 --gpu H100-80GB
    .venv/bin/python build/build_engine.py --checkpoint-dir out/ckpt --output-dir out/engines \
        --gpu H100-80GB --dry-run
"""
from mixtral_triton.trtllm_build import engine_main

raise SystemExit(engine_main())
