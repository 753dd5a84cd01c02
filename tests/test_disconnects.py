"""Clients that go away mid-stream, on the interfaces test_gateway and test_client do not
cover (issue 7): a raw gRPC client of the ensemble that drops its stream (and then sends
the documented `stop`), a gRPC stream straight to `tensorrt_llm` cancelled by the client,
and Triton's HTTP generate_stream closed by its client. Each time another stream runs
alongside and must get exactly the text it gets alone, and the engine's active-request
gauge must come back to 0. These are the rows of docs/serving.md's cancellation table.

They run on the paced server (helpers.LONG): the cancelled generation cannot end by
itself during the test, so the only way it leaves the engine is the cancellation; the
witness is started before the cancel and waited for until its first token (an event, not a
sleep), and its WITNESS_TOKENS steps of at least STEP_S each keep it running through the
cancel.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest

from helpers import (LONG, PROMPT, STEP_S, RawStream, active_requests, ensemble_arrays, greedy_whole, raw_stream,
                     wait_active)
from mixtral_triton.client import PredictClient
from mixtral_triton.client.ensemble import ENSEMBLE, requested_outputs
from mixtral_triton.protocol import parse_request

WITNESS_PROMPT = "The history of the wind, in three parts:"
# At least WITNESS_TOKENS * STEP_S = 4 s on the paced engine: from its first token it runs
# on for seconds, where the cancellation beside it takes one gRPC call.
WITNESS_TOKENS = 80
# What an abandoned generate_stream request generates, to its end: 10 s at least, well
# past the witness that runs beside it.
HTTP_TOKENS = 200
# How long a cancellation that should NOT reach the engine is given to show up anyway: ten
# times the engine's check period. (A window for a negative check: a slower machine can
# only make it miss a late cancellation, never fail a correct server.)
NOT_PASSED_ON_S = 0.5


class Witness(threading.Thread):
    """A greedy stream through our client, run while another request is cancelled."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.text: str | None = None
        self.error: Exception | None = None
        self.streaming = threading.Event()

    def run(self):
        try:
            request = parse_request({"prompt": WITNESS_PROMPT, "max_tokens": WITNESS_TOKENS, "temperature": 0})
            chunks = []
            for chunk in PredictClient(self.url, timeout_s=60).generate(request):
                chunks.append(chunk)
                self.streaming.set()
            assert chunks[-1].finish_reason == "length"
            self.text = "".join(chunk.text for chunk in chunks)
        except Exception as exc:  # reported by the test
            self.error = exc
        finally:
            self.streaming.set()

    def begin(self) -> "Witness":
        """Start, and return once the witness streams (it is in the engine's batch)."""
        self.start()
        assert self.streaming.wait(60) and self.error is None, self.error
        return self

    def wait_alone(self, server, timeout_s: float = 30.0) -> None:
        """Until the engine runs nothing but this witness; the witness must still be running
        then, or it did not witness the cancellation."""
        assert wait_active(server, lambda v: v <= 1, timeout_s) <= 1, "the engine still runs the other request"
        assert self.is_alive(), "the witness ended before the other request left the engine"

    def result(self) -> str:
        self.join(60)
        assert not self.is_alive(), "the witness stream did not end"
        assert self.error is None, self.error
        return self.text


@pytest.fixture(scope="module")
def solo(paced_server) -> str:
    """The witness's text when it runs alone."""
    return greedy_whole(paced_server, WITNESS_TOKENS, WITNESS_PROMPT).text


@pytest.fixture
def idle(paced_server):
    assert wait_active(paced_server, lambda v: v == 0) == 0
    yield
    assert wait_active(paced_server, lambda v: v == 0, 30) == 0, "a request was left running"


def _greedy(**extra) -> dict:
    """A long greedy ensemble request that streams (the ensemble's `stream` defaults to false)."""
    return ensemble_arrays(PROMPT, LONG, temperature=np.array([[0.0]], np.float32),
                           stream=np.array([[True]], np.bool_), **extra)


def test_a_dropped_ensemble_stream_runs_on_until_its_stop(paced_server, solo, idle):
    """gRPC cancellation does not reach the models of an ensemble (Triton 2.51); the
    documented way out is an ensemble `stop` request with the request id."""
    victim = RawStream(paced_server.grpc_url, ENSEMBLE, _greedy(), "dropped-1", requested_outputs())
    result, error = victim.next()
    assert error is None
    victim.close(cancel=True)  # the client drops its stream
    time.sleep(NOT_PASSED_ON_S)
    assert active_requests(paced_server) == 1, "the engine heard of the dropped ensemble stream"

    witness = Witness(paced_server.grpc_url).begin()
    _, error = raw_stream(paced_server.grpc_url, ENSEMBLE, ensemble_arrays(
        "", 1, stop=np.array([[True]], np.bool_)), "dropped-1")
    assert error is None, error.message()
    witness.wait_alone(paced_server)  # the dropped request left the engine (LONG: only the stop ends it)
    assert witness.result() == solo


def test_a_cancelled_engine_stream_stops_the_engine(paced_server, solo, idle):
    """Straight to tensorrt_llm, gRPC cancellation reaches the model: the engine sees
    is_cancelled() within its check period and frees the request."""
    engine_inputs = {"input_ids": np.array([[1, 1824, 349, 272, 5565]], np.int32),
                     "input_lengths": np.array([[5]], np.int32),
                     "request_output_len": np.array([[LONG]], np.int32),
                     "streaming": np.array([[True]], np.bool_)}
    victim = RawStream(paced_server.grpc_url, "tensorrt_llm", engine_inputs, "engine-direct")
    for _ in range(3):
        result, error = victim.next()
        assert error is None
    assert active_requests(paced_server) == 1
    witness = Witness(paced_server.grpc_url).begin()
    victim.close(cancel=True)
    witness.wait_alone(paced_server)
    assert witness.result() == solo


def test_tritons_http_stream_runs_to_max_tokens_after_a_disconnect(paced_server, solo, idle):
    """Triton's generate_stream does not pass a client disconnect on (server issue 7077):
    the request runs to its max_tokens, and the server carries on."""
    connection = http.client.HTTPConnection(paced_server.host, paced_server.ports.http, timeout=30)
    sent = time.monotonic()
    connection.request("POST", "/v2/models/ensemble/generate_stream", json.dumps(
        {"text_input": PROMPT, "max_tokens": HTTP_TOKENS, "temperature": 0, "stream": True}),
        {"Content-Type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200 and reply.read1(64).startswith(b"data: ")  # streaming has begun
    connection.sock.shutdown(socket.SHUT_RDWR)  # hang up, as a client that goes away does
    connection.close()
    time.sleep(NOT_PASSED_ON_S)
    assert active_requests(paced_server) == 1, "ended early: was the disconnect passed on after all?"
    witness = Witness(paced_server.grpc_url).begin()
    assert witness.result() == solo
    assert wait_active(paced_server, lambda v: v == 0, 60) == 0
    # It ran to its max_tokens: each of its steps lasts STEP_S at least, so it cannot have
    # left sooner (one cut short at the disconnect would have left with the witness, or
    # before: that is what the check above and this one tell apart).
    assert time.monotonic() - sent >= HTTP_TOKENS * STEP_S
    assert paced_server.is_ready()
    assert greedy_whole(paced_server, 4).completion_tokens == 4
