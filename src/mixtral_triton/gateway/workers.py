"""Several gateway processes per pod: one asyncio process relays what one core can, so
`--workers N` runs N worker processes under this supervisor, each the whole gateway (its own
event loop and gRPC channel to Triton) on its own socket of the same port (SO_REUSEPORT: the
kernel spreads connections over the sockets that listen). A worker's socket listens only once
the worker serves (uvicorn listens after its start-up), so no connection waits on a worker
that is still starting, and a worker that dies takes its socket with it; the supervisor holds
the port meanwhile with a socket bound to it that never listens.

What the workers share is set up here and handed to them at start:
- the pod's --max-concurrency: one eventfd semaphore and the array of slots each worker
  holds (gateway/slots.py), so that a limit per pod stays a limit per pod;
- one folder for prometheus_client's multiprocess mode, so that /metrics is the pod's.

A worker that dies is started again after its slots are given back and its live gauges
dropped (connections go to the other workers meanwhile). SIGTERM or SIGINT stops every worker gracefully (uvicorn drains its
streams), then the supervisor.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mixtral_triton.gateway.metrics import MULTIPROC_DIR_ENV
from mixtral_triton.gateway.slots import held_map, new_held_fd, new_slots_fd, take_back

WORKER_ENV = "MIXTRAL_TRITON_GATEWAY_WORKER"  # index,workers,slots fd,held fd
STOP_GRACE_S = 20.0  # uvicorn's graceful shutdown (10 s) and the rest of a worker's exit
RESTART_DELAY_S = 1.0  # between a worker's death and its restart: no hot loop
# The default stops here: a GPU host without a container CPU limit offers a hundred cores or
# more, and each worker holds its own memory (about 85 MB idle) and gRPC connection.
DEFAULT_MAX_WORKERS = 16


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota
    (a container's CPU limit), rounded up."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def default_workers() -> int:
    return min(available_cores(), DEFAULT_MAX_WORKERS)


@dataclass(frozen=True)
class WorkerHandles:
    """What a worker receives from the supervisor (through WORKER_ENV and inherited fds)."""

    index: int
    workers: int
    slots_fd: int
    held_fd: int

    def encode(self) -> str:
        return f"{self.index},{self.workers},{self.slots_fd},{self.held_fd}"

    @classmethod
    def from_environment(cls) -> "WorkerHandles | None":
        value = os.environ.get(WORKER_ENV)
        return cls(*(int(part) for part in value.split(","))) if value else None


def die_with_supervisor() -> None:
    """Have the kernel send this worker SIGTERM (a graceful stop) when its supervisor dies,
    even by SIGKILL: no worker outlives its supervisor holding the port."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to the port with SO_REUSEPORT, not listening: a worker's (its server
    listens on it once it serves) or the supervisor's hold on the port."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    """Starts `workers` copies of `command` (the gateway's own command line) and keeps them
    running until told to stop."""

    def __init__(self, command: list[str], workers: int, host: str, port: int, max_concurrency: int):
        self.command = command
        self.port = port_socket(host, port)
        self.slots_fd = new_slots_fd(max_concurrency)
        self.held_fd = new_held_fd(workers)
        self.held = held_map(self.held_fd, workers)
        self.metrics_dir = tempfile.mkdtemp(prefix="mixtral-gateway-metrics-")
        self.processes: list[subprocess.Popen | None] = [None] * workers
        self.stopping = False

    def _start(self, index: int) -> None:
        handles = WorkerHandles(index, len(self.processes), self.slots_fd, self.held_fd)
        env = {**os.environ, WORKER_ENV: handles.encode(), MULTIPROC_DIR_ENV: self.metrics_dir}
        self.processes[index] = subprocess.Popen(
            self.command, env=env, stdin=subprocess.DEVNULL, pass_fds=(handles.slots_fd, handles.held_fd))

    def _stop(self, signum, frame) -> None:
        if not self.stopping:
            self.stopping = True
            for process in self.processes:
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGTERM)

    def run(self) -> int:
        from prometheus_client.multiprocess import mark_process_dead

        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        try:
            for index in range(len(self.processes)):
                self._start(index)
            deadline = None
            while any(p is not None for p in self.processes):
                if self.stopping and deadline is None:
                    deadline = time.monotonic() + STOP_GRACE_S
                for index, process in enumerate(self.processes):
                    if process is None or process.poll() is None:
                        if process is not None and deadline is not None and time.monotonic() > deadline:
                            process.kill()
                        continue
                    # slots first: a gauge of in-flight generations without the dead worker's
                    # means they are free again
                    returned = take_back(self.held, index, self.slots_fd)
                    mark_process_dead(process.pid, self.metrics_dir)
                    self.processes[index] = None
                    if not self.stopping:
                        print(f"gateway: worker {index} (pid {process.pid}) exited with code "
                              f"{process.returncode}, {returned} slot(s) given back; starting it again",
                              file=sys.stderr, flush=True)
                        time.sleep(RESTART_DELAY_S)
                        if not self.stopping:
                            self._start(index)
                time.sleep(0.2)
        finally:
            self._stop(None, None)
            for process in self.processes:
                if process is not None:
                    process.kill()
                    process.wait()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return 0
