"""The benchmark behind `scripts/bench/run.py`: serving on CPU (engine alone, ensemble over
gRPC and HTTP, the gateway's /predict) in one Triton server, perf_analyzer beside it, the
converter against a plain copy, and the GPU section on paper.

machine.py: what ran it; workload.py: prompts of exact token lengths; serving.py: the load
generator and its statistics; perf_analyzer.py: the same setting through perf_analyzer;
converter.py: conversion throughput and peak memory; gpu.py: the decode roofline;
report.py: bench/results/latest.json -> BENCHMARKS.md and the plots; cli.py: the command.
"""
