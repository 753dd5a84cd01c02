"""`scripts/serve.sh`: the embedded default served on this machine (CPU, tiny model).

The local stack (mixtral_triton.local_stack): writes the tiny random-weight Mixtral (on-hub
layout, real tokenizer) once, converts it to a TP=4 TensorRT-LLM checkpoint and fills the
CPU model repository (both resumable), then runs the real Triton server (restarted if it
or one of its Python stubs dies) and the HTTP gateway (in front of Triton's gRPC port)
until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from mixtral_triton.errors import UserError, one_line_errors
from mixtral_triton.launcher import Ports, free_ports
from mixtral_triton.launcher.ports import port_is_free
from mixtral_triton.local_stack import GatewayOptions, LocalStack

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
    ports = free_ports() if args.free_ports else Ports(args.http_port, args.grpc_port, args.metrics_port)
    ports.check_free(args.host)  # before minutes of work, not after
    gateway_port = free_ports().http if args.free_ports else args.gateway_port
    if not port_is_free(gateway_port, args.host):
        raise UserError(f"--gateway-port {gateway_port} is already in use")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(args.work_dir, tp=args.tp, host=args.host, ports=ports,
                       gateway=GatewayOptions(port=gateway_port), log=lambda line: print(line, flush=True))
    repository = stack.repository

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with stack:
        print(f"triton ready: http {args.host}:{ports.http}  grpc {args.host}:{ports.grpc}  "
              f"metrics {args.host}:{ports.metrics}\n"
              f"gateway ready: http://{args.host}:{gateway_port}  (/predict, /v1/completions, /docs)\n"
              f"  repository {repository}\n  logs {args.work_dir}/triton.log, gateway.log\n"
              f"  try: curl -sN http://{args.host}:{gateway_port}/predict "
              """-d '{"prompt": "What is the mistral wind?", "max_tokens": 32}'\n"""
              "Ctrl-C stops.", flush=True)
        code = stack.triton.serve(stop, log=lambda line: print(line, flush=True))
    print("stopped", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
