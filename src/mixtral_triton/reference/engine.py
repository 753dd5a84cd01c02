"""A CPU generation engine with the request semantics of TensorRT-LLM's executor, on top of
the reference model; the Triton Python-backend model drives it.

A background thread steps the model. Before every step it drops cancelled requests
(freeing their KV caches) and admits waiting ones up to ``max_batch_size`` (in-flight
batching: a new request's prefill runs in the same packed step as the others' decodes).
After every step each request gets an event with only its new tokens; its last event
carries the finish reason:

* ``"stop"``: the end id was chosen (not returned, as TensorRT-LLM leaves it out) or the
  generated tokens end with a stop word (returned, as TensorRT-LLM returns them);
* ``"length"``: ``max_tokens`` tokens were generated;
* ``"cancelled"``: ``cancel`` was called (or the engine shut down) first;
* ``"error"``: the model step failed; ``RequestHandle.result`` raises it.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from mixtral_triton.errors import UserError
from mixtral_triton.reference.forward import ReferenceModel, SequenceCache
from mixtral_triton.reference.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """One generation request. ``max_tokens`` counts new tokens (TensorRT-LLM's
    max_new_tokens). ``pad_id`` is the id the caller pads batched outputs with; a
    single-beam generation never emits it."""

    input_ids: Sequence[int]
    max_tokens: int
    end_id: int | None = None
    pad_id: int | None = None
    stop_words: Sequence[Sequence[int]] = ()
    bad_words: Sequence[Sequence[int]] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    streaming: bool = True


@dataclass(frozen=True)
class Event:
    """New tokens of one request; ``finish_reason`` is set on its last event only. Without
    streaming the only event is the last one, with all the tokens."""

    request_id: int
    tokens: tuple[int, ...]
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestHandle:
    """What ``Engine.submit`` returns: the request's id, its events (when no callback was
    given) and its result."""

    def __init__(self, request_id: int, engine: "Engine", on_event: Callable[[Event], None] | None):
        self.id = request_id
        self._engine = engine
        self._on_event = on_event
        self._events: queue.Queue[Event] = queue.Queue()
        self._tokens: list[int] = []
        self._finish_reason: str | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The events as they come, up to the last one (only when no callback was given)."""
        if self._on_event is not None:
            raise UserError("this request delivers its events to its callback")
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if event.finished:
                return

    def result(self, timeout: float | None = None) -> tuple[list[int], str]:
        """Wait for the end; returns (all generated tokens, finish reason)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"request {self.id} failed") from self._error
        return list(self._tokens), self._finish_reason

    def cancel(self) -> bool:
        return self._engine.cancel(self.id)

    def _deliver(self, event: Event, error: BaseException | None = None) -> None:
        self._tokens.extend(event.tokens)
        if event.finished:
            self._finish_reason, self._error = event.finish_reason, error
        if self._on_event is None:
            self._events.put(event)
        else:
            try:
                self._on_event(event)
            except Exception:  # a caller's bug must not stop the stepping loop
                log.exception("event callback of request %d failed", self.id)
        if event.finished:
            self._done.set()


class _Active:
    """Engine-side state of one request."""

    def __init__(self, handle: RequestHandle, request: Request, max_tokens: int, sampler):
        self.handle = handle
        self.request = request
        self.max_tokens = max_tokens
        self.sampler = sampler  # the model's: turns its step output for this request into a token
        self.cache: SequenceCache | None = None  # created on admission, dropped when finished
        self.next_input = list(request.input_ids)  # what the next step feeds: the prompt, then the last token
        self.generated: list[int] = []
        self.unsent: list[int] = []  # held back until the last event when not streaming
        self.cancelled = False
        self.error: BaseException | None = None

    def advance(self, token: int) -> tuple[tuple[int, ...], str | None]:
        """Take the chosen token; returns (tokens to send now, finish reason or None)."""
        if token == self.request.end_id:
            return self.end("stop")
        self.generated.append(token)
        self.unsent.append(token)
        self.next_input = [token]
        if any(len(w) <= len(self.generated) and self.generated[-len(w):] == list(w)
               for w in self.request.stop_words):
            return self.end("stop")
        if len(self.generated) >= self.max_tokens:
            return self.end("length")
        if not self.request.streaming:
            return (), None
        sent, self.unsent = tuple(self.unsent), []
        return sent, None

    def end(self, reason: str) -> tuple[tuple[int, ...], str]:
        sent, self.unsent = tuple(self.unsent), []
        return sent, reason


class QueueFull(UserError):
    """``submit`` while ``max_queue_size`` requests already wait for a batch slot. Its text is
    the executor's own (TensorRT-LLM v1.2.1, executorImpl.cpp), which the tensorrtllm backend
    sends uncoded as INTERNAL: the pipeline in front must recognise that wording as overload."""


class Engine:
    """In-flight batching over a ReferenceModel (or the load tests' TableModel, which has the
    same interface); thread-safe ``submit`` and ``cancel``.

    ``max_seq_len`` (default: unlimited) bounds prompt + generated tokens: a longer prompt
    is refused, and ``max_tokens`` is cut to fit, as TensorRT-LLM's executor does.
    ``max_queue_size`` (default 0: unbounded) bounds the requests waiting for a batch slot,
    as the executor's maxQueueSize: one more is refused with QueueFull, not queued.
    ``on_step`` is called with the request ids of every step's batch, before the step.
    """

    def __init__(self, model: ReferenceModel, max_batch_size: int = 8, max_seq_len: int | None = None,
                 on_step: Callable[[list[int]], None] | None = None, max_queue_size: int = 0):
        if max_batch_size < 1:
            raise UserError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_size < 0:
            raise UserError(f"max_queue_size must be >= 0, got {max_queue_size}")
        self._model = model
        self._max_batch_size = max_batch_size
        self._max_queue_size = max_queue_size
        self._max_seq_len = max_seq_len
        self._on_step = on_step
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._waiting: list[_Active] = []
        self._running: list[_Active] = []
        self._by_id: dict[int, _Active] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="reference-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> RequestHandle:
        """Queue a request. Events go to ``on_event`` (called on the engine thread) if given,
        else to the handle's ``events()``."""
        max_tokens = self._check(request)
        with self._lock:
            if self._stopping:
                raise UserError("the engine is shut down")
            # Waiting requests that a free batch slot takes at the next step are not queued.
            queued = len(self._waiting) - max(0, self._max_batch_size - len(self._running))
            if self._max_queue_size and queued >= self._max_queue_size:
                raise QueueFull(f"Maximum queue size of {self._max_queue_size} has been reached, "
                                "please try again later")
            handle = RequestHandle(next(self._ids), self, on_event)
            active = _Active(handle, request, max_tokens, self._model.new_sampler(request))
            self._waiting.append(active)
            self._by_id[handle.id] = active
            self._lock.notify()
        return handle

    def cancel(self, request_id: int) -> bool:
        """Ask for a request to end; it leaves the batch before the next step. False if it
        already finished (or never existed)."""
        with self._lock:
            active = self._by_id.get(request_id)
            if active is None:
                return False
            active.cancelled = True
            self._lock.notify()
            return True

    @property
    def active_count(self) -> int:
        """Requests submitted and not finished yet (waiting or running)."""
        with self._lock:
            return len(self._by_id)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the loop; unfinished requests end as cancelled."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _check(self, request: Request) -> int:
        vocab = self._model.config.vocab_size

        def check_ids(ids: Sequence[int], what: str) -> None:
            if not ids:
                raise UserError(f"{what} must not be empty")
            if any(not 0 <= int(t) < vocab for t in ids):
                raise UserError(f"{what} must hold token ids in [0, {vocab})")

        check_ids(request.input_ids, "input_ids")
        for word in (*request.stop_words, *request.bad_words):
            check_ids(word, "a stop or bad word")
        for name in ("end_id", "pad_id"):
            value = getattr(request, name)
            if value is not None and not 0 <= value < vocab:
                raise UserError(f"{name} must be in [0, {vocab}), got {value}")
        if request.max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if self._max_seq_len is None:
            return request.max_tokens
        room = self._max_seq_len - len(request.input_ids)
        if room < 1:
            raise UserError(f"the prompt has {len(request.input_ids)} tokens; at most "
                            f"{self._max_seq_len - 1} fit in max_seq_len {self._max_seq_len}")
        return min(request.max_tokens, room)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self._running):
                    self._lock.wait()
                stopping = self._stopping
                leaving = [a for a in self._waiting + self._running if a.cancelled or stopping]
                self._waiting = [a for a in self._waiting if a not in leaving]
                self._running = [a for a in self._running if a not in leaving]
                while self._waiting and len(self._running) < self._max_batch_size:
                    active = self._waiting.pop(0)
                    active.cache = self._model.new_sequence()
                    self._running.append(active)
                self._forget(leaving)
                batch = list(self._running)
            self._deliver([(a, *a.end("cancelled")) for a in leaving])
            if stopping:
                return
            if batch:
                self._deliver(self._step(batch))

    def _step(self, batch: list[_Active]) -> list[tuple[_Active, tuple[int, ...], str | None]]:
        if self._on_step is not None:
            self._on_step([a.handle.id for a in batch])
        try:
            logits = self._model.step([a.next_input for a in batch], [a.cache for a in batch])
        except Exception as exc:
            log.exception("model step failed")
            for active in batch:
                active.error = exc
            outcome = [(a, *a.end("error")) for a in batch]
        else:
            with self._lock:
                cancelled = [a.cancelled for a in batch]
            # A request cancelled during the step ends now, without this step's token.
            outcome = [(a, *(a.end("cancelled") if gone else a.advance(a.sampler.choose(row))))
                       for a, row, gone in zip(batch, logits, cancelled)]
        with self._lock:
            finished = [a for a, _, reason in outcome if reason is not None]
            self._running = [a for a in self._running if a not in finished]
            self._forget(finished)
        return outcome

    def _forget(self, finished: list[_Active]) -> None:
        """Drop finished requests and free their KV caches (the caller holds the lock)."""
        for active in finished:
            active.cache = None
            self._by_id.pop(active.handle.id, None)

    @staticmethod
    def _deliver(outcome: list[tuple[_Active, tuple[int, ...], str | None]]) -> None:
        for active, tokens, reason in outcome:
            if tokens or reason is not None:
                active.handle._deliver(Event(active.handle.id, tokens, reason), active.error)
