#!/usr/bin/env python3
"""Plan GPU memory for the fp16 model and the engine limits that fit (see --help).

    .venv/bin/python build/plan_capacity.py --gpu H100-80GB --gpus 4
    .venv/bin/python build/plan_capacity.py --gpu A100-80GB --gpus 4 --max-input-len 8192 --json
"""
from mixtral_triton.trtllm_build import plan_main

raise SystemExit(plan_main())
