"""What the served processes cost, read from /proc: CPU seconds and memory of a process
group (tritonserver and its model stubs share the server's group) or of one process (the
gateway), and the state of every process in a group (a dead stub shows as a zombie)."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces): fields[0] is the
    state, fields[2] the process group, fields[11] and fields[12] utime and stime."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(entry)
            if fields is not None and int(fields[2]) == pgid:
                members.append(int(entry))
    return members


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of every live process in a process group (Triton and its stubs)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in group_members(pgid):
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def process_cpu_seconds(pid: int) -> float | None:
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process and its live children (the gateway's supervisor and its
    worker processes)."""
    own = process_cpu_seconds(pid)
    if own is None:
        return None
    children = [int(e) for e in os.listdir("/proc")
                if e.isdigit() and (fields := _stat_fields(e)) is not None and int(fields[1]) == pid]
    return own + sum(process_cpu_seconds(child) or 0.0 for child in children)


def proportional_set_size(pid: int) -> int | None:
    """Bytes of memory the process holds, shared pages split among their sharers (Pss of
    smaps_rollup): the stubs' shared-memory pool is counted once across the group, not once
    per stub as resident set sizes would. Falls back to VmRSS where Pss is unreadable."""
    for name, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            for line in Path(name).read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        except OSError:
            continue
    return None


def memory_bytes(pgids: tuple[int, ...] = (), pids: tuple[int, ...] = ()) -> int:
    """Proportional set size of every process in the groups plus the single processes."""
    members = {pid for pgid in pgids for pid in group_members(pgid)} | set(pids)
    return sum(size for pid in members if (size := proportional_set_size(pid)) is not None)


def group_states(pgid: int) -> list[str]:
    """`pid state command` of every process in a process group (a dead model stub shows Z)."""
    out = []
    for pid in group_members(pgid):
        try:
            head = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[0]
        except OSError:
            continue
        fields = _stat_fields(pid)
        if fields is not None:
            out.append(f"{pid} {fields[0]} {head.split('(', 1)[1][:40]}")
    return out


class PeakMemory:
    """Samples memory_bytes() in a thread while in the block; `.peak` is the largest sample."""

    def __init__(self, pgids: tuple[int, ...], pids: tuple[int, ...] = (), interval_s: float = 0.5):
        self.pgids, self.pids, self.interval_s = pgids, pids, interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, memory_bytes(self.pgids, self.pids))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
