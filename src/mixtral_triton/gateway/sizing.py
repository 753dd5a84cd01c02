"""How many gateway processes a deployment needs: every token a Triton replica makes for an
HTTP client passes through one gateway worker, which spends CPU on each; so the gateway pods
x their workers must relay the replicas' plan throughput, with headroom.

RELAY_CPU_S_PER_1K_TOKENS is the measured cost, rounded up: BENCHMARKS.md's gateway section
(`scripts/bench/run.py --only gateway`) measures one worker's CPU seconds per 1,000 relayed
tokens at the seed's 128/128 and at 128/32, c = 1 to 256, and tests/test_gateway_sizing.py
checks that this figure is not below the highest of its measured medians at c >= 64: a pod at
capacity runs its --max-concurrency streams, about 70 per worker on every overlay. (A worker
at low load spends more per token, each token waking it on its own, but then it has its core
to spare.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RELAY_CPU_S_PER_1K_TOKENS = 0.3
HEADROOM = 1.2  # gateway capacity over the Triton replicas' plan throughput
WORKERS_PER_POD = 8  # one core each; a pod of 8 cores schedules on any GPU node's spare CPUs
MIN_PODS = 2  # one may be drained or rescheduled (the PodDisruptionBudget keeps one)


def relay_tokens_per_s_per_worker(cpu_s_per_1k_tokens: float = RELAY_CPU_S_PER_1K_TOKENS) -> float:
    """The tok/s one worker process relays with its core busy."""
    return 1000.0 / cpu_s_per_1k_tokens


@dataclass(frozen=True)
class GatewaySizing:
    pods: int
    workers_per_pod: int
    tokens_per_s_needed: float  # HEADROOM x the plan's tok/s of every replica the HPA may run
    tokens_per_s_capacity: float  # pods x workers x one worker's tok/s

    @property
    def headroom(self) -> float:
        return self.tokens_per_s_capacity / (self.tokens_per_s_needed / HEADROOM)


def size_gateway(tokens_per_s_replica: float, triton_max_replicas: int,
                 workers_per_pod: int = WORKERS_PER_POD) -> GatewaySizing:
    needed = HEADROOM * tokens_per_s_replica * triton_max_replicas
    per_pod = workers_per_pod * relay_tokens_per_s_per_worker()
    pods = max(MIN_PODS, math.ceil(needed / per_pod))
    return GatewaySizing(pods, workers_per_pod, needed, pods * per_pod)


def plan_tokens_per_s_replica(gpu: str, gpus: int, workload: str) -> float:
    """The capacity plan's decode tok/s of one replica at `workload` ("128/128";
    mixtral_triton.roofline)."""
    from mixtral_triton.capacity import Workload
    from mixtral_triton.roofline import workload_plan

    shape = Workload.parse(workload)
    (row,) = workload_plan(gpus=(gpu,), workloads=(shape,), sized_for=shape, gpu_count=gpus)
    return row["tokens_per_s_replica"]
