"""The GPU launch: the NGC `tritonserver:26.07-trtllm-python-py3` server (TensorRT-LLM 1.2.1)
in one of the TensorRT-LLM backend's two multi-GPU modes.

Orchestrator mode, the default (one node): one plain `tritonserver` process with
TRTLLM_ORCHESTRATOR=1 in its environment. Its `tensorrt_llm` model spawns one executor
worker process per GPU (MPI_Comm_spawn of the model's `executor_worker_path`, on its
`gpu_device_ids`) and relays requests, streamed responses, cancellations and iteration
statistics to and from them over MPI. Everything else (ports, the Python models, SIGTERM
and the drain) is an ordinary Triton server's.

How the server is started rests on the image's MPI: the spawn is made from an MPI singleton
(a process not started by mpirun, world size 1). Upstream's CI runs the bare server that way
and Triton's docs describe it, but the singleton spawns known to fail are on Open MPI 5, and
upstream's own launch script (triton_backend/scripts/launch_triton_server.py --multi-model)
runs the server under `mpirun -n 1`, which gives the spawn a runtime to start the workers in
on any version. So the server runs bare where the image's Open MPI is older than 5 (recorded at
image build by `ompi_info --version`, ompi_version()), and under `mpirun -n 1` otherwise; there
the launcher keeps mpirun as its child and sends SIGTERM to the tritonserver rank first, as in
leader mode, so that the drain holds.

Leader mode (`--mode leader`; the layout that can span nodes, since spawned workers cannot):
the same server under mpirun, one rank per GPU. Rank 0 loads every model and serves; ranks
1..N-1 load only the engine model, whose load never returns on those ranks (they become the
executor's workers), so they never open the ports they are given. Each rank gets its own
Python-backend shared-memory prefix so their stubs' regions do not collide in /dev/shm.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

from mixtral_triton.errors import UserError
from mixtral_triton.launcher.ports import Ports
from mixtral_triton.launcher.shutdown import descendants, kill_group, stop_process_group

NGC_TRITONSERVER = "/opt/tritonserver/bin/tritonserver"
ENGINE_MODEL = "tensorrt_llm"
# Read by the tensorrtllm backend when its model loads: any value but 0 is orchestrator mode.
ORCHESTRATOR_ENV = "TRTLLM_ORCHESTRATOR"
# Leader mode: how long rank 0 gets beyond its own exit timeout to unload the engine and
# let the worker ranks exit, and then how long mpirun gets to end the ranks itself.
DRAIN_MARGIN_S = 15.0
MPIRUN_KILL_GRACE_S = 10.0
# Written at image build (deploy/Dockerfile): `ompi_info --version` of the image's Open MPI.
OMPI_VERSION_RECORD = Path("/opt/mixtral-triton/ompi-version.txt")
# The first Open MPI major version whose singleton MPI_Comm_spawn is not trusted bare.
SPAWN_NEEDS_MPIRUN_FROM = 5
ORCHESTRATOR_STARTS = ("auto", "bare", "mpirun")


def ompi_version(record: Path = OMPI_VERSION_RECORD) -> str | None:
    """The image's Open MPI version ("4.1.7"): from the record written at image build, else from
    `ompi_info --version` here; None where neither says (no Open MPI here)."""
    try:
        text = record.read_text(errors="replace")
    except OSError:
        if shutil.which("ompi_info") is None:
            return None
        text = subprocess.run(["ompi_info", "--version"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"Open MPI v?(\d+(?:\.\d+)*)", text)
    return found.group(1) if found else None


def orchestrator_start(version: str | None) -> str:
    """bare below Open MPI 5, the mpirun -n 1 wrapper from 5 on; bare where no Open MPI is
    known (outside the image: nothing to spawn with, so only a --dry-run gets this far)."""
    if version is None:
        return "bare"
    return "mpirun" if int(version.split(".")[0]) >= SPAWN_NEEDS_MPIRUN_FROM else "bare"


def _check_world_size(world_size: int) -> None:
    if not 1 <= world_size <= 64:
        raise UserError(f"--world-size must be between 1 and 64, got {world_size}")


def _server_flags(model_repository: Path, ports: Ports, exit_timeout_s: int) -> list[str]:
    return [f"--model-repository={model_repository}",
            f"--http-port={ports.http}", f"--grpc-port={ports.grpc}",
            f"--metrics-port={ports.metrics}", f"--exit-timeout-secs={exit_timeout_s}",
            "--disable-auto-complete-config"]


def orchestrator_environment() -> dict[str, str]:
    """What the orchestrator-mode server needs in its environment beyond the image's."""
    return {ORCHESTRATOR_ENV: "1"}


