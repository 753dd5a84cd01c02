#!/usr/bin/env python3
"""The benchmark: serving on CPU (engine, ensemble gRPC/HTTP, gateway), perf_analyzer, the
converter, the pipeline at scale in front of a stand-in engine (and beside tensorrtllm_backend's
ensemble with --anchor PATH), the GPU section on paper -> bench/results/latest.json,
BENCHMARKS.md, bench/plots/. Measures a commit: a dirty tree is refused unless --allow-dirty.

    .venv/bin/python scripts/bench/run.py [--quick] [--only serving|converter|perf_analyzer|scale] [--anchor PATH]

The logic lives in src/mixtral_triton/bench/ (see its cli.py for every option).
"""
from mixtral_triton.bench.cli import main

raise SystemExit(main())
