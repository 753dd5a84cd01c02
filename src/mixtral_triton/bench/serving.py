"""Serving benchmark on CPU: one Triton server (the tiny fixture, the reference engine), four
ways in, a closed-loop concurrency sweep, per-token timestamps.

Paths:
  engine_grpc      the `tensorrt_llm` model alone over gRPC streaming, sent the exact
                   tensors postprocessing sends it for the same prompt
  ensemble_grpc    the `ensemble` over gRPC streaming (as client/PredictClient does)
  ensemble_http    the `ensemble` over Triton's HTTP /generate_stream (server-sent events)
  gateway_predict  the HTTP gateway's POST /predict, stream true (text/plain chunks)

Every gRPC request has its own stream (as the project's clients do), every HTTP request
its own keep-alive connection slot. Each of C workers sends its requests back to back
(closed loop), worker w starting w x (single-stream request time / C) late so that
requests join a running batch one by one; a cell is (path, shape, C), measured in parts
with the paths interleaved A B C D, D C B A. Output tok/s is taken over the steady window
(all workers running). Timing is the client's: the send, and the arrival of each
response; a response carrying k new tokens after a gap g counts as k tokens g/k apart. Output length is forced with min_tokens = max_tokens (end token banned
until then) on the three Triton paths; /predict has no min_tokens, so its prompts are
checked first to run greedily to max_tokens without the end token, and every path reuses
those prompts. Every request's token count is checked afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mixtral_triton.bench.workload import (EngineRequests, Prompt, Shape, ensemble_arrays,
                                           http_generate_body, make_prompts, predict_body)
from mixtral_triton.client.ensemble import infer_inputs
from mixtral_triton.local_stack import GatewayDidNotStart, GatewayOptions, GatewayProcess, LocalStack

PATHS = ("engine_grpc", "ensemble_grpc", "ensemble_http", "gateway_predict")
PATH_TITLES = {
    "engine_grpc": "(a) engine alone, gRPC stream",
    "ensemble_grpc": "(b) ensemble, gRPC stream",
    "ensemble_http": "(c) ensemble, HTTP generate_stream",
    "gateway_predict": "(d) gateway /predict stream",
}
# No request here takes more than a few seconds; one that does not end in this time is a
# hung server (the part is then rerun on a restarted one).
REQUEST_TIMEOUT_S = 60.0

@dataclass
class Record:
    """One request as the client saw it (perf_counter seconds)."""

    sent: float
    token_times: list[float] = field(default_factory=list)
    responses: int = 0
    error: str | None = None
    worker: int = 0

    def add(self, now: float, tokens: int) -> None:
        """`tokens` new tokens arrived now; after the first, spread them over the gap."""
        self.responses += 1
        if tokens <= 0:
            return
        if not self.token_times:
            self.token_times.extend([now] * tokens)
            return
        last = self.token_times[-1]
        self.token_times.extend(last + (now - last) * (i + 1) / tokens for i in range(tokens))


# ---------------------------------------------------------------------------- the four paths

class _GrpcPath:
    """One gRPC stream per request over one channel (tritonclient.grpc.aio)."""

    model = ""

    def __init__(self, url: str):
        self.url = url
        self.client = None
        self.sequence = 0

    async def open(self) -> None:
        import tritonclient.grpc.aio as grpcaio

        self.client = grpcaio.InferenceServerClient(self.url)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def _stream(self, arrays: dict[str, np.ndarray], outputs: list[str], tokens_of) -> Record:
        import tritonclient.grpc as grpcclient

        self.sequence += 1
        done = asyncio.Event()
        call_args = {"model_name": self.model, "inputs": infer_inputs(arrays),
                     "outputs": [grpcclient.InferRequestedOutput(n) for n in outputs],
                     "request_id": f"bench-{os.getpid()}-{self.sequence}",
                     "parameters": {"triton_enable_empty_final_response": True}}

        async def requests():
            yield call_args
            await done.wait()  # then half-close: the server ends the stream

        record = Record(sent=time.perf_counter())
        call = self.client.stream_infer(requests())
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                async for result, error in call:
                    now = time.perf_counter()
                    if error is not None:
                        record.error = str(error)
                        break
                    response = result.get_response()
                    final = response.parameters["triton_final_response"].bool_param
                    if response.outputs:
                        tokens, finished = tokens_of(result)
                        record.add(now, tokens)
                        final = final or finished
                    if final:
                        break
        except TimeoutError:
            record.error = f"no end within {REQUEST_TIMEOUT_S:.0f} s"
        except Exception as exc:  # noqa: BLE001 - the stream failed (server gone): a failed request
            record.error = f"{type(exc).__name__}: {getattr(exc, 'details', lambda: exc)()}"
        finally:
            done.set()
            try:  # let the server close the half-closed stream; cut it if it lingers
                async with asyncio.timeout(2.0):
                    async for _ in call:
                        pass
            except (TimeoutError, Exception):
                call.cancel()
        return record


class EngineGrpc(_GrpcPath):
    model = "tensorrt_llm"

    def __init__(self, url: str, engine_requests: EngineRequests):
        super().__init__(url)
        self.engine_requests = engine_requests
        self.cache: dict[tuple, dict] = {}

    async def request(self, prompt: Prompt, shape: Shape) -> Record:
        key = (prompt.text, shape)
        if key not in self.cache:  # tokenizing is the client's work, not the engine's
            self.cache[key] = self.engine_requests.arrays(ensemble_arrays(prompt, shape))
        return await self._stream(self.cache[key], ["output_ids", "sequence_length"],
                                  lambda result: (int(result.as_numpy("sequence_length").reshape(-1)[0]), False))


class EnsembleGrpc(_GrpcPath):
    model = "ensemble"

    def __init__(self, url: str, force_length: bool = True):
        super().__init__(url)
        self.force_length = force_length

    async def request(self, prompt: Prompt, shape: Shape) -> Record:
        arrays = ensemble_arrays(prompt, shape)
        if not self.force_length:
            del arrays["min_tokens"]
        so_far = [0]

        def tokens(result) -> tuple[int, bool]:
            # completion_tokens counts every token so far; one response may carry several
            # (a character split over tokens, text held back as a possible stop string)
            total = int(result.as_numpy("completion_tokens").reshape(-1)[0])
            reason = result.as_numpy("finish_reason").reshape(-1)[0]
            new, so_far[0] = total - so_far[0], total
            return new, bool(reason)

        return await self._stream(arrays, ["text_output", "finish_reason", "completion_tokens"], tokens)


class _HttpPath:
    def __init__(self, base_url: str):
        self.base_url = base_url
        self.session = None

    async def open(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def _post(self, path: str, body: dict, read) -> Record:
        """POST `body` and let `read(response, record)` record the streamed tokens; an HTTP
        error status or an exception is recorded as the request's failure."""
        record = Record(sent=time.perf_counter())
        try:
            async with self.session.post(f"{self.base_url}{path}", json=body) as response:
                if response.status != 200:
                    record.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                    return record
                await read(response, record)
        except Exception as exc:  # noqa: BLE001 - recorded, counted as a failed request
            record.error = f"{type(exc).__name__}: {exc}"
        return record


