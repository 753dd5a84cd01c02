"""`client/predict.py`: one prompt to the served model over gRPC, the completion printed as
it arrives. Ctrl-C cancels the request on the server and exits with 130.

    .venv/bin/python client/predict.py "What is mistral wind?" --max-tokens 256
    .venv/bin/python client/predict.py "Hi" --url localhost:8001 --temperature 0 --no-stream

The sampling options are generated from the predict API's field table
(mixtral_triton.protocol.FIELDS), so the CLI takes exactly the API's fields with its rules
and defaults; an option left out is not sent and the API's default applies.
"""

from __future__ import annotations

import argparse
import json
import sys

from mixtral_triton.client.ensemble import ServerError
from mixtral_triton.client.sync import PredictClient
from mixtral_triton.errors import UserError, one_line_errors
from mixtral_triton.protocol import FIELDS, RequestError, parse_request

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
def _json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text[:60]}") from None


_TYPES = {"integer": int, "number": float, "stop": str, "token_ids": int, "response_format": _json}
_OWN = ("prompt", "stream")  # the positional prompt and --no-stream


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="predict.py",
        description="Send one prompt to Mixtral on Triton (gRPC streaming) and print the "
        "completion as it arrives. Ctrl-C cancels the request on the server.")
    p.add_argument("prompt", help="the text to complete")
    p.add_argument("--url", default="localhost:8001", help="Triton's gRPC address (default localhost:8001)")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="wait for the whole completion and print it at once")
    p.add_argument("--usage", action="store_true",
                   help="print the finish reason and token counts to stderr at the end")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for each response (default 300)")
    for spec in FIELDS:
        if spec.name in _OWN:
            continue
        default = "not sent" if spec.default is None else repr(spec.default)
        rules = f"; {spec.bounds_rule}" if spec.bounds_rule else ""
        help_text = f"{spec.description} (default {default}{rules})".replace("%", "%%")
        if spec.kind in ("stop", "token_ids"):
            p.add_argument(_option(spec.name), dest=spec.name, action="append", type=_TYPES[spec.kind],
                           default=None, metavar=spec.kind.upper(), help=help_text + "; repeat for more")
        elif spec.kind == "boolean":
            p.add_argument(_option(spec.name), dest=spec.name, action=argparse.BooleanOptionalAction,
                           default=None, help=help_text)
        else:
            metavar = "JSON" if spec.kind == "response_format" else spec.kind.upper()
            p.add_argument(_option(spec.name), dest=spec.name, type=_TYPES[spec.kind],
                           default=None, metavar=metavar, help=help_text)
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    fields = {spec.name: getattr(args, spec.name) for spec in FIELDS
              if spec.name not in _OWN and getattr(args, spec.name) is not None}
    client = PredictClient(args.url, timeout_s=args.timeout)
    out = sys.stdout
    try:
        if args.stream:
            chunk = None
            request = parse_request({"prompt": args.prompt, "stream": True, **fields})
            for chunk in client.generate(request):
                if chunk.text:
                    out.write(chunk.text)
                    out.flush()
            out.write("\n")
            last = chunk
        else:
            last = client.predict(args.prompt, stream=False, **fields)
            out.write(last.text + "\n")
        out.flush()
        if args.usage and last is not None:
            print(f"[finish_reason={last.finish_reason} prompt_tokens={last.prompt_tokens} "
                  f"completion_tokens={last.completion_tokens}]", file=sys.stderr)
    except KeyboardInterrupt:  # the client's stream has sent `stop` on its way out
        out.write("\n")
        out.flush()
        print("[cancelled]", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RequestError as exc:
        raise UserError(str(exc)) from None
    except ServerError as exc:
        raise UserError(f"{args.url}: {exc}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
