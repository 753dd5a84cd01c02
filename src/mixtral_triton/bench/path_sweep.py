"""The serving section: one Triton server (the tiny fixture, the reference engine), four ways
in (mixtral_triton.bench.request_clients), a closed-loop concurrency sweep.

A cell is (path, shape, C), measured in `rounds` rounds; within a round the paths run one
after the other, in A B C D order in even rounds and D C B A in odd ones, so that this
machine's load drifts fall on every path alike and a ratio between two paths can be taken
round by round (paired). Output length is forced with min_tokens = max_tokens (end token
banned until then) on the three Triton paths; /predict has no min_tokens, so its prompts
are checked first to run greedily to max_tokens without the end token, and every path
reuses those prompts. Every request's token count is checked afterwards.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from pathlib import Path

from mixtral_triton.bench.closed_loop import Measurement, Served, run_part
from mixtral_triton.bench.in_process import in_process_engine
from mixtral_triton.bench.request_clients import (PATHS, EngineGrpc, EnsembleGrpc, EnsembleHttp, GatewayPredict,
                                                  Record)
from mixtral_triton.bench.server_supervisor import SupervisedStack
from mixtral_triton.bench.statistics import cell_summary
from mixtral_triton.bench.workload import EngineRequests, Prompt, Shape, make_prompts
from mixtral_triton.local_stack import GatewayOptions, LocalStack

ENGINE_MAX_BATCH_SIZE, MAX_INPUT_LEN, MAX_SEQ_LEN = 8, 1024, 2048
GATEWAY_MAX_CONCURRENCY = 256  # above every cell's concurrency: the gateway never refuses one


@dataclass
class ServingPlan:
    shapes: list[Shape]
    concurrencies: list[int]
    rounds: int = 4  # each cell this many times, the paths interleaved within a round
    requests_per_worker: int = 2  # per round: every worker sends at least this many
    min_requests: int = 3  # per round: at least this many requests (c=1 too)
    prompt_pool: int = 16
    paths: tuple[str, ...] = PATHS
    run_paths: bool = True  # False: perf_analyzer only (--only perf_analyzer)
    perf_analyzer: bool = True
    perf_analyzer_shape: Shape = Shape(128, 128)
    perf_analyzer_concurrencies: tuple[int, ...] = (1, 8)
    in_process_batches: tuple[int, ...] = (1, 8)

    def count(self, concurrency: int) -> int:
        """Requests per round at this concurrency."""
        return max(self.min_requests, self.requests_per_worker * concurrency)


def plan_dict(plan: ServingPlan) -> dict:
    d = asdict(plan)
    d["shapes"] = [s.label for s in plan.shapes]
    d["perf_analyzer_shape"] = plan.perf_analyzer_shape.label
    return d


def describe_fixture(checkpoint: Path) -> str:
    """The fixture's size, read from its config.json."""
    import json

    c = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    return (f"tiny random-weight Mixtral (hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
            f"{c['num_local_experts']} experts top-{c['num_experts_per_tok']}, vocab {c['vocab_size']})")


def run_serving(work: Path, plan: ServingPlan, log=print) -> dict:
    """Build (or reuse) the tiny CPU repository, start one Triton server (and the gateway),
    run every cell and perf_analyzer against it, stop them. Returns the results section."""
    from transformers import AutoTokenizer

    from mixtral_triton.bench import perf_analyzer as pa

    want_gateway = plan.run_paths and "gateway_predict" in plan.paths
    local = LocalStack(work, max_batch_size=ENGINE_MAX_BATCH_SIZE, max_input_len=MAX_INPUT_LEN,
                       max_seq_len=MAX_SEQ_LEN, log=lambda *_: None,
                       gateway=GatewayOptions(chat=False, max_concurrency=GATEWAY_MAX_CONCURRENCY,
                                              log_level="warning") if want_gateway else None)
    checkpoint = local.checkpoint
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    engine_requests = EngineRequests(checkpoint, MAX_INPUT_LEN, MAX_SEQ_LEN)
    shapes = list(plan.shapes)
    if plan.perf_analyzer and plan.perf_analyzer_shape not in shapes:
        shapes.append(plan.perf_analyzer_shape)
    pools = {shape: make_prompts(tokenizer, shape.input_tokens, plan.prompt_pool, seed=shape.input_tokens)
             for shape in shapes}

    section: dict = {
        "setup": {"model": describe_fixture(checkpoint) + ", TP=4 simulated, CPU reference engine",
                  "engine_max_batch_size": ENGINE_MAX_BATCH_SIZE, "decoding": "greedy (top_k 1), seed 0",
                  "output_length": "min_tokens = max_tokens on (a)-(c); /predict has no min_tokens: greedy "
                                   "(temperature 0) on prompts prescreened to reach max_tokens without the end token",
                  "load": "closed loop: C workers, each sends its next request when the previous one ends, "
                          "worker w starting w x (this path's single-stream request time / C) late so that "
                          "requests join a running batch one by one; one gRPC stream / HTTP request per "
                          "request. Output tok/s over the steady window (from the last worker's first send "
                          "to the first worker's last token)",
                  "requests_per_round": {str(c): plan.count(c) for c in plan.concurrencies},
                  "rounds": plan.rounds,
                  "shapes": [s.label for s in plan.shapes], "concurrencies": plan.concurrencies},
        "paths": {}, "prescreen": {}, "missing": {}, "server_crashes": [], "in_process_engine": {}}

    if plan.run_paths and plan.in_process_batches:
        # before the server starts: nothing else competes for the cores
        for shape in plan.shapes[:1]:
            section["in_process_engine"][shape.label] = in_process_engine(
                local.trtllm_checkpoint, pools[shape], shape, plan.in_process_batches,
                ENGINE_MAX_BATCH_SIZE, plan.rounds, log)

    with SupervisedStack(local, section, log) as stack:
        for shape in shapes:
            kept, screen, seen = asyncio.run(_prescreen(stack.server.grpc_url, pools[shape], shape, log))
            if not stack.check(f"prescreen {shape.label}", seen):
                kept, screen, seen = asyncio.run(_prescreen(stack.server.grpc_url, pools[shape], shape, log))
            section["prescreen"][shape.label] = screen
            if kept:
                pools[shape] = kept
        if plan.run_paths:
            _run_paths(stack, plan, pools, engine_requests, section, log)
        if plan.perf_analyzer:
            section["perf_analyzer"] = pa.run_section(stack, plan, pools, work, log)
    return section


