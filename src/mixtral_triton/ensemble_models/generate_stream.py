"""The engine's token stream read over Triton's HTTP generate_stream endpoint, parsed on the
detokenizer's event loop.

Why not gRPC for the tokens: grpc.aio hands every message from its poller thread to the
event loop, and its per-message Python costs about twice the CPU of this reader (measured:
~140 against ~65 us per engine response in a client process, docs/serving.md). Here the
loop reads the socket itself: one wake-up reads every response that arrived meanwhile, and
an SSE event is one JSON parse. The server's HTTP frontend costs about what its gRPC
frontend does per response.

The request is Triton's generate extension: one JSON object whose keys are the model's
input names (each value a scalar or a flat list, which Triton shapes by the model's
metadata: [1, 2, N] for a stop-words list) plus `id`; the answer is a chunked
`text/event-stream`, one `data: {...}` event per engine response, holding every output the
model produced, or `{"error": ...}`. The chunked body ends after the engine's final
response, so the end of the HTTP body is the end of the stream.

Connections are HTTP/1.1 keep-alive, reused by the next stream (a new connection costs
a stream about 0.5 ms of time to first token on loopback, measured), and closed once idle
for IDLE_CLOSE_S: Triton's shutdown waits for every open HTTP connection up to its exit
timeout ("Found N HTTP service connections", seen on 2.51), idle keep-alive ones included,
so a connection kept open for good would make every drain last the full timeout.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Mapping

import numpy as np

# An idle connection is closed after this long: short beside Triton's one-second shutdown
# poll, long beside the gap between one stream's end and the next one's start under load.
IDLE_CLOSE_S = 0.5


class GenerateStreamError(RuntimeError):
    """The server answered the stream with an error (its message, as Triton wrote it)."""


def request_body(model_inputs: Mapping[str, np.ndarray], request_id: str) -> bytes:
    """A generate request: every input flattened (Triton reshapes by the model's metadata)."""
    body = {name: (array.reshape(-1).tolist() if array.size != 1 else array.reshape(-1)[0].item())
            for name, array in model_inputs.items()}
    body["id"] = request_id
    return json.dumps(body, separators=(",", ":")).encode()


class _Stream(asyncio.Protocol):
    """One connection's HTTP/1.1 response parser: status and headers, then a chunked body of
    SSE events. Parsed events go to `events` (a deque) and `wake` is set; `done` is set at the
    body's end, at an error, or when the connection closes."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.events: deque = deque()  # dicts; an error raises from the reader
        self.wake = asyncio.Event()
        self.done = False
        self.error: Exception | None = None
        self.reusable = False  # the answer ended cleanly and the server keeps the connection
        self._buffer = bytearray()
        self._state = "head"  # head -> size -> data -> (size ...) -> trailer; or "plain"
        self._remaining = 0
        self._status = 0
        self._keep_alive = False
        self._events = bytearray()  # body bytes not yet split into SSE events

    # -- asyncio.Protocol --
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._parse()
        except Exception as exc:  # noqa: BLE001 - a malformed answer ends this stream only
            self._finish(GenerateStreamError(f"unreadable generate_stream answer: {exc}"))
            self.transport.close()
        self.wake.set()

    def connection_lost(self, exc) -> None:
        self.reusable = False
        if not self.done:
            self._finish(ConnectionError(f"the server closed the generate_stream connection ({exc or 'EOF'})"))
        self.wake.set()

    # -- parsing --
    def _parse(self) -> None:
        buffer = self._buffer
        while not self.done:
            if self._state == "head":
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
                del buffer[:end + 4]
                self._status = int(head[0].split(" ", 2)[1])
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
                self._keep_alive = headers.get("connection", "").lower() != "close"
                if headers.get("transfer-encoding", "").lower() == "chunked":
                    self._state = "size"
                else:  # an answer before any streaming: Triton's error JSON with a length
                    self._state, self._remaining = "plain", int(headers.get("content-length", "0"))
            elif self._state == "size":
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buffer[:end]).split(b";", 1)[0], 16)
                del buffer[:end + 2]
                self._state, self._remaining = ("data", size) if size else ("trailer", 0)
            elif self._state == "data":
                if len(buffer) < self._remaining + 2:
                    return
                self._events += buffer[:self._remaining]
                del buffer[:self._remaining + 2]
                self._state = "size"
                self._split_events()
            elif self._state == "trailer":
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                del buffer[:end + 2]
                if end == 0:  # the empty line after the last chunk: the stream ended
                    self._split_events()
                    self.reusable = self._keep_alive and not buffer and self._status == 200
                    self._finish(None)
            else:  # plain
                if len(buffer) < self._remaining:
                    return
                body = bytes(buffer[:self._remaining])
                del buffer[:self._remaining]
                self._finish(GenerateStreamError(_error_message(body, self._status)))

    def _split_events(self) -> None:
        while True:
            end = self._events.find(b"\n\n")
            if end < 0:
                return
            line = bytes(self._events[:end])
            del self._events[:end + 2]
            if line.startswith(b"data:"):
                event = json.loads(line[5:])
                if "error" in event:
                    self._finish(GenerateStreamError(str(event["error"])))
                    return
                self.events.append(event)

    def _finish(self, error: Exception | None) -> None:
        if not self.done:
            self.done, self.error = True, error
            if error is not None:
                self.reusable = False


def _error_message(body: bytes, status: int) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"


class GenerateStreamClient:
    """Streams of one model's generate_stream on one server, from one event loop."""

    def __init__(self, model: str, host: str, port: int):
        self.model, self.host, self.port = model, host, port
        self._idle: dict[asyncio.Transport, asyncio.TimerHandle] = {}  # newest last, each with its closer
        self._head = (f"POST /v2/models/{model}/generate_stream HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      "Content-Type: application/json\r\nContent-Length: ").encode()

    async def events(self, model_inputs: Mapping[str, np.ndarray], request_id: str):
        """Each item: the engine responses (dicts of outputs) that arrived since the last item
        was taken. Raises GenerateStreamError for an error the server sent, ConnectionError
        when the connection failed."""
        body = request_body(model_inputs, request_id)
        stream = await self._send(self._head + str(len(body)).encode() + b"\r\n\r\n" + body)
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                if stream.events:
                    batch = list(stream.events)
                    stream.events.clear()
                    yield batch
                if stream.done:
                    if stream.error is not None:
                        raise stream.error
                    return
        finally:
            self._release(stream)

    async def _send(self, message: bytes) -> _Stream:
        """Write the request on an idle connection, or on a new one."""
        while self._idle:
            transport, closer = self._idle.popitem()
            closer.cancel()
            if transport.is_closing():
                continue
            stream = _Stream()
            transport.set_protocol(stream)
            stream.transport = transport
            transport.write(message)
            return stream
        transport, stream = await asyncio.get_running_loop().create_connection(_Stream, self.host, self.port)
        transport.write(message)
        return stream

    def _release(self, stream: _Stream) -> None:
        """Keep a connection whose answer ended cleanly (a stream left early closes it)."""
        transport = stream.transport
        if not (stream.reusable and stream.done) or transport.is_closing():
            transport.close()
            return
        self._idle[transport] = asyncio.get_running_loop().call_later(IDLE_CLOSE_S, self._close_idle, transport)

    def _close_idle(self, transport: asyncio.Transport) -> None:
        del self._idle[transport]
        transport.close()
