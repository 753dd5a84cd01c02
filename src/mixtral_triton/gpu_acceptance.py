"""`scripts/gpu_acceptance.py`: accept a GPU deployment in one command, on a GPU host inside the
test image (deploy/Dockerfile, target `test`). NOTHING here has run on a GPU: the steps and
commands are tested with --dry-run on CPU (tests/test_gpu_acceptance.py), the results file's
rendering with a results file written for the test.

The steps, each printed with its command before it runs:

 1. the machine: GPUs, driver and the image's MPI (`nvidia-smi`, `ompi_info --version`);
 2. the GPU smoke tests (`pytest -m gpu tests/test_gpu_smoke.py`: TP=1, and TP=2 on 2+ GPUs);
 3. the capacity plan for --gpu x --gpus (build/plan_capacity.py);
 4. the engine: built from --checkpoint-dir with that plan, or taken from --engine-dir;
 5. the plan again from the engine's build record, with the memory trtllm-build reported;
 6. the model repository filled with the measured plan's numbers;
 7. per serving mode (orchestrator, leader, or both): serve it with scripts/launch_triton.py,
    record each GPU's memory per process (nvidia-smi) against the plan, run genai-perf over
    the plan's request shapes and concurrencies, and the seed's own `/predict` client through
    the HTTP gateway; then stop the server with SIGTERM;
 8. the results file (--results), which `scripts/bench/run.py --report-only` renders as
    BENCHMARKS.md's measured GPU section, and the verdicts printed.

Verdicts compare each measurement with the decode roofline (mixtral_triton.roofline), an upper
bound of what the GPUs can do: throughput is accepted at ACCEPT_THROUGHPUT_SHARE of the bound
or more, latencies at ACCEPT_LATENCY_FACTOR times the bound or less. Those bars are this
project's choice, not a law; each cell is one genai-perf run (its request count is printed),
so a verdict near a bar is as sure as one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mixtral_triton.bench.uncertainty import MET, MISSED
from mixtral_triton.capacity import (GPU_MEMORY_BYTES, HEADROOM_BYTES, PLAN_WORKLOADS, CapacityPlan, Workload,
                                     kv_admitted_requests, mean_decode_context, plan_capacity)
from mixtral_triton.errors import OneLineArgumentParser, UserError, one_line_errors
from mixtral_triton.roofline import decode_step_seconds, step_bounds
from mixtral_triton.trtllm_build import BUILD_RECORD, plan_from_build_record, read_build_record

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable  # in the image: its python3, which has TensorRT-LLM and this project
ACCEPT_THROUGHPUT_SHARE = 0.5
ACCEPT_LATENCY_FACTOR = 2.0
MODES = ("orchestrator", "leader")
SEED_PROMPT = "What is mistral wind?"


@dataclass
class Options:
    gpu: str
    gpus: int
    max_input_len: int
    max_output_len: int
    workload: Workload
    tokenizer_dir: Path
    work_dir: Path
    checkpoint_dir: Path | None
    engine_dir: Path | None
    modes: tuple[str, ...]
    shapes: tuple[Workload, ...]
    smoke: bool
    genai_perf: str
    results: Path
    exit_timeout_s: int
    load_timeout_s: int
    dry_run: bool


class Steps:
    """Prints every step and command; runs them unless this is a dry run."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.number = 0

    def step(self, title: str) -> None:
        self.number += 1
        print(f"\n== step {self.number}: {title}", flush=True)

    def show(self, command: list[str], env: dict[str, str] | None = None) -> None:
        prefix = [f"{k}={v}" for k, v in (env or {}).items()]
        print("+ " + shlex.join(prefix + command), flush=True)

    def run(self, command: list[str], check: bool = True, capture: bool = False) -> subprocess.CompletedProcess | None:
        self.show(command)
        if self.dry_run:
            return None
        result = subprocess.run(command, cwd=ROOT, text=True, capture_output=capture)
        if check and result.returncode:
            raise UserError(f"step {self.number} failed (exit {result.returncode}): {shlex.join(command)}")
        return result


