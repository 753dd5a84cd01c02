"""A small soak (issue 7): 60 mixed requests through a gateway process and gRPC at
concurrency 8 on the session's server (mixtral_triton.soak, which scripts/soak.py runs with
1000 and more). No unexpected failure, every cancelled request let go by the engine, and
the resident memory of every serving process bounded.

The memory bound is generous on purpose: 60 requests cannot show a slow leak (the soak
command's figures in docs/reliability.md do), but they do show a gross one, e.g. a KV
cache or a thread kept per request. Legitimate growth after the warm-up comes from the
allocator (a glibc arena per new thread: the detokenizer serves each stream on a thread of
its own) and Python's and torch's caches: a few MiB, well under the bound.
"""

from __future__ import annotations

import pytest

from mixtral_triton.local_stack import GatewayProcess
from mixtral_triton.soak import Runner, plan, serving_processes, soak

REQUESTS, CONCURRENCY, WARMUP = 60, 8, 20
RSS_GROWTH_BOUND_MIB = 64


@pytest.fixture(scope="module")
def gateway_process(triton_server, tmp_path_factory):
    with GatewayProcess(triton_server.grpc_url, tmp_path_factory.mktemp("soak") / "gateway.log",
                        log_level="warning") as g:
        yield g


def test_a_small_soak_has_no_failures_and_no_leak(triton_server, gateway_process):
    processes = serving_processes(triton_server.process.pid, gateway_process.pid)
    assert {"tritonserver", "gateway", "stub:preprocessing_0_0", "stub:postprocessing_0_0",
            "stub:tensorrt_llm_0_0"} <= set(processes), processes
    # seed 2: cancels and refusals on each of the three interfaces
    jobs = plan(REQUESTS, seed=2, chat=False, cancel_every=5, invalid_every=12)
    for kind in ("cancel", "invalid"):
        assert {j.interface for j in jobs if getattr(j, kind)} == {"grpc", "predict", "completions"}
    runner = Runner(triton_server.grpc_url, gateway_process.url, timeout_s=60)
    report = soak(runner, jobs, processes, CONCURRENCY, WARMUP, time_limit_s=120,
                  metrics_url=f"http://{triton_server.host}:{triton_server.ports.metrics}/metrics",
                  log=lambda line: None)
    print("\n" + report.markdown())
    assert report.unexpected == 0, report.failures
    assert report.requests == REQUESTS and report.not_run == 0
    assert report.counts["cancelled"] == sum(j.cancel for j in jobs)
    assert report.counts["refused"] == sum(j.invalid for j in jobs)
    assert report.engine_active_after == 0 and report.gateway_in_flight_after == 0
    for label in processes:
        growth = report.growth_kib(label)
        assert growth is not None, f"{label} is gone"
        assert growth < RSS_GROWTH_BOUND_MIB * 1024, f"{label} grew {growth / 1024:.1f} MiB"
