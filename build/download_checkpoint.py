#!/usr/bin/env python3
"""Download the Mixtral checkpoint (safetensors, configs, tokenizer; resumable), or check a
local checkpoint folder, and print the checked folder (see --help).

    .venv/bin/python build/download_checkpoint.py --local-dir out/hub/Mixtral-8x22B-v0.1
    .venv/bin/python build/download_checkpoint.py /data/Mixtral-8x22B-v0.1
"""
from mixtral_triton.download import main

raise SystemExit(main())
