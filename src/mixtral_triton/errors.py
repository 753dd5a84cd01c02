"""User-facing errors and the one-line error convention of every command-line tool."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix (bad option, missing folder, port in use).

    Command-line tools print it as one line and exit non-zero, never as a traceback.
    """


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (a bad or missing option) are one line through one_line_errors,
    instead of the usage block and `prog: error:` on several lines."""

    def error(self, message: str):
        raise UserError(message)


def one_line_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI entry point so that UserError becomes `<prog>: error: <message>`, exit 2.
    An OSError (a folder that cannot be created, a file that cannot be opened) is the
    user's to fix too: one line, not a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except (UserError, OSError) as exc:
            if isinstance(exc, OSError) and exc.strerror:
                where = exc.filename if exc.filename is not None else ""
                exc = f"{where}: {exc.strerror}" if where else exc.strerror
            prog = (sys.argv[0].rsplit("/", 1)[-1]) or "mixtral-triton"
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2

    return wrapper