def orchestrator_server_command(model_repository: Path, world_size: int, ports: Ports,
                                tritonserver: str = NGC_TRITONSERVER,
                                exit_timeout_s: int = 30) -> list[str]:
    """The one `tritonserver` process of orchestrator mode, on a node with `world_size` GPUs."""
    _check_world_size(world_size)
    # The server process itself computes nothing on the GPUs (its spawned workers do): no
    # pinned or CUDA memory pools and no peer access between the GPUs (which would create a
    # CUDA context on each), as upstream's launch_triton_server.py --multi-model starts it,
    # so that the workers get the memory.
    return [tritonserver, *_server_flags(model_repository, ports, exit_timeout_s),
            "--pinned-memory-pool-byte-size=0", "--enable-peer-access=false",
            *[f"--cuda-memory-pool-byte-size={gpu}:0" for gpu in range(world_size)]]


def wrapped_orchestrator_command(model_repository: Path, world_size: int, ports: Ports,
                                 tritonserver: str = NGC_TRITONSERVER, exit_timeout_s: int = 30) -> list[str]:
    """The orchestrator-mode server as upstream's launch script starts it: the one server
    process under `mpirun -n 1`, so that its worker spawn has an MPI runtime (any Open MPI).
    Its rank-0 shared-memory prefix lets serving_rank find it below mpirun."""
    return ["mpirun", "--allow-run-as-root", "-n", "1", "-x", f"{ORCHESTRATOR_ENV}=1",
            *orchestrator_server_command(model_repository, world_size, ports, tritonserver, exit_timeout_s),
            shm_prefix_flag(0)]


def server_invocation(mode: str, start: str, model_repository: Path, world_size: int, ports: Ports,
                      tritonserver: str = NGC_TRITONSERVER, exit_timeout_s: int = 30
                      ) -> tuple[str, dict[str, str], list[str]]:
    """How `mode` (orchestrator or leader) is started: the start chosen (bare, mpirun; `start`
    auto: by the image's Open MPI), the environment it needs beyond the image's, the command."""
    if mode == "leader":
        return "mpirun", {}, mpi_server_command(model_repository, world_size, ports, tritonserver, exit_timeout_s)
    if start == "auto":
        version = ompi_version()
        start = f"{orchestrator_start(version)} (Open MPI {version or 'not found'})"
    if start.startswith("bare"):
        return start, orchestrator_environment(), orchestrator_server_command(
            model_repository, world_size, ports, tritonserver, exit_timeout_s)
    # mpirun -x sets the mode for the server.
    return start, {}, wrapped_orchestrator_command(model_repository, world_size, ports, tritonserver, exit_timeout_s)


def shm_prefix_flag(rank: int) -> str:
    """Rank `rank`'s Python-backend shared-memory prefix (it also tells rank 0 apart)."""
    return f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"


def mpi_server_command(model_repository: Path, world_size: int, ports: Ports,
                       tritonserver: str = NGC_TRITONSERVER, exit_timeout_s: int = 30,
                       engine_model: str = ENGINE_MODEL) -> list[str]:
    _check_world_size(world_size)
    # Leader mode on every rank, whatever the image's environment says (deploy/Dockerfile
    # sets orchestrator mode); -x also carries it to the ranks of other nodes.
    command = ["mpirun", "--allow-run-as-root", "-x", f"{ORCHESTRATOR_ENV}=0"]
    for rank in range(world_size):
        if rank:
            command.append(":")
        command += ["-n", "1", tritonserver, *_server_flags(model_repository, ports, exit_timeout_s),
                    shm_prefix_flag(rank)]
        if rank:
            command += ["--model-control-mode=explicit", f"--load-model={engine_model}"]
    return command


def serving_rank(mpirun_pid: int) -> int | None:
    """The pid of rank 0's tritonserver below mpirun (the only rank that serves), if it runs."""
    for pid in descendants(mpirun_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if shm_prefix_flag(0) in argv:
            return pid
    return None


def serve_under_mpirun(command: list[str], exit_timeout_s: int) -> int:
    """Run mpirun (leader mode, or the wrapped orchestrator) until it exits or this process gets
    SIGTERM or SIGINT. On a signal, rank 0's tritonserver alone gets SIGTERM and drains for its
    exit timeout; its engine unload then ends the workers and mpirun exits. Only past that does mpirun get SIGTERM itself (it kills
    the ranks a second later), then the whole group SIGKILL. Returns mpirun's exit code."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    mpirun = subprocess.Popen(command, start_new_session=True)
    while mpirun.poll() is None and not stop.wait(0.5):
        pass
    if mpirun.poll() is not None:  # it ended by itself: end any process it left
        kill_group(mpirun.pid)
        return mpirun.returncode
    return stop_process_group(mpirun, exit_timeout_s + DRAIN_MARGIN_S, serving_rank(mpirun.pid),
                              kill_grace_s=MPIRUN_KILL_GRACE_S)
