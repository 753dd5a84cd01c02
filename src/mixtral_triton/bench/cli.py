"""`scripts/bench/run.py`: measure, write bench/results/latest.json, regenerate BENCHMARKS.md
and bench/plots/*.png.

    .venv/bin/python scripts/bench/run.py                 # everything
    .venv/bin/python scripts/bench/run.py --quick         # fewer cells, fewer rounds
    .venv/bin/python scripts/bench/run.py --only serving  # or converter, perf_analyzer, scale, gateway, guided (repeatable)
    .venv/bin/python scripts/bench/run.py --only scale --anchor PATH  # with tensorrtllm_backend's ensemble
    .venv/bin/python scripts/bench/run.py --report-only   # re-render from latest.json

A run measures a commit: a tree that differs from it (the benchmark's own outputs aside) is
refused unless --allow-dirty, and then every figure of the sections it measured is marked.
With --only, the other sections of latest.json are kept as they were (each section records
when, on which commit and how it was measured), so the report always covers every section.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from mixtral_triton.errors import UserError, one_line_errors

ROOT = Path(__file__).resolve().parents[3]
SECTIONS = ("serving", "perf_analyzer", "converter", "scale", "gateway", "guided")
# What a run rewrites: not part of what it measures, so not a reason to call the tree dirty.
OUTPUTS = ("BENCHMARKS.md", "bench/results", "bench/plots")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/bench/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=SECTIONS,
                   help="measure only this section (repeatable); the others are kept from latest.json")
    p.add_argument("--quick", action="store_true",
                   help="one shape (128/128), concurrency 1 and 8, fewer requests, one conversion")
    p.add_argument("--report-only", action="store_true", help="measure nothing: re-render the report")
    p.add_argument("--allow-dirty", action="store_true",
                   help="measure a tree that differs from its commit (every figure it measures is marked so)")
    p.add_argument("--anchor", type=Path, metavar="PATH",
                   help="scale: a checkout (or git directory) of triton-inference-server/tensorrtllm_backend; "
                        "its v0.19.0 ensemble is rebuilt in the work dir and measured beside ours "
                        "(skipped without it)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    p.add_argument("--work-dir", type=Path, default=ROOT / "bench" / ".work",
                   help="fixtures, converted checkpoints, repositories and logs (kept between runs, git-ignored)")
    p.add_argument("--report", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--plots", type=Path, default=ROOT / "bench" / "plots")
    return p


def _load(path: Path) -> dict:
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            pass
    return {}


def _plans(quick: bool):
    from mixtral_triton.bench.gateway_cost import GatewayPlan
    from mixtral_triton.bench.path_sweep import ServingPlan
    from mixtral_triton.bench.scale import ScalePlan
    from mixtral_triton.bench.workload import Shape

    if quick:
        return (ServingPlan(shapes=[Shape(128, 128)], concurrencies=[1, 8], rounds=3, min_requests=2,
                            prompt_pool=8, perf_analyzer_concurrencies=(1,), in_process_batches=(1, 8)),
                (1,), ScalePlan.quick(), GatewayPlan.quick())
    return (ServingPlan(shapes=[Shape(128, 128), Shape(32, 256)], concurrencies=[1, 2, 4, 8, 16]), (1, 2),
            ScalePlan(), GatewayPlan())


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from mixtral_triton.bench import machine, report
    from mixtral_triton.bench.targets import targets

    results = _load(args.results)
    if not args.report_only:
        wanted = set(args.only or SECTIONS)
        machine_info = machine.describe(ROOT, OUTPUTS)
        if machine_info["git_commit"] is None:
            raise UserError(f"{ROOT} is not a git checkout: a benchmark measures a commit")
        if machine_info["git_dirty"] and not args.allow_dirty:
            paths = machine_info["git_dirty_paths"]
            raise UserError(f"the tree differs from commit {machine_info['git_commit'][:12]} in {len(paths)} path(s) "
                            f"({', '.join(paths[:5])}{', ...' if len(paths) > 5 else ''}): commit first, or pass "
                            "--allow-dirty to mark every figure of this run as measured on a dirty tree")
        results["schema"] = 1
        results["machine"] = machine_info
        results.setdefault("runs", {})
        serving_plan, converter_workers, scale_plan, gateway_plan = _plans(args.quick)
        args.work_dir.mkdir(parents=True, exist_ok=True)
        print(f"benchmark: {', '.join(s for s in SECTIONS if s in wanted)}{' (quick)' if args.quick else ''}; "
              f"{machine_info['cores']} cores, load average {machine_info['load_average_at_start']}", flush=True)

        def stamp(name: str, started: float) -> None:
            results["runs"][name] = {"date_utc": machine_info["date_utc"], "quick": args.quick,
                                     "duration_s": time.monotonic() - started, "machine": machine_info,
                                     "load_average_at_end": machine.load_average()}

        if "serving" in wanted or "perf_analyzer" in wanted:
            from mixtral_triton.bench.path_sweep import plan_dict, run_serving

            serving_plan.run_paths = "serving" in wanted
            serving_plan.perf_analyzer = "perf_analyzer" in wanted
            started = time.monotonic()
            print("serving" + (" + perf_analyzer" if serving_plan.perf_analyzer else ""), flush=True)
            section = run_serving(args.work_dir / "serving", serving_plan, log=_log)
            pa = section.pop("perf_analyzer", None)
            if serving_plan.run_paths:
                section["plan"] = plan_dict(serving_plan)
                results["serving"] = section
                stamp("serving", started)
            if pa is not None:
                results["perf_analyzer"] = pa
                stamp("perf_analyzer", started)
        if "converter" in wanted:
            from mixtral_triton.bench.converter import run_converter

            started = time.monotonic()
            print("converter", flush=True)
            results["converter"] = run_converter(args.work_dir / "converter", workers=converter_workers, log=_log)
            stamp("converter", started)
        if "scale" in wanted:
            from mixtral_triton.bench.scale import run_scale

            started = time.monotonic()
            print("scale", flush=True)
            results["scale"] = run_scale(args.work_dir / "scale", scale_plan, args.anchor, log=_log)
            stamp("scale", started)
        if "gateway" in wanted:
            from mixtral_triton.bench.gateway_cost import run_gateway

            started = time.monotonic()
            print("gateway", flush=True)
            results["gateway"] = run_gateway(args.work_dir / "gateway", gateway_plan, log=_log)
            stamp("gateway", started)
        if "guided" in wanted:
            from mixtral_triton.bench.guided_cost import measure
            from mixtral_triton.local_stack import LocalStack

            started = time.monotonic()
            print("guided", flush=True)
            stack = LocalStack(args.work_dir / "guided", log=_log)
            stack.repository  # the tiny checkpoint and its conversion
            results["guided"] = measure(stack.trtllm_checkpoint, stack.checkpoint)
            stamp("guided", started)
        from mixtral_triton.bench.gpu import gpu_section

        results["gpu"] = gpu_section()
        results["targets"] = targets(results)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.results.with_name(f".{args.results.name}.tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, args.results)
        print(f"wrote {args.results}", flush=True)
    elif not results:
        raise UserError(f"{args.results} does not exist: run without --report-only first")
    # The GPU host's acceptance run (scripts/gpu_acceptance.py) writes its own file beside it.
    acceptance = args.results.with_name("gpu-acceptance.json")
    if acceptance.is_file():
        results = {**results, "gpu_acceptance": json.loads(acceptance.read_text(encoding="utf-8"))}
    for path in report.write_report(results, ROOT, args.plots, args.report):
        print(f"wrote {path}", flush=True)
    for row in targets(results):
        print(f"  [{row['verdict']:>12}] {row['target']}: {row['measured']}", flush=True)
    return 0


def _log(message: str) -> None:
    print(message, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
