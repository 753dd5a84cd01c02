"""User-facing errors and the one-line error convention of every command-line tool."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix (bad option, missing folder, port in use).

    Command-line tools print it as one line and exit non-zero, never as a traceback.
    """


def one_line_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI entry point so that UserError becomes `<prog>: error: <message>`, exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as exc:
            prog = (sys.argv[0].rsplit("/", 1)[-1]) or "mixtral-triton"
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2

    return wrapper
