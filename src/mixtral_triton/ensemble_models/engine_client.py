"""The serving models' connection to the tensorrt_llm model: the server they run in, over
loopback, not Triton's BLS.

Why not BLS: in the Python backend's stub (Triton 2.51, and python_backend's main branch
as of 2026-11), the responses of a decoupled BLS call are turned into numpy arrays on the
stub's message thread, which never takes the GIL (`Stub::ProcessBLSResponseDecoupled` ->
`InferResponse::LoadFromSharedMemory` -> the `PbTensor` constructor). That races with
the model's own Python thread and corrupts the stub's heap: it crashed our detokenizer
every few thousand streamed requests (docs/reliability.md). A client on the event loop
holds the GIL for everything it does.

Two ways in, by what is cheapest for each:
- The token streams go over HTTP, Triton's generate_stream endpoint, read by the
  detokenizer's event loop itself (`generate_stream.GenerateStreamClient`): per engine
  response it costs the detokenizer about half the CPU of a grpc.aio stream, whose messages
  each cross from its poller thread to the loop (docs/serving.md). One connection per
  stream at a time, kept alive for the next stream and closed once idle.
- Stops (rare) go over gRPC, as TensorRT-LLM's own clients send them: `EngineClient`
  (blocking; the tokenizer model's) and `AsyncEngineClient.stop` (the detokenizer's), each
  a call of its own, so no two requests' answers are ever written on one gRPC stream, a
  pattern that can abort Triton 2.51's gRPC frontend (docs/cpu-triton-stack.md).

The server's addresses come from the environment the server was started with
(`MIXTRAL_TRITON_HTTP_URL` and `MIXTRAL_TRITON_GRPC_URL`, which the launchers set);
without them, Triton's default ports.
"""

from __future__ import annotations

import asyncio
import os
import queue
from typing import AsyncIterator, Mapping

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aio_grpcclient
from tritonclient.utils import InferenceServerException

from mixtral_triton.client.empty_final import open_stream
from mixtral_triton.client.ensemble import infer_inputs
from mixtral_triton.launcher.ports import GRPC_URL_ENV, HTTP_URL_ENV
from mixtral_triton.ensemble_models.generate_stream import GenerateStreamClient, GenerateStreamError
from mixtral_triton.ensemble_models.engine_request import new_token_ids, stop_inputs

DEFAULT_GRPC_URL = "127.0.0.1:8001"  # Triton's default gRPC port
DEFAULT_HTTP_URL = "127.0.0.1:8000"  # and HTTP port
# Longest wait for the engine's next response before the stream is given up: far longer
# than any step, so that only a wedged server ends a stream this way.
RESPONSE_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0


def server_grpc_url() -> str:
    return os.environ.get(GRPC_URL_ENV) or DEFAULT_GRPC_URL


def server_http_url() -> str:
    return os.environ.get(HTTP_URL_ENV) or DEFAULT_HTTP_URL


class EngineClient:
    """Blocking stops of engine requests (the tokenizer model carries out `stop`s)."""

    def __init__(self, model: str, url: str | None = None):
        self.model = model
        self.url = url or server_grpc_url()
        self._stops = grpcclient.InferenceServerClient(self.url)

    def stop(self, request_id: str) -> bool:
        """Cancel the engine's request `request_id`, if the engine takes the stop: under a
        full queue (max_queue_size) it may refuse it, and the generation ends by itself."""
        done: queue.Queue = queue.Queue()
        self._stops.start_stream(callback=lambda result, error: done.put(error))
        try:
            self._stops.async_stream_infer(self.model, infer_inputs(stop_inputs()), request_id=request_id,
                                           enable_empty_final_response=True)
            error = done.get(timeout=STOP_TIMEOUT_S)
        except (queue.Empty, InferenceServerException) as exc:
            error = exc
        finally:
            self._stops.stop_stream()
        return error is None

    def close(self) -> None:
        self._stops.close()


class AsyncEngineClient:
    """Many engine streams at once from one event loop: the token streams over HTTP
    (`http_url`), the stops on one gRPC channel (`url`); both "host:port", by default the
    server's own from the environment.

    Use it from one event loop (the gRPC channel belongs to the loop it is first used on).
    """

    def __init__(self, model: str, url: str | None = None, http_url: str | None = None):
        self.model = model
        self.url = url or server_grpc_url()
        self.http_url = http_url or server_http_url()
        host, _, port = self.http_url.rpartition(":")
        self._tokens = GenerateStreamClient(model, host, int(port))
        self._client: aio_grpcclient.InferenceServerClient | None = None
        self._stopping: set[asyncio.Future] = set()  # stops of streams left early, kept alive

    def _grpc(self) -> aio_grpcclient.InferenceServerClient:
        if self._client is None:
            self._client = aio_grpcclient.InferenceServerClient(self.url)
        return self._client

    async def stream(self, arrays: Mapping[str, np.ndarray], request_id: str) -> AsyncIterator[list[int]]:
        """The engine's new token ids for one request. Each item holds every response that
        arrived since the previous item was taken: when the caller falls behind (a busy
        loop), tokens come in batches, so that it sends fewer, larger responses.

        An error raises. The caller ends a stream early with `stop(request_id)` and keeps
        reading to its end; a caller that leaves early (an exception) closes the connection,
        which Triton does not pass to the engine (server issue 7077), so the engine is then
        stopped here."""
        ended = False
        try:
            async with asyncio.timeout(RESPONSE_TIMEOUT_S) as deadline:
                async for responses in self._tokens.events(arrays, request_id):
                    deadline.reschedule(asyncio.get_running_loop().time() + RESPONSE_TIMEOUT_S)
                    batch = [token for response in responses for token in new_token_ids(response)]
                    if batch:
                        yield batch
            ended = True
        except TimeoutError:
            raise RuntimeError(f"no response from {self.model} in {RESPONSE_TIMEOUT_S:.0f} s") from None
        except (GenerateStreamError, OSError) as exc:
            ended = True  # the engine's request ended (or never started) with the error
            raise RuntimeError(str(exc)) from None
        finally:
            if not ended:
                stopping = asyncio.ensure_future(self.stop(request_id))
                self._stopping.add(stopping)
                stopping.add_done_callback(self._stopping.discard)

    async def stop(self, request_id: str) -> bool:
        """Cancel the engine's request `request_id` (see EngineClient.stop)."""
        async def requests():
            yield {"model_name": self.model, "inputs": infer_inputs(stop_inputs()), "request_id": request_id}

        ok = False
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                # Read to the call's end: leaving it open would cancel it on the server.
                async for _, error in open_stream(self._grpc(), requests()):
                    ok = error is None
        except (TimeoutError, InferenceServerException):
            return False
        return ok