class EnsembleHttp(_HttpPath):
    async def request(self, prompt: Prompt, shape: Shape) -> Record:
        async def read(response, record):
            so_far = 0
            async for line in response.content:
                now = time.perf_counter()
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    record.error = str(event["error"])[:200]
                    break
                total = int(_first(event.get("completion_tokens", so_far)))
                record.add(now, total - so_far)
                so_far = total

        return await self._post("/v2/models/ensemble/generate_stream", http_generate_body(prompt, shape), read)


class GatewayPredict(_HttpPath):
    async def request(self, prompt: Prompt, shape: Shape) -> Record:
        """Text chunks carry no token counts: each chunk counts as one token (the detokenizer
        sends one response per token unless it holds text back), and the total is checked
        against max_tokens by the caller from the chunk count and the prescreen."""
        async def read(response, record):
            async for data, _ in response.content.iter_chunks():
                if data:
                    record.add(time.perf_counter(), 1)

        return await self._post("/predict", predict_body(prompt, shape), read)


def _first(value):
    while isinstance(value, list):
        value = value[0]
    return value


# ---------------------------------------------------------------------------- statistics

def _percentiles(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(values) * scale
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def window_itl(record: Record, token: int, window: int = 8) -> float | None:
    """Mean gap (s) over the `window` tokens ending at the 1-based `token`."""
    t = record.token_times
    if len(t) < token or token - window < 1:
        return None
    return (t[token - 1] - t[token - 1 - window]) / window


def summarize(records: list[Record], shape: Shape, wall_s: float, client_cpu_s: float,
              server_cpu_s: float | None, gateway_cpu_s: float | None,
              chunk_tokens_unknown: bool = False) -> dict:
    ok = [r for r in records if r.error is None and r.token_times]
    tokens = sum(len(r.token_times) for r in ok) if not chunk_tokens_unknown else shape.output_tokens * len(ok)
    gaps = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    per_request_itl = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1)
                       for r in ok if len(r.token_times) > 1]
    summary = {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:3],
        "exact_length": sum(len(r.token_times) == shape.output_tokens for r in ok),
        "responses_per_request": float(np.mean([r.responses for r in ok])) if ok else None,
        "wall_s": wall_s,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "ttft_ms": _percentiles([r.token_times[0] - r.sent for r in ok]),
        "itl_ms": _percentiles(gaps),
        "itl_per_request_mean_ms": _percentiles(per_request_itl),
        "e2e_ms": _percentiles([r.token_times[-1] - r.sent for r in ok]),
        "client_cpu_s": client_cpu_s,
        "server_cpu_s": server_cpu_s,
        "gateway_cpu_s": gateway_cpu_s,
    }
    if shape.output_tokens >= 256:
        for token in (16, 256):
            exact = [r.token_times[token - 1] - r.token_times[token - 2] for r in ok
                     if len(r.token_times) >= token]
            windowed = [w for r in ok if (w := window_itl(r, token)) is not None]
            summary[f"itl_token_{token}_ms"] = float(np.median(exact) * 1000) if exact else None
            summary[f"itl_window_{token}_ms"] = float(np.median(windowed) * 1000) if windowed else None
    return summary


