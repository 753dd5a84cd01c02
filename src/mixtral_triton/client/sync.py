"""The blocking client: one gRPC stream per request."""

from __future__ import annotations

import queue
from typing import Iterator

import tritonclient.grpc as grpcclient

from mixtral_triton.client.ensemble import (
    ENSEMBLE, Chunk, Completion, ServerError, cancel_inputs, chunk_of, is_final, new_request_id,
    request_inputs, requested_outputs, server_error)
from mixtral_triton.protocol import PredictRequest, parse_request

CANCEL_WAIT_S = 10.0


class PredictClient:
    """`predict()` with the Truss schema, against Triton's gRPC port (default localhost:8001).

    Stopping early (breaking out of the stream, an exception, Ctrl-C) cancels the request
    on the server: the engine stops generating for it.
    """

    def __init__(self, url: str = "localhost:8001", timeout_s: float = 300.0):
        self.url = url
        self.timeout_s = timeout_s

    def predict(self, prompt: str, stream: bool = True, **fields) -> Iterator[str] | Completion:
        """Text chunks as they come (stream=True) or the whole Completion (stream=False).
        The fields and their rules are mixtral_triton.protocol's; a bad one raises
        RequestError before anything is sent."""
        request = parse_request({"prompt": prompt, "stream": stream, **fields})
        if stream:
            return (chunk.text for chunk in self.generate(request) if chunk.text)
        last = None
        for last in self.generate(request):
            pass
        return Completion(last.text, last.finish_reason, last.prompt_tokens, last.completion_tokens)

    def generate(self, request: PredictRequest, request_id: str | None = None) -> Iterator[Chunk]:
        """The ensemble's responses for one request, the last with its finish reason."""
        request_id = request_id or new_request_id()
        responses: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        finished = False
        try:
            client.async_stream_infer(ENSEMBLE, request_inputs(request), request_id=request_id,
                                      outputs=requested_outputs(), enable_empty_final_response=True)
            while not finished:
                result, error = _next(responses, self.timeout_s)
                if error is not None:
                    finished = True
                    raise server_error(error)
                finished = is_final(result)
                chunk = chunk_of(result)
                if chunk is not None:
                    yield chunk
        finally:
            if not finished:
                self._cancel(client, responses, request_id)
            client.stop_stream()
            client.close()

    @staticmethod
    def _cancel(client, responses: queue.Queue, request_id: str) -> None:
        """Send `stop` for the request on its own stream, and wait (briefly) until both the
        stop and the cancelled generation have ended, so the engine has let go of it."""
        try:
            client.async_stream_infer(ENSEMBLE, cancel_inputs(), request_id=request_id,
                                      enable_empty_final_response=True)
            finals = 0
            while finals < 2:
                result, error = _next(responses, CANCEL_WAIT_S)
                finals += 1 if error is not None or is_final(result) else 0
        except (ServerError, grpcclient.InferenceServerException):
            pass  # the server is gone or the request already ended: nothing left to cancel


def _next(responses: queue.Queue, timeout_s: float):
    try:
        return responses.get(timeout=timeout_s)
    except queue.Empty:
        raise ServerError(f"no response from the server within {timeout_s:.0f} s",
                          "DEADLINE_EXCEEDED") from None
