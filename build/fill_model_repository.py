#!/usr/bin/env python3
"""Fill the Triton model repository for a target from model_repository/ (see --help).

    python3 build/fill_model_repository.py --target gpu --out /srv/repo \
        --tokenizer-dir /models/Mixtral-8x22B-v0.1 --engine-dir /engines/tp8
    .venv/bin/python build/fill_model_repository.py --target cpu --out out/repo \
        --tokenizer-dir out/hub/tiny --checkpoint-dir out/ckpt
"""
from mixtral_triton.repository.cli import main

raise SystemExit(main())
