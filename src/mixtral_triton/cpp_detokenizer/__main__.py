"""Compile the C++ detokenizer for an image: `python3 -m mixtral_triton.cpp_detokenizer --out DIR
[--triton-include DIR]`. Writes DIR/libtriton_mixtral_detokenizer.so (release flavour) and its
`.sources` stamp, which the fill then installs without a compiler (PREBUILT_ENV). With Triton's
headers (the image's /opt/tritonserver/include), first checks triton_api.h against them."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from mixtral_triton.cpp_detokenizer import LIBRARY, build, cxx_compiler, header_check
from mixtral_triton.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m mixtral_triton.cpp_detokenizer", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for the library and its stamp")
    parser.add_argument("--triton-include", type=Path,
                        help="Triton's include folder (holding triton/core/); checked when it exists")
    args = parser.parse_args(argv)
    try:
        if args.triton_include is not None and args.triton_include.is_dir():
            count = header_check.check(args.triton_include, cxx_compiler())
            print(f"triton_api.h: {count} declarations match {args.triton_include}")
        elif args.triton_include is not None:
            print(f"triton_api.h: not checked ({args.triton_include} does not exist)")
        with tempfile.TemporaryDirectory() as cache:
            library = build(Path(cache))
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(library, args.out / LIBRARY)
            shutil.copy2(library.with_name(f"{LIBRARY}.sources"), args.out / f"{LIBRARY}.sources")
        print(args.out / LIBRARY)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
