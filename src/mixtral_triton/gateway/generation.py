"""The gateway's logic: a generation through the asyncio client, the bound on concurrent
generations, and cancellation when the HTTP client goes away. Every generation route
answers with a `GenerationResponse`, so these rules are one mechanism for all of them:

- above --max-concurrency generations in flight (per pod, across its worker processes:
  gateway/slots.py) a request waits up to --queue-wait seconds for a slot, then 429 with
  Retry-After; a slot is given back before the answer's last byte is sent, so a client that
  sends its next request on seeing the end finds it free;
- the status is chosen once the engine's first response (or error) is in: a request the
  server refuses is a 4xx/5xx JSON error, never a 200 with an error inside;
- an error after streaming began ends the stream visibly (the format's error line or
  event) and aborts the chunked body, so the client cannot take it for a whole answer;
- the HTTP client disconnecting (at any point, streaming or not) cancels the generation
  task: the asyncio client then sends `stop` on the gRPC stream and the engine lets go.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.responses import Response

from mixtral_triton.client.aio import AsyncPredictClient
from mixtral_triton.client.ensemble import Chunk, ServerError, new_request_id
from mixtral_triton.gateway.chat import ChatTemplate
from mixtral_triton.gateway.metrics import Metrics
from mixtral_triton.gateway.slots import Slots
from mixtral_triton.gateway.wire_formats import Format
from mixtral_triton.gateway.http_errors import GatewayError
from mixtral_triton.protocol import PredictRequest, RequestError

log = logging.getLogger("mixtral_triton.gateway")

# gRPC status of a ServerError -> HTTP status and error type
_SERVER_ERRORS = {"UNAVAILABLE": (503, "service_unavailable"),
                  "DEADLINE_EXCEEDED": (504, "server_error"),
                  "INVALID_ARGUMENT": (400, "invalid_request_error")}


@dataclass(frozen=True)
class GatewaySettings:
    triton_grpc_url: str = "localhost:8001"
    max_concurrency: int = 64
    api_key: str | None = None
    model_name: str = "mixtral"
    tokenizer_dir: Path | None = None
    log_prompts: bool = False
    timeout_s: float = 300.0  # the longest wait for one response from the engine
    retry_after_s: int = 1
    queue_wait_s: float = 2.0  # how long a request beyond max_concurrency waits for a slot
    max_body_bytes: int = 1 << 20  # larger request bodies are answered 413, unread


class StreamAborted(Exception):
    """Raised to the server after an error has been written into a started stream: the
    server then drops the connection instead of ending the chunked body, so the body is
    visibly incomplete."""


class Serving:
    """State shared by the routes: the gRPC client (one channel), the bound, the metrics."""

    def __init__(self, settings: GatewaySettings, metrics: Metrics,
                 client: AsyncPredictClient | None = None, chat: ChatTemplate | None = None,
                 slots: Slots | None = None):
        self.settings = settings
        self.metrics = metrics
        self.client = client or AsyncPredictClient(settings.triton_grpc_url, settings.timeout_s)
        self.chat = chat or ChatTemplate(settings.tokenizer_dir)
        self.slots = slots or Slots(settings.max_concurrency)

    async def ready(self) -> bool:
        """Triton and the ensemble are ready, and its Python models answer (a dead stub
        process leaves Triton reporting ready: docs/reliability.md)."""
        return await self.client.is_ready() and await self.client.answers()

    async def connect(self) -> None:
        """Open the gRPC channel at start, not at the first request: each worker process has
        its own, and a worker's first request would otherwise wait for the connection."""
        if not await self.client.is_ready():
            log.warning("Triton at %s is not ready yet; requests will be answered 503 until it is",
                        self.settings.triton_grpc_url)

    async def close(self) -> None:
        await self.client.close()

    def generation(self, request: PredictRequest, fmt: Format, route: str) -> "GenerationResponse":
        return GenerationResponse(self, request, fmt, route)