# ------------------------------------------------------------------------- commands

def concurrencies(plan: CapacityPlan, shape: Workload) -> list[int]:
    """One user; the engine's batch for this shape (what its KV cache admits, at most
    max_batch_size), where the roofline's throughput is reached; and a point between."""
    batch = min(kv_admitted_requests(plan.kv_cache_tokens, shape.input_tokens, shape.output_tokens),
                plan.max_batch_size)
    middle = max(1, round((batch) ** 0.5))
    return sorted({1, middle, batch})


def genai_perf_command(genai_perf: str, shape: Workload, concurrency: int, tokenizer_dir: Path,
                       artifact_dir: Path, grpc_url: str = "localhost:8001") -> list[str]:
    """genai-perf on the ensemble over gRPC, streaming, every request exactly this shape."""
    return [genai_perf, "profile", "-m", "ensemble", "--endpoint-type", "kserve", "--backend", "tensorrtllm",
            "--streaming", "-u", grpc_url, "--tokenizer", str(tokenizer_dir),
            "--synthetic-input-tokens-mean", str(shape.input_tokens), "--synthetic-input-tokens-stddev", "0",
            "--output-tokens-mean", str(shape.output_tokens), "--output-tokens-stddev", "0",
            "--output-tokens-mean-deterministic", "--concurrency", str(concurrency),
            "--request-count", str(max(4 * concurrency, 16)), "--warmup-request-count", str(concurrency),
            "--artifact-dir", str(artifact_dir)]


def launch_command(mode: str, plan: CapacityPlan, repo: Path, exit_timeout_s: int) -> list[str]:
    return [PY, "scripts/launch_triton.py", "--target", "gpu", "--mode", mode, "--world-size", str(plan.gpus),
            "--model-repository", str(repo), "--exit-timeout-secs", str(exit_timeout_s)]


def fill_command(plan: CapacityPlan, repo: Path, tokenizer_dir: Path, engine_dir: Path) -> list[str]:
    return [PY, "build/fill_model_repository.py", "--target", "gpu", "--out", str(repo),
            "--tokenizer-dir", str(tokenizer_dir), "--engine-dir", str(engine_dir),
            "--triton-max-batch-size", str(plan.max_batch_size), "--max-input-len", str(plan.max_input_len),
            "--max-seq-len", str(plan.max_seq_len),
            "--kv-cache-free-gpu-mem-fraction", str(plan.kv_cache_free_gpu_mem_fraction),
            "--cancellation-check-period-ms", str(plan.cancellation_check_period_ms),
            "--gpu-device-ids", ",".join(str(i) for i in range(plan.gpus))]


# ------------------------------------------------------------------------- measurements

def genai_perf_summary(artifact_dir: Path) -> dict:
    """The figures of genai-perf's profile_export_genai_perf.json, times in ms."""
    path = next(Path(artifact_dir).rglob("profile_export_genai_perf.json"), None)
    if path is None:
        raise UserError(f"genai-perf wrote no profile_export_genai_perf.json under {artifact_dir}")
    summary = json.loads(path.read_text())
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}

    def ms(name: str, stat: str) -> float:
        figure = summary[name]
        return figure[stat] * scale[figure.get("unit", "ms")]

    return {"requests": int(summary["request_count"]["avg"]),
            "output_tokens_per_s": summary["output_token_throughput"]["avg"],
            "ttft_ms_p50": ms("time_to_first_token", "p50"), "ttft_ms_p99": ms("time_to_first_token", "p99"),
            "itl_ms_p50": ms("inter_token_latency", "p50"), "itl_ms_p99": ms("inter_token_latency", "p99")}