def _run_paths(stack: SupervisedStack, plan: ServingPlan, pools, engine_requests, section: dict, log) -> None:
    makers = {"engine_grpc": lambda: EngineGrpc(stack.server.grpc_url, engine_requests),
              "ensemble_grpc": lambda: EnsembleGrpc(stack.server.grpc_url),
              "ensemble_http": lambda: EnsembleHttp(f"http://{stack.server.http_url}"),
              "gateway_predict": lambda: GatewayPredict(stack.gateway_url)}
    for shape in plan.shapes:
        for concurrency in plan.concurrencies:
            names = [n for n in plan.paths if n != "gateway_predict" or stack.gateway is not None]
            rounds: dict[str, list[Measurement]] = {n: [] for n in names}
            flags: dict[str, dict] = {n: {} for n in names}
            count = plan.count(concurrency)
            for index in range(plan.rounds):
                for name in (names if index % 2 == 0 else names[::-1]):
                    if name == "gateway_predict" and stack.gateway is None:
                        continue
                    cell = f"{name} {shape.label} c={concurrency} round {index + 1}"

                    # stagger the workers over one single-stream request time of this path
                    single = _cell_of(section, name, shape, 1)
                    stagger = (single["e2e_ms"]["p50"] / 1000 / concurrency
                               if single and single["e2e_ms"]["p50"] and concurrency > 1 else 0.0)

                    def run() -> Measurement:
                        served = Served(stack.pgid, stack.gateway_pid if name == "gateway_predict" else None)
                        return asyncio.run(run_part(makers[name](), pools[shape], shape, concurrency, count,
                                                    served, index, stagger))

                    part = run()
                    if not stack.check(cell, part.records):  # died or hung: once more on a new server
                        flags[name].update(rerun_after_crash=True,
                                           failed_before_rerun=sum(r.error is not None for r in part.records))
                        part = run()
                        stack.check(f"{cell} (rerun)", part.records)
                    rounds[name].append(part)
            for name in names:
                if not rounds[name]:
                    continue
                summary = cell_summary(rounds[name], name, shape, concurrency)
                summary.update(flags[name])
                section["paths"].setdefault(name, {}).setdefault(shape.label, {})[str(concurrency)] = summary
                spread = summary["output_tokens_per_s_estimate"] or {}
                log(f"  {shape.label:>7} c={concurrency:<2} {name:<16} "
                    f"{summary['output_tokens_per_s'] or 0:7.1f} tok/s "
                    f"[{spread.get('low') or 0:.1f}, {spread.get('high') or 0:.1f}] n={spread.get('n', 0)}  "
                    f"TTFT p50 {summary['ttft_ms']['p50'] or 0:7.1f} ms  "
                    f"ITL p50 {summary['itl_ms']['p50'] or 0:6.2f} ms  "
                    f"failed {summary['failed']}/{summary['requests']}  load {summary['load_1m']}")


def _cell_of(section: dict, name: str, shape: Shape, concurrency: int) -> dict | None:
    return section["paths"].get(name, {}).get(shape.label, {}).get(str(concurrency))


async def _prescreen(url: str, prompts: list[Prompt], shape: Shape, log) -> tuple[list[Prompt], dict, list[Record]]:
    """Greedy, no min_tokens, through the ensemble: keep the prompts that run to
    max_tokens without the end token (what /predict will do with them). Also warms up."""
    path = EnsembleGrpc(url, force_length=False)
    await path.open()
    try:
        kept, lengths, seen = [], [], []
        for start in range(0, len(prompts), 8):
            batch = prompts[start:start + 8]
            records = await asyncio.gather(*(path.request(p, shape) for p in batch))
            seen.extend(records)
            for prompt, record in zip(batch, records):
                lengths.append(len(record.token_times))
                if record.error is None and len(record.token_times) == shape.output_tokens:
                    kept.append(prompt)
    finally:
        await path.close()
    log(f"  prescreen {shape.label}: {len(kept)}/{len(prompts)} prompts run greedily to "
        f"{shape.output_tokens} tokens without the end token")
    return kept, {"prompts": len(prompts), "kept": len(kept), "lengths": lengths}, seen
