#!/usr/bin/env python3
"""Soak the CPU serving stack: the tiny model on Triton and the gateway (loopback), >= 1000
mixed requests through the gateway and gRPC, some cancelled; prints requests served,
failures and the resident memory of every serving process (see --help).

    .venv/bin/python scripts/soak.py                      # 1000 requests, concurrency 8
    .venv/bin/python scripts/soak.py --requests 5000 --json out/soak.json
"""
from mixtral_triton.soak import main

raise SystemExit(main())
