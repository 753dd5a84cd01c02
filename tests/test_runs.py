"""The registry of generations in flight that the serving models' processes share."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

from mixtral_triton.serving.runs import RunRegistry, remove_stale_registries, server_registry_path


def test_a_stop_cancels_every_run_of_its_id_and_only_those(tmp_path):
    runs = RunRegistry(tmp_path / "runs.sqlite")
    runs.start("client-a", "engine-1")
    runs.start("client-a", "engine-2")  # the same client id twice: both are cancelled
    runs.start("client-b", "engine-3")
    assert sorted(runs.cancel("client-a")) == ["engine-1", "engine-2"]
    assert runs.cancel("client-a") == []  # already cancelled: nothing more to stop
    assert runs.cancelled_here() == {"engine-1", "engine-2"}  # all three runs are this process's
    assert runs.finish("engine-1") is True
    assert runs.finish("engine-3") is False
    assert runs.finish("engine-3") is False  # gone: finishing twice is harmless
    assert runs.running() == 1
    assert runs.cancel("nobody") == []


def _cancel_in_another_process(path, client_id, queue):
    queue.put(RunRegistry(path).cancel(client_id))


def test_a_run_learns_of_a_stop_taken_by_another_process(tmp_path):
    path = tmp_path / "runs.sqlite"
    runs = RunRegistry(path)
    runs.start("client", "engine")
    queue = multiprocessing.get_context("spawn").Queue()
    process = multiprocessing.get_context("spawn").Process(
        target=_cancel_in_another_process, args=(path, "client", queue))
    process.start()
    process.join(60)
    assert queue.get(timeout=5) == ["engine"]
    assert runs.cancelled_here() == {"engine"} and runs.finish("engine")


def test_a_process_sees_only_its_own_cancelled_runs(tmp_path):
    path = tmp_path / "runs.sqlite"
    code = ("import sys; from mixtral_triton.serving.runs import RunRegistry; "
            "r = RunRegistry(sys.argv[1]); r.start('client', 'theirs'); r.cancel('client'); "
            "print(sorted(r.cancelled_here()))")
    runs = RunRegistry(path)
    runs.start("client", "mine")
    theirs = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert theirs.stdout.strip() == "['theirs']"  # its stop cancelled both runs; it sees its own
    assert runs.cancelled_here() == {"mine"}


def test_runs_of_a_dead_instance_are_dropped(tmp_path):
    path = tmp_path / "runs.sqlite"
    code = ("import sys; from mixtral_triton.serving.runs import RunRegistry; "
            "RunRegistry(sys.argv[1]).start('client', 'orphan')")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    assert RunRegistry(path).running() == 0  # its owner exited: it can never finish


def test_each_server_has_its_own_file_and_a_dead_server_s_file_is_removed(tmp_path):
    mine = server_registry_path(folder=tmp_path)
    assert mine.name == f"mixtral-triton-runs-{os.getppid()}.sqlite"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = server_registry_path(int(dead.stdout), folder=tmp_path)
    RunRegistry(stale).close()
    (tmp_path / (stale.name + "-wal")).write_bytes(b"")
    unrelated = tmp_path / "mixtral-triton-runs-notes.txt"
    unrelated.write_text("kept")
    RunRegistry(mine).close()  # opening a registry clears what dead servers left
    assert not stale.exists() and not (tmp_path / (stale.name + "-wal")).exists()
    assert mine.exists() and unrelated.exists()
    assert remove_stale_registries(tmp_path) == []
