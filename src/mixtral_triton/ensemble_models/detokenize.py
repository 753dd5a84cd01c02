"""The streaming detokenizer's work for many streams in one process (one asyncio loop):
call the engine, turn its tokens into text, answer; the postprocessing model is its glue.

Per process: a gRPC channel for stops, the token table, the sender thread, and one task that
looks every CANCELLATION_CHECK_PERIOD_S whether a `stop` marked any of this process's runs
cancelled (one query, whatever the number of streams). Per stream: a `Completion` (a few hundred
bytes of state) and its HTTP connection to the engine with its parser.

A streamed response costs far more than a token (an IPC round trip to the server, the
ensemble's hop, the client's gRPC message), so a stream sends at most one response per
MIN_RESPONSE_INTERVAL_S: text that arrives sooner waits for the interval's end (or the
stream's end) and goes out with what came meanwhile. The first token always goes out at
once (TTFT is untouched), and a real engine's decode step is longer than the interval, so
on a GPU only a detokenizer that fell behind groups tokens; text and counts are the same
however tokens are grouped. The responses go out from the process's sender thread
(mixtral_triton.ensemble_models.outbox), which merges what a stream gathered while it was busy.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Callable, Mapping, Sequence

import numpy as np

from mixtral_triton.ensemble_models.completion import Completion
from mixtral_triton.ensemble_models.engine_client import AsyncEngineClient
from mixtral_triton.ensemble_models.engine_request import engine_inputs
from mixtral_triton.ensemble_models.outbox import Outbox
from mixtral_triton.ensemble_models.runs import RunRegistry
from mixtral_triton.ensemble_models.tensors import strings

# How often the process looks whether a `stop` marked one of its runs cancelled. The
# tokenizer model, which takes the stop, also stops the engine at once; this covers a stop
# that came before the engine had the request. The C++ backend checks its own
# cancellations every 100 ms.
CANCELLATION_CHECK_PERIOD_S = 0.05
# Shortest time between two streamed responses of one stream: below the decode step of
# Mixtral 8x22B on any GPU the plan knows (about 4 ms at batch 1 on H200, TP=4), so that
# only tokens that come faster than an engine makes them (a backlog) are grouped.
MIN_RESPONSE_INTERVAL_S = 0.002

# send(text, completion, completion tokens so far, finish reason, final, error): one
# response of a stream, called from the process's sender thread (mixtral_triton.ensemble_models.outbox)
Send = Callable[[str, Completion, int, str, bool, Exception | None], None]


class StreamingDetokenizer:
    """Serves any number of streams at once; use it from one event loop."""

    def __init__(self, tables: Mapping[bool, Sequence[bytes]], engine: AsyncEngineClient, runs: RunRegistry):
        self.tables = tables  # by skip_special_tokens
        self.engine = engine
        self.runs = runs
        self._live = 0
        self._cancelled: set[str] = set()
        self._watch: asyncio.Task | None = None
        self.outbox = Outbox()

    async def generate(self, client_id: str, inputs: Mapping[str, np.ndarray], send: Send) -> None:
        """One request: text to `send` as it comes (or once, when not streaming), the last
        response with the finish reason, or with the error that ended the stream; returns
        once the last response is sent."""
        flag = lambda name: bool(inputs[name].reshape(-1)[0])  # noqa: E731
        completion = Completion(self.tables[flag("SKIP_SPECIAL_TOKENS")], strings(inputs, "STOP_STRINGS"),
                                int(inputs["REQUEST_OUTPUT_LEN"].reshape(-1)[0]),
                                int(inputs["INPUT_LENGTHS"].reshape(-1)[0]),
                                include_stop=flag("INCLUDE_STOP_STR_IN_OUTPUT"),
                                count_outputs=(flag("RETURN_NUM_INPUT_TOKENS"), flag("RETURN_NUM_OUTPUT_TOKENS")))
        streaming = flag("STREAMING")
        # exclude_input_in_output false: the prompt comes first, as its own text
        echo = "".join(strings(inputs, "ECHO_TEXT"))
        engine_id = uuid.uuid4().hex  # unique, so a stop never hits another client's run
        self.runs.start(client_id, engine_id)
        self._live += 1
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_cancellations())
        # The stream's responses go out from the sender thread.
        box = self.outbox.box(lambda text, tokens, reason, final, failure:
                              send(text, completion, tokens, reason, final, failure))
        pieces: list[str] = []  # text not handed to the box yet
        if echo and streaming:
            box.put(echo, 0)
        elif echo:
            pieces.append(echo)
        loop = asyncio.get_running_loop()
        next_send = 0.0  # loop time before which new text waits (the first token never does)
        timer: asyncio.TimerHandle | None = None

        def flush() -> None:
            nonlocal next_send, timer
            timer = None
            if pieces:
                box.put("".join(pieces), completion.completion_tokens)
                pieces.clear()
                next_send = loop.time() + MIN_RESPONSE_INTERVAL_S

        failure = None
        try:
            ending = False  # a stop string matched or the run was cancelled: drain quietly
            async for token_ids in self.engine.stream(engine_inputs(inputs), engine_id):
                if box.error is not None:
                    raise box.error
                if ending:
                    continue
                text = completion.add(token_ids)
                if text:
                    pieces.append(text)
                    if streaming and timer is None:
                        wait = next_send - loop.time()
                        if wait > 0:
                            timer = loop.call_later(wait, flush)
                        else:
                            flush()
                if completion.stopped or engine_id in self._cancelled:
                    ending = True
                    await self.engine.stop(engine_id)  # then read the stream to its end
        except Exception as exc:  # noqa: BLE001 - the stream ends with it, after its text
            failure = exc
        finally:
            if timer is not None:
                timer.cancel()
            self._live -= 1
            self._cancelled.discard(engine_id)
            cancelled = self.runs.finish(engine_id)
        if failure is not None:
            await box.close("", completion.completion_tokens, "", failure)  # the error, not text
            return
        tail, reason = completion.finish(cancelled=cancelled)
        pieces.append(tail)
        await box.close("".join(pieces), completion.completion_tokens, reason)

    async def _watch_cancellations(self) -> None:
        while self._live:
            self._cancelled = self.runs.cancelled_here()
            await asyncio.sleep(CANCELLATION_CHECK_PERIOD_S)
