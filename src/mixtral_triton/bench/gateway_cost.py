"""The gateway section: what relaying tokens over HTTP costs the gateway, per worker count.

Triton with the paced stand-in engine (mixtral_triton.standin: a GPU's decode step time,
batching up to the highest concurrency), and client/gateway.py in front of it with --workers
W, started as users start it. At each shape and concurrency, in rounds, a closed loop of the
seed's /predict requests (stream true, ignore_eos and min_tokens, so every request streams
exactly its output length) and the CPU seconds the gateway's processes (supervisor and
workers) spent per 1,000 relayed tokens, read from /proc. The report turns that into the
tok/s one gateway core relays and the cores and processes a replica's plan throughput needs,
and lists the capacity each Kubernetes overlay deploys (mixtral_triton.gateway.sizing, as the
code says when the report is written: arithmetic, not a measurement).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from mixtral_triton.bench.closed_loop import Served, run_part
from mixtral_triton.bench.path_sweep import describe_fixture
from mixtral_triton.bench.request_clients import GatewayPredict
from mixtral_triton.bench.scale import MAX_INPUT_LEN, MAX_SEQ_LEN, plan_throughput
from mixtral_triton.bench.statistics import cell_summary
from mixtral_triton.bench.uncertainty import median_interval
from mixtral_triton.bench.workload import Shape, make_prompts, seed_predict_body
from mixtral_triton.local_stack import GatewayProcess, LocalStack

OVERLAY_GPUS = ("A100-80GB", "H100-80GB", "H200-141GB")


@dataclass
class GatewayPlan:
    gpu: str = "H100-80GB"  # the stand-in keeps this GPU's decode step time...
    tp: int = 4
    pace_scale: float = 1.0  # ... times this
    engine_max_batch_size: int = 256
    shapes: tuple[Shape, ...] = (Shape(128, 128), Shape(128, 32))
    concurrencies: tuple[int, ...] = (1, 16, 64, 128, 256)
    workers: tuple[int, ...] = (1, 2)
    rounds: int = 3
    requests_per_worker: int = 1  # per round
    min_requests: int = 4
    prompt_pool: int = 16
    # The request path alone (parse, validate, open the gRPC stream, answer): one token per
    # request, many requests, so that their CPU is well above /proc's 10 ms resolution.
    request_path_shape: Shape = Shape(128, 1)
    request_path_concurrency: int = 64
    request_path_requests: int = 1024

    @classmethod
    def quick(cls) -> "GatewayPlan":
        return cls(shapes=(Shape(128, 128),), concurrencies=(1, 128), workers=(1,), rounds=2,
                   request_path_requests=256)

    def count(self, concurrency: int) -> int:
        return max(self.min_requests, self.requests_per_worker * concurrency)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shapes"] = [s.label for s in self.shapes]
        d["request_path_shape"] = self.request_path_shape.label
        return d


def run_gateway(work: Path, plan: GatewayPlan, log=print) -> dict:
    from transformers import AutoTokenizer

    from mixtral_triton.standin import Pacing

    local = LocalStack(work, standin=Pacing(plan.gpu, plan.tp, plan.pace_scale),
                       max_batch_size=plan.engine_max_batch_size, max_input_len=MAX_INPUT_LEN,
                       max_seq_len=MAX_SEQ_LEN, log=lambda *_: None)
    tokenizer = AutoTokenizer.from_pretrained(str(local.checkpoint), local_files_only=True)
    out: dict = {"setup": {**plan.to_dict(), "model": describe_fixture(local.checkpoint) + " tokenizer and "
                           "vocabulary; the engine is the paced stand-in",
                           "request": "POST /predict {prompt, stream: true, max_tokens, min_tokens = max_tokens, "
                                      "ignore_eos: true}"},
                 "plan": plan_throughput(plan.gpu), "cells": {}}
    top = max(plan.concurrencies)
    with local:
        for workers in plan.workers:
            log_file = work / f"gateway-w{workers}.log"
            with GatewayProcess(local.triton.grpc_url, log_file, workers=workers, max_concurrency=top,
                                log_level="warning") as gateway:
                cells = out["cells"].setdefault(str(workers), {})
                measured = [(shape, c, plan.count(c)) for shape in plan.shapes for c in plan.concurrencies]
                measured.append((plan.request_path_shape, plan.request_path_concurrency, plan.request_path_requests))
                for shape, concurrency, count in measured:
                    prompts = make_prompts(tokenizer, shape.input_tokens, plan.prompt_pool, seed=shape.input_tokens)
                    summary = _cell(plan, local, gateway, prompts, shape, concurrency, count)
                    cells.setdefault(shape.label, {})[str(concurrency)] = summary
                    cost = summary["gateway_cpu_s_per_1k_tokens_estimate"]
                    log(f"  gateway w={workers} {shape.label} c={concurrency:<3} "
                        f"{summary['output_tokens_per_s'] or 0:8.1f} tok/s  gateway "
                        f"{cost['median'] if cost else float('nan'):.3f} CPU-s/1k tok  "
                        f"failed {summary['failed']}/{summary['requests']}")
    return out


def _cell(plan: GatewayPlan, local: LocalStack, gateway: GatewayProcess, prompts, shape: Shape, concurrency: int,
          count: int) -> dict:
    parts = [asyncio.run(run_part(GatewayPredict(gateway.url, body=seed_predict_body), prompts, shape, concurrency,
                                  count, Served(local.triton.process.pid, gateway.pid), index))
             for index in range(plan.rounds)]
    summary = cell_summary(parts, "gateway_predict", shape, concurrency)
    summary.pop("raw", None)
    cost = median_interval([r["gateway_cpu_s_per_1k_tokens"] for r in summary["rounds"]])
    summary["gateway_cpu_s_per_1k_tokens_estimate"] = cost.to_dict() if cost else None
    return summary


def overlay_capacity() -> dict:
    """What each GPU's overlay deploys (the sizing deploy/k8s is rendered with), against the
    plan's throughput of every replica the HPA may run."""
    from mixtral_triton.gateway.sizing import (HEADROOM, RELAY_CPU_S_PER_1K_TOKENS, plan_tokens_per_s_replica,
                                               size_gateway)
    from mixtral_triton.overlay import base_settings

    replicas = base_settings()["triton_max_replicas"]
    out = {"relay_cpu_s_per_1k_tokens": RELAY_CPU_S_PER_1K_TOKENS, "headroom_target": HEADROOM,
           "triton_max_replicas": replicas, "gpus": {}}
    for gpu in OVERLAY_GPUS:
        replica = plan_tokens_per_s_replica(gpu, 4, "128/128")
        sizing = size_gateway(replica, replicas)
        out["gpus"][gpu] = {"tokens_per_s_replica": replica, "pods": sizing.pods,
                            "workers_per_pod": sizing.workers_per_pod,
                            "tokens_per_s_capacity": sizing.tokens_per_s_capacity, "headroom": sizing.headroom}
    return out


def cores_for_plan(cost_s_per_1k: float, tokens_per_s: float) -> tuple[float, int]:
    """Cores (and whole worker processes) that relay `tokens_per_s` at this CPU cost per token."""
    cores = cost_s_per_1k * tokens_per_s / 1000
    return cores, math.ceil(cores)
