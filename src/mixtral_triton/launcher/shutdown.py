"""Stopping a server's process group so that it drains first and leaves nothing behind.

Both launchers stop the same way: SIGTERM to the process that serves (Triton then refuses
new requests and finishes the ones in flight, up to its --exit-timeout-secs), a wait for
the group's leader to exit, and only then SIGKILL to whatever is left of the group. On the
CPU the server is the group's leader; in leader mode the leader is mpirun and the server is
MPI rank 0 below it, because mpirun's own SIGTERM handling kills the ranks about a second
after forwarding the signal (Open MPI's odls_base_sigkill_timeout), long before a drain ends.
"""

from __future__ import annotations

import os
import signal
import subprocess

from mixtral_triton.launcher.stubs import child_pids


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, children before their own children."""
    found, frontier = [], [pid]
    while frontier:
        children = [c for p in frontier for c in child_pids(p)]
        found += children
        frontier = children
    return found


def stop_process_group(leader: subprocess.Popen, timeout_s: float, serving_pid: int | None = None,
                       kill_grace_s: float = 0.0) -> int:
    """Drain, then stop `leader`'s process group (it was started with start_new_session).

    SIGTERM goes to `serving_pid` (default: the leader itself); `leader` gets up to
    `timeout_s` to exit. If the serving process is not the leader, the leader then gets a
    SIGTERM of its own and `kill_grace_s` more. Whatever is left of the group is killed.
    Returns the leader's exit code."""
    if leader.poll() is None:
        try:
            os.kill(serving_pid or leader.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            leader.wait(timeout_s)
        except subprocess.TimeoutExpired:
            if serving_pid not in (None, leader.pid):
                leader.terminate()
                try:
                    leader.wait(kill_grace_s)
                except subprocess.TimeoutExpired:
                    pass
    kill_group(leader.pid)
    leader.wait()
    return leader.returncode


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
