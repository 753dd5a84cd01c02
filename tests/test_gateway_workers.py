"""The gateway with several worker processes (client/gateway.py --workers 2, as a subprocess)
in front of the real Triton server: connections spread over the workers, --max-concurrency
holds for the pod (not per worker), a request beyond it waits for a slot (--queue-wait) or
is answered 429, a hang-up cancels its generation in the engine, /metrics adds up every
worker, and a worker that dies is started again with its slots given back."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from helpers import LONG, PROMPT, ensemble_arrays, metric, raw_stream, wait_active, wait_metric
from mixtral_triton.client.ensemble import ENSEMBLE
from mixtral_triton.local_stack import GatewayProcess

IN_FLIGHT = "mixtral_gateway_generations_in_flight"
WAITING = "mixtral_gateway_generations_waiting"


def _children(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                children.append(int(entry))
    return sorted(children)


def _connections(port: int) -> dict[str, int]:
    """Socket inode -> client port of every established connection to `port`."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            found[fields[9]] = int(fields[2].split(":")[1], 16)
    return found


def _accepted(pid: int, port: int) -> list[int]:
    """The client ports of the connections to `port` that process `pid` has accepted."""
    connections = _connections(port)
    ports = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in connections:
            ports.append(connections[target[8:-1]])
    return ports


