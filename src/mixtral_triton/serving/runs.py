"""Generations in flight, shared by the model instances (processes) of one Triton server.

Why this exists: the streaming detokenizer runs as several instances, each a process of
its own serving many streams (processes follow the cores, so that detokenizing runs in
parallel and a crash takes only that process's streams). A `stop` for a request id is
taken by the tokenizer model, another process than the one running that request, and the
running one must still learn that it was cancelled (to report "cancelled", not "stop"). So the runs live in a small SQLite database that every instance opens: each run
is registered under the client's request id with a private engine request id, a `stop`
marks every run of its client id cancelled and gets their engine ids to stop, and the
run's owner removes it when its stream ends.

One database per server process (the stubs' parent), in /dev/shm where it exists, so
two servers on one machine never see each other's runs; a file left by a server that is
gone is removed by the next one to open a registry in that folder.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path

_PREFIX = "mixtral-triton-runs-"
_SUFFIX = ".sqlite"
# How long a process waits for another's write to finish before it fails: writes are a
# single short statement each, so this is only reached if a process died holding the lock.
_LOCK_TIMEOUT_S = 10.0


def server_registry_path(server_pid: int | None = None, folder: Path | None = None) -> Path:
    """The registry file of the server `server_pid` (default: this stub's parent, the server)."""
    if folder is None:
        shm = Path("/dev/shm")
        folder = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    pid = os.getppid() if server_pid is None else server_pid
    return folder / f"{_PREFIX}{pid}{_SUFFIX}"


def remove_stale_registries(folder: Path) -> list[Path]:
    """Delete the registry files of servers that are no longer running; returns them."""
    removed = []
    for path in folder.glob(f"{_PREFIX}*{_SUFFIX}*"):
        pid_text = path.name[len(_PREFIX):].split(_SUFFIX)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass  # another instance got there first
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, and not ours to judge
    return True


class RunRegistry:
    """The runs of one server: register, cancel by client id, finish. Safe across processes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        remove_stale_registries(self.path.parent)
        # Autocommit: every statement below is its own transaction.
        self._db = sqlite3.connect(self.path, timeout=_LOCK_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
        # WAL: a reader (a run checking its flag) never waits for a writer.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")  # a registry dies with its server anyway
        self._db.execute("CREATE TABLE IF NOT EXISTS runs (engine_id TEXT PRIMARY KEY, "
                         "client_id TEXT NOT NULL, owner INTEGER NOT NULL, "
                         "cancelled INTEGER NOT NULL DEFAULT 0)")
        self._db.execute("CREATE INDEX IF NOT EXISTS runs_by_client ON runs (client_id)")
        self._db.execute("CREATE INDEX IF NOT EXISTS runs_by_owner ON runs (owner, cancelled)")
        # Runs a dead instance of this server left behind can never finish: drop them.
        owners = [owner for (owner,) in self._db.execute("SELECT DISTINCT owner FROM runs")]
        for owner in owners:
            if not _alive(owner):
                self._db.execute("DELETE FROM runs WHERE owner = ?", (owner,))

    def start(self, client_id: str, engine_id: str) -> None:
        self._db.execute("INSERT INTO runs (engine_id, client_id, owner) VALUES (?, ?, ?)",
                         (engine_id, client_id, os.getpid()))

    def cancel(self, client_id: str) -> list[str]:
        """Mark every running generation of `client_id` cancelled; their engine ids, to stop."""
        rows = self._db.execute("UPDATE runs SET cancelled = 1 WHERE client_id = ? AND cancelled = 0 "
                                "RETURNING engine_id", (client_id,)).fetchall()
        return [engine_id for (engine_id,) in rows]

    def cancelled_here(self) -> set[str]:
        """The engine ids of this process's runs that a `stop` has marked cancelled: one
        query per process however many streams it serves."""
        rows = self._db.execute("SELECT engine_id FROM runs WHERE owner = ? AND cancelled = 1",
                                (os.getpid(),))
        return {engine_id for (engine_id,) in rows}

    def finish(self, engine_id: str) -> bool:
        """Forget the run; whether it had been cancelled."""
        row = self._db.execute("DELETE FROM runs WHERE engine_id = ? RETURNING cancelled",
                               (engine_id,)).fetchone()
        return bool(row and row[0])

    def running(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    def close(self) -> None:
        self._db.close()
