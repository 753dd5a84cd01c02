#!/usr/bin/env python3
"""Where the ensemble's TTFT and per-token cost go (CPU server, tiny model).

Starts Triton on the tiny fixture (reference engine), streams `--streams` greedy requests
`--concurrency` at a time through the ensemble over gRPC, then the same through the engine
model alone, and reports: TTFT and time per token of both paths, and the CPU seconds each
process (tritonserver, each stub, this client) spent per 1,000 streamed tokens. With
`--py-spy DIR` it also records the Python stubs (the tokenizer model's, the reference
engine's) with py-spy during the ensemble load (raw stacks, one file per stub); the
detokenizer is C++ inside tritonserver (use `perf` on it). Figures on a shared machine are noisy.

    .venv/bin/python scripts/profile_pipeline.py --streams 64 --concurrency 8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mixtral_triton.client.ensemble import ENSEMBLE, infer_inputs, requested_outputs  # noqa: E402
from mixtral_triton.launcher import TritonServer  # noqa: E402
from mixtral_triton.launcher.stubs import stub_processes  # noqa: E402

PROMPT = "The history of the world in brief:"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def model_stats(url: str) -> dict[str, tuple[int, int, int]]:
    """Per model: executions, total queue ns, total compute ns (input + infer + output)."""
    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(as_json=True)
    out = {}
    for model in stats["model_stats"]:
        s = model["inference_stats"]
        ns = [int(s[k].get("ns", 0)) for k in ("queue", "compute_input", "compute_infer", "compute_output")]
        out[model["name"]] = (int(model.get("execution_count", 0)), ns[0], sum(ns[1:]))
    return out


def one_stream(client, model, inputs, outputs, request_id):
    """(ttft, seconds, responses, tokens or chars) of one streamed request."""
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    started = time.perf_counter()
    first = None
    count = 0
    try:
        client.async_stream_infer(model, inputs, request_id=request_id, outputs=outputs,
                                  enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=300)
            if error is not None:
                raise RuntimeError(error)
            if result.get_response().outputs and first is None:
                first = time.perf_counter() - started
            if result.get_response().outputs:
                count += 1
            if result.get_response().parameters["triton_final_response"].bool_param:
                return first, time.perf_counter() - started, count
    finally:
        client.stop_stream()


def load(url, model, make_inputs, outputs, streams, concurrency):
    jobs = queue.Queue()
    for i in range(streams):
        jobs.put(i)
    stats, failures = [], []

    def worker():
        client = grpcclient.InferenceServerClient(url)
        while True:
            try:
                i = jobs.get_nowait()
            except queue.Empty:
                break
            try:
                stats.append(one_stream(client, model, make_inputs(), outputs, f"p-{i}"))
            except Exception as exc:
                failures.append(exc)
        client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats, failures, time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--engine-batch", type=int, default=8)
    p.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "profile")
    p.add_argument("--py-spy", type=Path, default=None, help="record the Python stubs here")
    args = p.parse_args()

    from mixtral_triton.fixture import write_checkpoint  # noqa: F401
    from mixtral_triton.pipeline import build_repository
    from mixtral_triton.ensemble_models.preprocess import Preprocessor

    checkpoint = args.work_dir / "hub" / "tiny"
    if not (checkpoint / "config.json").exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        write_checkpoint(checkpoint)
    repository = build_repository(checkpoint, args.work_dir, tp=4, max_batch_size=args.engine_batch,
                                  log=lambda *_: None)
    prompt_ids = Preprocessor(str(checkpoint), 1024, 2048, True).tokenizer(PROMPT)["input_ids"]

    def ensemble_inputs():
        return infer_inputs({"text_input": np.array([[PROMPT.encode()]], dtype=object),
                             "max_tokens": np.array([[args.max_tokens]], np.int32),
                             "temperature": np.array([[0.0]], np.float32),
                             "min_tokens": np.array([[args.max_tokens]], np.int32),
                             "stream": np.array([[True]], np.bool_)})

    def engine_inputs():
        return infer_inputs({"input_ids": np.array([prompt_ids], np.int32),
                             "input_lengths": np.array([[len(prompt_ids)]], np.int32),
                             "request_output_len": np.array([[args.max_tokens]], np.int32),
                             "runtime_top_k": np.array([[1]], np.int32),
                             "min_tokens": np.array([[args.max_tokens]], np.int32),
                             "streaming": np.array([[True]], np.bool_)})

    with TritonServer(repository, log_file=args.work_dir / "triton.log") as server:
        pids = {"tritonserver": server.process.pid, **stub_processes(server.process.pid),
                "client": os.getpid()}
        load(server.grpc_url, ENSEMBLE, ensemble_inputs, requested_outputs(), 8, 4)  # warm up
        for path, model, make, outputs in (("ensemble", ENSEMBLE, ensemble_inputs, requested_outputs()),
                                           ("engine", "tensorrt_llm", engine_inputs, None)):
            spies = []
            if args.py_spy and path == "ensemble":
                args.py_spy.mkdir(parents=True, exist_ok=True)
                for name, pid in pids.items():
                    if name not in ("tritonserver", "client"):
                        spies.append(subprocess.Popen(
                            [str(ROOT / ".venv" / "bin" / "py-spy"), "record", "--pid", str(pid), "--format",
                             "raw", "--rate", "200", "--nonblocking", "--output",
                             str(args.py_spy / f"{name}.txt")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL))
                time.sleep(1)
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            stats_before = model_stats(server.grpc_url)
            stats, failures, seconds = load(server.grpc_url, model, make, outputs, args.streams,
                                            args.concurrency)
            after = {name: cpu_seconds(pid) for name, pid in pids.items()}
            stats_after = model_stats(server.grpc_url)
            for spy in spies:
                spy.send_signal(2)
                spy.wait(60)
            tokens = args.streams * args.max_tokens
            ttfts = sorted(s[0] for s in stats)
            per_token = [(s[1] - s[0]) / max(1, args.max_tokens - 1) for s in stats]
            print(f"\n{path}: {len(stats)} streams x {args.max_tokens} tokens at c={args.concurrency} "
                  f"in {seconds:.1f} s ({tokens / seconds:.0f} tok/s), {len(failures)} failed; "
                  f"responses/stream {statistics.mean(s[2] for s in stats):.1f}")
            print(f"  TTFT ms p50 {1000 * statistics.median(ttfts):.1f}  p90 "
                  f"{1000 * ttfts[int(0.9 * len(ttfts))]:.1f}; ms/token p50 {1000 * statistics.median(per_token):.2f}")
            for model_name, (count, queue_ns, compute_ns) in stats_after.items():
                count -= stats_before[model_name][0]
                if count:
                    print(f"  Triton stats {model_name}: {count} executions, queue "
                          f"{(queue_ns - stats_before[model_name][1]) / count / 1e6:.2f} ms, compute "
                          f"{(compute_ns - stats_before[model_name][2]) / count / 1e6:.2f} ms each")
            spent = {name: after[name] - before[name] for name in pids}
            total = sum(spent.values())
            print(f"  CPU s per 1000 tokens: total {1000 * total / tokens:.2f}")
            for name, value in sorted(spent.items(), key=lambda kv: -kv[1]):
                if value > 0:
                    print(f"    {name:24s} {1000 * value / tokens:6.2f}  ({100 * value / total:4.1f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
