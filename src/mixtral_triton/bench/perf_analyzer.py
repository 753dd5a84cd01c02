"""perf_analyzer against the ensemble, beside our own figures for the same setting.

Two inputs: the project's `scripts/perf/ensemble_input.json` as it is (whatever prompts and
sampling it holds), and one written here with the benchmark's own setting (the same prompts
of exactly N tokens, greedy, min_tokens = max_tokens), so that its figures sit beside the
ensemble_grpc cell of the same shape and concurrency.

perf_analyzer runs a fixed number of requests (--request-count) per concurrency and
exports every response's timestamp (--profile-export-file); time to first token and
inter-token latency are computed from that export, as genai-perf does. Its own summary
(throughput in requests/s, average request latency) is parsed from its stdout as well.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mixtral_triton.bench.workload import Prompt, Shape

ROOT = Path(__file__).resolve().parents[3]


def environment() -> dict[str, str]:
    """perf_analyzer's environment (mixtral_triton.launcher.perf: libcudart from the wheel)."""
    try:
        from mixtral_triton.launcher.perf import perf_analyzer_environment
    except ImportError:  # an older tree without the helper: the server's own library path
        from mixtral_triton.launcher.cpu import library_path

        return {**os.environ, "LD_LIBRARY_PATH": library_path()}
    return perf_analyzer_environment()


def binary() -> str | None:
    candidate = Path(sys.executable).parent / "perf_analyzer"
    return str(candidate) if candidate.exists() else shutil.which("perf_analyzer")


def missing_libraries() -> list[str]:
    try:
        from mixtral_triton.launcher.perf import missing_libraries as missing
    except ImportError:
        return []
    return missing(Path(binary()), environment()) if binary() else []


def write_input(path: Path, prompts: list[Prompt], shape: Shape) -> Path:
    data = [{"text_input": [p.text], "max_tokens": [shape.output_tokens],
             "min_tokens": [shape.output_tokens], "stream": [True], "seed": [0]} for p in prompts]
    path.write_text(json.dumps({"data": data}, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def command(url: str, input_file: Path, concurrency: int, request_count: int, export: Path) -> list[str]:
    return [binary() or "perf_analyzer", "-m", "ensemble", "-i", "grpc", "-u", url, "--streaming",
            "--input-data", str(input_file), "--concurrency-range", str(concurrency),
            "--request-count", str(request_count), "--profile-export-file", str(export)]


def _from_export(export: Path, shape: Shape | None) -> dict:
    """Our statistics (statistics.summarize) from perf_analyzer's per-response timestamps (ns)
    and outputs: each response's new tokens are its completion_tokens minus the previous."""
    from mixtral_triton.bench.request_clients import Record
    from mixtral_triton.bench.statistics import summarize

    doc = json.loads(export.read_text())
    records = []
    for r in (r for exp in doc.get("experiments", []) for r in exp.get("requests", [])):
        record = Record(sent=r["timestamp"] / 1e9)
        so_far = 0
        outputs = r.get("response_outputs") or [{}] * len(r.get("response_timestamps", []))
        for t, out in zip(r.get("response_timestamps", []), outputs):
            total = out.get("completion_tokens")
            new = 1 if total is None else int(total) - so_far  # no outputs exported: one each
            so_far = so_far + new
            record.add(t / 1e9, new)
        if not record.token_times:
            record.error = "no response"
        records.append(record)
    ok = [r for r in records if r.token_times]
    wall = (max(r.token_times[-1] for r in ok) - min(r.sent for r in ok)) if ok else 0.0
    shape = shape or Shape(0, max((len(r.token_times) for r in ok), default=0))
    summary = summarize(records, shape, wall, 0.0, None, None)
    for key in ("client_cpu_s", "server_cpu_s", "gateway_cpu_s"):
        summary.pop(key, None)
    return summary


def _from_stdout(text: str) -> dict:
    out = {}
    m = re.search(r"Throughput:\s*([\d.]+)\s*infer/sec", text)
    if m:
        out["infer_per_s"] = float(m.group(1))
    m = re.search(r"Avg latency:\s*(\d+)\s*usec", text)
    if m:
        out["avg_latency_ms"] = int(m.group(1)) / 1000
    for p in (50, 90, 99):
        m = re.search(rf"p{p} latency:\s*(\d+)\s*usec", text)
        if m:
            out[f"p{p}_latency_ms"] = int(m.group(1)) / 1000
    return out


def run_one(url: str, input_file: Path, concurrency: int, request_count: int, work: Path,
            label: str, shape: Shape | None = None, timeout_s: float = 180.0) -> dict:
    export = work / f"pa-{label}-c{concurrency}.json"
    export.unlink(missing_ok=True)
    argv = command(url, input_file, concurrency, request_count, export)
    try:
        done = subprocess.run(argv, env=environment(), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"command": _shown(argv), "error": f"timed out after {timeout_s:.0f} s"}
    result = {"command": _shown(argv), "returncode": done.returncode}
    if done.returncode != 0:
        result["error"] = (done.stderr or done.stdout).strip()[-800:]
        return result
    result["summary"] = _from_stdout(done.stdout)
    if export.exists():
        result["from_export"] = _from_export(export, shape)
    return result


def _shown(argv: list[str]) -> str:
    shown = ["perf_analyzer" if i == 0 else a for i, a in enumerate(argv)]
    return " ".join(shown)


def run_section(stack, plan, pools: dict, work: Path, log) -> dict:
    """perf_analyzer against the section's server (a SupervisedStack), per plan (a ServingPlan)."""
    out: dict = {"binary": binary(), "runs": []}
    if binary() is None:
        out["missing"] = "perf_analyzer is not installed (tritonclient[all])"
        return out
    if missing_libraries():
        out["missing"] = f"perf_analyzer cannot load {', '.join(missing_libraries())} (scripts/setup.sh)"
        return out
    shape = plan.perf_analyzer_shape
    ours = write_input(work / f"pa-input-{shape.input_tokens}-{shape.output_tokens}.json", pools[shape], shape)
    inputs = [("bench", ours, shape)]
    project = ROOT / "scripts" / "perf" / "ensemble_input.json"
    if project.is_file():
        inputs.append(("project", project, None))
    else:
        out["project_input_missing"] = str(project)
    for label, input_file, input_shape in inputs:
        for concurrency in plan.perf_analyzer_concurrencies:
            count = plan.count(concurrency) * plan.rounds  # as many requests as our cell
            result = run_one(stack.server.grpc_url, input_file, concurrency, count, work, label, input_shape)
            stack.check(f"perf_analyzer {label} c={concurrency}", hung="timed out" in result.get("error", ""))
            result.update(input=label, input_file=str(input_file), concurrency=concurrency,
                          shape=input_shape.label if input_shape else None)
            out["runs"].append(result)
            fe = result.get("from_export") or {}
            log(f"  perf_analyzer {label:<7} c={concurrency:<2} "
                + (f"{fe.get('output_tokens_per_s') or 0:7.1f} tok/s  TTFT p50 {(fe.get('ttft_ms') or {}).get('p50') or 0:7.1f} ms"
                   if fe else f"error: {result.get('error', '')[:200]}"))
    return out
