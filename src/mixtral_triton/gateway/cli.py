"""`client/gateway.py`: the HTTP gateway (FastAPI on uvicorn) in front of Triton's gRPC port.

    .venv/bin/python client/gateway.py --triton-grpc-url localhost:8001 --port 8080 \
        --tokenizer-dir out/hub/tiny-instruct
"""

from __future__ import annotations

import argparse
import logging
import os
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
                   help="generations in flight at once; above it requests are answered 429 "
                   "with Retry-After, never queued (default 64)")
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
    if args.keep_alive_timeout <= 0:
        raise UserError(f"--keep-alive-timeout must be positive, got {args.keep_alive_timeout:g}")
    if args.max_body_size < 1:
        raise UserError(f"--max-body-size must be at least 1 byte, got {args.max_body_size}")
    if args.timeout <= 0:
        raise UserError(f"--timeout must be positive, got {args.timeout}")
    from mixtral_triton.launcher.ports import port_is_free

    if not port_is_free(args.port, args.host):
        raise UserError(f"--port {args.port} is already in use on {args.host}")

    import uvicorn

    from mixtral_triton.gateway.app import create_app
    from mixtral_triton.gateway.generation import GatewaySettings

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    settings = GatewaySettings(triton_grpc_url=args.triton_grpc_url, max_concurrency=args.max_concurrency,
                               api_key=api_key or None, model_name=args.model_name,
                               tokenizer_dir=args.tokenizer_dir, log_prompts=args.log_prompts,
                               timeout_s=args.timeout, max_body_bytes=args.max_body_size)
    app = create_app(settings)
    print(f"gateway: http://{args.host}:{args.port} -> triton grpc {args.triton_grpc_url} "
          f"(model {args.model_name}, max {args.max_concurrency} generations, "
          f"API key {'required' if settings.api_key else 'off'}, chat template "
          f"{'on' if app.state.serving.chat.available else 'off'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_keep_alive=args.keep_alive_timeout, timeout_graceful_shutdown=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
