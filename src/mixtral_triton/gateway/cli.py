"""`client/gateway.py`: the HTTP gateway (FastAPI on uvicorn) in front of Triton's gRPC port.

    .venv/bin/python client/gateway.py --triton-grpc-url localhost:8001 --port 8080 \
        --tokenizer-dir out/hub/tiny-instruct
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mixtral_triton.errors import UserError, one_line_errors

API_KEY_ENV = "MIXTRAL_TRITON_API_KEY"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway.py",
        description="HTTP gateway for Mixtral on Triton: POST /predict (the Truss contract), "
        "POST /v1/completions and /v1/chat/completions (OpenAI), GET /v1/models, /health, "
        "/ready, /metrics.")
    p.add_argument("--triton-grpc-url", default="localhost:8001",
                   help="Triton's gRPC address (default localhost:8001)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--max-concurrency", type=int, default=64,
                   help="generations in flight at once in this gateway, all its workers together; "
                   "a request above it waits up to --queue-wait seconds for one to end, then is "
                   "answered 429 with Retry-After (default 64)")
    p.add_argument("--queue-wait", type=float, default=2.0, metavar="SECONDS",
                   help="how long a request above --max-concurrency waits for a slot before its "
                   "429 (default 2; 0: answer 429 at once)")
    p.add_argument("--workers", type=int, default=None,
                   help="gateway processes, each relaying on its own core (default: the cores "
                   "this process may use, its CPU affinity capped by a container's CPU limit, "
                   "at most 16; a process relays about the tok/s BENCHMARKS.md gives per core)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Api-Key <key>' or 'Bearer <key>' on every "
                   f"route but /health, /ready and /metrics (default: the environment variable "
                   f"{API_KEY_ENV}; none: no key). Prefer the variable: a command line is "
                   "visible to every user of the machine")
    p.add_argument("--model-name", default="mixtral",
                   help="the model name of the OpenAI routes (default mixtral)")
    p.add_argument("--tokenizer-dir", type=Path, default=None,
                   help="the checkpoint folder whose tokenizer_config.json chat template "
                   "/v1/chat/completions uses (without it, chat answers 400)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for each response of the engine (default 300)")
    p.add_argument("--max-body-size", type=int, default=1 << 20, metavar="BYTES",
                   help="the largest request body accepted; larger ones are answered 413 "
                   "without being read (default 1048576, 1 MiB)")
    p.add_argument("--keep-alive-timeout", type=float, default=75.0, metavar="SECONDS",
                   help="how long an idle HTTP connection stays open (default 75). Keep it above "
                   "the idle timeout of whatever sends to the gateway (a load balancer: AWS ALB's "
                   "is 60 s; pooled clients): a connection the gateway closes while a client "
                   "sends on it is reset, and that request fails (uvicorn's own default, 5 s, "
                   "made a 256-stream soak lose 3 requests in 5000 that way)")
    p.add_argument("--log-prompts", action="store_true",
                   help="log prompt text (off by default: prompts are the users' data)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_concurrency < 1:
        raise UserError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    if args.queue_wait < 0:
        raise UserError(f"--queue-wait must be 0 or more seconds, got {args.queue_wait:g}")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.keep_alive_timeout <= 0:
        raise UserError(f"--keep-alive-timeout must be positive, got {args.keep_alive_timeout:g}")
    if args.max_body_size < 1:
        raise UserError(f"--max-body-size must be at least 1 byte, got {args.max_body_size}")
    if args.timeout <= 0:
        raise UserError(f"--timeout must be positive, got {args.timeout}")
    from mixtral_triton.gateway.workers import WorkerHandles, default_workers

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handles = WorkerHandles.from_environment()
    if handles is not None:  # one worker of a supervisor (gateway/workers.py)
        return _serve_worker(args, handles)
    from mixtral_triton.launcher.ports import port_is_free

    if not port_is_free(args.port, args.host):
        raise UserError(f"--port {args.port} is already in use on {args.host}")
    workers = args.workers or default_workers()
    app = _app(args)  # made here too in a supervisor: a bad setting stops the command, not each worker
    print(f"gateway: http://{args.host}:{args.port} -> triton grpc {args.triton_grpc_url} "
          f"(model {args.model_name}, {workers} worker process{'es' if workers > 1 else ''}, "
          f"max {args.max_concurrency} generations, API key "
          f"{'required' if app.state.serving.settings.api_key else 'off'}, chat template "
          f"{'on' if app.state.serving.chat.available else 'off'})", flush=True)
    if workers > 1:
        from mixtral_triton.gateway.workers import Supervisor

        command = [sys.executable, "-m", "mixtral_triton.gateway.cli", *(argv if argv is not None else sys.argv[1:])]
        return Supervisor(command, workers, args.host, args.port, args.max_concurrency).run()
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, **_uvicorn_options(args))
    return 0


def _settings(args):
    from mixtral_triton.gateway.generation import GatewaySettings

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    return GatewaySettings(triton_grpc_url=args.triton_grpc_url, max_concurrency=args.max_concurrency,
                           queue_wait_s=args.queue_wait, api_key=api_key or None, model_name=args.model_name,
                           tokenizer_dir=args.tokenizer_dir, log_prompts=args.log_prompts,
                           timeout_s=args.timeout, max_body_bytes=args.max_body_size)


def _app(args, slots=None):
    from mixtral_triton.gateway.app import create_app
    from mixtral_triton.gateway.generation import Serving
    from mixtral_triton.gateway.metrics import Metrics

    settings = _settings(args)
    return create_app(settings, Serving(settings, Metrics(), slots=slots))


def _uvicorn_options(args) -> dict:
    return {"log_level": args.log_level, "timeout_keep_alive": args.keep_alive_timeout,
            "timeout_graceful_shutdown": 10}


def _serve_worker(args, handles) -> int:
    import uvicorn

    from mixtral_triton.gateway.slots import Slots, held_map
    from mixtral_triton.gateway.workers import die_with_supervisor, port_socket

    die_with_supervisor()
    slots = Slots(args.max_concurrency, handles.slots_fd, held_map(handles.held_fd, handles.workers), handles.index)
    server = uvicorn.Server(uvicorn.Config(_app(args, slots), **_uvicorn_options(args)))
    server.run(sockets=[port_socket(args.host, args.port)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