# ---------------------------------------------------------------------------- processes

def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of every live process in a process group (Triton and its stubs)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields[0] is the state: pgrp is the 5th field overall
            total += int(fields[11]) + int(fields[12])
    return total / tick


def process_cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------- the run

@dataclass
class ServingPlan:
    shapes: list[Shape]
    concurrencies: list[int]
    requests_per_worker: int = 2
    min_requests: int = 6  # a cell has at least this many requests (c=1 too)
    prompt_pool: int = 16
    parts: int = 2  # each cell in this many parts, paths in ABCD DCBA order
    paths: tuple[str, ...] = PATHS
    run_paths: bool = True  # False: perf_analyzer only (--only perf_analyzer)
    perf_analyzer: bool = True
    perf_analyzer_shape: Shape = Shape(128, 128)
    perf_analyzer_concurrencies: tuple[int, ...] = (1, 8)
    in_process_batches: tuple[int, ...] = (1, 8)

    def count(self, concurrency: int) -> int:
        return max(self.min_requests, self.requests_per_worker * concurrency)


@dataclass
class Measurement:
    """One closed-loop batch of requests on one path (a cell is one or more of them)."""

    records: list[Record]
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float
    gateway_cpu_s: float | None
    offset_s: float  # where this part starts on the cell's time line (for the raw records)
    load_1m: float
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


