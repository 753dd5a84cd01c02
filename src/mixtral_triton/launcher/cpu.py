"""Run the Triton Inference Server binary shipped in the `nvidia-pytriton` wheel on CPU.

What it takes (checked on Triton 2.51, see docs/cpu-triton-stack.md):
- the Python backend needs its stub next to `libtriton_python.so`, so the wheel's backend
  folder is copied once into the virtual environment with the stub of this Python;
- the stub links `libcudart` from the wheel's own library folder, and embeds the first
  `libpython3.x` the loader finds, so this interpreter's LIBDIR goes first;
- the stub ignores PYTHONPATH and takes its interpreter from the first `python3` on PATH,
  whose `pyvenv.cfg` then gives models this venv's packages (this project included).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from mixtral_triton import cpp_detokenizer
from mixtral_triton.errors import UserError
from mixtral_triton.launcher.ports import Ports, free_ports
from mixtral_triton.launcher.shutdown import stop_process_group
from mixtral_triton.launcher.stubs import dead_stubs

# Logged as errors by every start on a machine without a GPU, and harmless there.
_CPU_ONLY_NOISE = ("CudaDriverHelper has not been initialized", "Failed to initialize NVML")

PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
# TritonServer.serve restarts a server that died at most this often before it gives up.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 300.0


def _wheel_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise UserError("nvidia-pytriton is not installed: run scripts/setup.sh")
    return Path(spec.origin).parent


def tritonserver_binary() -> Path:
    return _wheel_root() / "tritonserver" / "bin" / "tritonserver"


def library_path() -> str:
    """LD_LIBRARY_PATH for the server and its Python stubs."""
    site = _wheel_root().parent
    cuda_runtime = importlib.util.find_spec("nvidia.cuda_runtime")
    folders = [
        sysconfig.get_config_var("LIBDIR"),  # first: the stub embeds this Python, not Debian's
        str(site / "nvidia_pytriton.libs"),
    ]
    if cuda_runtime is not None and cuda_runtime.submodule_search_locations:
        folders.append(str(Path(list(cuda_runtime.submodule_search_locations)[0]) / "lib"))
    if os.environ.get("LD_LIBRARY_PATH"):
        folders.append(os.environ["LD_LIBRARY_PATH"])
    return ":".join(folders)


def backend_directory() -> Path:
    """The wheel's backends with the Python stub for this interpreter, prepared once per venv.

    Built in a temporary folder and renamed into place, so concurrent first runs (tests in
    parallel) never see half a folder.
    """
    target = Path(sys.prefix) / "var" / "mixtral-triton" / f"backends-py{PYTHON_VERSION}"
    if (target / "python" / "triton_python_backend_stub").exists():
        return target
    source = _wheel_root() / "tritonserver"
    stub = source / "python_backend_stubs" / PYTHON_VERSION / "triton_python_backend_stub"
    if not stub.exists():
        raise UserError(f"the Triton wheel has no Python backend stub for Python {PYTHON_VERSION}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".backends-"))
    shutil.copytree(source / "backends", staging, dirs_exist_ok=True)
    shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")
    try:
        staging.rename(target)
    except OSError:  # another process won the race; its folder is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    return target


def server_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = library_path()
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def cpu_server_command(model_repository: Path, ports: Ports, host: str = "127.0.0.1",
                       exit_timeout_s: int = 5, log_verbose: int = 0) -> list[str]:
    return [
        str(tritonserver_binary()),
        f"--model-repository={model_repository}",
        f"--backend-directory={backend_directory()}",
        f"--http-address={host}", f"--http-port={ports.http}",
        f"--grpc-address={host}", f"--grpc-port={ports.grpc}",
        f"--metrics-address={host}", f"--metrics-port={ports.metrics}",
        # Our configs are complete: a missing field is a bug to see, not to guess.
        "--disable-auto-complete-config",
        f"--exit-timeout-secs={exit_timeout_s}",
        f"--log-verbose={log_verbose}",
    ]


class TritonServer:
    """The CPU server as a managed child process (used by the launcher CLI, tests and
    benchmarks). It runs in its own process group, so that stopping it also ends every
    Python stub it started: no orphans even if the server itself has to be killed."""

    def __init__(self, model_repository: Path, ports: Ports | None = None, host: str = "127.0.0.1",
                 log_file: Path | None = None, exit_timeout_s: int = 5, log_verbose: int = 0):
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise UserError(f"model repository {model_repository} is not a folder")
        self.ports = ports or free_ports()
        self.host = host
        self.log_file = Path(log_file) if log_file else Path(
            tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.exit_timeout_s = exit_timeout_s
        self.command = cpu_server_command(self.model_repository, self.ports, host,
                                          exit_timeout_s, log_verbose)
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    def start(self, timeout_s: float = 180.0) -> "TritonServer":
        self.ports.check_free(self.host)
        env = server_environment()
        if cpp_detokenizer.sanitized_library_in(self.model_repository) is not None:
            # a sanitized detokenizer (the suite's sanitizer pass): its runtimes go first
            reports = os.environ.get(cpp_detokenizer.SANITIZER_REPORTS_ENV) or f"{self.log_file}.sanitizer"
            env = cpp_detokenizer.sanitizer_environment(env, Path(reports))
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise UserError(f"tritonserver exited with code {self.process.returncode} before it "
                                f"was ready:\n{self.log_errors() or self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise UserError(f"tritonserver was not ready after {timeout_s:.0f} s; last log lines:\n"
                        f"{self.log_tail()}")

    def log_errors(self) -> str:
        """Triton's error lines (`E<date> ...`), less the ones every CPU-only start logs."""
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(line for line in lines
                         if (re.match(r"E\d{4} ", line) or line.startswith("error:"))
                         and not any(noise in line for noise in _CPU_ONLY_NOISE))

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM (Triton drains in-flight requests up to its exit timeout), then SIGKILL
        whatever is left of the process group. Returns the server's exit code.

        Waits at most `timeout_s` (default: the exit timeout plus 5 s) before the SIGKILL:
        with streams in flight, Triton 2.51 reports "Exit timeout expired. Exiting
        immediately." and then keeps serving them to their end (minutes, for long
        generations), so its own exit timeout does not bound a stop."""
        if self.process is None:
            return None
        if timeout_s is None:
            timeout_s = self.exit_timeout_s + 5.0
        regions = _stub_shm_regions(self.process.pid)
        stop_process_group(self.process, timeout_s)
        for region in regions:  # a killed stub leaves its region (1 MiB or more) in /dev/shm
            region.unlink(missing_ok=True)
        return self.process.returncode

    def serve(self, stop: threading.Event, log=print, period_s: float = 0.5) -> int:
        """Keep the started server serving until `stop` is set, then stop it (0). A server
        that exits by itself, or whose Python stub process dies (Triton 2.51 never restarts
        a stub and keeps reporting ready; a stub killed while holding a shared-memory lock
        also aborts the server), is restarted on the same ports: its in-flight requests fail,
        the ones after the restart succeed. More than MAX_RESTARTS in RESTART_WINDOW_S
        means it cannot stay up: this gives up and returns 1."""
        restarts: list[float] = []
        while not stop.wait(period_s):
            if self.process.poll() is not None:
                reason = (f"tritonserver exited with code {self.process.returncode}; last log lines:\n"
                          f"{self.log_tail()}")
            elif dead := dead_stubs(self.process.pid):
                reason = f"a Python stub process of tritonserver died (pid {', '.join(map(str, dead))})"
            else:
                continue
            restarts = [t for t in restarts if time.monotonic() - t < RESTART_WINDOW_S] + [time.monotonic()]
            if len(restarts) > MAX_RESTARTS:
                log(f"{reason}\ngiving up: {MAX_RESTARTS} restarts within {RESTART_WINDOW_S:.0f} s")
                self.stop()
                return 1
            log(f"{reason}\nrestarting tritonserver")
            self.stop()
            self.start()
            log("tritonserver ready again")
        self.stop()
        return 0

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _stub_shm_regions(pid: int) -> list[Path]:
    """The shared-memory files of a server's Python stubs (each stub's second argument)."""
    regions = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"triton_python_backend_stub") and len(argv) > 2 \
                    and re.fullmatch(rb"[\w.-]+", argv[2]):
                regions.append(Path("/dev/shm") / argv[2].decode())
    return regions
