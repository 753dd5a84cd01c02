#!/usr/bin/env python3
"""Start Triton on a filled model repository (CPU here, or --target gpu in the NGC image).

    .venv/bin/python scripts/launch_triton.py --model-repository out/model_repository
    python3 scripts/launch_triton.py --target gpu --world-size 4 --model-repository /models --dry-run
    python3 scripts/launch_triton.py --target gpu --mode leader --world-size 4 --model-repository /models
"""
from mixtral_triton.launcher.cli import main

raise SystemExit(main())
