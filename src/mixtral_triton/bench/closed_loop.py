"""The load generator: C workers, each sending its next request when the previous one ends
(a closed loop), worker w starting w x stagger late so that requests join a running batch
one by one, as in steady traffic, rather than in one burst. What the served processes
spent meanwhile (CPU seconds, peak memory) is read from /proc around the run."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

from mixtral_triton.bench.process_stats import PeakMemory, group_cpu_seconds, process_tree_cpu_seconds
from mixtral_triton.bench.request_clients import Record
from mixtral_triton.bench.workload import Prompt, Shape


@dataclass(frozen=True)
class Served:
    """The processes whose cost a measurement reads: the server's process group (Triton and
    its model stubs) and, when the path goes through it, the gateway's process (with its
    worker processes)."""

    server_pgid: int
    gateway_pid: int | None = None
    sample_memory: bool = False


@dataclass
class Measurement:
    """One closed-loop batch of requests on one path (a cell is one or more of them)."""

    records: list[Record]
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float
    gateway_cpu_s: float | None
    load_1m: float
    peak_memory_bytes: int | None = None  # server group + gateway, sampled during the run
    window_s: float = 0.0  # the steady part: every worker has started and none has finished
    window_tokens: int = 0

    def steady(self) -> None:
        """The window from the last worker's first send to the first worker's last token,
        and the tokens that arrived in it: throughput without ramp-up and ramp-down."""
        by_worker: dict[int, list[Record]] = {}
        for r in self.records:
            by_worker.setdefault(r.worker, []).append(r)
        try:
            start = max(min(r.sent for r in rs) for rs in by_worker.values())
            end = min(max(r.token_times[-1] for r in rs if r.token_times) for rs in by_worker.values())
        except ValueError:
            return
        if end > start:
            self.window_s = end - start
            self.window_tokens = sum(1 for r in self.records for t in r.token_times if start <= t <= end)

    @property
    def steady_tokens_per_s(self) -> float | None:
        return self.window_tokens / self.window_s if self.window_s > 0 and self.window_tokens else None


async def measure(path, prompts: list[Prompt], shape: Shape, concurrency: int, count: int, served: Served,
                  first_prompt: int = 0, stagger_s: float = 0.0) -> Measurement:
    """`count` requests from `concurrency` workers on `path` (a request client)."""
    records: list[Record] = []
    per_worker = [count // concurrency + (1 if w < count % concurrency else 0) for w in range(concurrency)]

    async def worker(w: int) -> None:
        if w and stagger_s:
            await asyncio.sleep(w * stagger_s)
        for j in range(per_worker[w]):
            record = await path.request(prompts[(first_prompt + w + j * concurrency) % len(prompts)], shape)
            record.worker = w
            records.append(record)

    gateway = (served.gateway_pid,) if served.gateway_pid else ()
    memory = PeakMemory((served.server_pgid,), gateway) if served.sample_memory else None
    server0 = group_cpu_seconds(served.server_pgid)
    gateway0 = process_tree_cpu_seconds(served.gateway_pid) if served.gateway_pid else None
    cpu0, t0 = time.process_time(), time.perf_counter()
    if memory is not None:
        with memory:
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
    else:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    gateway1 = process_tree_cpu_seconds(served.gateway_pid) if served.gateway_pid else None
    for r in records:  # times relative to this part's start
        r.token_times = [t - t0 for t in r.token_times]
        r.sent -= t0
    measurement = Measurement(
        records, wall, time.process_time() - cpu0, group_cpu_seconds(served.server_pgid) - server0,
        (gateway1 - gateway0) if gateway0 is not None and gateway1 is not None else None,
        os.getloadavg()[0], memory.peak if memory is not None else None)
    measurement.steady()
    return measurement


async def run_part(path, prompts: list[Prompt], shape: Shape, concurrency: int, count: int, served: Served,
                   first_prompt: int = 0, stagger_s: float = 0.0) -> Measurement:
    """Open the client, warm its connection with one short request, measure, close."""
    await path.open()
    try:
        await path.request(prompts[0], Shape(shape.input_tokens, 4))
        return await measure(path, prompts, shape, concurrency, count, served, first_prompt, stagger_s)
    finally:
        await path.close()
