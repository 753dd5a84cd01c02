"""`scripts/serve.sh`: the embedded default served on this machine (CPU, tiny model).

Writes the tiny random-weight Mixtral (on-hub layout, real tokenizer) once, converts it
to a TP=4 TensorRT-LLM checkpoint and fills the CPU model repository (both resumable),
then runs the real Triton server and the HTTP gateway (in front of Triton's gRPC port)
until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from mixtral_triton.errors import UserError, one_line_errors
from mixtral_triton.launcher import Ports, TritonServer, free_ports
from mixtral_triton.launcher.ports import port_is_free

ROOT = Path(__file__).resolve().parents[2]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/serve.sh", description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "serve",
                   help="where the fixture, converted checkpoint and repository are kept")
    p.add_argument("--host", default="127.0.0.1", help="address Triton listens on")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--gateway-port", type=int, default=8080, help="the HTTP gateway's port")
    p.add_argument("--free-ports", action="store_true", help="pick free ports instead")
    p.add_argument("--tp", type=int, default=4, help="tensor parallel ranks simulated (default 4)")
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from mixtral_triton.fixture import write_checkpoint
    from mixtral_triton.pipeline import build_repository

    ports = free_ports() if args.free_ports else Ports(args.http_port, args.grpc_port, args.metrics_port)
    ports.check_free(args.host)  # before minutes of work, not after
    gateway_port = _free_port() if args.free_ports else args.gateway_port
    if not port_is_free(gateway_port, args.host):
        raise UserError(f"--gateway-port {gateway_port} is already in use")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = args.work_dir / "hub" / "tiny"
    if not (checkpoint / "config.json").exists():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing the tiny Mixtral fixture to {checkpoint}", flush=True)
        write_checkpoint(checkpoint)
    repository = build_repository(checkpoint, args.work_dir, tp=args.tp, log=lambda *_: None)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with TritonServer(repository, ports, args.host, args.work_dir / "triton.log") as triton, \
            _gateway(triton.grpc_url, args.host, gateway_port, checkpoint, args.work_dir / "gateway.log"):
        print(f"triton ready: http {args.host}:{ports.http}  grpc {args.host}:{ports.grpc}  "
              f"metrics {args.host}:{ports.metrics}\n"
              f"gateway ready: http://{args.host}:{gateway_port}  (/predict, /v1/completions, /docs)\n"
              f"  repository {repository}\n  logs {args.work_dir}/triton.log, gateway.log\n"
              f"  try: curl -sN http://{args.host}:{gateway_port}/predict "
              """-d '{"prompt": "What is the mistral wind?", "max_tokens": 32}'\n"""
              "Ctrl-C stops.", flush=True)
        code = triton.serve(stop, log=lambda line: print(line, flush=True))
    print("stopped", flush=True)
    return code


@contextlib.contextmanager
def _gateway(triton_grpc_url: str, host: str, port: int, tokenizer_dir: Path, log_file: Path):
    """The gateway in a process of its own, up (its /health answering) while in the block."""
    command = [sys.executable, "-m", "mixtral_triton.gateway.cli", "--triton-grpc-url", triton_grpc_url,
               "--host", host, "--port", str(port), "--tokenizer-dir", str(tokenizer_dir)]
    with open(log_file, "ab") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"http://{host}:{port}/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise UserError(f"the gateway did not start; see {log_file}")
            time.sleep(0.2)
        yield
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def _free_port() -> int:
    return free_ports().http


if __name__ == "__main__":
    raise SystemExit(main())
