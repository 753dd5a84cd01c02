#!/usr/bin/env python3
"""The benchmark: serving on CPU (engine, ensemble gRPC/HTTP, gateway), perf_analyzer, the
converter, the GPU section on paper -> bench/results/latest.json, BENCHMARKS.md, bench/plots/.

    .venv/bin/python scripts/bench/run.py [--quick] [--only serving|converter|perf_analyzer]

The logic lives in src/mixtral_triton/bench/ (see its cli.py for every option).
"""
from mixtral_triton.bench.cli import main

raise SystemExit(main())
