"""The benchmark behind `scripts/bench/run.py`: serving on CPU (engine alone, ensemble over
gRPC and HTTP, the gateway's /predict) in one Triton server, perf_analyzer beside it, the
converter against a plain copy, the pipeline in front of a stand-in engine at scale (and
beside tensorrtllm_backend's own ensemble), and the GPU section on paper.

cli.py            the command: sections, provenance (commit, clean or dirty tree), results file
machine.py        what ran it: cores, memory, packages, commit, dirty paths, load
workload.py       prompts of exact token lengths and the requests made of them
request_clients.py  the four ways in (engine gRPC, ensemble gRPC/HTTP, gateway) and a text-keeping one
closed_loop.py    the load generator: C workers, staggered, CPU and memory read around the run
process_stats.py  /proc: CPU seconds and proportional memory of a process group or process
statistics.py     a cell from its rounds: steady tok/s, TTFT/ITL percentiles, CPU per token
uncertainty.py    median and bootstrap interval of rounds, paired/unpaired ratios, verdicts
server_supervisor.py  the section's local stack, restarted (and recorded) when the server dies
path_sweep.py     the serving section: shapes x concurrencies x paths, in interleaved rounds
in_process.py     the reference engine alone in this process (its own scaling with batch)
perf_analyzer.py  the same setting through perf_analyzer
scale.py          the paced and no-op stand-in sections
anchor.py         tensorrtllm_backend's ensemble rebuilt around the stand-in (from --anchor PATH)
converter.py      conversion throughput and peak memory
gpu.py            the decode roofline on paper
targets.py        every target's estimate and verdict, from the results file alone
report.py, plots.py  the results file -> BENCHMARKS.md and bench/plots/*.png
"""
