"""The scale section: the pipeline in front of the stand-in engine (mixtral_triton.standin),
so that what is measured is the text pipeline's own cost, not an engine's arithmetic.

Paced: the stand-in keeps the decode roofline's step time of a GPU (x a scale for this
machine), batching up to the highest concurrency. At each concurrency, in rounds, three
ways in: the stand-in alone over gRPC (what it delivers with nothing in front of it), the
ensemble over gRPC, and the gateway's /predict. Per cell: delivered tok/s against the
stand-in alone, TTFT and ITL percentiles, CPU seconds per 1,000 streamed tokens of Triton
(server and every stub) and of the gateway, and the peak proportional memory of those
processes; the report turns the CPU per token into the cores a replica needs at the
capacity plan's throughput, and the memory into bytes per additional stream.

No-op, beside the anchor: the stand-in with no pacing, behind this project's ensemble (its
postprocessing the C++ detokenizer, mixtral_triton.cpp_detokenizer) and behind
tensorrtllm_backend's own (mixtral_triton.bench.anchor): both servers up at once, measured
in turn round by round with the same requests; every streamed text is checked byte for
byte against what the stand-in's tokens stand for.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mixtral_triton.bench.closed_loop import Measurement, Served, run_part
from mixtral_triton.bench.path_sweep import describe_fixture
from mixtral_triton.bench.request_clients import EngineGrpc, EnsembleGrpc, GatewayPredict, TextEnsembleGrpc
from mixtral_triton.bench.server_supervisor import STARTS, SupervisedStack
from mixtral_triton.bench.statistics import cell_summary
from mixtral_triton.bench.uncertainty import median_interval
from mixtral_triton.bench.workload import EngineRequests, Shape, make_prompts
from mixtral_triton.errors import UserError
from mixtral_triton.local_stack import GatewayOptions, LocalStack

MAX_INPUT_LEN, MAX_SEQ_LEN = 1024, 2048
PACED_PATHS = ("standin_alone", "ensemble_grpc", "gateway_predict")


@dataclass
class ScalePlan:
    gpu: str = "H100-80GB"  # the stand-in keeps this GPU's decode step time...
    tp: int = 4
    pace_scale: float = 10.0  # ... times this (a 2-core machine cannot stream at a real GPU's pace)
    shape: Shape = Shape(128, 32)
    concurrencies: tuple[int, ...] = (1, 16, 64, 256)
    rounds: int = 3
    requests_per_worker: int = 1  # per round
    min_requests: int = 3  # per round, c=1 too
    prompt_pool: int = 16
    anchor_shape: Shape = Shape(32, 256)
    anchor_concurrencies: tuple[int, ...] = (1, 8)
    # paired rounds beside the anchor: at c=8 on 2 shared cores a round's ratio varies by tens
    # of percent, and 5 rounds left the tok/s and TTFT intervals straddling 1.0 (at 644d220)
    anchor_rounds: int = 9
    anchor_requests_per_worker: int = 2
    anchor_prompt_pool: int = 8

    @classmethod
    def quick(cls) -> "ScalePlan":
        return cls(shape=Shape(128, 16), concurrencies=(1, 16), rounds=2, anchor_rounds=3)

    def count(self, concurrency: int) -> int:
        return max(self.min_requests, self.requests_per_worker * concurrency)

    def anchor_count(self, concurrency: int) -> int:
        return max(self.min_requests, self.anchor_requests_per_worker * concurrency)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"], d["anchor_shape"] = self.shape.label, self.anchor_shape.label
        return d


@dataclass
class _Cells:
    """Rounds per (path, concurrency), and the figures derived from them."""

    rounds: dict = field(default_factory=dict)

    def add(self, path: str, concurrency: int, part: Measurement) -> None:
        self.rounds.setdefault(path, {}).setdefault(concurrency, []).append(part)


def run_scale(work: Path, plan: ScalePlan, anchor: Path | None, log=print) -> dict:
    section = {"setup": plan.to_dict(), "plan": plan_throughput(plan.gpu), "missing": {}, "server_crashes": []}
    section["paced"] = _paced(work / "paced", plan, section, log)
    section["anchor"] = (_beside_anchor(work / "noop", anchor, plan, section, log) if anchor is not None
                         else {"skipped": "no --anchor PATH given (a tensorrtllm_backend checkout or git directory)"})
    return section


def plan_throughput(gpu: str) -> dict:
    """The capacity plan's decode tok/s per replica at the seed's workload on `gpu`."""
    from mixtral_triton.capacity import SEED_WORKLOAD
    from mixtral_triton.roofline import workload_plan

    row = next(r for r in workload_plan(gpus=(gpu,)) if r["workload"] == str(SEED_WORKLOAD))
    return {"gpu": gpu, "workload": str(SEED_WORKLOAD), "batch": row["batch"],
            "tokens_per_s_replica": row["tokens_per_s_replica"], "source": "mixtral_triton.roofline.workload_plan"}


def _paced(work: Path, plan: ScalePlan, section: dict, log) -> dict:
    from transformers import AutoTokenizer

    from mixtral_triton.standin import Pacing

    pacing = Pacing(plan.gpu, plan.tp, plan.pace_scale)
    top = max(plan.concurrencies)
    local = LocalStack(work, standin=pacing, max_batch_size=top, max_input_len=MAX_INPUT_LEN, max_seq_len=MAX_SEQ_LEN,
                       gateway=GatewayOptions(chat=False, max_concurrency=top, log_level="warning"),
                       log=lambda *_: None)
    tokenizer = AutoTokenizer.from_pretrained(str(local.checkpoint), local_files_only=True)
    prompts = make_prompts(tokenizer, plan.shape.input_tokens, plan.prompt_pool, seed=plan.shape.input_tokens)
    engine_requests = EngineRequests(local.checkpoint, MAX_INPUT_LEN, MAX_SEQ_LEN)
    context = plan.shape.input_tokens + plan.shape.output_tokens // 2
    out: dict = {"setup": {"model": describe_fixture(local.checkpoint) + " tokenizer and vocabulary; the engine is "
                                    "the paced stand-in", "pacing": asdict(pacing), "engine_max_batch_size": top,
                           "paced_tokens_per_s": {str(c): c / pacing.step_seconds([context] * c)
                                                  for c in plan.concurrencies},
                           "paced_context_tokens": context, "model_instances": _instances(local.repository)},
           "standin_alone": {}, "paths": {}}
    cells = _Cells()
    stack = SupervisedStack(local, section, log)
    try:
        stack.start()
    except UserError as exc:  # recorded: the report says the paced cells were not measured, and why
        lines = str(exc).splitlines()
        out["error"] = f"{lines[0]} ... {' '.join(lines[-2:])} ({STARTS} tries, engine max batch {top})"
        log(f"  !! paced stand-in: {out['error']}")
        return out
    with stack:
        makers = {"standin_alone": lambda: EngineGrpc(stack.server.grpc_url, engine_requests),
                  "ensemble_grpc": lambda: EnsembleGrpc(stack.server.grpc_url),
                  "gateway_predict": lambda: GatewayPredict(stack.gateway_url)}
        single: dict[str, float] = {}
        for concurrency in plan.concurrencies:
            names = [n for n in PACED_PATHS if n != "gateway_predict" or stack.gateway is not None]
            for index in range(plan.rounds):
                for name in (names if index % 2 == 0 else names[::-1]):
                    cell = f"scale {name} c={concurrency} round {index + 1}"
                    stagger = single.get(name, 0.0) / concurrency if concurrency > 1 else 0.0

                    def run() -> Measurement:
                        served = Served(stack.pgid, stack.gateway_pid if name == "gateway_predict" else None,
                                        sample_memory=True)
                        return asyncio.run(run_part(makers[name](), prompts, plan.shape, concurrency,
                                                    plan.count(concurrency), served, index, stagger))

                    part = run()
                    if not stack.check(cell, part.records):
                        part = run()
                        stack.check(f"{cell} (rerun)", part.records)
                    cells.add(name, concurrency, part)
            for name in names:
                summary = cell_summary(cells.rounds[name][concurrency], name, plan.shape, concurrency)
                if concurrency == 1:
                    single[name] = (summary["e2e_ms"]["p50"] or 0.0) / 1000
                target = out["standin_alone"] if name == "standin_alone" else out["paths"].setdefault(name, {})
                target[str(concurrency)] = summary
                spread = summary["output_tokens_per_s_estimate"] or {}
                log(f"  scale c={concurrency:<3} {name:<15} {summary['output_tokens_per_s'] or 0:8.1f} tok/s "
                    f"[{spread.get('low') or 0:.1f}, {spread.get('high') or 0:.1f}]  "
                    f"TTFT p50 {summary['ttft_ms']['p50'] or 0:7.1f} ms  failed {summary['failed']}/{summary['requests']}")
    out["memory_per_stream"] = _memory_per_stream(cells, plan.concurrencies)
    return out


def _instances(repository: Path) -> dict[str, int]:
    """Instances of each model of a filled repository (each Python instance is a process)."""
    from mixtral_triton.repository import load_config

    counts = {}
    for config in sorted(repository.glob("*/config.pbtxt")):
        model = load_config(config)
        if model.instance_group:
            counts[model.name] = sum(group.count for group in model.instance_group)
    return counts


def _memory_per_stream(cells: _Cells, concurrencies) -> dict:
    """(peak at the highest concurrency - peak at the lowest) / the streams between, round by
    round (the rounds of both ends run in the same order), for each path through Triton."""
    low, high = min(concurrencies), max(concurrencies)
    out = {}
    for path in ("ensemble_grpc", "gateway_predict"):
        by_c = cells.rounds.get(path) or {}
        if low == high or low not in by_c or high not in by_c:
            continue
        per_stream = [(b.peak_memory_bytes - a.peak_memory_bytes) / (high - low)
                      for a, b in zip(by_c[low], by_c[high])
                      if a.peak_memory_bytes is not None and b.peak_memory_bytes is not None]
        estimate = median_interval(per_stream)
        out[path] = {"from_concurrency": low, "to_concurrency": high, "per_round_bytes": per_stream,
                     "estimate": estimate.to_dict() if estimate else None}
    return out


def _beside_anchor(work: Path, anchor: Path, plan: ScalePlan, section: dict, log) -> dict:
    from mixtral_triton.bench.anchor import build_anchor_repository
    from mixtral_triton.launcher import TritonServer
    from mixtral_triton.repository import load_config
    from mixtral_triton.standin import Pacing, TableModel
    from mixtral_triton.text.detokenizer import load_token_table
    from transformers import AutoTokenizer

    top = max(plan.anchor_concurrencies)
    local = LocalStack(work, standin=Pacing(plan.gpu, plan.tp, 0.0), max_batch_size=top,
                       max_input_len=MAX_INPUT_LEN, max_seq_len=MAX_SEQ_LEN, log=lambda *_: None)
    engine = load_config(local.repository / "tensorrt_llm" / "config.pbtxt")
    repository, source = build_anchor_repository(anchor, local.repository, local.checkpoint,
                                                 work / "anchor-repository", engine.max_batch_size)
    table = TableModel.from_folders(local.checkpoint, local.checkpoint, Pacing(plan.gpu, plan.tp, 0.0)).table
    token_bytes = load_token_table(local.checkpoint)
    ids = [table[i % len(table)] for i in range(plan.anchor_shape.output_tokens)]
    expected = b"".join(token_bytes[i] for i in ids).decode("utf-8", "replace").encode("utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(local.checkpoint), local_files_only=True)
    prompts = make_prompts(tokenizer, plan.anchor_shape.input_tokens, plan.anchor_prompt_pool,
                           seed=plan.anchor_shape.input_tokens)
    out: dict = {"setup": {"anchor": source, "shape": plan.anchor_shape.label,
                           "concurrencies": list(plan.anchor_concurrencies), "rounds": plan.anchor_rounds,
                           "requests_per_round": {str(c): plan.anchor_count(c) for c in plan.anchor_concurrencies},
                           "engine": "the no-op stand-in (no pacing), the same folder in both repositories",
                           "request": "text_input, max_tokens, stream: the same for both"},
                 "ours": {}, "anchor": {}}
    cells = _Cells()
    with SupervisedStack(local, section, log) as ours, \
            TritonServer(repository, log_file=work / "anchor-triton.log") as theirs:
        sides = {"ours": (lambda: TextEnsembleGrpc(ours.server.grpc_url, counted=True), lambda: ours.pgid),
                 "anchor": (lambda: TextEnsembleGrpc(theirs.grpc_url, counted=False), lambda: theirs.process.pid)}
        order = list(sides)
        for concurrency in plan.anchor_concurrencies:
            for index in range(plan.anchor_rounds):
                first = index % len(order)  # each side first in turn
                for side in order[first:] + order[:first]:
                    client, pgid = sides[side]
                    part = asyncio.run(run_part(client(), prompts, plan.anchor_shape, concurrency,
                                                plan.anchor_count(concurrency), Served(pgid())))
                    if side == "ours":
                        ours.check(f"noop ours c={concurrency} round {index + 1}", part.records)
                    cells.add(side, concurrency, part)
            for side in sides:
                parts = cells.rounds[side][concurrency]
                summary = cell_summary(parts, side, plan.anchor_shape, concurrency)
                summary.update(_exactness([r for p in parts for r in p.records], expected))
                summary.pop("raw", None)
                out[side][str(concurrency)] = summary
                log(f"  no-op c={concurrency} {side:<6} {summary['output_tokens_per_s'] or 0:8.1f} tok/s  "
                    f"TTFT p50 {summary['ttft_ms']['p50'] or 0:6.1f} ms  "
                    f"Triton CPU {summary['server_cpu_s_per_1k_tokens_estimate']['median'] if summary['server_cpu_s_per_1k_tokens_estimate'] else 0:.2f} s/1k tok  "
                    f"byte-exact {summary['byte_exact_requests']}/{summary['requests']}")
    return out


def _exactness(records, expected: bytes) -> dict:
    answered = [r for r in records if r.error is None]
    wrong = [r for r in answered if r.text != expected]
    return {"byte_exact_requests": len(answered) - len(wrong), "byte_exact": bool(answered) and not wrong,
            "text_errors": len(wrong),
            "text_example": {"expected": expected[:120].decode("utf-8", "replace"),
                             "got": wrong[0].text[:120].decode("utf-8", "replace")} if wrong else None}
