"""`build/convert_checkpoint.py`: convert a Hugging Face Mixtral checkpoint to a TensorRT-LLM
1.2.1 checkpoint (`convert`), and check one against its source without a GPU (`verify`)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mixtral_triton.errors import UserError, one_line_errors
from mixtral_triton.progress import Progress
from mixtral_triton.convert.layout import DTYPES
from mixtral_triton.convert.mapping import resolve
from mixtral_triton.convert.verify import verify
from mixtral_triton.convert.writer import convert

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line through one_line_errors, instead of argparse's usage block.
        raise UserError(message)


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 512M or 8G, got {text!r}")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="convert_checkpoint.py", description=__doc__)
    commands = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = commands.add_parser("convert", help="write config.json and rank{r}.safetensors for TensorRT-LLM")
    c.add_argument("src", type=Path, help="Hugging Face checkpoint folder (sharded safetensors and config.json)")
    c.add_argument("out", type=Path, help="output folder; an unfinished conversion there is resumed")
    c.add_argument("--dtype", default="float16", choices=list(DTYPES), help="weight dtype (default float16)")
    c.add_argument("--tp-size", type=int, default=4, help="tensor parallel size (default 4)")
    c.add_argument("--pp-size", type=int, default=1, help="pipeline parallel size (default 1)")
    c.add_argument("--moe-tp-size", type=int, default=None,
                   help="split each expert over this many ranks (default: tp size / --moe-ep-size)")
    c.add_argument("--moe-ep-size", type=int, default=None,
                   help="split the experts over this many ranks (default: tp size / --moe-tp-size, else 1)")
    c.add_argument("--workers", type=int, default=1, help="ranks written at the same time (default 1)")
    c.add_argument("--memory-budget", type=parse_size, default=None,
                   help="memory for the workers' buffers (about 100M each) on top of the ~250M of the "
                   "process itself, e.g. 2G: fewer workers run if they would not fit")
    c.add_argument("--clamp-fp16", action="store_true",
                   help="clamp weights beyond the float16 range to +-65504 instead of refusing to convert")

    v = commands.add_parser("verify", help="check a converted checkpoint against its source, on CPU")
    v.add_argument("src", type=Path, help="the Hugging Face checkpoint folder it was converted from")
    v.add_argument("out", type=Path, help="the TensorRT-LLM checkpoint folder")
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "convert":
        parallel = resolve(args.tp_size, args.pp_size, args.moe_tp_size, args.moe_ep_size)
        convert(args.src, args.out, parallel=parallel, dtype=args.dtype, workers=args.workers,
                memory_budget=args.memory_budget, clamp_fp16=args.clamp_fp16, log=Progress.write)
    else:
        verify(args.src, args.out, log=Progress.write)
    return 0