def _listening(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on `port` (each worker binds its own,
    once it serves)."""
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
            listening.add(fields[9])
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd)[8:-1] in listening:
                return True
        except OSError:
            continue
    return False


def _hold(g: GatewayProcess) -> http.client.HTTPConnection:
    """A long generation (on the paced engine: LONG tokens outlast every test here), its
    request sent and its answer never read: it holds a slot until the connection is closed."""
    connection = http.client.HTTPConnection("127.0.0.1", g.port, timeout=60)
    body = {"prompt": PROMPT, "max_tokens": LONG, "min_tokens": LONG, "ignore_eos": True}
    connection.request("POST", "/predict", json.dumps(body), {"Content-Type": "application/json"})
    return connection


@pytest.fixture
def workers_gateway(paced_server, tmp_path):
    def start(**options) -> GatewayProcess:
        g = GatewayProcess(paced_server.grpc_url, tmp_path / f"gateway-{len(started)}.log", workers=2, **options)
        started.append(g)
        g.start()
        assert len(_children(g.pid)) == 2, g.log_file.read_text()
        deadline = time.monotonic() + 60  # the supervisor is up; each worker listens once it serves
        while not all(_listening(w, g.port) for w in _children(g.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_listening(w, g.port) for w in _children(g.pid)), g.log_file.read_text()
        return g

    started: list[GatewayProcess] = []
    yield start
    for g in started:
        g.stop()


def test_workers_share_connections_the_pods_limit_and_metrics(workers_gateway, paced_server):
    g = workers_gateway(max_concurrency=3, queue_wait_s=120)
    workers = _children(g.pid)

    # Connections spread over the workers (SO_REUSEPORT hashes each one: all 24 on one
    # worker would happen once in 2**23), and /metrics counts the requests of both.
    connections = [http.client.HTTPConnection("127.0.0.1", g.port, timeout=60) for _ in range(24)]
    for connection in connections:
        connection.request("GET", "/health")
        assert connection.getresponse().read() == b'{"status":"ok"}'  # the connection stays open
    counts = [len(_accepted(w, g.port)) for w in workers]
    assert sum(counts) == 24 and min(counts) >= 1, counts
    for connection in connections:
        connection.close()
    assert 'mixtral_gateway_requests_total{route="/health",status="200"} 24.0' in \
        requests.get(f"{g.url}/metrics", timeout=10).text.splitlines()

    # The limit is the pod's: with 3 generations in flight over two workers, a fourth waits
    # (a limit per worker would have let it in), and /metrics counts both workers' streams.
    held = [_hold(g) for _ in range(3)]
    assert wait_metric(g, IN_FLIGHT, lambda v: v == 3, timeout_s=60) == 3
    answer: dict = {}
    waiting = threading.Thread(target=lambda: answer.update(response=requests.post(
        f"{g.url}/predict", json={"prompt": PROMPT, "max_tokens": 8, "min_tokens": 8, "ignore_eos": True,
                                  "stream": False}, timeout=120)))
    waiting.start()
    assert wait_metric(g, WAITING, lambda v: v == 1, timeout_s=60) == 1
    assert metric(g, IN_FLIGHT) == 3

    # A hang-up cancels its generation and frees its slot: the waiting request gets it.
    held.pop().close()
    waiting.join(120)
    response = answer["response"]
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 8
    assert wait_metric(g, "mixtral_gateway_client_disconnects_total", lambda v: v == 1, timeout_s=60) == 1

    for connection in held:
        connection.close()
    assert wait_metric(g, IN_FLIGHT, lambda v: v == 0, timeout_s=60) == 0
    assert wait_active(paced_server, lambda v: v == 0, timeout_s=60) == 0  # the engine let go of each

    # A worker killed while it streams: its slots come back, it is started again, and the
    # pod admits as many generations as before.
    held = [_hold(g) for _ in range(2)]
    assert wait_metric(g, IN_FLIGHT, lambda v: v == 2, timeout_s=60) == 2
    # their request ids (headers come with the first token; the answers stay unread), so that
    # the generation the killed worker leaves behind can be cancelled at the end
    request_ids = [c.getresponse().getheader("x-request-id") for c in held]
    client_port = held[0].sock.getsockname()[1]
    victim = next(w for w in workers if client_port in _accepted(w, g.port))
    survivor = next(w for w in workers if w != victim)
    left = sum(c.sock.getsockname()[1] in _accepted(survivor, g.port) for c in held)
    os.kill(victim, signal.SIGKILL)
    # (until the supervisor has reaped it, a new connection may still land on its socket)
    deadline = time.monotonic() + 60
    children = _children(g.pid)  # one reading per check: the victim may be reaped between two
    while (len(children) < 2 or victim in children) and time.monotonic() < deadline:
        time.sleep(0.05)
        children = _children(g.pid)
    assert len(children) == 2 and victim not in children, children
    assert wait_metric(g, IN_FLIGHT, lambda v: v == left, timeout_s=60) == left
    for connection in held:
        connection.close()
    assert wait_metric(g, IN_FLIGHT, lambda v: v == 0, timeout_s=60) == 0
    held = [_hold(g) for _ in range(3)]
    assert wait_metric(g, IN_FLIGHT, lambda v: v == 3, timeout_s=60) == 3
    for connection in held:
        connection.close()
    assert wait_metric(g, IN_FLIGHT, lambda v: v == 0, timeout_s=60) == 0
    # The killed worker could not cancel its generation (on the paced engine it would run
    # for minutes): a `stop` for its request id ends it, as a client's cancel would.
    for request_id in request_ids:
        _, error = raw_stream(paced_server.grpc_url, ENSEMBLE, ensemble_arrays("", 1, stop=np.array([[True]], np.bool_)),
                              request_id)
        assert error is None, error.message()
    assert wait_active(paced_server, lambda v: v == 0, timeout_s=60) == 0


def test_a_closed_loop_within_the_limit_gets_no_429_and_one_beyond_it_does(workers_gateway):
    g = workers_gateway(max_concurrency=1, queue_wait_s=0)
    # One client sending its next request as soon as it has read the last one's end, on a new
    # connection each time (either worker): the slot was given back before that end was sent.
    for _ in range(10):
        response = requests.post(f"{g.url}/predict", json={"prompt": PROMPT, "max_tokens": 4, "stream": True},
                                 timeout=60)
        assert response.status_code == 200, response.text
    held = _hold(g)
    try:
        assert wait_metric(g, IN_FLIGHT, lambda v: v == 1, timeout_s=60) == 1
        # every connection, whichever worker it lands on, finds the pod's one slot taken
        for _ in range(4):
            response = requests.post(f"{g.url}/predict", json={"prompt": PROMPT, "max_tokens": 4}, timeout=60)
            assert response.status_code == 429 and response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "rate_limit_error"
        text = requests.get(f"{g.url}/metrics", timeout=10).text
        assert 'mixtral_gateway_requests_total{route="/predict",status="429"} 4.0' in text
        assert 'mixtral_gateway_requests_total{route="/predict",status="200"} 10.0' in text
    finally:
        held.close()
    assert wait_metric(g, IN_FLIGHT, lambda v: v == 0, timeout_s=60) == 0
