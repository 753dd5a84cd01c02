"""Build the Mixtral TensorRT engines with `trtllm-build`, sized by the capacity plan.

Flag names and values are TensorRT-LLM 1.2.1's (tensorrt_llm/commands/build.py and
tensorrt_llm/plugin/plugin.py). `--kv_cache_type paged` rather than `--paged_kv_cache
enable`, which 1.2.1 still accepts but marks deprecated.

The input is a TensorRT-LLM checkpoint (config.json and one rank{r}.safetensors per rank);
the output folder gets config.json, one rank{r}.engine per rank, trtllm-build's output
(BUILD_LOG) and BUILD_RECORD: the command, the versions, the plan, the model's shape and the
GPU memory the build reported (each rank engine's size, and the activation and weight memory
where trtllm-build or TensorRT logged them), so an engine folder says how it was made and
`plan_capacity.py --from-build-record` can plan again from measured figures.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from mixtral_triton.capacity import (DEFAULT_MAX_INPUT_LEN, DEFAULT_MAX_OUTPUT_LEN, GPU_MEMORY_BYTES, MIXTRAL_8X22B,
                                     SEED_WORKLOAD, BuildMeasurement, CapacityPlan, ModelShape,
                                     Workload, memory_table_markdown, plan_capacity)
from mixtral_triton.errors import UserError, one_line_errors

TRTLLM_BUILD = "trtllm-build"
BUILD_RECORD = "mixtral_triton_build.json"
BUILD_LOG = "trtllm-build.log"
# What a build logs about one rank engine's GPU memory: TensorRT-LLM's own summary lines
# ("Activation memory size: 2062.03 MiB", "Weights memory size: ... MiB") and TensorRT's
# builder statistics ("Total Activation Memory: N bytes", "Total Weights Memory: N bytes").
# Which of them 1.2.1's trtllm-build prints at its default log level has not been seen here
# (no GPU); whichever appears is used, the largest over the ranks.
_MEMORY_LINES = {
    "activation_bytes": (re.compile(r"Activation memory size: ([\d.]+) MiB"),
                         re.compile(r"Total Activation Memory: (\d+) bytes")),
    "weight_bytes": (re.compile(r"Weights memory size: ([\d.]+) MiB"),
                     re.compile(r"Total Weights Memory: (\d+) bytes")),
}


@dataclass(frozen=True)
class EngineBuild:
    checkpoint_dir: Path
    output_dir: Path
    plan: CapacityPlan
    command: list[str]
    model: ModelShape


def read_checkpoint(checkpoint_dir: Path) -> tuple[dict, ModelShape]:
    """The mapping and shape of a TensorRT-LLM checkpoint; UserError if it cannot be built here."""
    try:
        config = json.loads((checkpoint_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--checkpoint-dir {checkpoint_dir} has no readable config.json "
                        f"(convert the hub checkpoint first): {exc}") from None
    if config.get("dtype") != "float16":
        raise UserError(f"--checkpoint-dir holds a {config.get('dtype')} checkpoint; "
                        "the engine is built fp16: convert with dtype float16")
    mapping = config.get("mapping", {})
    tp, world = mapping.get("tp_size", 1), mapping.get("world_size", 1)
    if mapping.get("pp_size", 1) != 1 or world != tp:
        raise UserError(f"--checkpoint-dir is split tp {tp}, pp {mapping.get('pp_size', 1)}; "
                        "only tensor-parallel checkpoints (pp 1) are built here")
    missing = [f"rank{r}.safetensors" for r in range(world)
               if not (checkpoint_dir / f"rank{r}.safetensors").is_file()]
    if missing:
        raise UserError(f"--checkpoint-dir {checkpoint_dir} lacks {', '.join(missing)}")
    return mapping, ModelShape.from_config(config)


def engine_command(checkpoint_dir: Path, output_dir: Path, plan: CapacityPlan, workers: int = 1,
                   executable: str = TRTLLM_BUILD) -> list[str]:
    return [
        executable,
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(output_dir),
        "--gemm_plugin", "float16",
        "--gpt_attention_plugin", "float16",
        "--moe_plugin", "float16",
        "--kv_cache_type", "paged",
        "--tokens_per_block", str(plan.tokens_per_block),
        "--remove_input_padding", "enable",
        "--context_fmha", "enable",
        # Lets the runtime reuse KV blocks across requests and chunk long prompts.
        "--use_paged_context_fmha", "enable",
        "--max_batch_size", str(plan.max_batch_size),
        "--max_input_len", str(plan.max_input_len),
        "--max_seq_len", str(plan.max_seq_len),
        "--max_num_tokens", str(plan.max_num_tokens),
        "--max_beam_width", "1",
        "--workers", str(workers),
    ]


def prepare_build(checkpoint_dir: Path, output_dir: Path, gpu: str, max_input_len: int | None = None,
                  max_output_len: int | None = None, workers: int = 1,
                  workload: Workload | None = None) -> EngineBuild:
    """Check the checkpoint, plan for its split on `gpu`, and assemble the command. Lengths not
    given default to what the checkpoint's positions allow (capacity.engine_lengths)."""
    checkpoint_dir, output_dir = Path(checkpoint_dir).resolve(), Path(output_dir).resolve()
    mapping, shape = read_checkpoint(checkpoint_dir)
    tp = mapping.get("tp_size", 1)
    plan = plan_capacity(gpu, gpus=tp, tp=tp, ep=mapping.get("moe_ep_size", 1),
                         max_input_len=max_input_len, max_output_len=max_output_len, model=shape,
                         workload=workload)
    # Each worker holds one rank's weights in host memory while it builds.
    if not 1 <= workers <= tp:
        raise UserError(f"--workers must be between 1 and {tp} (the checkpoint's ranks), got {workers}")
    return EngineBuild(checkpoint_dir, output_dir, plan,
                       engine_command(checkpoint_dir, output_dir, plan, workers), shape)


