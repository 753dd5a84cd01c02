"""The asyncio client: one gRPC stream per request over `tritonclient.grpc.aio`, one channel
per client object (the gateway keeps one for all its requests).

The wire format (tensors, the `stop` request, reading a response, errors) is
client/ensemble.py's, shared with the blocking client. A generation that does not run to
its end (the task is cancelled, the consumer stops iterating, an exception) is cancelled
on the server by `stop` sent on the same stream, as the blocking client does: gRPC
cancellation does not reach the models of an ensemble (docs/cpu-triton-stack.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import AsyncIterator

import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from mixtral_triton.client.empty_final import open_stream
from mixtral_triton.client.ensemble import (
    CANCEL_WAIT_S, ENSEMBLE, PLAIN, Chunk, Completion, GenerationOptions, ServerError, cancel_call,
    chunk_of, ends_request, generation_call, is_final, new_request_id, probe_calls, server_error)
from mixtral_triton.protocol import PredictRequest, parse_request

_END = object()  # the request iterator's last item: half-closes the stream
CLOSE_WAIT_S = 2.0  # how long an ended request's stream may take to close before it is cut


class AsyncPredictClient:
    """`await predict()` with the Truss schema, against Triton's gRPC port.

        async with AsyncPredictClient("localhost:8001") as client:
            async for piece in await client.predict("What is mistral wind?", max_tokens=64):
                print(piece, end="", flush=True)
            completion = await client.predict("Hi", stream=False)

    Stopping early (leaving the `async for`, cancelling the task, an exception) cancels
    the request on the server: the engine stops generating for it. Use one client from
    one event loop.
    """

    def __init__(self, url: str = "localhost:8001", timeout_s: float = 300.0):
        self.url = url
        self.timeout_s = timeout_s
        self._client: grpcaio.InferenceServerClient | None = None

    def _grpc(self) -> grpcaio.InferenceServerClient:
        if self._client is None:  # made inside the running loop: the channel binds to it
            self._client = grpcaio.InferenceServerClient(self.url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def __aenter__(self) -> "AsyncPredictClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def is_ready(self, timeout_s: float = 2.0) -> bool:
        """Triton is ready and so is the ensemble model."""
        client = self._grpc()
        try:
            return bool(await client.is_server_ready(client_timeout=timeout_s)
                        and await client.is_model_ready(ENSEMBLE, client_timeout=timeout_s))
        except InferenceServerException:
            return False

    async def answers(self, timeout_s: float = 2.0) -> bool:
        """The Python tokenizer model and the engine answer a request (no engine work; see
        `probe_calls`). Triton 2.51 keeps reporting a model ready after its Python stub
        process has died; this notices it for these two."""
        # One after the other: two requests answered at once on one stream can crash Triton
        # 2.51's gRPC frontend (see _end_stream).
        calls = probe_calls(new_request_id())
        outbox: asyncio.Queue = asyncio.Queue()
        inbox = _Inbox()
        try:
            call = open_stream(self._grpc(), _requests(outbox))
        except InferenceServerException:
            return False
        reader = asyncio.create_task(_read(call, inbox))
        try:
            async with asyncio.timeout(timeout_s):
                for request in calls:
                    outbox.put_nowait(request)
                    result, error = await _next(inbox, timeout_s)
                    if error is not None or not is_final(result):
                        return False
            return True
        except (ServerError, TimeoutError):
            return False
        finally:
            outbox.put_nowait(_END)
            call.cancel()
            reader.cancel()

    async def predict(self, prompt: str, stream: bool = True,
                      **fields) -> AsyncIterator[str] | Completion:
        """Text chunks as they come (stream=True) or the whole Completion (stream=False).
        The fields and their rules are mixtral_triton.protocol's; a bad one raises
        RequestError here, before anything is sent."""
        request = parse_request({"prompt": prompt, "stream": stream, **fields})
        if stream:
            return (chunk.text async for chunk in self.generate(request) if chunk.text)
        last = None
        async for last in self.generate(request):
            pass
        return Completion(last.text, last.finish_reason, last.prompt_tokens, last.completion_tokens)

    async def generate(self, request: PredictRequest,
                       request_id: str | None = None) -> AsyncIterator[Chunk]:
        """The ensemble's responses for one request, the last with its finish reason."""
        async with contextlib.aclosing(self.generate_batches(request, request_id)) as batches:
            async for batch in batches:
                for chunk in batch:
                    yield chunk

    async def generate_batches(self, request: PredictRequest, request_id: str | None = None,
                               options: GenerationOptions = PLAIN) -> AsyncIterator[list[Chunk]]:
        """The same chunks as generate(), as lists of every chunk that has arrived since the
        last list: a consumer that fell behind relays them in one write. With several
        sequences the request ends when each has its finish reason (or at the final flag)."""
        request_id = request_id or new_request_id()
        outbox: asyncio.Queue = asyncio.Queue()
        inbox = _Inbox(self.timeout_s)
        outbox.put_nowait(generation_call(request, request_id, options))
        ended: set[int] = set()  # the sequences whose finish reason came
        try:
            call = open_stream(self._grpc(), _requests(outbox))
        except InferenceServerException as exc:
            raise server_error(exc) from None
        # The responses are read by a task of their own, so that neither a timeout nor the
        # consumer's cancellation interrupts a read of the gRPC call (which would end the
        # stream before the stop could be sent on it).
        reader = asyncio.create_task(_read(call, inbox), name=f"stream-{request_id}")
        finished = False  # the server has ended the request (its finish reason came, or an error)
        try:
            while not finished:
                batch, error = [], None
                for response, error in await inbox.get_all():
                    if error is not None:
                        finished = True
                        break
                    chunk = chunk_of(response)
                    if chunk is not None and chunk.finish_reason is not None:
                        ended.add(chunk.sequence_index)
                    finished = is_final(response) or len(ended) == options.sequences
                    if chunk is not None:
                        batch.append(chunk)
                    if finished:
                        break
                if batch:
                    yield batch
                if error is not None:
                    raise server_error(error)
        finally:
            inbox.close()
            end = _end_stream(self._grpc(), call, reader, outbox, inbox, None if finished else request_id)
            await _unless_cancelled_again(end)