def roofline_cell(plan: CapacityPlan, shape: Workload, concurrency: int) -> dict:
    """The roofline's figures for `concurrency` users of `shape` on this plan's engine."""
    batch = min(concurrency, kv_admitted_requests(plan.kv_cache_tokens, shape.input_tokens, shape.output_tokens),
                plan.max_batch_size)
    step_s = decode_step_seconds(plan.gpu, batch, mean_decode_context(shape), plan.tp)
    # A prompt as one step of input_tokens tokens attending, on average, over half of it.
    prefill = step_bounds(plan.gpu, shape.input_tokens, shape.input_tokens // 2, plan.tp)
    return {"batch": batch, "itl_ms": step_s * 1e3, "tokens_per_s_per_user": 1 / step_s,
            "tokens_per_s_replica": batch / step_s,
            "ttft_ms": 1e3 * (max(prefill["memory_s"], prefill["compute_s"]) + step_s)}


def verdicts(measured: dict, bound: dict, concurrency: int) -> dict:
    """met / MISSED against the bars above; TTFT only for one user (above one it includes queueing)."""
    per_user = 1e3 / measured["itl_ms_p50"]
    out = {"tokens_per_s_replica": measured["output_tokens_per_s"] >= ACCEPT_THROUGHPUT_SHARE * bound["tokens_per_s_replica"],
           "tokens_per_s_per_user": per_user >= ACCEPT_THROUGHPUT_SHARE * bound["tokens_per_s_per_user"],
           "itl_ms_p50": measured["itl_ms_p50"] <= ACCEPT_LATENCY_FACTOR * bound["itl_ms"]}
    if concurrency == 1:
        out["ttft_ms_p50"] = measured["ttft_ms_p50"] <= ACCEPT_LATENCY_FACTOR * bound["ttft_ms"]
    return {name: MET if ok else MISSED for name, ok in out.items()}


def gpu_memory_by_process() -> dict:
    """Per GPU: total and used MiB, and the MiB each compute process holds there (nvidia-smi)."""
    def query(kind: str, fields: str) -> list[list[str]]:
        out = subprocess.run(["nvidia-smi", f"--query-{kind}={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout
        return [[part.strip() for part in line.split(",")] for line in out.splitlines() if line.strip()]

    gpus = {uuid: {"index": int(index), "total_mib": int(total), "used_mib": int(used), "processes": {}}
            for index, uuid, total, used in query("gpu", "index,uuid,memory.total,memory.used")}
    for pid, uuid, used in query("compute-apps", "pid,gpu_uuid,used_memory"):
        gpus[uuid]["processes"][int(pid)] = int(used)
    return {g["index"]: g for g in gpus.values()}


def memory_against_plan(plan: CapacityPlan, gpus: dict, server_pid: int | None) -> list[dict]:
    """Each planned GPU: what nvidia-smi shows, the headroom left (accepted at HEADROOM_BYTES or
    more) and, on GPU 0, the server process's own share (planned: its context reserve)."""
    rows = []
    for row in plan.memory_per_gpu():
        seen = gpus[row["gpu_index"]]
        headroom = (seen["total_mib"] - seen["used_mib"]) * 2**20
        server = seen["processes"].get(server_pid, 0) * 2**20 if server_pid else 0
        rows.append({"gpu_index": row["gpu_index"], "used_bytes": seen["used_mib"] * 2**20,
                     "planned_used_bytes": row["gpu_memory"] - row["headroom"], "headroom_bytes": headroom,
                     "planned_headroom_bytes": row["headroom"], "server_process_bytes": server,
                     "planned_server_bytes": row["server_context"],
                     "verdict": MET if headroom >= HEADROOM_BYTES and server <= row["server_context"] else MISSED})
    return rows


def predict_through_gateway(url: str, max_tokens: int = 128) -> dict:
    """The seed's client, as its users run it (README), against the gateway."""
    import requests

    started = time.monotonic()
    first = None
    text = ""
    with requests.post(f"{url}/predict", json={"prompt": SEED_PROMPT, "stream": True, "max_tokens": max_tokens},
                       stream=True, timeout=600) as res:
        res.raise_for_status()
        for content in res.iter_content(chunk_size=None, decode_unicode=True):
            first = first or time.monotonic()
            text += content
    return {"status": MET if text.strip() else MISSED, "characters": len(text), "text_start": text[:80],
            "first_chunk_ms": None if first is None else 1e3 * (first - started),
            "total_ms": 1e3 * (time.monotonic() - started)}


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _wait_ready(process: subprocess.Popen, url: str, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not _ready(url):
        if process.poll() is not None:
            raise UserError(f"{what} exited with {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise UserError(f"{what} was not ready after {timeout_s:.0f} s")
        time.sleep(2)


def _stop(process: subprocess.Popen, timeout_s: float) -> int:
    """SIGTERM first (the server drains), then the whole group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    return process.wait()


# ------------------------------------------------------------------------- the run

def serve_and_measure(o: Options, steps: Steps, plan: CapacityPlan, repo: Path, mode: str) -> dict | None:
    steps.step(f"serve in {mode} mode, then measure: memory per GPU, genai-perf, /predict through the gateway")
    command = launch_command(mode, plan, repo, o.exit_timeout_s)
    gateway = [PY, "client/gateway.py", "--triton-grpc-url", "localhost:8001", "--port", "8080",
               "--tokenizer-dir", str(o.tokenizer_dir), "--max-concurrency", str(plan.max_batch_size)]
    cells_commands = [(shape, c, genai_perf_command(o.genai_perf, shape, c, o.tokenizer_dir,
                                                    o.work_dir / "genai-perf" / mode / f"in{shape.input_tokens}-out{shape.output_tokens}" / f"c{c}"))
                      for shape in o.shapes for c in concurrencies(plan, shape)]
    if o.dry_run:
        steps.show(command)
        from mixtral_triton.launcher.gpu import server_invocation
        from mixtral_triton.launcher.ports import Ports

        start, env, server = server_invocation(mode, "auto", repo, plan.gpus, Ports(), exit_timeout_s=o.exit_timeout_s)
        print(f"  which starts ({start}):")
        print(shlex.join([f"{k}={v}" for k, v in env.items()] + server), flush=True)
        steps.show(["curl", "-sf", "localhost:8000/v2/health/ready"])
        steps.show(["nvidia-smi", "--query-gpu=index,uuid,memory.total,memory.used", "--format=csv,noheader,nounits"])
        steps.show(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits"])
        for _, _, genai in cells_commands:
            steps.show(genai)
        steps.show(gateway)
        steps.show(["POST", "localhost:8080/predict", json.dumps({"prompt": SEED_PROMPT, "stream": True,
                                                                   "max_tokens": 128})])
        steps.show(["kill", "-TERM", "<server>"])
        return None

    steps.show(command)
    server = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    try:
        _wait_ready(server, "http://localhost:8000/v2/health/ready", o.load_timeout_s, "tritonserver")
        cells = []
        for shape, concurrency, genai in cells_commands:
            artifacts = Path(genai[genai.index("--artifact-dir") + 1])
            shutil.rmtree(artifacts, ignore_errors=True)
            steps.run(genai)
            measured, bound = genai_perf_summary(artifacts), roofline_cell(plan, shape, concurrency)
            cells.append({"workload": str(shape), "concurrency": concurrency, "measured": measured,
                          "roofline": bound, "verdicts": verdicts(measured, bound, concurrency)})
        # Measured once the engine has served full batches: the server's own context exists by now.
        steps.show(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits"])
        memory = memory_against_plan(plan, gpu_memory_by_process(), _server_pid(server.pid, mode))
        steps.show(gateway)
        gateway_process = subprocess.Popen(gateway, cwd=ROOT, start_new_session=True)
        try:
            _wait_ready(gateway_process, "http://localhost:8080/ready", 120, "the gateway")
            predict = predict_through_gateway("http://localhost:8080")
        finally:
            _stop(gateway_process, 30)
    finally:
        steps.show(["kill", "-TERM", str(server.pid)])
        code = _stop(server, o.exit_timeout_s + 60)
    return {"cells": cells, "memory": memory, "predict": predict, "server_exit_code": code}


def _server_pid(launcher_pid: int, mode: str) -> int | None:
    """The serving tritonserver: the launcher itself where it exec'd the server, else the rank
    below mpirun that serves."""
    from mixtral_triton.launcher.gpu import serving_rank

    argv0 = Path(f"/proc/{launcher_pid}/cmdline").read_bytes().split(b"\0")[0]
    return launcher_pid if argv0.endswith(b"tritonserver") else serving_rank(launcher_pid)


def run(o: Options) -> dict | None:
    steps = Steps(o.dry_run)
    results: dict = {"schema": 1, "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "gpu": o.gpu, "gpus": o.gpus, "modes": {}}

    steps.step("the machine: GPUs, driver, the image's MPI")
    for command in (["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader"],
                    ["ompi_info", "--version"], ["git", "rev-parse", "HEAD"]):
        done = steps.run(command, check=False, capture=True)
        if done is not None:
            results.setdefault("machine", {})[command[0]] = done.stdout.strip() or done.stderr.strip()

    steps.step("GPU smoke tests: a real engine of the tiny model, TP=1 and, on 2+ GPUs, TP=2")
    if o.smoke:
        done = steps.run([PY, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu", "-v", "tests/test_gpu_smoke.py"],
                         check=False)
        if done is not None:
            results["smoke_tests"] = MET if done.returncode == 0 else f"{MISSED} (pytest exit {done.returncode})"
    else:
        print("skipped (--skip-smoke)")

    steps.step("the capacity plan")
    workload_args = ["--workload", str(o.workload)]
    steps.show([PY, "build/plan_capacity.py", "--gpu", o.gpu, "--gpus", str(o.gpus), "--max-input-len",
                str(o.max_input_len), "--max-output-len", str(o.max_output_len), *workload_args, "--json"])
    plan = plan_capacity(o.gpu, o.gpus, o.max_input_len, o.max_output_len, workload=o.workload)
    results["plan_estimated"] = plan.to_dict()

    engine_dir = o.engine_dir or o.work_dir / "engine"
    if o.engine_dir:
        steps.step(f"the engine: taken from {o.engine_dir}")
        if not o.dry_run and not (o.engine_dir / BUILD_RECORD).is_file():
            raise UserError(f"--engine-dir {o.engine_dir} has no {BUILD_RECORD}: build it with build/build_engine.py")
    else:
        steps.step("the engine: trtllm-build with the plan")
        steps.run([PY, "build/build_engine.py", "--checkpoint-dir", str(o.checkpoint_dir), "--output-dir",
                   str(engine_dir), "--gpu", o.gpu, "--max-input-len", str(o.max_input_len),
                   "--max-output-len", str(o.max_output_len), *workload_args, "--workers", "1"])

    steps.step("the plan again, from the memory the build reported")
    steps.show([PY, "build/plan_capacity.py", "--from-build-record", str(engine_dir), "--json"])
    if not o.dry_run:
        plan = plan_from_build_record(read_build_record(engine_dir))
        results["plan_measured"] = plan.to_dict()

    steps.step("fill the model repository with that plan's numbers")
    repo = o.work_dir / "model-repository"
    steps.run(fill_command(plan, repo, o.tokenizer_dir, engine_dir))

    for mode in o.modes:
        measured = serve_and_measure(o, steps, plan, repo, mode)
        if measured is not None:
            results["modes"][mode] = measured

    steps.step(f"write the results: {o.results}")
    steps.show([PY, "scripts/bench/run.py", "--report-only"])
    if o.dry_run:
        return None
    o.results.parent.mkdir(parents=True, exist_ok=True)
    o.results.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(summary_text(results))
    return results


def summary_text(results: dict) -> str:
    lines = []
    for mode, measured in results["modes"].items():
        for cell in measured["cells"]:
            m, b, v = cell["measured"], cell["roofline"], cell["verdicts"]
            lines.append(f"{mode} {cell['workload']} c={cell['concurrency']}: {m['output_tokens_per_s']:,.0f} tok/s "
                         f"(roofline {b['tokens_per_s_replica']:,.0f}, {v['tokens_per_s_replica']}), ITL p50 "
                         f"{m['itl_ms_p50']:.1f} ms (roofline {b['itl_ms']:.1f}, {v['itl_ms_p50']})")
        lines += [f"{mode} GPU {r['gpu_index']}: headroom {r['headroom_bytes'] / 2**30:.2f} GiB, server "
                  f"{r['server_process_bytes'] / 2**30:.2f} GiB: {r['verdict']}" for r in measured["memory"]]
        lines.append(f"{mode} /predict through the gateway: {measured['predict']['status']}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="gpu_acceptance.py",
        description="Accept a GPU deployment in one command (inside the test image on the GPU host): smoke "
        "tests, engine, plan measured, serve, genai-perf against the roofline, /predict through the gateway; "
        "writes a results file BENCHMARKS.md renders. --dry-run prints every step and command.")
    p.add_argument("--gpu", required=True, choices=list(GPU_MEMORY_BYTES))
    p.add_argument("--gpus", type=int, default=4, help="GPUs of the engine (its tensor parallel size; default 4)")
    p.add_argument("--max-input-len", type=int, default=4096)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--workload", type=Workload.parse, default=Workload(128, 128),
                   help="the shape max_batch_size is sized for (default 128/128)")
    p.add_argument("--tokenizer-dir", type=Path, required=True, help="the hub checkpoint folder (tokenizer)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint-dir", type=Path, help="converted TensorRT-LLM checkpoint: build the engine")
    source.add_argument("--engine-dir", type=Path, help="an engine built by build/build_engine.py: take it")
    p.add_argument("--work-dir", type=Path, default=Path("/data/acceptance"),
                   help="engine (when built), model repository and genai-perf artifacts (default /data/acceptance)")
    p.add_argument("--mode", choices=[*MODES, "both"], default="both",
                   help="the serving mode(s) measured (default both, one after the other)")
    p.add_argument("--shapes", default=",".join(map(str, PLAN_WORKLOADS)),
                   help="request shapes IN/OUT, comma separated (default the plan's four)")
    p.add_argument("--skip-smoke", action="store_true", help="do not run the GPU smoke tests")
    p.add_argument("--genai-perf", default="genai-perf",
                   help="genai-perf to run (scripts/tools-venv.sh genai-perf makes .venv-genai-perf/bin/genai-perf)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "gpu-acceptance.json")
    p.add_argument("--exit-timeout-secs", type=int, default=120)
    p.add_argument("--load-timeout-s", type=int, default=2700, help="how long the engine may load (default 45 min)")
    p.add_argument("--dry-run", action="store_true", help="print every step and command; run none")
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {a.gpus}")
    options = Options(
        gpu=a.gpu, gpus=a.gpus, max_input_len=a.max_input_len, max_output_len=a.max_output_len, workload=a.workload,
        tokenizer_dir=a.tokenizer_dir.resolve(), work_dir=a.work_dir.resolve(),
        checkpoint_dir=a.checkpoint_dir.resolve() if a.checkpoint_dir else None,
        engine_dir=a.engine_dir.resolve() if a.engine_dir else None,
        modes=MODES if a.mode == "both" else (a.mode,),
        shapes=tuple(Workload.parse(s) for s in a.shapes.split(",")), smoke=not a.skip_smoke,
        genai_perf=a.genai_perf, results=a.results.resolve(), exit_timeout_s=a.exit_timeout_secs,
        load_timeout_s=a.load_timeout_s, dry_run=a.dry_run)
    run(options)
    return 0
