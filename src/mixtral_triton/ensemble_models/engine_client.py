"""The serving models' connection to the tensorrt_llm model: gRPC over loopback to the
server they run in, not Triton's BLS.

Why not BLS: in the Python backend's stub (Triton 2.51, and python_backend's main branch
as of 2026-11), the responses of a decoupled BLS call are turned into numpy arrays on the
stub's message thread, which never takes the GIL (`Stub::ProcessBLSResponseDecoupled` ->
`InferResponse::LoadFromSharedMemory` -> the `PbTensor` constructor). That races with
the model's own Python thread and corrupts the stub's heap: it crashed our detokenizer
every few thousand streamed requests (docs/reliability.md). A gRPC client delivers its
responses on threads (or the event loop) that hold the GIL.

Two clients: `EngineClient` (blocking; the tokenizer model's stops) and
`AsyncEngineClient` (asyncio; the detokenizer, which serves many streams from one event
loop: each stream is a gRPC call of its own on one shared channel, so no two requests'
answers are ever written on one gRPC stream, a pattern that can abort Triton 2.51's gRPC
frontend, docs/cpu-triton-stack.md).

The server's gRPC address comes from the environment the server was started with
(`MIXTRAL_TRITON_GRPC_URL`, which the launchers set); without it, Triton's default port.
"""

from __future__ import annotations

import asyncio
import os
import queue
from collections import deque
from typing import AsyncIterator, Mapping

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aio_grpcclient
from tritonclient.utils import InferenceServerException

from mixtral_triton.client.empty_final import open_stream
from mixtral_triton.client.ensemble import infer_inputs
from mixtral_triton.launcher.ports import GRPC_URL_ENV
from mixtral_triton.ensemble_models.engine_request import ENGINE_OUTPUTS, new_token_ids, stop_inputs

DEFAULT_GRPC_URL = "127.0.0.1:8001"  # Triton's default gRPC port
# Longest wait for the engine's next response before the stream is given up: far longer
# than any step, so that only a wedged server ends a stream this way.
RESPONSE_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0


def server_grpc_url() -> str:
    return os.environ.get(GRPC_URL_ENV) or DEFAULT_GRPC_URL


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
    """Many engine streams at once from one event loop, on one gRPC channel.

    Create and use it on one event loop (the channel belongs to the loop it is first used on).
    """

    def __init__(self, model: str, url: str | None = None):
        self.model = model
        self.url = url or server_grpc_url()
        self._client: aio_grpcclient.InferenceServerClient | None = None

    def _grpc(self) -> aio_grpcclient.InferenceServerClient:
        if self._client is None:
            self._client = aio_grpcclient.InferenceServerClient(self.url)
        return self._client

    async def stream(self, arrays: Mapping[str, np.ndarray], request_id: str) -> AsyncIterator[list[int]]:
        """The engine's new token ids for one request. Each item holds every response that
        arrived since the previous item was taken: when the caller falls behind (a busy
        loop), tokens come in batches, so that it sends fewer, larger responses.

        An error raises. The caller ends a stream early with `stop(request_id)` and keeps
        reading to its end; never by cancelling the gRPC call: under load that made Triton
        2.51's gRPC frontend abort the whole server ("proto_buffer_writer.h: ASSERTION
        FAILED: !byte_buffer->Valid()")."""
        finished = asyncio.Event()

        async def requests():
            yield {"model_name": self.model, "inputs": infer_inputs(dict(arrays)), "request_id": request_id,
                   "outputs": [grpcclient.InferRequestedOutput(name) for name in ENGINE_OUTPUTS]}
            await finished.wait()  # the stream stays open until its final response

        arrived: deque = deque()  # (token ids, None) or (None, error)
        wake = asyncio.Event()

        async def read():
            try:
                async for result, error in open_stream(self._grpc(), requests()):
                    if error is not None:
                        arrived.append((None, RuntimeError(error.message())))
                        break
                    response = result.get_response()
                    ids = _token_ids(response)
                    if ids:
                        arrived.append((ids, None))
                        wake.set()
                    if response.parameters["triton_final_response"].bool_param:
                        break
                else:
                    arrived.append((None, RuntimeError(f"{self.model} closed the stream early")))
            except Exception as exc:  # the connection failed: the stream ends with it
                arrived.append((None, RuntimeError(str(exc))))
            finally:
                finished.set()
                wake.set()

        reader = asyncio.create_task(read())
        try:
            while True:
                async with asyncio.timeout(RESPONSE_TIMEOUT_S):
                    await wake.wait()
                wake.clear()
                batch: list[int] = []
                error = None
                while arrived:
                    ids, error = arrived.popleft()
                    if error is not None:
                        break
                    batch += ids
                if batch:
                    yield batch
                if error is not None:
                    raise error
                if finished.is_set() and not arrived:
                    return
        except TimeoutError:
            raise RuntimeError(f"no response from {self.model} in {RESPONSE_TIMEOUT_S:.0f} s") from None
        finally:
            finished.set()
            await reader

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


def _token_ids(response) -> list[int]:
    """New token ids of one engine response (ModelInferResponse), read from its raw bytes."""
    arrays = {}
    for output, raw in zip(response.outputs, response.raw_output_contents):
        arrays[output.name] = np.frombuffer(raw, np.int32).reshape(output.shape)
    if "output_ids" not in arrays:
        return []  # the empty final response
    return new_token_ids(arrays["output_ids"], arrays.get("sequence_length"))
