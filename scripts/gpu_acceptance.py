#!/usr/bin/env python3
"""Accept a GPU deployment in one command, inside the test image on the GPU host (see --help):

    docker run --rm --gpus all --shm-size 16g --network host -v /data:/data mixtral-triton:0.1.0-test \
        python3 scripts/gpu_acceptance.py --gpu H100-80GB --tokenizer-dir /data/hf/Mixtral-8x22B-v0.1 \
        --checkpoint-dir /data/trtllm-checkpoints/Mixtral-8x22B-v0.1-tp4-fp16
    .venv/bin/python scripts/gpu_acceptance.py --gpu H100-80GB --tokenizer-dir X --engine-dir Y --dry-run
"""
from mixtral_triton.gpu_acceptance import main

raise SystemExit(main())
