"""Triton stopped mid-stream and started again (issue 7), with the gateway left running.

While a stream runs through our client and another through the gateway, Triton is
stopped: both get a clear error within seconds (UNAVAILABLE; the gateway's stream ends
visibly, its new requests are 503 and /ready is false), never a hang. Triton is then
started again on the same ports and requests succeed again through the same gateway
process; the time that takes is measured and bounded (docs/reliability.md).

The servers here serve the paced repository (helpers.LONG): a stream in flight cannot end
before the stop or the restart it must witness, however fast the machine (on the reference
engine a fast runner finished it during the launcher's graceful restart, and the expected
error never came).
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from helpers import LONG, PROMPT, Reader, gateway
from mixtral_triton.client import AsyncPredictClient, PredictClient, ServerError
from mixtral_triton.launcher import TritonServer
from mixtral_triton.launcher.cpu import _stub_shm_regions
from mixtral_triton.launcher.stubs import child_pids, stub_processes
from mixtral_triton.protocol import parse_request

EXIT_TIMEOUT_S = 1  # this server's --exit-timeout-secs: how long Triton drains on SIGTERM
# TritonServer.stop kills what is left 5 s after the exit timeout (Triton 2.51 itself keeps
# streams in flight going past it); the clients hear of it at once.
ERROR_WITHIN_S = EXIT_TIMEOUT_S + 5 + 3
# From Triton ready again to the gateway's first 200. A bound that tells a gateway that never
# reconnects from one that does, not a speed target (the time is printed; a loaded 2-core
# runner took just over 5 s).
RECOVER_WITHIN_S = 60.0


@pytest.fixture(scope="module")
def restartable(paced_repository, tmp_path_factory):
    """A Triton server of this module's own (it is stopped), and a gateway in front."""
    logs = tmp_path_factory.mktemp("restart-logs")
    server = TritonServer(paced_repository, log_file=logs / "triton.log", exit_timeout_s=EXIT_TIMEOUT_S)
    server.start()
    try:
        with gateway(triton_grpc_url=server.grpc_url, timeout_s=30) as g:
            yield server, g, logs
    finally:
        server.stop()


def _gateway_stream(g):
    reply = requests.post(f"{g.url}/predict", json={"prompt": PROMPT, "max_tokens": LONG, "temperature": 0},
                          stream=True, timeout=60)
    assert reply.status_code == 200
    return reply.iter_content(chunk_size=None, decode_unicode=True)


def test_stop_mid_stream_then_restart_on_the_same_ports(restartable):
    server, g, logs = restartable
    client = PredictClient(server.grpc_url, timeout_s=30)
    grpc_reader = Reader(client.generate(parse_request({"prompt": PROMPT, "max_tokens": LONG,
                                                        "temperature": 0})))
    http_reader = Reader(_gateway_stream(g))
    grpc_reader.start()
    http_reader.start()
    assert grpc_reader.started_streaming.wait(30) and http_reader.started_streaming.wait(30)
    assert grpc_reader.error is None and http_reader.error is None

    regions = _stub_shm_regions(server.process.pid)
    assert len(regions) == len(stub_processes(server.process.pid))  # one per Python model instance
    stopped = time.monotonic()
    server.stop()  # SIGTERM, the drain, then SIGKILL of what is left
    print(f"\nTriton stopped in {time.monotonic() - stopped:.2f} s")

    # 1. Both streams end with a clear error, within seconds
    grpc_reader.join(ERROR_WITHIN_S)
    http_reader.join(ERROR_WITHIN_S)
    assert not grpc_reader.is_alive() and not http_reader.is_alive(), "a stream hangs"
    assert isinstance(grpc_reader.error, ServerError), grpc_reader.error
    assert grpc_reader.error.status == "UNAVAILABLE", grpc_reader.error
    assert grpc_reader.ended_at - stopped < ERROR_WITHIN_S
    # the gateway's stream was cut visibly (no clean end of the chunked body), with the reason
    assert isinstance(http_reader.error, requests.exceptions.ChunkedEncodingError), http_reader.error
    assert "[error: the model server is unavailable" in "".join(http_reader.received)
    assert not [r for r in regions if r.exists()], "killed stubs left their shared memory"

    # 2. While Triton is down: quick 503s, /ready false, the client's UNAVAILABLE
    started = time.monotonic()
    reply = requests.post(f"{g.url}/predict", json={"prompt": PROMPT, "max_tokens": 4}, timeout=30)
    assert reply.status_code == 503 and reply.json()["error"]["type"] == "service_unavailable"
    assert reply.headers["retry-after"] == "1"
    assert requests.get(f"{g.url}/ready", timeout=30).status_code == 503
    assert requests.get(f"{g.url}/health", timeout=30).status_code == 200  # the gateway itself lives
    with pytest.raises(ServerError) as down:
        PredictClient(server.grpc_url, timeout_s=30).predict(PROMPT, stream=False, max_tokens=4)
    assert down.value.status == "UNAVAILABLE"

    async def async_down():
        async with AsyncPredictClient(server.grpc_url, timeout_s=30) as aclient:
            assert not await aclient.is_ready()
            await aclient.predict(PROMPT, stream=False, max_tokens=4)

    with pytest.raises(ServerError) as down:
        asyncio.run(async_down())
    assert down.value.status == "UNAVAILABLE"
    assert time.monotonic() - started < 60  # every answer above came, none hung until its timeout

    # 3. Triton again, same ports, same gateway process
    restarted = TritonServer(server.model_repository, server.ports, log_file=logs / "triton-2.log",
                             exit_timeout_s=EXIT_TIMEOUT_S)
    server.process = None  # the fixture stops whichever runs
    restarted.start()
    server.process = restarted.process
    ready_at = time.monotonic()
    while True:
        reply = requests.post(f"{g.url}/predict", json={"prompt": PROMPT, "max_tokens": 4, "stream": False},
                              timeout=30)
        if reply.status_code == 200:
            break
        assert reply.status_code == 503, reply.text
        assert time.monotonic() - ready_at < RECOVER_WITHIN_S, "the gateway did not reconnect"
        time.sleep(0.05)
    recovered_s = time.monotonic() - ready_at
    print(f"\ngateway recovered {recovered_s:.2f} s after Triton was ready again")
    assert reply.json()["usage"]["completion_tokens"] == 4
    assert requests.get(f"{g.url}/ready", timeout=30).status_code == 200
    assert PredictClient(server.grpc_url).predict(PROMPT, stream=False, max_tokens=4).completion_tokens == 4


