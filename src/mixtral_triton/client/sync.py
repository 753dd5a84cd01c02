"""The blocking client: one gRPC stream per request."""

from __future__ import annotations

import queue
from typing import Iterator

import tritonclient.grpc as grpcclient

from mixtral_triton.client.ensemble import (
    CANCEL_WAIT_S, Chunk, Completion, ServerError, cancel_call, chunk_of, ends_request,
    generation_call, is_final, new_request_id, server_error)
from mixtral_triton.protocol import PredictRequest, parse_request


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
        client.start_stream(callback=lambda result, error: responses.put((_response(result), error)))
        finished = False
        try:
            try:
                client.async_stream_infer(**generation_call(request, request_id), enable_empty_final_response=True)
            except grpcclient.InferenceServerException as exc:
                finished = True  # the stream broke before the request went out
                raise _stream_error(responses, exc) from None
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
                self._cancel(responses, request_id)
            # A request the server may never end (its stub died, no answer within timeout_s)
            # must not be waited for: closing gracefully would block until it ends.
            client.stop_stream(cancel_requests=not finished)
            client.close()

    def _cancel(self, responses: queue.Queue, request_id: str) -> None:
        """Send `stop` for the request, and wait (briefly) until the cancelled generation and
        then the stop have ended, so the engine has let go of it. The stop goes on a stream
        of its own: the detokenizer answers it from another thread than the generation's
        responses, so on the same stream its answer could be written at the same moment as the
        generation's, which Triton 2.51's gRPC frontend does not survive (docs/cpu-triton-stack.md)."""
        stop_responses: queue.Queue = queue.Queue()
        stopper = grpcclient.InferenceServerClient(self.url)
        try:
            stopper.start_stream(callback=lambda result, error: stop_responses.put((_response(result), error)))
            stopper.async_stream_infer(**cancel_call(request_id), enable_empty_final_response=True)
            for answers in (responses, stop_responses):
                while not ends_request(*_next(answers, CANCEL_WAIT_S)):
                    pass
        except (ServerError, grpcclient.InferenceServerException):
            pass  # the server is gone or the request already ended: nothing left to cancel
        finally:
            stopper.stop_stream(cancel_requests=True)
            stopper.close()


def _response(result: grpcclient.InferResult | None):
    """The response's protobuf, which client/ensemble.py reads."""
    return None if result is None else result.get_response()


def _stream_error(responses: queue.Queue, exc: Exception) -> Exception:
    """The stream's own error (the server unreachable, say), which tritonclient hands to the
    callback while its enqueue only says that the stream is broken."""
    try:
        _, error = responses.get(timeout=1.0)
    except queue.Empty:
        error = None
    return server_error(error if error is not None else exc)


def _next(responses: queue.Queue, timeout_s: float):
    try:
        return responses.get(timeout=timeout_s)
    except queue.Empty:
        raise ServerError(f"no response from the server within {timeout_s:.0f} s",
                          "DEADLINE_EXCEEDED") from None
