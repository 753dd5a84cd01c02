"""The benchmark's request clients: one request in, the client's timing of it out.

  EngineGrpc      the `tensorrt_llm` model alone over gRPC streaming, sent the exact
                  tensors postprocessing sends it for the same prompt
  EnsembleGrpc    the `ensemble` over gRPC streaming (as client/PredictClient does)
  EnsembleHttp    the `ensemble` over Triton's HTTP /generate_stream (server-sent events)
  GatewayPredict  the HTTP gateway's POST /predict, stream true (text/plain chunks)

Every gRPC request has its own stream (as the project's clients do), every HTTP request
its own keep-alive connection slot. Timing is the client's: the send, and the arrival of
each response; a response carrying k new tokens after a gap g counts as k tokens g/k apart.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np

from mixtral_triton.bench.workload import (EngineRequests, Prompt, Shape, ensemble_arrays,
                                           http_generate_body, predict_body)
from mixtral_triton.client.ensemble import infer_inputs

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
    text: bytes | None = None  # the streamed text, where the client keeps it

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


class TextEnsembleGrpc(_GrpcPath):
    """An ensemble over gRPC streaming, asked only for text_input, max_tokens and stream, that
    keeps the streamed text (to check it byte for byte). This project's ensemble counts the
    tokens it streamed (completion_tokens); tensorrtllm_backend's sends one response per
    engine response, one token each when streaming, and says no count: `counted` False."""

    model = "ensemble"

    def __init__(self, url: str, counted: bool = True):
        super().__init__(url)
        self.counted = counted

    async def request(self, prompt: Prompt, shape: Shape) -> Record:
        arrays = {"text_input": np.array([[prompt.text.encode("utf-8")]], dtype=object),
                  "max_tokens": np.array([[shape.output_tokens]], np.int32),
                  "stream": np.array([[True]], np.bool_)}
        chunks: list[bytes] = []
        so_far = [0]

        def tokens(result) -> tuple[int, bool]:
            chunks.extend(bytes(t) for t in result.as_numpy("text_output").reshape(-1))
            if not self.counted:
                return 1, False
            total = int(result.as_numpy("completion_tokens").reshape(-1)[0])
            new, so_far[0] = total - so_far[0], total
            return new, bool(result.as_numpy("finish_reason").reshape(-1)[0])

        outputs = ["text_output", "finish_reason", "completion_tokens"] if self.counted else ["text_output"]
        record = await self._stream(arrays, outputs, tokens)
        record.text = b"".join(chunks)
        return record


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
    def __init__(self, base_url: str, body=predict_body):
        super().__init__(base_url)
        self.body = body  # the request body of a prompt and shape

    async def request(self, prompt: Prompt, shape: Shape) -> Record:
        """Text chunks carry no token counts: each chunk counts as one token (the detokenizer
        sends one response per token unless it holds text back), and the total is checked
        against max_tokens by the caller from the chunk count and the prescreen."""
        async def read(response, record):
            async for data, _ in response.content.iter_chunks():
                if data:
                    record.add(time.perf_counter(), 1)

        return await self._post("/predict", self.body(prompt, shape), read)


def _first(value):
    while isinstance(value, list):
        value = value[0]
    return value
