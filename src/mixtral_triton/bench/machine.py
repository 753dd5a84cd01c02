"""What a benchmark ran on: cores, memory, Python, package versions, git commit, load."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("mixtral-triton", "nvidia-pytriton", "tritonclient", "torch", "transformers", "tokenizers",
            "numpy", "safetensors", "grpcio", "aiohttp", "fastapi", "uvicorn", "matplotlib")


def _git(root: Path, *args: str, strip: bool = True) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout
        return out.strip() if strip else out
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def dirty_paths(root: Path, outputs: tuple[str, ...] = ()) -> list[str] | None:
    """Paths that differ from the commit (modified, staged or untracked, git-ignored files
    aside), leaving out the benchmark's own outputs (`outputs`: paths or folder prefixes
    relative to the repository), which a run rewrites and which measure nothing; None when
    git cannot say."""
    status = _git(root, "status", "--porcelain", "--untracked-files=all", strip=False)
    if status is None:
        return None
    paths = [line[3:].split(" -> ")[-1].strip('"') for line in status.splitlines() if line.strip()]
    return [p for p in paths if not any(p == o or p.startswith(o.rstrip("/") + "/") for o in outputs)]


def describe(root: Path, outputs: tuple[str, ...] = ()) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    dirty = dirty_paths(root, outputs)
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": _memory_bytes(),
        "python": sys.version.split()[0],
        "packages": versions,
        "git_commit": _git(root, "rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "git_dirty_paths": dirty,
        "load_average_at_start": load_average(),
    }