def run_build(build: EngineBuild) -> Path:
    """Run trtllm-build, check its output and write BUILD_RECORD; returns the engine folder."""
    if shutil.which(TRTLLM_BUILD) is None:
        raise UserError(f"{TRTLLM_BUILD} not found: build inside the NGC image "
                        "tritonserver:26.07-trtllm-python-py3, or use --dry-run to print the command")
    out = build.output_dir
    if out.exists() and any(out.iterdir()):
        # Engines of an earlier build with more ranks would otherwise sit beside the new ones.
        raise UserError(f"--output-dir {out} is not empty; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    returncode = _run_with_progress(build.command, out, build.plan.tp)
    if returncode:
        raise UserError(f"{TRTLLM_BUILD} failed with exit code {returncode} (its output is above, "
                        f"and in {out / BUILD_LOG})")
    expected = ["config.json"] + [f"rank{r}.engine" for r in range(build.plan.tp)]
    missing = [name for name in expected if not (out / name).is_file() or not (out / name).stat().st_size]
    if missing:
        raise UserError(f"{TRTLLM_BUILD} exited 0 but {out} lacks {', '.join(missing)}")
    record = {
        "command": build.command,
        "versions": {name: _version(name) for name in ("tensorrt_llm", "tensorrt", "mixtral-triton")},
        "plan": build.plan.to_dict(),
        "model": asdict(build.model),
        "memory": {"reported": reported_memory((out / BUILD_LOG).read_text(errors="replace")),
                   "rank_engine_bytes": [(out / f"rank{r}.engine").stat().st_size for r in range(build.plan.tp)]},
        "checkpoint_dir": str(build.checkpoint_dir),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (out / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out


def reported_memory(log: str) -> dict[str, int | None]:
    """The activation and weight memory of the largest rank engine, in bytes, as the build's
    output reports them; None for a figure it does not report."""
    found: dict[str, int | None] = {}
    for name, (mib, byte_count) in _MEMORY_LINES.items():
        values = [round(float(v) * 2**20) for v in mib.findall(log)] + [int(v) for v in byte_count.findall(log)]
        found[name] = max(values) if values else None
    return found


def _run_with_progress(command: list[str], out: Path, ranks: int) -> int:
    """Run trtllm-build with a bar over the rank engines it has written (each rank{r}.engine
    appears when that rank is built), so the time left is estimated from the ranks done. Its
    output goes to this process's stdout and to BUILD_LOG, where the memory it reports is read."""
    import threading

    from mixtral_triton.progress import Progress

    with open(out / BUILD_LOG, "w", encoding="utf-8") as log, \
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace") as child, \
            Progress(total=ranks, desc="building engines", unit=" rank", unit_scale=False) as bar:
        def copy_output() -> None:
            for line in child.stdout:
                sys.stdout.write(line)
                log.write(line)

        copier = threading.Thread(target=copy_output, daemon=True)
        copier.start()
        while child.poll() is None:
            time.sleep(1.0)
            bar.update(len(list(out.glob("rank*.engine"))) - bar.n)
        copier.join()
        bar.update(len(list(out.glob("rank*.engine"))) - bar.n)
    return child.returncode


def read_build_record(path: Path) -> dict:
    """An engine folder's BUILD_RECORD (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / BUILD_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--from-build-record: cannot read {path}: {exc}") from None
    if not all(key in record for key in ("plan", "model", "memory")):
        raise UserError(f"--from-build-record: {path} has no plan, model or memory (built by an older "
                        "build_engine.py: build again)")
    return record


def plan_from_build_record(record: dict) -> CapacityPlan:
    """The plan again for the engine a build record describes, with the memory its build
    reported instead of the estimates: the weights reported (else the largest rank engine file,
    which holds them), the activations reported (else still the estimate); its max_batch_size at
    most the engine's."""
    built, reported = record["plan"], record["memory"]["reported"]
    measured = BuildMeasurement(
        weight_bytes=reported.get("weight_bytes") or max(record["memory"]["rank_engine_bytes"]),
        activation_bytes=reported.get("activation_bytes"))
    return plan_capacity(built["gpu"], built["gpus"], built["max_input_len"], built["max_output_len"],
                         tp=built["tp"], ep=built["ep"], model=ModelShape(**record["model"]),
                         workload=Workload.parse(built["workload"]), measured=measured,
                         engine_max_batch_size=built["max_batch_size"])


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through one_line_errors, not usage + message
        raise UserError(message)


def _add_limits(p: argparse.ArgumentParser, gpu_required: bool = True) -> None:
    p.add_argument("--gpu", required=gpu_required, choices=list(GPU_MEMORY_BYTES), help="GPU type")
    p.add_argument("--max-input-len", type=int, default=None,
                   help=f"the engine's longest prompt in tokens (default {DEFAULT_MAX_INPUT_LEN}, less "
                   "where the model has too few positions)")
    p.add_argument("--max-output-len", type=int, default=None,
                   help=f"the engine's most generated tokens per request (default {DEFAULT_MAX_OUTPUT_LEN}, "
                   "less where the model has too few positions)")
    p.add_argument("--workload", type=Workload.parse, default=None,
                   help=f"the request shape INPUT/OUTPUT tokens max_batch_size is sized for (default "
                   f"{SEED_WORKLOAD}, or the engine's full length where that is shorter); longer requests, "
                   "up to the engine's limits, are still served, fewer at once")


def plan_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="plan_capacity.py",
                description="Plan GPU memory for the fp16 model: weights and KV cache per GPU, "
                "and the engine limits that fit, max_batch_size sized for a workload. Refuses plans "
                "that cannot fit, with the numbers. --table: the plan for every GPU and request shape.")
    _add_limits(p, gpu_required=False)  # --table without --gpu: every planned GPU
    p.add_argument("--gpus", type=int, default=4, help="GPU count, one rank each (default 4)")
    p.add_argument("--tp", type=int, default=None, help="tensor parallelism (default: --gpus)")
    p.add_argument("--ep", type=int, default=1, help="expert parallelism within tp (default 1)")
    p.add_argument("--model-config", type=Path, default=None,
                   help="config.json (or its folder) of the model; default Mixtral-8x22B-v0.1's")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    output.add_argument("--table", action="store_true",
                        help="print the workload plan (markdown) for every planned GPU, or --gpu's, and "
                        "the request shapes 128/128, 512/256, 2048/512 and 4096/1024")
    output.add_argument("--memory-table", action="store_true",
                        help="print (markdown) where each GPU's memory goes, GPU by GPU, for every planned GPU "
                        "type, or --gpu's, the engine sized for --workload")
    p.add_argument("--from-build-record", type=Path, metavar="ENGINE_DIR",
                   help=f"plan again for a built engine from its {BUILD_RECORD} (the engine folder or the "
                   "file): the same limits, with the GPU memory its build reported instead of the estimates")
    output.add_argument("--render-overlay", type=Path, metavar="DIR",
                        help="write DIR/kustomization.yaml: the Kubernetes overlay for --gpu, every limit "
                        "(engine, gateway, HPA) from this plan")
    return p


@one_line_errors
def plan_main(argv: list[str] | None = None) -> int:
    args = plan_parser().parse_args(argv)
    model = ModelShape.from_file(args.model_config) if args.model_config else MIXTRAL_8X22B
    if args.table:
        from mixtral_triton.roofline import PLAN_GPUS, workload_plan, workload_plan_markdown

        gpus = (args.gpu,) if args.gpu else PLAN_GPUS
        print(workload_plan_markdown(workload_plan(gpus, sized_for=args.workload, gpu_count=args.gpus,
                                                   model=model)))
        return 0
    if args.memory_table:
        from mixtral_triton.roofline import PLAN_GPUS

        print(memory_table_markdown([plan_capacity(gpu, args.gpus, args.max_input_len, args.max_output_len,
                                                   tp=args.tp, ep=args.ep, model=model, workload=args.workload)
                                     for gpu in ((args.gpu,) if args.gpu else PLAN_GPUS)]))
        return 0
    if args.from_build_record:
        plan = plan_from_build_record(read_build_record(args.from_build_record))
    elif args.gpu is None:
        raise UserError(f"--gpu is required (one of {', '.join(GPU_MEMORY_BYTES)}) unless --table, "
                        "--memory-table or --from-build-record is given")
    else:
        plan = plan_capacity(args.gpu, args.gpus, args.max_input_len, args.max_output_len,
                             tp=args.tp, ep=args.ep, model=model, workload=args.workload)
    if args.render_overlay:
        from mixtral_triton.overlay import write_overlay

        print(write_overlay(args.render_overlay, plan))
        return 0
    print(plan.to_json() if args.json else plan.table())
    return 0


def engine_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="build_engine.py",
                description="Build the TensorRT engines from a converted TensorRT-LLM checkpoint with "
                f"{TRTLLM_BUILD}, sized by the capacity plan for the checkpoint's tp/ep on --gpu.")
    p.add_argument("--checkpoint-dir", type=Path, required=True, help="converted TensorRT-LLM checkpoint")
    p.add_argument("--output-dir", type=Path, required=True, help="new or empty folder for the engines")
    _add_limits(p)
    p.add_argument("--workers", type=int, default=1,
                   help="ranks built in parallel, one GPU and one rank's weights in host memory each "
                   "(default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the command; build nothing")
    return p


@one_line_errors
def engine_main(argv: list[str] | None = None) -> int:
    args = engine_parser().parse_args(argv)
    build = prepare_build(args.checkpoint_dir, args.output_dir, args.gpu, args.max_input_len,
                          args.max_output_len, args.workers, args.workload)
    print(build.plan.table(), file=sys.stderr)
    if args.dry_run:
        print(shlex.join(build.command))
        return 0
    print(run_build(build))
    return 0