def test_a_dead_python_stub_makes_the_gateway_unready(restartable):
    """When a Python model's stub process dies (as Triton 2.51's did under the soak, see
    docs/reliability.md), Triton keeps reporting itself and the model ready and answers
    that instance's requests with "Stub process ... is not healthy". The gateway's /ready
    probes the tokenizer model and the engine and goes false; requests are 503 with
    Retry-After. (Last in this module: the server stays broken.)"""
    server, g, _ = restartable
    assert requests.get(f"{g.url}/ready", timeout=30).status_code == 200
    os.kill(stub_processes(server.process.pid)["preprocessing_0_0"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while requests.get(f"{g.url}/ready", timeout=30).status_code == 200:
        assert time.monotonic() < deadline, "the gateway still reports ready"
        time.sleep(0.2)
    noticed_s = 30 - (deadline - time.monotonic())
    print(f"\ngateway /ready false {noticed_s:.2f} s after the stub died")
    # Triton itself does not notice (upstream behaviour this test documents)
    assert server.is_ready()
    reply = requests.post(f"{g.url}/predict", json={"prompt": PROMPT, "max_tokens": 4}, timeout=30)
    assert reply.status_code == 503 and "is not healthy" in reply.json()["error"]["message"]
    assert reply.headers["retry-after"] == "1"
    with pytest.raises(ServerError) as down:
        PredictClient(server.grpc_url, timeout_s=30).predict(PROMPT, stream=False, max_tokens=4)
    assert down.value.status == "UNAVAILABLE"


def test_the_launcher_restarts_triton_when_a_stub_dies(paced_repository, tmp_path):
    """`mixtral-triton-launch` (and serve.sh) restart the server when a stub dies (or the
    server itself does). Here the tokenizer model's stub (preprocessing, the Python model of
    the serving path on every target; the detokenizer runs inside the server, so its crash
    is the server's) is killed while a stream runs: the launcher restarts Triton on the same
    ports, the stream ends with an error (or its client gives up at its own timeout), and
    requests succeed again. The stream (LONG tokens on the paced engine: 90 s at least)
    cannot end by itself before the restart kills the server: the restart begins within the
    30 s waited for below and kills what is left of the server EXIT_TIMEOUT_S + 5 s later."""
    launch = subprocess.Popen(
        [sys.executable, "-m", "mixtral_triton.launcher.cli", "--model-repository", str(paced_repository),
         "--free-ports", "--exit-timeout-secs", str(EXIT_TIMEOUT_S), "--log-file", str(tmp_path / "triton.log")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in launch.stdout], daemon=True).start()
    try:
        ready = lines.get(timeout=180)
        assert ready.startswith("triton ready: http 127.0.0.1:"), ready
        grpc_url = ready.split()[5]
        in_flight = Reader(PredictClient(grpc_url, timeout_s=3).generate(parse_request(
            {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0})))
        in_flight.start()
        assert in_flight.started_streaming.wait(30) and in_flight.error is None
        (server_pid,) = child_pids(launch.pid)
        for name, pid in stub_processes(server_pid).items():
            if name.startswith("preprocessing_"):
                os.kill(pid, signal.SIGKILL)
        died = time.monotonic()
        # Killing a stub may also abort tritonserver (a stub killed while holding a
        # shared-memory lock): either way the launcher restarts it.
        while (line := lines.get(timeout=30)).strip() != "restarting tritonserver":
            assert "giving up" not in line, line
        noticed_s = time.monotonic() - died
        assert lines.get(timeout=180).strip() == "tritonserver ready again"
        restarted_s = time.monotonic() - died
        print(f"\nrestart began {noticed_s:.1f} s after the stubs died; serving again after {restarted_s:.1f} s")
        in_flight.join(25)
        assert not in_flight.is_alive() and isinstance(in_flight.error, ServerError), in_flight.error
        after = PredictClient(grpc_url, timeout_s=60).predict(PROMPT, stream=False, max_tokens=4)
        assert after.completion_tokens == 4
        # The server itself dying (as it may when a stub dies holding a shared-memory lock)
        # is restarted the same way.
        (server_pid,) = child_pids(launch.pid)
        os.kill(server_pid, signal.SIGKILL)
        assert lines.get(timeout=30).startswith("tritonserver exited with code -9")
        while (line := lines.get(timeout=30)).strip() != "restarting tritonserver":
            assert "giving up" not in line, line
        assert lines.get(timeout=180).strip() == "tritonserver ready again"
        again = PredictClient(grpc_url, timeout_s=60).predict(PROMPT, stream=False, max_tokens=4)
        assert again.completion_tokens == 4
    finally:
        os.killpg(launch.pid, signal.SIGINT)
        assert launch.wait(60) == 0