class _Inbox:
    """The responses of one call, put by its reader task. With `timeout_s`, a wait for the
    next response fails with DEADLINE_EXCEEDED once none has come for that long: one timer
    per stream, moved on only when it fires, rather than one set and cancelled per response
    (which cost the gateway more than a tenth of its time per token)."""

    def __init__(self, timeout_s: float | None = None):
        self._items: collections.deque = collections.deque()
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future | None = None
        self._timeout_s = timeout_s
        self._last = self._loop.time()  # when the last response (or the request) went by
        self._expired = False
        self._timer = self._loop.call_at(self._last + timeout_s, self._check) if timeout_s else None

    def put(self, item) -> None:
        self._items.append(item)
        self._last = self._loop.time()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self):
        """The next response (result, error) in order."""
        await self._wait()
        return self._items.popleft()

    async def get_all(self) -> list:
        """Every response that has arrived, at least one."""
        await self._wait()
        items = list(self._items)
        self._items.clear()
        return items

    async def _wait(self) -> None:
        while not self._items:
            if self._expired:
                raise ServerError(f"no response from the server within {self._timeout_s:.0f} s",
                                  "DEADLINE_EXCEEDED")
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _check(self) -> None:
        due = self._last + self._timeout_s
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
            return
        self._expired = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        """Stop the timer: later waits (the ending of a cancelled stream) bring their own."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._expired = False


async def _requests(outbox: asyncio.Queue):
    while (item := await outbox.get()) is not _END:
        yield item


async def _read(call, inbox: _Inbox) -> None:
    try:
        async for item in call:
            inbox.put(item)
        inbox.put((None, ServerError("the server closed the stream", "UNAVAILABLE")))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the call failed (server gone, stream cancelled): say why
        details = exc.details() if hasattr(exc, "details") else str(exc)
        status = str(exc.code()) if hasattr(exc, "code") else None
        inbox.put((None, InferenceServerException(msg=details, status=status)))


async def _next(inbox: _Inbox, timeout_s: float):
    # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation that
    # arrives as the awaited item does, and the generation would then never be cancelled.
    try:
        async with asyncio.timeout(timeout_s):
            result, error = await inbox.get()
    except TimeoutError:
        raise ServerError(f"no response from the server within {timeout_s:.0f} s",
                          "DEADLINE_EXCEEDED") from None
    if isinstance(error, ServerError):
        raise error
    return result, error


async def _end_stream(grpc, call, reader: asyncio.Task, outbox: asyncio.Queue, inbox: _Inbox,
                      cancel_id: str | None) -> None:
    """Cancel an unfinished request (send `stop` and wait, briefly, until the cancelled
    generation and then the stop have ended, so the engine has let go of it), then close
    the stream. The stop goes on a call of its own: the detokenizer answers it from another
    thread than the generation's responses, so on the same stream its answer could be written
    at the same moment as the generation's, which Triton 2.51's gRPC frontend does not survive."""
    stop_call = stop_reader = None
    try:
        if cancel_id is not None and not reader.done():
            stop_outbox: asyncio.Queue = asyncio.Queue()
            stop_inbox = _Inbox()
            stop_outbox.put_nowait(cancel_call(cancel_id))
            stop_outbox.put_nowait(_END)
            stop_call = open_stream(grpc, _requests(stop_outbox))
            stop_reader = asyncio.create_task(_read(stop_call, stop_inbox))
            for answers in (inbox, stop_inbox):
                while not ends_request(*await _next(answers, CANCEL_WAIT_S)):
                    pass
        # Half-close: the server ends the stream once it has answered all its requests
        # (the empty final marker may still be on its way).
        outbox.put_nowait(_END)
        async with asyncio.timeout(CLOSE_WAIT_S):
            await asyncio.shield(reader)
    except (ServerError, InferenceServerException, TimeoutError):
        pass  # the server is gone or the request already ended: nothing left to cancel
    finally:
        outbox.put_nowait(_END)
        call.cancel()
        reader.cancel()
        if stop_call is not None:
            stop_call.cancel()
            stop_reader.cancel()


async def _unless_cancelled_again(coroutine) -> None:
    """Run the stream's ending to completion even if the task that ends it (already being
    cancelled, or closing the generator) is cancelled once more meanwhile."""
    task = asyncio.ensure_future(coroutine)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise
