"""The whole serving stack on this machine, in one place: the tiny random-weight Mixtral
fixture (on-hub layout, real tokenizer) -> its TP-sharded TensorRT-LLM checkpoint -> the
filled CPU model repository -> the real Triton server -> optionally the HTTP gateway in a
process of its own.

Used by `scripts/serve.sh` (mixtral_triton.serve_local), the soak, the serving benchmark
and the test suite's fixtures, so that each starts the stack the same way. Writing the
fixture and the conversion are resumable: a second stack on the same folder reuses them.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mixtral_triton.errors import UserError
from mixtral_triton.launcher import Ports, TritonServer, free_ports

# The fixture's folder under <work dir>/hub, by tokenizer ("instruct" has a chat template).
CHECKPOINT_NAMES = {"base": "tiny", "instruct": "tiny-instruct"}


def fixture_checkpoint(hub_dir: Path, tokenizer: str = "base", log=print) -> Path:
    """The tiny Mixtral fixture in `hub_dir`, written once (seed 0): the same weights in every
    folder, so any stack's answers are comparable."""
    from mixtral_triton.fixture import write_checkpoint  # torch: slow to import

    if tokenizer not in CHECKPOINT_NAMES:
        raise UserError(f"tokenizer must be one of {', '.join(CHECKPOINT_NAMES)}, got {tokenizer!r}")
    checkpoint = Path(hub_dir) / CHECKPOINT_NAMES[tokenizer]
    if not (checkpoint / "config.json").is_file():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        log(f"writing the tiny Mixtral fixture to {checkpoint}")
        write_checkpoint(checkpoint, size="tiny", tokenizer=tokenizer, seed=0)
    return checkpoint


class GatewayDidNotStart(UserError):
    """The gateway process exited, or was not ready in time (its log says why)."""


class GatewayProcess:
    """The HTTP gateway (`python -m mixtral_triton.gateway.cli`) in a process of its own (so
    that its CPU and memory are its own), up and ready while in the block. `port` None
    picks a free one."""

    def __init__(self, triton_grpc_url: str, log_file: Path, host: str = "127.0.0.1",
                 port: int | None = None, tokenizer_dir: Path | None = None,
                 max_concurrency: int | None = None, timeout_s: float | None = None,
                 log_level: str | None = None, workers: int | None = None, queue_wait_s: float | None = None):
        self.host = host
        self.port = port if port is not None else free_ports().http
        self.log_file = Path(log_file)
        self.command = [sys.executable, "-m", "mixtral_triton.gateway.cli", "--triton-grpc-url", triton_grpc_url,
                        "--host", host, "--port", str(self.port)]
        for option, value in (("--tokenizer-dir", tokenizer_dir), ("--max-concurrency", max_concurrency),
                              ("--timeout", timeout_s), ("--log-level", log_level), ("--workers", workers),
                              ("--queue-wait", queue_wait_s)):
            if value is not None:
                self.command += [option, str(value)]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        # a gateway listening on every address is reached on loopback
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, timeout_s: float = 60.0) -> "GatewayProcess":
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        # /ready, not /health: it also answers only once the gateway reaches Triton's models
        while not _answers(f"{self.url}/ready"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                code = self.process.poll()
                self.stop()
                why = f"exited with code {code}" if code is not None else f"was not ready after {timeout_s:.0f} s"
                raise GatewayDidNotStart(f"the gateway {why}; see {self.log_file}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "GatewayProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@dataclass(frozen=True)
class GatewayOptions:
    """How LocalStack runs its gateway; None leaves the gateway's own default."""

    port: int | None = None  # None: a free port
    chat: bool = True  # hand it the fixture's tokenizer folder (its chat template, if any)
    max_concurrency: int | None = None
    timeout_s: float | None = None
    log_level: str | None = None
    workers: int | None = None  # gateway worker processes (None: one per core)


class LocalStack:
    """Fixture -> checkpoint -> repository -> Triton (-> gateway) in `work_dir`; started in the
    block (or by start/stop). `checkpoint` and `repository` are built on first use, so a
    caller may take them without starting a server. `repository_options` go to
    mixtral_triton.pipeline.build_repository (max_batch_size, max_input_len, max_seq_len,
    standin, ...).

    The logs are `work_dir`/triton.log and gateway.log, fresh at the first start; a restart
    (after a crash) keeps the crashed server's log and writes triton-restart<N>.log."""

    def __init__(self, work_dir: Path, *, tokenizer: str = "base", tp: int = 4, host: str = "127.0.0.1",
                 ports: Ports | None = None, gateway: GatewayOptions | None = None,
                 exit_timeout_s: int = 5, log=print, **repository_options):
        self.work_dir = Path(work_dir)
        self.tokenizer = tokenizer
        self.tp = tp
        self.host = host
        self.ports = ports  # None: free ports at every start
        self.gateway_options = gateway
        self.exit_timeout_s = exit_timeout_s
        self.repository_options = repository_options
        self.log = log
        self.triton: TritonServer | None = None
        self.gateway: GatewayProcess | None = None
        self.starts = 0

    @cached_property
    def checkpoint(self) -> Path:
        return fixture_checkpoint(self.work_dir / "hub", self.tokenizer, self.log)

    @cached_property
    def repository(self) -> Path:
        from mixtral_triton.pipeline import build_repository

        return build_repository(self.checkpoint, self.work_dir, tp=self.tp, log=lambda *_: None,
                                **self.repository_options)

    @cached_property
    def trtllm_checkpoint(self) -> Path:
        """The converted (TP-sharded) checkpoint that the repository's CPU engine computes from."""
        from mixtral_triton.repository import load_config

        engine = load_config(self.repository / "tensorrt_llm" / "config.pbtxt")
        return Path(engine.parameters["checkpoint_dir"].string_value)

    def start(self) -> "LocalStack":
        repository = self.repository
        self.starts += 1
        triton_log = self.work_dir / ("triton.log" if self.starts == 1 else f"triton-restart{self.starts - 1}.log")
        gateway_log = self.work_dir / "gateway.log"
        triton_log.unlink(missing_ok=True)
        if self.starts == 1:
            gateway_log.unlink(missing_ok=True)
        self.triton = TritonServer(repository, self.ports, self.host, triton_log,
                                   exit_timeout_s=self.exit_timeout_s).start()
        options = self.gateway_options
        if options is not None:
            try:
                self.gateway = GatewayProcess(
                    self.triton.grpc_url, gateway_log, self.host, options.port,
                    self.checkpoint if options.chat else None, options.max_concurrency, options.timeout_s,
                    options.log_level, options.workers).start()
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.triton is not None:
            self.triton.stop()
            self.triton = None

    @property
    def metrics_url(self) -> str:
        return f"http://{self.triton.host}:{self.triton.ports.metrics}/metrics"

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
