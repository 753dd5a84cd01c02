#!/usr/bin/env python3
"""One command: Hugging Face checkpoint folder -> filled Triton model repository.

    .venv/bin/python build/build_model_repository.py CKPT --work-dir W              # CPU
    python3 build/build_model_repository.py CKPT --work-dir W --target gpu --gpu H100-80GB
"""
from mixtral_triton.pipeline import main

raise SystemExit(main())
