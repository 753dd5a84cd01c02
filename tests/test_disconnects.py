"""Clients that go away mid-stream, on the interfaces test_gateway and test_client do not
cover (issue 7): a raw gRPC client of the ensemble that drops its stream (and then sends
the documented `stop`), a gRPC stream straight to `tensorrt_llm` cancelled by the client,
and Triton's HTTP generate_stream closed by its client. Each time another stream runs
alongside and must get exactly the text it gets alone, and the engine's active-request
gauge must come back to 0. These are the rows of docs/serving.md's cancellation table.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest

from helpers import LONG, PROMPT, RawStream, active_requests, ensemble_arrays, greedy_whole, raw_stream, wait_active
from mixtral_triton.client import PredictClient
from mixtral_triton.client.ensemble import ENSEMBLE, requested_outputs
from mixtral_triton.protocol import parse_request

WITNESS_PROMPT = "The history of the wind, in three parts:"
WITNESS_TOKENS = 160  # about 1-2 s on the CPU engine: it overlaps each cancellation
HTTP_TOKENS = 300  # what an abandoned generate_stream request generates, to its end


class Witness(threading.Thread):
    """A greedy stream through our client, run while another request is cancelled."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.text: str | None = None
        self.error: Exception | None = None

    def run(self):
        try:
            request = parse_request({"prompt": WITNESS_PROMPT, "max_tokens": WITNESS_TOKENS, "temperature": 0})
            chunks = list(PredictClient(self.url, timeout_s=60).generate(request))
            assert chunks[-1].finish_reason == "length"
            self.text = "".join(chunk.text for chunk in chunks)
        except Exception as exc:  # reported by the test
            self.error = exc

    def wait_alone(self, server, timeout_s: float = 5.0) -> float:
        """Seconds until the engine runs nothing but (at most) this witness."""
        started = time.monotonic()
        while active_requests(server) > (1 if self.is_alive() else 0):
            assert time.monotonic() - started < timeout_s, "the engine still runs the other request"
            time.sleep(0.02)
        return time.monotonic() - started

    def result(self) -> str:
        self.join(60)
        assert not self.is_alive(), "the witness stream did not end"
        assert self.error is None, self.error
        return self.text


@pytest.fixture(scope="module")
def solo(triton_server) -> str:
    """The witness's text when it runs alone."""
    return greedy_whole(triton_server, WITNESS_TOKENS, WITNESS_PROMPT).text


@pytest.fixture
def idle(triton_server):
    assert wait_active(triton_server, lambda v: v == 0) == 0
    yield
    assert wait_active(triton_server, lambda v: v == 0, 30) == 0, "a request was left running"


def _greedy(**extra) -> dict:
    """A long greedy ensemble request that streams (the ensemble's `stream` defaults to false)."""
    return ensemble_arrays(PROMPT, LONG, temperature=np.array([[0.0]], np.float32),
                           stream=np.array([[True]], np.bool_), **extra)


def test_a_dropped_ensemble_stream_runs_on_until_its_stop(triton_server, solo, idle):
    """gRPC cancellation does not reach the models of an ensemble (Triton 2.51); the
    documented way out is an ensemble `stop` request with the request id."""
    victim = RawStream(triton_server.grpc_url, ENSEMBLE, _greedy(), "dropped-1", requested_outputs())
    result, error = victim.next()
    assert error is None
    victim.close(cancel=True)  # the client drops its stream
    time.sleep(0.5)  # ten times the engine's cancellation check period
    assert active_requests(triton_server) == 1, "the engine heard of the dropped ensemble stream"

    witness = Witness(triton_server.grpc_url)
    witness.start()
    time.sleep(0.2)  # the witness is in the batch
    _, error = raw_stream(triton_server.grpc_url, ENSEMBLE, ensemble_arrays(
        "", 1, stop=np.array([[True]], np.bool_)), "dropped-1")
    assert error is None, error.message()
    assert witness.wait_alone(triton_server) < 2  # the dropped request left the engine
    assert witness.result() == solo


def test_a_cancelled_engine_stream_stops_the_engine(triton_server, solo, idle):
    """Straight to tensorrt_llm, gRPC cancellation reaches the model: the engine sees
    is_cancelled() within its check period and frees the request."""
    engine_inputs = {"input_ids": np.array([[1, 1824, 349, 272, 5565]], np.int32),
                     "input_lengths": np.array([[5]], np.int32),
                     "request_output_len": np.array([[LONG]], np.int32),
                     "streaming": np.array([[True]], np.bool_)}
    victim = RawStream(triton_server.grpc_url, "tensorrt_llm", engine_inputs, "engine-direct")
    for _ in range(3):
        result, error = victim.next()
        assert error is None
    assert active_requests(triton_server) == 1
    witness = Witness(triton_server.grpc_url)
    witness.start()
    time.sleep(0.2)  # the witness is in the batch
    victim.close(cancel=True)
    assert witness.wait_alone(triton_server) < 2
    assert witness.result() == solo


def test_tritons_http_stream_runs_to_max_tokens_after_a_disconnect(triton_server, solo, idle):
    """Triton's generate_stream does not pass a client disconnect on (server issue 7077):
    the request runs to its max_tokens, and the server carries on."""
    started = time.monotonic()  # how long the whole completion takes, alone
    assert greedy_whole(triton_server, HTTP_TOKENS, PROMPT).completion_tokens == HTTP_TOKENS
    alone_s = time.monotonic() - started

    connection = http.client.HTTPConnection(triton_server.host, triton_server.ports.http, timeout=30)
    connection.request("POST", "/v2/models/ensemble/generate_stream", json.dumps(
        {"text_input": PROMPT, "max_tokens": HTTP_TOKENS, "temperature": 0, "stream": True}),
        {"Content-Type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200 and reply.read1(64).startswith(b"data: ")  # streaming has begun
    connection.sock.shutdown(socket.SHUT_RDWR)  # hang up, as a client that goes away does
    connection.close()
    hung_up = time.monotonic()
    time.sleep(min(0.5, alone_s / 4))  # five times the engine's cancellation check period
    assert active_requests(triton_server) == 1, "ended early: was the disconnect passed on after all?"
    witness = Witness(triton_server.grpc_url)
    witness.start()
    assert witness.result() == solo
    assert wait_active(triton_server, lambda v: v == 0, 30) == 0
    # it ran (nearly) as long as the whole completion takes: it was not cut short
    assert time.monotonic() - hung_up >= 0.5 * alone_s
    assert triton_server.is_ready()
    assert greedy_whole(triton_server, 4).completion_tokens == 4
