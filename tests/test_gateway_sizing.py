"""The gateway's sizing rests on a measured cost: mixtral_triton.gateway.sizing's CPU per
relayed token is not below what the benchmark's gateway section measured (the committed
bench/results/latest.json) at the concurrencies a pod at capacity runs, and the capacity it
deploys follows from it."""

from __future__ import annotations

import json
from pathlib import Path

from mixtral_triton.bench.targets import SIZING_MIN_CONCURRENCY
from mixtral_triton.gateway.sizing import (HEADROOM, MIN_PODS, RELAY_CPU_S_PER_1K_TOKENS,
                                           relay_tokens_per_s_per_worker, size_gateway)

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "latest.json"


def test_the_sizing_cost_covers_the_measured_cost():
    gateway = json.loads(RESULTS.read_text())["gateway"]
    cells = gateway["cells"]["1"]
    measured = {(shape, c): cell["gateway_cpu_s_per_1k_tokens_estimate"]["median"]
                for shape in gateway["setup"]["shapes"] for c, cell in cells[shape].items()
                if int(c) >= SIZING_MIN_CONCURRENCY}
    assert {shape for shape, _ in measured} == {"128/128", "128/32"}
    assert RELAY_CPU_S_PER_1K_TOKENS >= max(measured.values()), measured


def test_pods_relay_the_plan_with_headroom():
    per_worker = relay_tokens_per_s_per_worker()
    assert per_worker == 1000 / RELAY_CPU_S_PER_1K_TOKENS
    sizing = size_gateway(30_000, triton_max_replicas=4, workers_per_pod=8)
    assert sizing.tokens_per_s_capacity >= HEADROOM * 30_000 * 4
    assert (sizing.pods - 1) * 8 * per_worker < HEADROOM * 30_000 * 4  # no pod more than needed
    assert size_gateway(10, triton_max_replicas=1).pods == MIN_PODS
