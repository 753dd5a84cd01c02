"""Streamed responses sent from one thread of their own, so that the detokenizer's event loop
never waits on them, and merged while that thread is busy.

Why: the Python backend's `sender.send` is a blocking round trip to the server (it waits
until the server has taken the response, 0.3 to 1 ms under load), and it was half of the
detokenizer's time. On the loop, every send stalled every other stream of the process.
Here the loop only appends text to its stream's box; the sender thread (one per process)
takes each box in turn and sends what has gathered in it as one response. When the server
keeps up, that is one response per piece of text, as before; when the host's CPU is the
bottleneck, the thread falls behind and each response carries more text, so the pipeline
spends less per token exactly when it must (the backpressure vLLM's and SGLang's
`stream_interval` set by hand). Text and counts are the same however it is grouped.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Callable

# send(text, completion tokens so far, finish reason, final, error): one response of a
# stream; the last has final True and either a finish reason or the error that ended it.
SendResponse = Callable[[str, int, str, bool, Exception | None], None]


class StreamBox:
    """One stream's text not yet sent. `put` and `close` from the event loop only."""

    def __init__(self, outbox: "Outbox", send: SendResponse):
        self._outbox, self._send = outbox, send
        self._pending: list[str] = []
        self._tokens = 0  # completion tokens when the pending text was made
        self._final = False
        self._reason = ""
        self._failure: Exception | None = None  # what ended the stream, for its last response
        self._queued = False
        self._closed: asyncio.Future | None = None
        self.error: Exception | None = None  # a send failed: the stream should end

    def put(self, text: str, completion_tokens: int) -> None:
        with self._outbox.lock:
            self._pending.append(text)
            self._tokens = completion_tokens
            self._enqueue()

    async def close(self, text: str, completion_tokens: int, reason: str, failure: Exception | None = None) -> None:
        """Send the last response (with the final flag) after everything before it: the
        finish reason, or `failure` as the stream's error. Raises what that send raised."""
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        with self._outbox.lock:
            self._pending.append(text)
            self._tokens = completion_tokens
            self._final, self._reason, self._failure = True, reason, failure
            self._enqueue()
        await self._closed  # raises what the last send raised

    def _enqueue(self) -> None:  # holding the lock
        if not self._queued:
            self._queued = True
            self._outbox.ready.append(self)
            self._outbox.wake.notify()

    def _take(self) -> tuple[str, int, str, bool, Exception | None]:  # holding the lock
        text, self._pending = "".join(self._pending), []
        self._queued = False
        return text, self._tokens, self._reason, self._final, self._failure

    def _sent(self, final: bool, error: Exception | None) -> None:  # sender thread
        if not final:
            if error is not None and self.error is None:
                self.error = error  # the loop ends the stream with it
            return
        closed = self._closed

        def settle() -> None:
            if not closed.done():
                closed.set_result(None) if error is None else closed.set_exception(error)

        closed.get_loop().call_soon_threadsafe(settle)


class Outbox:
    """The sender thread of one process and the boxes waiting for it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.ready: deque[StreamBox] = deque()
        self._thread = threading.Thread(target=self._run, name="detokenizer-sender", daemon=True)
        self._thread.start()

    def box(self, send: SendResponse) -> StreamBox:
        return StreamBox(self, send)

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.ready:
                    self.wake.wait()
                box = self.ready.popleft()
                text, tokens, reason, final, failure = box._take()
            error = None
            if box.error is None or final:  # after a failed send, only the last is tried
                try:
                    box._send(text, tokens, reason, final, failure)
                except Exception as exc:  # noqa: BLE001 - the stream raises it
                    error = exc
            box._sent(final, error)
