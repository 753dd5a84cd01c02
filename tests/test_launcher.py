"""The launcher starts the real Triton server from the wheel, streams over gRPC and HTTP,
and stops without leaving stub processes behind."""

from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

from helpers import PROMPT, Reader
from mixtral_triton.client import PredictClient
from mixtral_triton.launcher import TritonServer, free_ports
from mixtral_triton.launcher.gpu import (NGC_TRITONSERVER, mpi_server_command, ompi_version, orchestrator_server_command,
                                         orchestrator_start, serving_rank, shm_prefix_flag)
from mixtral_triton.launcher.shutdown import descendants, process_group_alive
from mixtral_triton.protocol import parse_request

ECHO_REPOSITORY = Path(__file__).parent / "data" / "echo_repository"
# Per stream, on the paced engine (helpers.STEP_S a step at least): 5 s at least, so the
# streams are still in flight at the SIGTERM sent right after their first tokens, however
# fast the machine.
DRAIN_TOKENS = 100
DRAIN_EXIT_TIMEOUT_S = 120  # the drain the launcher is given: far more than the streams need
LAUNCH = [sys.executable, "-m", "mixtral_triton.launcher.cli"]


@pytest.fixture(scope="module")
def echo_server():
    with TritonServer(ECHO_REPOSITORY) as server:
        yield server


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def test_grpc_bidirectional_stream(echo_server):
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(echo_server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array(["café 日本 🙂".encode()], dtype=object))
    client.async_stream_infer("stream_echo", [text], request_id="launcher-grpc",
                              enable_empty_final_response=True)
    words = []
    while True:
        result, error = responses.get(timeout=30)
        assert error is None, error
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
        words.append(result.as_numpy("text_output")[0].decode())
    client.stop_stream()
    assert words == ["café", "日本", "🙂"]


def test_http_generate_stream_and_models_use_the_venv(echo_server):
    url = f"http://{echo_server.http_url}/v2/models/stream_echo/generate_stream"
    with requests.post(url, json={"text_input": "one two"}, stream=True, timeout=30) as reply:
        assert reply.status_code == 200
        events = [json.loads(line[len(b"data: "):]) for line in reply.iter_lines() if line]
    assert [e["text_output"] for e in events] == ["one", "two"]
    # The stub ignores PYTHONPATH; the launcher must make it run this venv's Python.
    assert Path(events[0]["python_executable"]).parent == Path(sys.executable).parent


def test_stop_leaves_no_stub_processes(tmp_path):
    repo = shutil.copytree(ECHO_REPOSITORY, tmp_path / "repo")
    server = TritonServer(repo).start()
    assert any("triton_python_backend_stub" in p for p in _processes_mentioning(str(repo)))
    assert server.stop() == 0
    assert not process_group_alive(server.process.pid)
    assert _processes_mentioning(str(repo)) == []


