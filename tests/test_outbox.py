"""The detokenizer's sender thread (mixtral_triton.ensemble_models.outbox): a stream's text
goes out in order, merged while the thread is busy, the last response after everything
before it; a failed send ends the stream with its error."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mixtral_triton.ensemble_models.outbox import Outbox


class Recorder:
    """A send that records its responses and, while `hold` is clear, waits (a slow server)."""

    def __init__(self, fail_on: str | None = None):
        self.sent: list[tuple] = []
        self.hold = threading.Event()
        self.fail_on = fail_on

    def __call__(self, text, tokens, reason, final, failure):
        self.hold.wait(10)
        if text == self.fail_on:
            raise RuntimeError(f"send of {text!r} failed")
        self.sent.append((text, tokens, reason, final, failure))


def test_text_gathered_while_the_thread_is_busy_goes_out_as_one_response_in_order():
    async def run():
        send = Recorder()
        box = Outbox().box(send)
        box.put("a", 1)
        await asyncio.sleep(0.05)  # the thread took "a" and waits in its send
        box.put("b", 2)
        box.put("c", 3)
        closing = asyncio.ensure_future(box.close("d", 4, "length"))
        await asyncio.sleep(0)  # close() has added its text
        send.hold.set()
        await closing
        return send.sent

    assert asyncio.run(run()) == [("a", 1, "", False, None), ("bcd", 4, "length", True, None)]


def test_streams_of_one_process_do_not_mix():
    async def run():
        outbox = Outbox()
        sends = [Recorder(), Recorder()]
        boxes = [outbox.box(send) for send in sends]
        for i in range(20):
            boxes[i % 2].put(str(i), i)
        for send in sends:
            send.hold.set()
        await asyncio.gather(*(box.close("", 20, "stop") for box in boxes))
        return ["".join(r[0] for r in send.sent) for send in sends], [send.sent[-1][3] for send in sends]

    texts, finals = asyncio.run(run())
    assert texts == ["".join(str(i) for i in range(0, 20, 2)), "".join(str(i) for i in range(1, 20, 2))]
    assert finals == [True, True]


def test_a_failed_send_ends_the_stream_with_its_error_in_the_last_response():
    async def run():
        send = Recorder(fail_on="bad")
        send.hold.set()
        box = Outbox().box(send)
        box.put("bad", 1)
        for _ in range(100):
            if box.error is not None:
                break
            await asyncio.sleep(0.01)
        box.put("ignored", 2)  # after a failed send only the last response is tried
        await box.close("", 2, "", box.error)
        return box.error, send.sent

    error, sent = asyncio.run(run())
    assert str(error) == "send of 'bad' failed"
    assert sent == [("ignored", 2, "", True, error)]


def test_close_raises_what_the_last_send_raised():
    async def run():
        send = Recorder(fail_on="end")
        send.hold.set()
        await Outbox().box(send).close("end", 1, "stop")

    with pytest.raises(RuntimeError, match="send of 'end' failed"):
        asyncio.run(run())