async def _measure(path, prompts: list[Prompt], shape: Shape, concurrency: int, count: int,
                   server_pgid: int, gateway_pid: int | None, first_prompt: int = 0,
                   stagger_s: float = 0.0) -> Measurement:
    """`concurrency` workers, worker w starting w * stagger_s late (so that requests join a
    running batch one by one, as in steady traffic, rather than all in one burst)."""
    records: list[Record] = []
    per_worker = [count // concurrency + (1 if w < count % concurrency else 0) for w in range(concurrency)]

    async def worker(w: int) -> None:
        if w and stagger_s:
            await asyncio.sleep(w * stagger_s)
        for j in range(per_worker[w]):
            record = await path.request(prompts[(first_prompt + w + j * concurrency) % len(prompts)], shape)
            record.worker = w
            records.append(record)

    server0 = group_cpu_seconds(server_pgid)
    gateway0 = process_cpu_seconds(gateway_pid) if gateway_pid else None
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    gateway1 = process_cpu_seconds(gateway_pid) if gateway_pid else None
    for r in records:  # times relative to this part's start
        r.token_times = [t - t0 for t in r.token_times]
        r.sent -= t0
    measurement = Measurement(records, wall, time.process_time() - cpu0, group_cpu_seconds(server_pgid) - server0,
                              (gateway1 - gateway0) if gateway0 is not None and gateway1 is not None else None,
                              0.0, os.getloadavg()[0])
    measurement.steady()
    return measurement


def cell_summary(parts: list[Measurement], path_name: str, shape: Shape, concurrency: int) -> dict:
    """One cell from its parts: tokens and requests over the summed wall time, latencies over
    all requests, CPU summed."""
    records = [r for part in parts for r in part.records]
    wall = sum(p.wall_s for p in parts)
    gateway_cpu = sum(p.gateway_cpu_s for p in parts) if all(p.gateway_cpu_s is not None for p in parts) else None
    chunks = path_name == "gateway_predict"
    summary = summarize(records, shape, wall, sum(p.client_cpu_s for p in parts),
                        sum(p.server_cpu_s for p in parts), gateway_cpu, chunk_tokens_unknown=chunks)
    summary["parts"] = len(parts)
    summary["load_1m"] = [round(p.load_1m, 2) for p in parts]
    # output tok/s: the steady window (all workers running); the whole-run figure beside it
    window = sum(p.window_s for p in parts)
    tokens = sum(p.window_tokens for p in parts)
    summary["output_tokens_per_s_whole_run"] = summary["output_tokens_per_s"]
    summary["steady_window_s"] = window
    if window > 0 and tokens > 0 and not chunks:
        summary["output_tokens_per_s"] = tokens / window
    elif window > 0 and tokens > 0:  # /predict: chunks stand for tokens, scaled to the known total
        counted = sum(len(r.token_times) for r in records if r.error is None)
        summary["output_tokens_per_s"] = tokens / window * (summary["output_tokens"] / counted if counted else 1)
    if chunks:
        ok = [r for r in records if r.error is None and r.token_times]
        summary["chunks_per_request"] = float(np.mean([len(r.token_times) for r in ok])) if ok else None
        summary["exact_length"] = None  # not observable from text chunks; see the prescreen
    offset, raw = 0.0, []
    for part in parts:
        for r in part.records:
            raw.append({"part_start_s": round(offset, 4), "sent_s": round(r.sent, 4), "tokens": len(r.token_times),
                        "ttft_ms": round((r.token_times[0] - r.sent) * 1000, 3) if r.token_times else None,
                        "e2e_ms": round((r.token_times[-1] - r.sent) * 1000, 3) if r.token_times else None,
                        "responses": r.responses, "error": r.error})
        offset += part.wall_s
    summary["raw"] = raw
    if shape.output_tokens >= 256 and concurrency == 1:
        # median gap at every position over the single-stream requests (ITL-vs-position plot)
        ok = [r for r in records if r.error is None and len(r.token_times) == shape.output_tokens]
        if ok:
            gaps = np.diff(np.array([r.token_times for r in ok]), axis=1) * 1000
            summary["itl_by_position_ms"] = [round(float(x), 4) for x in np.median(gaps, axis=0)]
    return summary


async def _prescreen(url: str, prompts: list[Prompt], shape: Shape, log) -> tuple[list[Prompt], dict, list]:
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


async def _run_part(path, prompts, shape, concurrency, count, server_pgid, gateway_pid,
                    first_prompt: int, stagger_s: float) -> Measurement:
    await path.open()
    try:
        await path.request(prompts[0], Shape(shape.input_tokens, 4))  # connection warm-up
        return await _measure(path, prompts, shape, concurrency, count, server_pgid, gateway_pid, first_prompt,
                              stagger_s)
    finally:
        await path.close()


def in_process_engine(checkpoint_dir: Path, prompts: list[Prompt], shape: Shape, batches, max_batch_size: int,
                      log) -> dict:
    """The reference engine alone, in this process, no Triton: the engine's own scaling with
    batch, the floor under every served path. One torch thread, as the served model."""
    import torch

    from mixtral_triton.reference import Engine, ReferenceModel
    from mixtral_triton.reference.engine import Request
    from mixtral_triton.reference.sampling import SamplingParams

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = ReferenceModel.from_trtllm_checkpoint(checkpoint_dir)
        out = {}
        with Engine(model, max_batch_size=max_batch_size) as engine:
            warm = engine.submit(Request(input_ids=list(prompts[0].token_ids), max_tokens=4))
            warm.result(timeout=60)
            for batch in batches:
                requests = [Request(input_ids=list(prompts[i % len(prompts)].token_ids),
                                    max_tokens=shape.output_tokens, end_id=2,
                                    sampling=SamplingParams(top_k=1, min_tokens=shape.output_tokens))
                            for i in range(batch)]
                start = time.perf_counter()
                handles = [engine.submit(r) for r in requests]
                tokens = sum(len(h.result(timeout=600)[0]) for h in handles)
                wall = time.perf_counter() - start
                out[str(batch)] = {"output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall,
                                   "step_ms": wall / shape.output_tokens * 1000}
                log(f"  in-process engine {shape.label} batch {batch}: {tokens / wall:.1f} tok/s "
                    f"({wall / shape.output_tokens * 1000:.1f} ms/step)")
        return out
    finally:
        torch.set_num_threads(threads)


def _group_states(pgid: int) -> list[str]:
    """`pid state command` of every process in a process group (a dead model stub shows Z)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            head, _, rest = Path(f"/proc/{entry}/stat").read_text().rpartition(")")
            fields = rest.split()
            if int(fields[2]) == pgid:
                out.append(f"{entry} {fields[0]} {head.split('(', 1)[1][:40]}")
        except (OSError, IndexError, ValueError):
            continue
    return out


class Stack:
    """The one Triton server of the run and the gateway in front of it (a LocalStack);
    restarted (and the crash recorded) if the server dies during a cell."""

    def __init__(self, root: Path, local: LocalStack, section: dict, log):
        self.root, self.local, self.section, self.log = root, local, section, log
        self.server = None
        self.gateway: GatewayProcess | None = None

    def start(self) -> None:
        try:
            self.local.start()
        except GatewayDidNotStart as exc:  # the run goes on without path (d)
            self.local.gateway_options = None
            self.section["missing"]["gateway_predict"] = str(exc)
            self.log(f"  (d) gateway: MISSING ({exc})")
            self.local.start()
        self.server, self.gateway = self.local.triton, self.local.gateway

    def stop(self) -> None:
        self.local.stop()
        self.server = self.gateway = None

    def check(self, cell: str, records: "list[Record] | None" = None, hung: bool = False) -> bool:
        """True if the server is alive and answered every one of `records`; else record the
        crash (or hang) and restart everything."""
        hung = hung or any(r.error and r.error.startswith("no end within") for r in records or ())
        if self.server.process.poll() is None and not hung:
            return True
        dead = [line for line in _group_states(self.pgid) if " Z " in line]
        errors = self.server.log_errors() or self.server.log_tail()
        self.section["server_crashes"].append({
            "during": cell, "kind": "hang" if self.server.process.poll() is None else "exit",
            "exit_code": self.server.process.poll(), "defunct_processes": dead,
            "log": str(self.server.log_file), "errors": errors[-1500:]})
        what = "hung (a request got no response for %.0f s)" % REQUEST_TIMEOUT_S if hung else \
            f"died (exit {self.server.process.returncode})"
        self.log(f"  !! tritonserver {what} during {cell}{'; defunct: ' + '; '.join(dead) if dead else ''}; "
                 "restarting")
        self.stop()
        self.start()
        return False

    @property
    def pgid(self) -> int:
        return self.server.process.pid

    @property
    def gateway_pid(self) -> int | None:
        return self.gateway.process.pid if self.gateway is not None else None


def run_serving(root: Path, work: Path, plan: ServingPlan, log=print) -> dict:
    """Build (or reuse) the tiny CPU repository, start one Triton server (and the gateway),
    run every cell and perf_analyzer against it, stop them. Returns the results section."""
    from transformers import AutoTokenizer

    from mixtral_triton.bench import perf_analyzer as pa

    work.mkdir(parents=True, exist_ok=True)
    max_batch_size, max_input_len, max_seq_len = 8, 1024, 2048
    want_gateway = plan.run_paths and "gateway_predict" in plan.paths
    local = LocalStack(work, max_batch_size=max_batch_size, max_input_len=max_input_len, max_seq_len=max_seq_len,
                       gateway=GatewayOptions(chat=False, max_concurrency=256, log_level="warning")
                       if want_gateway else None, log=lambda *_: None)
    checkpoint = local.checkpoint
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    engine_requests = EngineRequests(checkpoint, max_input_len, max_seq_len)
    shapes = list(plan.shapes)
    if plan.perf_analyzer and plan.perf_analyzer_shape not in shapes:
        shapes.append(plan.perf_analyzer_shape)
    pools = {shape: make_prompts(tokenizer, shape.input_tokens, plan.prompt_pool, seed=shape.input_tokens)
             for shape in shapes}

    section: dict = {
        "setup": {"model": "tiny random-weight Mixtral (hidden 256, 2 layers, 8 experts top-2, vocab 32000), "
                           "TP=4 simulated, CPU reference engine",
                  "engine_max_batch_size": max_batch_size, "decoding": "greedy (top_k 1), seed 0",
                  "output_length": "min_tokens = max_tokens on (a)-(c); /predict has no min_tokens: greedy "
                                   "(temperature 0) on prompts prescreened to reach max_tokens without the end token",
                  "load": "closed loop: C workers, each sends its next request when the previous one ends, "
                          "worker w starting w x (this path's single-stream request time / C) late so that "
                          "requests join a running batch one by one; one gRPC stream / HTTP request per "
                          "request. Output tok/s over the steady window (from the last worker's first send "
                          "to the first worker's last token)",
                  "requests_per_cell": {str(c): plan.count(c) for c in plan.concurrencies},
                  "parts": plan.parts,
                  "shapes": [s.label for s in plan.shapes], "concurrencies": plan.concurrencies},
        "paths": {}, "prescreen": {}, "missing": {}, "server_crashes": [], "in_process_engine": {}}
    if plan.run_paths and plan.in_process_batches:
        # before the server starts: nothing else competes for the two cores
        for shape in plan.shapes[:1]:
            section["in_process_engine"][shape.label] = in_process_engine(
                local.trtllm_checkpoint, pools[shape], shape, plan.in_process_batches, max_batch_size, log)

    stack = Stack(root, local, section, log)
    stack.start()
    try:
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
            section["perf_analyzer"] = _run_perf_analyzer(stack, plan, pools, work, log, pa)
    finally:
        stack.stop()
    return section


def _run_paths(stack: Stack, plan: ServingPlan, pools, engine_requests, section: dict, log) -> None:
    makers = {"engine_grpc": lambda: EngineGrpc(stack.server.grpc_url, engine_requests),
              "ensemble_grpc": lambda: EnsembleGrpc(stack.server.grpc_url),
              "ensemble_http": lambda: EnsembleHttp(f"http://{stack.server.http_url}"),
              "gateway_predict": lambda: GatewayPredict(stack.gateway.url) if stack.gateway else None}
    # Each cell is measured in `plan.parts` parts, the paths interleaved in ABCD DCBA order
    # within a (shape, concurrency), so that the load drifts of this shared machine fall on
    # every path alike.
    for shape in plan.shapes:
        for concurrency in plan.concurrencies:
            names = [n for n in plan.paths if n != "gateway_predict" or stack.gateway is not None]
            parts: dict[str, list[Measurement]] = {n: [] for n in names}
            flags: dict[str, dict] = {n: {} for n in names}
            total = plan.count(concurrency)
            n_parts = max(1, min(plan.parts, total // concurrency))  # every part reaches the concurrency
            sizes = [total // n_parts + (1 if i < total % n_parts else 0) for i in range(n_parts)]
            for index, size in enumerate(sizes):
                if size == 0:
                    continue
                for name in (names if index % 2 == 0 else names[::-1]):
                    if name == "gateway_predict" and stack.gateway is None:
                        continue
                    cell = f"{name} {shape.label} c={concurrency} part {index + 1}"

                    # stagger the workers over one single-stream request time of this path
                    single = _cell_of(section, name, shape, 1)
                    stagger = (single["e2e_ms"]["p50"] / 1000 / concurrency
                               if single and single["e2e_ms"]["p50"] and concurrency > 1 else 0.0)

                    def run() -> Measurement:
                        return asyncio.run(_run_part(makers[name](), pools[shape], shape, concurrency, size,
                                                     stack.pgid, stack.gateway_pid, index, stagger))

                    part = run()
                    if not stack.check(cell, part.records):  # died or hung: once more on a new server
                        flags[name].update(rerun_after_crash=True,
                                           failed_before_rerun=sum(r.error is not None for r in part.records))
                        part = run()
                        stack.check(f"{cell} (rerun)", part.records)
                    parts[name].append(part)
            for name in names:
                if not parts[name]:
                    continue
                summary = cell_summary(parts[name], name, shape, concurrency)
                summary.update(flags[name])
                section["paths"].setdefault(name, {}).setdefault(shape.label, {})[str(concurrency)] = summary
                log(f"  {shape.label:>7} c={concurrency:<2} {name:<16} "
                    f"{summary['output_tokens_per_s'] or 0:7.1f} tok/s  "
                    f"TTFT p50 {summary['ttft_ms']['p50'] or 0:7.1f} ms  "
                    f"ITL p50 {summary['itl_ms']['p50'] or 0:6.2f} ms  "
                    f"failed {summary['failed']}/{summary['requests']}  load {summary['load_1m']}")


def _cell_of(section: dict, name: str, shape: Shape, concurrency: int) -> dict | None:
    return section["paths"].get(name, {}).get(shape.label, {}).get(str(concurrency))


def _run_perf_analyzer(stack: Stack, plan: ServingPlan, pools, work: Path, log, pa) -> dict:
    out: dict = {"binary": pa.binary(), "runs": []}
    if pa.binary() is None:
        out["missing"] = "perf_analyzer is not installed (tritonclient[all])"
        return out
    if pa.missing_libraries():
        out["missing"] = f"perf_analyzer cannot load {', '.join(pa.missing_libraries())} (scripts/setup.sh)"
        return out
    shape = plan.perf_analyzer_shape
    ours = pa.write_input(work / f"pa-input-{shape.input_tokens}-{shape.output_tokens}.json", pools[shape], shape)
    inputs = [("bench", ours, shape)]
    project = stack.root / "scripts" / "perf" / "ensemble_input.json"
    if project.is_file():
        inputs.append(("project", project, None))
    else:
        out["project_input_missing"] = str(project)
    for label, input_file, input_shape in inputs:
        for concurrency in plan.perf_analyzer_concurrencies:
            count = plan.count(concurrency)
            result = pa.run_one(stack.server.grpc_url, input_file, concurrency, count, work, label, input_shape)
            stack.check(f"perf_analyzer {label} c={concurrency}", hung="timed out" in result.get("error", ""))
            result.update(input=label, input_file=str(input_file), concurrency=concurrency,
                          shape=input_shape.label if input_shape else None)
            out["runs"].append(result)
            fe = result.get("from_export") or {}
            log(f"  perf_analyzer {label:<7} c={concurrency:<2} "
                + (f"{fe.get('output_tokens_per_s') or 0:7.1f} tok/s  TTFT p50 {(fe.get('ttft_ms') or {}).get('p50') or 0:7.1f} ms"
                   if fe else f"error: {result.get('error', '')[:200]}"))
    return out


def plan_dict(plan: ServingPlan) -> dict:
    d = asdict(plan)
    d["shapes"] = [s.label for s in plan.shapes]
    d["perf_analyzer_shape"] = plan.perf_analyzer_shape.label
    return d
