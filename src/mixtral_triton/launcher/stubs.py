"""Triton's Python stub processes, seen from /proc: which there are, and which have died.

Why: when a stub process dies, Triton 2.51 neither restarts it nor stops reporting the
server and the model ready (docs/reliability.md); it answers that instance's requests with
"Stub process ... is not healthy" until the server is restarted. A dead stub stays a
zombie child of the server (nobody reaps it), so it can be seen from outside. The CPU
launcher restarts the server when it sees one, and the Kubernetes liveness probe runs
`python3 -m mixtral_triton.launcher.liveness`, which fails while any stub on the machine
is dead, so that the kubelet restarts the container.
"""

from __future__ import annotations

import re
from pathlib import Path

STUB = "triton_python_backend_stub"
SERVER = "tritonserver"
_PROC = Path("/proc")


def child_pids(pid: int) -> list[int]:
    found = []
    for task in (_PROC / str(pid) / "task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _stub_name(pid: int) -> str | None:
    """The stub's instance name (<model>_<group>_<index>, as Triton names it), or None if
    `pid` is not a live or zombie stub. A zombie keeps no command line, only its `comm`."""
    try:
        argv = (_PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if argv and argv[0].endswith(STUB.encode()) and len(argv) > 1:
        model = Path(argv[1].decode()).parent.parent.name  # <repository>/<model>/<version>/model.py
        names = [a.decode() for a in argv if re.fullmatch(rf"{re.escape(model)}_\d+_\d+", a.decode())]
        return names[0] if names else model
    return None


def stub_processes(server_pid: int) -> dict[str, int]:
    """Instance name -> pid of the server's live stubs."""
    stubs = {}
    for child in child_pids(server_pid):
        name = _stub_name(child)
        if name is not None:
            stubs[name] = child
    return stubs


def _comm(pid: int | str) -> str | None:
    try:
        return (_PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return None


def _is_dead_stub(pid: int) -> bool:
    """A zombie stub whose server is still running."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    # "pid (comm) state ppid ...": comm is cut to 15 characters and may hold spaces.
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
    return state == "Z" and comm == STUB[:15] and not orphaned(ppid, _comm(1))


def orphaned(ppid: str, init_comm: str | None) -> bool:
    """Whether a zombie with this parent belongs to a server that is gone: a zombie handed
    to PID 1 does (an init that does not reap, as in some sandboxes, keeps it), unless PID 1
    is the server itself, as in a container whose command is `tritonserver`."""
    return ppid == "1" and init_comm != SERVER


def dead_stubs(server_pid: int | None = None) -> list[int]:
    """Pids of dead (zombie) stubs: the server's, or any on the machine."""
    pids = child_pids(server_pid) if server_pid is not None else [
        int(p.name) for p in _PROC.iterdir() if p.name.isdigit()]
    return [pid for pid in pids if _is_dead_stub(pid)]
