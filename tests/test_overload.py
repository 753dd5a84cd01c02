"""Overload (issue 7): the engine's queue bound. A repository filled with max_batch_size 1
and max_queue_size 1 for the engine model: one request runs, one waits, the next is
refused at once with a clear, retryable error (gRPC: ServerError UNAVAILABLE; gateway: 503
with Retry-After), never left to hang; and after the load the server serves again.
(The gateway's own bound, 429 with Retry-After, is test_gateway's.)

The engine is the paced stand-in (helpers.LONG): the requests that fill the batch slot and
the queue cannot end before the test stops them, so the queue is full when the next request
comes, however fast the machine.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from helpers import LONG, PROMPT, RawStream, ensemble_arrays, gateway, paced_settings, raw_stream, text_of, wait_active
from mixtral_triton.client import PredictClient, ServerError
from mixtral_triton.client.ensemble import ENSEMBLE, requested_outputs, server_error
from mixtral_triton.launcher import TritonServer
from mixtral_triton.repository.fill import fill_repository


@pytest.fixture(scope="module")
def queued(cpu_repository, tmp_path_factory):
    """A server whose (paced) engine runs one request and queues one, and its gateway."""
    settings = paced_settings(cpu_repository, max_batch_size=1, max_queue_size=1)
    repository = fill_repository(settings, tmp_path_factory.mktemp("queued") / "repository")
    with TritonServer(repository, log_file=tmp_path_factory.mktemp("logs") / "queued.log") as server:
        with gateway(triton_grpc_url=server.grpc_url) as g:
            g.triton = server
            yield g


def _long(request_id: str, url: str) -> RawStream:
    stream = RawStream(url, ENSEMBLE, ensemble_arrays(PROMPT, LONG, temperature=np.array([[0.0]], np.float32),
                                                      stream=np.array([[True]], np.bool_)),
                       request_id, requested_outputs())
    return stream


def _stop(url: str, request_id: str) -> None:
    _, error = raw_stream(url, ENSEMBLE, ensemble_arrays("", 1, stop=np.array([[True]], np.bool_)), request_id)
    assert error is None, error.message()


def test_a_full_engine_queue_is_a_clear_retryable_error(queued):
    server = queued.triton
    url = server.grpc_url
    running = _long("q-running", url)
    assert running.next()[1] is None and wait_active(server, lambda v: v >= 1) == 1
    waiting = _long("q-waiting", url)
    assert wait_active(server, lambda v: v == 2) == 2  # submitted, waiting for the batch slot
    try:
        with pytest.raises(ServerError) as refused:
            PredictClient(url, timeout_s=30).predict(PROMPT, stream=False, max_tokens=4)
        assert refused.value.status == "UNAVAILABLE"
        # the executor's own wording (TensorRT-LLM sends it as INTERNAL), relayed as overload
        assert "Maximum queue size of 1 has been reached" in str(refused.value)

        for route in ("/predict", "/v1/completions"):
            reply = requests.post(f"{queued.url}{route}", json={"prompt": PROMPT, "max_tokens": 4}, timeout=30)
            assert reply.status_code == 503, reply.text
            assert reply.headers["retry-after"] == "1"
            error = reply.json()["error"]
            assert error["type"] == "service_unavailable" and "Maximum queue size of 1" in error["message"]
    finally:
        for stream in (running, waiting):
            _stop(url, stream.request_id)
        for stream in (running, waiting):
            results, error = stream.read_all(30)
            stream.close()
    assert wait_active(server, lambda v: v == 0, 10) == 0
    assert PredictClient(url).predict(PROMPT, stream=False, max_tokens=4).completion_tokens == 4
    reply = requests.post(f"{queued.url}/predict", json={"prompt": PROMPT, "max_tokens": 4, "stream": False})
    assert reply.status_code == 200


def test_a_burst_over_the_queue_ends_every_request_promptly(queued):
    """Eight requests at once on a batch of one and a queue of one, while a LONG request
    holds the batch slot (so that the burst meets a busy engine on any machine): at most
    one of them waits in the queue, the others are refused as overload at once (by the
    engine, or by Triton's own scheduler queue, which the same max_queue_size bounds), none
    hangs; once the holder is stopped the queued one is served."""
    url = queued.triton.grpc_url
    holder = _long("burst-holder", url)
    assert holder.next()[1] is None

    def one(i: int):
        results, error = raw_stream(url, ENSEMBLE, ensemble_arrays(f"{PROMPT} {i}", 16), f"burst-{i}",
                                    requested_outputs(), timeout_s=60)
        return (text_of(results), None) if error is None else (None, server_error(error))

    with ThreadPoolExecutor(8) as pool:
        burst = [pool.submit(one, i) for i in range(8)]
        try:
            # All but the queued one are answered while the holder still runs (LONG: it
            # cannot end by itself during the test).
            deadline = time.monotonic() + 30
            while sum(f.done() for f in burst) < 7:
                assert time.monotonic() < deadline, "a refused request hangs"
                time.sleep(0.02)
            assert wait_active(queued.triton, lambda v: v == 2) == 2  # the holder and the queued one
        finally:
            _stop(url, holder.request_id)
            holder.read_all(30)
            holder.close()
        outcomes = [f.result(60) for f in burst]
    refused = [error for _, error in outcomes if error is not None]
    served = [text for text, _ in outcomes if text is not None]
    assert len(refused) == 7 and len(served) == 1, outcomes
    for error in refused:
        assert isinstance(error, ServerError) and error.status == "UNAVAILABLE", error
    assert all(served)
    assert wait_active(queued.triton, lambda v: v == 0, 10) == 0
