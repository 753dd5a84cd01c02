"""The serving models' connection to the tensorrt_llm model: gRPC over loopback to the
server they run in, not Triton's BLS.

Why not BLS: in the Python backend's stub (Triton 2.51, and python_backend's main branch
as of 2026-11), the responses of a decoupled BLS call are turned into numpy arrays on the
stub's message thread, which never takes the GIL (`Stub::ProcessBLSResponseDecoupled` ->
`InferResponse::LoadFromSharedMemory` -> the `PbTensor` constructor). That races with
the model's own Python thread and corrupts the stub's heap: it crashed our detokenizer
every few thousand streamed requests (docs/reliability.md). A gRPC client delivers its
responses on threads that do take the GIL.

The server's gRPC address comes from the environment the server was started with
(`MIXTRAL_TRITON_GRPC_URL`, which the launchers set); without it, Triton's default port.
"""

from __future__ import annotations

import os
import queue
from typing import Iterator, Mapping

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from mixtral_triton.client.ensemble import infer_inputs
from mixtral_triton.launcher.ports import GRPC_URL_ENV
from mixtral_triton.serving.engine_request import ENGINE_OUTPUTS, stop_inputs

DEFAULT_GRPC_URL = "127.0.0.1:8001"  # Triton's default gRPC port
# Longest wait for the engine's next response before the stream is given up: far longer
# than any step, so that only a wedged server ends a stream this way.
RESPONSE_TIMEOUT_S = 600.0


def server_grpc_url() -> str:
    return os.environ.get(GRPC_URL_ENV) or DEFAULT_GRPC_URL


class EngineClient:
    """One stream at a time (the detokenizer serves one per instance), plus stops."""

    def __init__(self, model: str, url: str | None = None):
        self.model = model
        self.url = url or server_grpc_url()
        self._streams = grpcclient.InferenceServerClient(self.url)
        self._stops = grpcclient.InferenceServerClient(self.url)

    def stream(self, arrays: Mapping[str, np.ndarray], request_id: str) -> Iterator[dict]:
        """The engine's responses to one request, as {output name: array}; an error raises.
        Leaving the loop early stops the request on the engine (a `stop` by its id, then
        the rest of its stream is read and dropped). Not by cancelling the gRPC call: under
        load that made Triton 2.51's gRPC frontend abort the whole server
        ("proto_buffer_writer.h: ASSERTION FAILED: !byte_buffer->Valid()")."""
        responses: queue.Queue = queue.Queue()
        self._streams.start_stream(callback=lambda result, error: responses.put((result, error)))
        finished = False

        def next_response():
            nonlocal finished
            try:
                result, error = responses.get(timeout=RESPONSE_TIMEOUT_S)
            except queue.Empty:
                raise RuntimeError(f"no response from {self.model} in {RESPONSE_TIMEOUT_S:.0f} s") from None
            if error is not None:
                finished = True
                raise RuntimeError(error.message() if hasattr(error, "message") else str(error))
            finished = result.get_response().parameters["triton_final_response"].bool_param
            return result

        try:
            self._streams.async_stream_infer(
                self.model, infer_inputs(dict(arrays)), request_id=request_id,
                outputs=[grpcclient.InferRequestedOutput(name) for name in ENGINE_OUTPUTS],
                enable_empty_final_response=True)
            while not finished:
                result = next_response()
                if result.get_response().outputs:  # the final response may carry nothing
                    arrays = {name: result.as_numpy(name) for name in ENGINE_OUTPUTS}
                    yield {name: array for name, array in arrays.items() if array is not None}
        finally:
            try:
                if not finished:
                    self.stop(request_id)
                    while not finished:
                        next_response()
            finally:
                self._streams.stop_stream(cancel_requests=not finished)

    def stop(self, request_id: str) -> bool:
        """Cancel the engine's request `request_id`, if the engine takes the stop: under a
        full queue (max_queue_size) it may refuse it, and the generation ends by itself."""
        done: queue.Queue = queue.Queue()
        self._stops.start_stream(callback=lambda result, error: done.put(error))
        try:
            self._stops.async_stream_infer(self.model, infer_inputs(stop_inputs()), request_id=request_id,
                                           enable_empty_final_response=True)
            error = done.get(timeout=30)
        except (queue.Empty, InferenceServerException) as exc:
            error = exc
        finally:
            self._stops.stop_stream()
        return error is None

    def close(self) -> None:
        self._streams.close()
        self._stops.close()

