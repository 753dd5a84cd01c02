"""Progress with time left: plain lines when the output is not a terminal, tqdm's bar on a
terminal (a real pseudo-terminal), for a real conversion and verification run by the
command line."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from test_convert import write_micro

from mixtral_triton.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "build" / "convert_checkpoint.py"


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return write_micro(tmp_path_factory.mktemp("hub") / "micro")


def test_plain_lines_when_not_a_terminal(micro, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, SCRIPT, "convert", micro, out, "--tp-size", "2"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    lines = done.stderr.splitlines()
    plain = r"{}: +\d+% \(\S+B of \S+B\) \[\d\d:\d\d elapsed, (\?|\d\d:\d\d) left, .*B/s\]$"
    for step in ("float16 audit", "converting"):
        mine = [line for line in lines if line.startswith(step)]
        assert mine and all(re.match(plain.format(step), line) for line in mine), lines
        assert re.match(r".*: 100% .* 00:00 left", mine[-1]), mine
    assert "rank 1: wrote rank1.safetensors" in done.stdout  # log lines stay on stdout

    done = subprocess.run([sys.executable, SCRIPT, "verify", micro, out], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^verifying: 100% .* 00:00 left", done.stderr, re.MULTILINE), done.stderr


def run_in_terminal(argv: list) -> tuple[int, str]:
    """Run `argv` with stdout and stderr on a pseudo-terminal; its exit code and all it wrote."""
    controller, terminal = pty.openpty()
    # A new pseudo-terminal is 0 x 0, where tqdm draws nothing; a real one has a size.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    child = subprocess.Popen([str(a) for a in argv], stdout=terminal, stderr=terminal, stdin=subprocess.DEVNULL)
    os.close(terminal)
    output = b""
    while True:
        ready, _, _ = select.select([controller], [], [], 120)
        if not ready:
            child.kill()
            break
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        output += data
    os.close(controller)
    return child.wait(), output.decode(errors="replace")


def test_a_terminal_shows_a_bar_with_time_left(micro, tmp_path):
    code, output = run_in_terminal([sys.executable, SCRIPT, "convert", micro, tmp_path / "out", "--tp-size", "2"])
    assert code == 0, output
    # tqdm's bar, redrawn in place: percentage, bar, count, [elapsed<remaining, rate].
    bar = re.compile(r"\rconverting: +100%\|[^|\r\n]+\| [^\r\n]+ \[\d\d:\d\d<00:00, [^\]]+B/s\]")
    assert bar.search(output), output
    assert "rank 1: wrote rank1.safetensors" in output


def test_plain_lines_are_throttled_and_say_the_time_left():
    stream = io.StringIO()
    with Progress(total=100, desc="step", file=stream, unit="B", unit_scale=True) as bar:
        for _ in range(100):
            bar.update(1)  # far under PLAIN_INTERVAL_S: no line until the end
    assert stream.getvalue().splitlines() == [
        "step:   0% (0.00B of 100B) [00:00 elapsed, ? left, ?B/s]",
        stream.getvalue().splitlines()[1]]
    assert re.match(r"step: 100% \(100B of 100B\) \[00:00 elapsed, 00:00 left, .*B/s\]$",
                    stream.getvalue().splitlines()[1])
