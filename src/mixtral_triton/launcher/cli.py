"""`mixtral-triton-launch`: start Triton on a model repository (see scripts/launch_triton.py)."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path

from mixtral_triton.errors import OneLineArgumentParser, UserError, one_line_errors
from mixtral_triton.launcher.cpu import TritonServer, cpu_server_command
from mixtral_triton.launcher.gpu import NGC_TRITONSERVER, ORCHESTRATOR_STARTS, serve_under_mpirun, server_invocation
from mixtral_triton.launcher.ports import Ports, free_ports


def parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="mixtral-triton-launch",
        description="Start Triton Inference Server on a filled model repository. "
        "--target cpu runs the server from the nvidia-pytriton wheel on this machine; "
        "--target gpu runs the NGC TensorRT-LLM container's server: in orchestrator mode (the "
        "default) it execs the one tritonserver process, whose engine model spawns a worker per "
        "GPU; in leader mode it runs mpirun, one tritonserver rank per GPU.")
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--target", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (cpu target; default loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--free-ports", action="store_true", help="pick three free ports instead")
    p.add_argument("--mode", choices=["orchestrator", "leader"], default="orchestrator",
                   help="gpu target: orchestrator (default): one tritonserver process with "
                   "TRTLLM_ORCHESTRATOR=1, one node; leader: mpirun, one tritonserver rank per GPU, "
                   "the layout that can span nodes")
    p.add_argument("--orchestrator-start", choices=ORCHESTRATOR_STARTS, default="auto",
                   help="gpu target, orchestrator mode: bare (the server alone, its worker spawn from an MPI "
                   "singleton) or mpirun (under mpirun -n 1, as upstream's launch script); auto (default): bare "
                   "below Open MPI 5, mpirun from 5 on, by the image's recorded `ompi_info --version`")
    p.add_argument("--world-size", type=int, default=4,
                   help="gpu target: the engine's GPUs (its tensor-parallel size), one MPI rank "
                   "each in leader mode (default 4)")
    p.add_argument("--tritonserver", default=NGC_TRITONSERVER, help="gpu target: server binary")
    p.add_argument("--exit-timeout-secs", type=int, default=5,
                   help="how long the server drains in-flight requests on shutdown")
    p.add_argument("--log-file", type=Path, default=None)
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    repo = args.model_repository.resolve()
    if not repo.is_dir():
        raise UserError(f"--model-repository {args.model_repository} is not a folder")
    if args.exit_timeout_secs < 0:
        raise UserError(f"--exit-timeout-secs must not be negative, got {args.exit_timeout_secs}")
    if args.log_verbose < 0:
        raise UserError(f"--log-verbose must not be negative, got {args.log_verbose}")
    if args.log_file is not None and not args.log_file.resolve().parent.is_dir():
        raise UserError(f"--log-file {args.log_file}: its folder does not exist")
    ports = free_ports() if args.free_ports else Ports(args.http_port, args.grpc_port, args.metrics_port)

    if args.target == "gpu":
        return launch_gpu(args, repo, ports)

    if args.dry_run:
        print(shlex.join(cpu_server_command(repo, ports, args.host, args.exit_timeout_secs,
                                            args.log_verbose)))
        return 0
    return serve_until_signal(TritonServer(repo, ports, args.host, args.log_file,
                                           args.exit_timeout_secs, args.log_verbose))


def launch_gpu(args: argparse.Namespace, repo: Path, ports: Ports) -> int:
    start, env, command = server_invocation(args.mode, args.orchestrator_start, repo, args.world_size, ports,
                                            args.tritonserver, args.exit_timeout_secs)
    needed = [args.tritonserver] + (["mpirun"] if command[0] == "mpirun" else [])
    if args.dry_run:
        print(shlex.join([f"{name}={value}" for name, value in env.items()] + command))
        return 0
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        raise UserError("the gpu target runs inside nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3 "
                        f"({' and '.join(missing)} not found here)")
    if args.mode == "orchestrator":
        print(f"orchestrator mode, started {start}", file=sys.stderr, flush=True)
    if command[0] == "mpirun":
        return serve_under_mpirun(command, args.exit_timeout_secs)
    # The server replaces this process, so that a container's SIGTERM reaches it directly.
    os.execve(command[0], command, {**os.environ, **env})


def serve_until_signal(server: TritonServer) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    print(f"triton ready: http {server.http_url}  grpc {server.grpc_url}  "
          f"metrics {server.host}:{server.ports.metrics}  (log: {server.log_file})", flush=True)
    code = server.serve(stop, log=lambda line: print(line, flush=True))
    if code == 0:
        print("triton stopped", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
