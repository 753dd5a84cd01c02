"""Progress with time left for the long steps (download, conversion, its float16 audit,
verification, the engine build): tqdm, as huggingface_hub's downloads show it.

On a terminal it is tqdm's bar, redrawn in place, with elapsed<remaining and the rate. When
the output is not a terminal (a log file, CI, a pipe) it is one plain line at the start,
then at most one every PLAIN_INTERVAL_S seconds, and one at the end, each with the time
left: no carriage returns or escape codes in logs.
"""

from __future__ import annotations

import io
import re
import sys

from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0
PLAIN_FORMAT = ("{desc}: {percentage:3.0f}% ({n_fmt}{unit} of {total_fmt}{unit}) "
                "[{elapsed} elapsed, {remaining} left, {rate_fmt}]")


class Progress(tqdm):
    """tqdm, or plain lines where its stream (stderr unless `file`) is not a terminal. Also
    usable as huggingface_hub's tqdm_class."""

    def __init__(self, *args, file=None, **kwargs):
        stream = sys.stderr if file is None else file
        if not _is_terminal(stream):
            stream = _PlainLines(stream)
            kwargs.update(mininterval=PLAIN_INTERVAL_S, bar_format=PLAIN_FORMAT)
            if kwargs.get("disable") is None:  # tqdm's "off unless a terminal"
                kwargs["disable"] = False
        super().__init__(*args, file=stream, **kwargs)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _PlainLines(io.TextIOBase):
    """tqdm's output as whole lines: each redraw ("\\r...") becomes a line of its own, repeats
    (tqdm draws the last state again when it closes) and cursor movements dropped."""

    def __init__(self, stream):
        super().__init__()
        self._stream, self._last = stream, None

    def write(self, text: str) -> int:
        for line in re.split(r"[\r\n]", _ESCAPES.sub("", text)):
            line = line.rstrip()
            if line and line != self._last:
                self._stream.write(line + "\n")
                self._last = line
        self._stream.flush()
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False