def server_error_status(exc: ServerError, retry_after_s: int = 1) -> GatewayError:
    status, type_ = _SERVER_ERRORS.get(exc.status or "", (500, "server_error"))
    message = str(exc)
    headers = {}
    if status == 503:  # gone or overloaded: worth retrying, as a 429
        message = f"the model server is unavailable: {message}"
        headers["Retry-After"] = str(retry_after_s)
    return GatewayError(status, type_, message, headers=headers)


def json_response_events(status: int, body: dict, headers: dict[str, str] | None = None):
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    return ({"type": "http.response.start", "status": status, "headers": raw},
            {"type": "http.response.body", "body": payload, "more_body": False})


class GenerationResponse(Response):
    """One generation, answered in `fmt` (an ASGI response FastAPI passes through)."""

    def __init__(self, serving: Serving, request: PredictRequest, fmt: Format, route: str):
        super().__init__(status_code=200, media_type=fmt.media_type)
        self.serving = serving
        self.request = request
        self.fmt = fmt
        self.route = route
        self.request_id = new_request_id()

    async def __call__(self, scope, receive, send) -> None:
        serving = self.serving
        if not await self._admitted():
            limit = serving.settings.max_concurrency
            error = GatewayError(429, "rate_limit_error",
                                 f"{limit} generations are in flight, the most this gateway "
                                 "runs at once: retry later",
                                 headers={"Retry-After": str(serving.settings.retry_after_s)})
            for event in json_response_events(429, error.body(self.fmt.openai), error.headers):
                await send(event)
            return
        serving.metrics.in_flight.inc()
        self._holding = True
        self._answered = False
        run = asyncio.create_task(self._run(self._tracking(send)), name=f"generation-{self.request_id}")
        gone = asyncio.create_task(_disconnected(receive))
        try:
            await asyncio.wait({run, gone}, return_when=asyncio.FIRST_COMPLETED)
            # (the server also reports a disconnect once the whole answer is sent)
            if not run.done() and not self._answered:  # the client went away first
                serving.metrics.disconnects.labels(self.route).inc()
                log.info("%s %s: client disconnected, generation cancelled", self.route, self.request_id)
                await _cancel_and_wait(run)
            else:
                await run  # StreamAborted, or a bug, reaches the server
        finally:
            gone.cancel()
            await _cancel_and_wait(run)  # our own task cancelled (shutdown): stop the generation
            self._give_back()

    async def _admitted(self) -> bool:
        """A slot now, or within --queue-wait (counted as waiting meanwhile)."""
        slots, metrics = self.serving.slots, self.serving.metrics
        if slots.take_now():
            return True
        metrics.waiting.inc()
        try:
            return await slots.acquire(self.serving.settings.queue_wait_s)
        finally:
            metrics.waiting.dec()

    def _give_back(self) -> None:
        if self._holding:
            self._holding = False
            self.serving.slots.release()
            self.serving.metrics.in_flight.dec()

    def _tracking(self, send):
        async def tracked(message) -> None:
            last = message["type"] == "http.response.body" and not message.get("more_body", False)
            if last:  # the generation has ended: its slot is free before the client can tell
                self._give_back()
            await send(message)
            if last:
                self._answered = True
        return tracked

    async def _run(self, send) -> None:
        serving, fmt = self.serving, self.fmt
        started = time.monotonic()
        if serving.settings.log_prompts:
            log.info("%s %s prompt: %r", self.route, self.request_id, self.request.prompt)
        engine_request = dataclasses.replace(self.request, stream=True)  # see TTFT, disconnects
        batches = serving.client.generate_batches(engine_request, self.request_id, fmt.options)
        async with contextlib.aclosing(batches):
            try:
                first = await anext(batches)
            except Exception as exc:
                error = self._error(exc)
                for event in json_response_events(error.status, error.body(fmt.openai),
                                                  {"X-Request-Id": self.request_id, **error.headers}):
                    await send(event)
                log.info("%s %s: %d %s", self.route, self.request_id, error.status, error.message)
                return
            previous = time.monotonic()
            route_metrics = serving.metrics.of_route(self.route)
            route_metrics.time_to_first_token.observe(previous - started)
            last = first[-1]
            ended = {c.sequence_index for c in first if c.finish_reason is not None}

            async def following():
                """The batches after the first, until every sequence has ended; one ITL
                observation per batch (its tokens counted on its last sequence)."""
                nonlocal previous, last
                while len(ended) < fmt.options.sequences:
                    batch = await anext(batches)
                    now = time.monotonic()
                    tokens = max(1, batch[-1].completion_tokens - last.completion_tokens)
                    route_metrics.inter_token_latency.observe((now - previous) / tokens)
                    previous, last = now, batch[-1]
                    ended.update(c.sequence_index for c in batch if c.finish_reason is not None)
                    yield batch

            if fmt.streaming:
                await self._stream(send, first, following())
            else:
                await self._whole(send, first, following())
            log.info("%s %s: finish=%s prompt_tokens=%d completion_tokens=%d %.3fs%s", self.route,
                     self.request_id, last.finish_reason, last.prompt_tokens,
                     last.completion_tokens, time.monotonic() - started, self._user())

    async def _stream(self, send, first: list[Chunk], rest) -> None:
        fmt = self.fmt
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", fmt.media_type.encode()), (b"x-request-id", self.request_id.encode()),
            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        await _body(send, fmt.opening(first[0]) + self._render(first))
        try:
            async for batch in rest:
                await _body(send, self._render(batch))
        except Exception as exc:
            error = self._error(exc)
            await _body(send, fmt.stream_error(error))
            log.warning("%s %s: error after streaming began: %s", self.route, self.request_id,
                        error.message)
            raise StreamAborted(f"{self.request_id}: {error.message}") from exc
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _whole(self, send, first: list[Chunk], rest) -> None:
        chunks = list(first)
        try:
            async for batch in rest:
                chunks.extend(batch)
        except Exception as exc:
            error = self._error(exc)
            for event in json_response_events(error.status, error.body(self.fmt.openai),
                                              {"X-Request-Id": self.request_id, **error.headers}):
                await send(event)
            return
        sequences: dict[int, list[Chunk]] = {}
        for chunk in chunks:
            sequences.setdefault(chunk.sequence_index, []).append(chunk)
        body = self.fmt.whole(sequences)
        for event in json_response_events(200, body, {"X-Request-Id": self.request_id}):
            await send(event)

    def _user(self) -> str:
        # repr: a label from the client cannot forge log lines
        return f" user={self.fmt.user[:256]!r}" if self.fmt.user else ""

    def _render(self, batch: list[Chunk]) -> bytes:
        """A batch's bytes, written at once (a batch of several: the relay fell behind)."""
        return b"".join(self.fmt.closing(chunk) if chunk.finish_reason is not None
                        else self.fmt.piece(chunk) if chunk.text or chunk.log_probs else b""
                        for chunk in batch)

    def _error(self, exc: Exception) -> GatewayError:
        if isinstance(exc, RequestError):
            return GatewayError.of_request_error(self.fmt.rename(exc))
        if isinstance(exc, ServerError):
            return server_error_status(exc, self.serving.settings.retry_after_s)
        if isinstance(exc, StopAsyncIteration):
            return GatewayError(502, "server_error", "the model server ended the stream early")
        raise exc


async def _body(send, data: bytes) -> None:
    if data:
        await send({"type": "http.response.body", "body": data, "more_body": True})


async def _disconnected(receive) -> None:
    """Returns when the client has gone away (the request body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _cancel_and_wait(task: asyncio.Task) -> None:
    """Cancel `task` and wait until it has ended (its generation has sent `stop`)."""
    if task.done():
        return
    task.cancel()
    try:
        await asyncio.shield(asyncio.gather(task, return_exceptions=True))
    except asyncio.CancelledError:
        pass