def test_cli_serves_until_sigint(tmp_path):
    repo = shutil.copytree(ECHO_REPOSITORY, tmp_path / "repo")
    cli = subprocess.Popen(LAUNCH + ["--model-repository", str(repo), "--free-ports"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = cli.stdout.readline()
        assert ready.startswith("triton ready: http 127.0.0.1:"), ready
        http_port = int(ready.split()[3].split(":")[1])
        assert requests.get(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=5).status_code == 200
        cli.send_signal(signal.SIGINT)
        assert cli.wait(60) == 0
        assert "triton stopped" in cli.stdout.read()
    finally:
        cli.kill()
    assert _processes_mentioning(str(repo)) == []


def _one_line_error(args: list[str]) -> str:
    result = subprocess.run(LAUNCH + args, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_port_in_use_is_a_one_line_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        error = _one_line_error(["--model-repository", str(ECHO_REPOSITORY), "--http-port", str(port)])
    assert f"--http-port {port} is already in use" in error


def test_missing_repository_is_a_one_line_error(tmp_path):
    error = _one_line_error(["--model-repository", str(tmp_path / "absent")])
    assert "is not a folder" in error


def test_free_ports_are_distinct_and_free():
    ports = free_ports()
    assert len({ports.http, ports.grpc, ports.metrics}) == 3
    ports.check_free()


def test_gpu_dry_run_prints_the_plain_orchestrator_mode_server(tmp_path):
    result = subprocess.run(LAUNCH + ["--model-repository", str(tmp_path), "--target", "gpu",
                                      "--world-size", "4", "--exit-timeout-secs", "120", "--dry-run"],
                            capture_output=True, text=True, check=True)
    printed = shlex.split(result.stdout)
    # One process, no mpirun: the environment that selects orchestrator mode, then the server.
    assert printed[:1] == ["TRTLLM_ORCHESTRATOR=1"]
    assert printed[1] == "/opt/tritonserver/bin/tritonserver" and "mpirun" not in printed
    assert printed[2:8] == [f"--model-repository={tmp_path.resolve()}", "--http-port=8000", "--grpc-port=8001",
                            "--metrics-port=8002", "--exit-timeout-secs=120", "--disable-auto-complete-config"]
    # The server process keeps off the GPUs its workers use: no pools, no peer access.
    assert printed[8:] == ["--pinned-memory-pool-byte-size=0", "--enable-peer-access=false",
                           *[f"--cuda-memory-pool-byte-size={gpu}:0" for gpu in range(4)]]


@pytest.mark.parametrize("recorded, version, start", [
    ("Open MPI v4.1.7\n\nhttp://www.open-mpi.org/community/help/\n", "4.1.7", "bare"),
    ("Open MPI v5.0.6\n\nhttp://www.open-mpi.org/community/help/\n", "5.0.6", "mpirun"),
])
def test_orchestrator_start_follows_the_images_open_mpi(tmp_path, recorded, version, start):
    """The image records `ompi_info --version` at build; the server runs bare (its worker spawn
    from an MPI singleton) only below Open MPI 5, else under upstream's `mpirun -n 1`."""
    record = tmp_path / "ompi-version.txt"
    record.write_text(recorded)
    assert ompi_version(record) == version and orchestrator_start(version) == start


def test_gpu_dry_run_prints_the_orchestrator_under_mpirun_n_1(tmp_path):
    result = subprocess.run(LAUNCH + ["--model-repository", str(tmp_path), "--target", "gpu", "--world-size", "2",
                                      "--exit-timeout-secs", "120", "--orchestrator-start", "mpirun", "--dry-run"],
                            capture_output=True, text=True, check=True)
    printed = shlex.split(result.stdout)
    assert printed[:6] == ["mpirun", "--allow-run-as-root", "-n", "1", "-x", "TRTLLM_ORCHESTRATOR=1"]
    # The very server of the bare start (one process, its memory flags), marked as rank 0.
    assert printed[6:-1] == orchestrator_server_command(tmp_path.resolve(), 2, free_ports().__class__(),
                                                        exit_timeout_s=120)
    assert printed[-1] == shm_prefix_flag(0) and ":" not in printed


FAKE_MPIRUN = r"""
import signal, subprocess, sys, time
log = open(sys.argv[1], "a", buffering=1)
rank = subprocess.Popen([sys.executable, *sys.argv[2:]])
def forward(*_):  # Open MPI: forward SIGTERM to the ranks, kill them a second later
    log.write("mpirun got SIGTERM\n")
    rank.terminate()
    time.sleep(1)
    rank.kill()
signal.signal(signal.SIGTERM, forward)
sys.exit(rank.wait())
"""
FAKE_SERVER = r"""
import signal, sys, time
log = open(sys.argv[1], "a", buffering=1)
def drain(*_):  # tritonserver: finish what is in flight, then exit
    log.write("server got SIGTERM\n")
    time.sleep(3)
    log.write("server drained\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, drain)
log.write("server up\n")
while True:
    time.sleep(0.1)
"""


def test_sigterm_reaches_the_server_below_mpirun_first_so_the_drain_holds(tmp_path):
    """The wrapped orchestrator (and leader mode) keep mpirun as the launcher's child: the
    launcher's SIGTERM goes to the serving tritonserver rank, not to mpirun (which would kill
    it a second later). Here a stand-in mpirun that does what Open MPI's does on SIGTERM and a
    stand-in server that takes 3 s to drain."""
    log = tmp_path / "events.log"
    (tmp_path / "mpirun.py").write_text(FAKE_MPIRUN)
    (tmp_path / "server.py").write_text(FAKE_SERVER)
    command = [sys.executable, str(tmp_path / "mpirun.py"), str(log), str(tmp_path / "server.py"), str(log),
               shm_prefix_flag(0)]
    launcher = subprocess.Popen([sys.executable, "-c", "import sys; from mixtral_triton.launcher.gpu import "
                                 "serve_under_mpirun; sys.exit(serve_under_mpirun(sys.argv[1:], 5))", *command],
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "server up" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, "the stand-in server never started"
            time.sleep(0.05)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert log.read_text().splitlines() == ["server up", "server got SIGTERM", "server drained"]


def test_gpu_dry_run_prints_the_leader_mode_mpirun_command(tmp_path):
    result = subprocess.run(LAUNCH + ["--model-repository", str(tmp_path), "--target", "gpu", "--mode", "leader",
                                      "--world-size", "4", "--exit-timeout-secs", "120", "--dry-run"],
                            capture_output=True, text=True, check=True)
    printed = result.stdout.strip().split()
    ranks = " ".join(printed).split(" : ")
    assert printed[:2] == ["mpirun", "--allow-run-as-root"] and len(ranks) == 4
    # Every rank, on every node, in leader mode whatever the image's environment says.
    assert printed[2:4] == ["-x", "TRTLLM_ORCHESTRATOR=0"]
    for rank, segment in enumerate(ranks):
        words = segment.split()
        assert words[words.index("-n") + 1] == "1"
        assert "/opt/tritonserver/bin/tritonserver" in words
        assert f"--model-repository={tmp_path.resolve()}" in words
        assert f"--backend-config=python,shm-region-prefix-name=prefix{rank}_" in words
        assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002", "--exit-timeout-secs=120"} <= set(words)
        # Only rank 0 loads the whole repository and serves.
        assert ("--load-model=tensorrt_llm" in words) == (rank > 0)
        assert ("--model-control-mode=explicit" in words) == (rank > 0)


def test_leader_mode_finds_rank_0_below_mpirun(tmp_path):
    """On SIGTERM leader mode signals rank 0 alone (mpirun would kill every rank a second
    after forwarding it). Here a process tree shaped like mpirun's: a parent with one
    child per rank, each carrying that rank's arguments."""
    command = mpi_server_command(tmp_path, 3, free_ports())
    ranks = " ".join(command).split(" : ")
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    rank_args = [words[words.index(NGC_TRITONSERVER) + 1:] for words in map(str.split, ranks)]
    children = " ".join(f"{shlex.join(sleeper + args)} &" for args in rank_args)
    parent = subprocess.Popen(["bash", "-c", f"{children} wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(descendants(parent.pid)) < 3:
            assert time.monotonic() < deadline, "the stand-in ranks never started"
            time.sleep(0.05)
        rank0 = serving_rank(parent.pid)
        argv = Path(f"/proc/{rank0}/cmdline").read_bytes().decode().split("\0")
        assert "--backend-config=python,shm-region-prefix-name=prefix0_" in argv
        assert not any(a.startswith("--load-model") for a in argv)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
    assert serving_rank(parent.pid) is None


def test_gpu_target_refuses_to_run_without_the_container(tmp_path):
    error = _one_line_error(["--model-repository", str(tmp_path), "--target", "gpu",
                             "--tritonserver", str(tmp_path / "no-tritonserver")])
    assert "tritonserver:26.07-trtllm-python-py3" in error


def test_bad_world_size_is_a_one_line_error(tmp_path):
    error = _one_line_error(["--model-repository", str(tmp_path), "--target", "gpu",
                             "--world-size", "0", "--dry-run"])
    assert "--world-size must be between 1 and 64, got 0" in error


def test_a_zombie_stub_under_pid_1_counts_only_when_pid_1_is_the_server():
    """In the pod tritonserver is the container's PID 1 (orchestrator mode, plain command):
    its dead stubs still fail the liveness check. Elsewhere a zombie stub handed to PID 1
    is an orphan of a server that is gone."""
    from mixtral_triton.launcher.stubs import orphaned

    assert not orphaned("1", "tritonserver")
    assert orphaned("1", "systemd") and orphaned("1", None)
    assert not orphaned("4242", "systemd")


def test_a_dead_stub_is_seen_until_it_is_reaped(tmp_path):
    """A stub that died stays a zombie child of the server; the liveness check fails while
    one exists (here: a copy of `sleep` under the stub's name, killed and not yet reaped)."""
    from mixtral_triton.launcher import liveness, stubs

    fake = tmp_path / stubs.STUB
    shutil.copy(shutil.which("sleep"), fake)
    process = subprocess.Popen([str(fake), "60"])
    try:
        assert stubs.dead_stubs(os.getpid()) == []
        process.kill()
        deadline = time.monotonic() + 10
        while stubs.dead_stubs(os.getpid()) != [process.pid]:
            assert time.monotonic() < deadline, "the killed stub never showed as dead"
            time.sleep(0.05)
        assert process.pid in stubs.dead_stubs() and liveness.main([]) == 1
    finally:
        process.kill()
        process.wait()
    assert stubs.dead_stubs(os.getpid()) == []


def test_sigterm_drains_streams_in_flight_then_leaves_no_process(paced_repository, tmp_path):
    """Kubernetes stops a pod with SIGTERM: the launcher must let Triton finish the streams
    in flight (up to --exit-timeout-secs) before anything is killed, and still leave no
    server or stub process behind."""
    # A copy of its own, so that the processes left behind are told apart from those of the
    # session's shared server on the same repository.
    repository = shutil.copytree(paced_repository, tmp_path / "repository")
    launch = subprocess.Popen(
        LAUNCH + ["--model-repository", str(repository), "--free-ports",
                  "--exit-timeout-secs", str(DRAIN_EXIT_TIMEOUT_S), "--log-file", str(tmp_path / "triton.log")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        ready = launch.stdout.readline()
        assert ready.startswith("triton ready: http 127.0.0.1:"), ready
        grpc_url = ready.split()[5]
        streams = [Reader(PredictClient(grpc_url, timeout_s=300).generate(parse_request(
            {"prompt": PROMPT, "max_tokens": DRAIN_TOKENS, "temperature": 0}))) for _ in range(3)]
        for stream in streams:
            stream.start()
        for stream in streams:
            assert stream.started_streaming.wait(60) and stream.error is None, stream.error
        in_flight = [s for s in streams if s.is_alive()]
        launch.send_signal(signal.SIGTERM)
        assert launch.wait(DRAIN_EXIT_TIMEOUT_S + 30) == 0
        output = launch.stdout.read()
        assert "triton stopped" in output, output
    finally:
        if launch.poll() is None:  # the server runs in its own session: stop it through the launcher
            launch.send_signal(signal.SIGINT)
            launch.wait(DRAIN_EXIT_TIMEOUT_S + 30)
    assert in_flight, "every stream ended before the SIGTERM: the test proved nothing"
    for stream in streams:
        stream.join(10)
        assert stream.error is None, stream.error
        last = stream.received[-1]
        assert last.finish_reason in ("length", "stop"), last
        assert last.finish_reason == "stop" or last.completion_tokens == DRAIN_TOKENS, last
    assert _processes_mentioning(str(repository)) == []
