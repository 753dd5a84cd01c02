"""Run Triton's `perf_analyzer` (installed by `tritonclient[all]`) on this machine.

The binary is a C++ program linked against `libb64.so.0d` (Debian: `libb64-0d`) and
`libcudart.so.12`, even for CPU-only use. The CUDA runtime comes from the PyPI wheel
`nvidia-cuda-runtime-cu12`, which the loader does not search: its `lib/` folder has to
be on LD_LIBRARY_PATH (docs/cpu-triton-stack.md). Used by the tests, the benchmarks and
the `mixtral-triton-perf-analyzer` command, which users (and genai-perf) run instead of the
bare binary.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from mixtral_triton.errors import UserError, one_line_errors

# What to install when a library is missing, by library file name.
_PROVIDERS = {
    "libb64.so.0d": "Debian's libb64-0d (apt-get install libb64-0d; scripts/setup.sh does it)",
    "libcudart.so.12": "the PyPI package nvidia-cuda-runtime-cu12 (pinned in pyproject.toml)",
}


def perf_analyzer_binary() -> Path:
    """This environment's perf_analyzer (next to the interpreter), else the one on PATH."""
    beside = Path(sys.executable).parent / "perf_analyzer"
    if beside.exists():
        return beside
    found = shutil.which("perf_analyzer")
    if found is None:
        raise UserError("perf_analyzer is not installed: it comes with tritonclient[all] "
                        "(run scripts/setup.sh)")
    return Path(found)


def cuda_runtime_lib_dir() -> Path | None:
    """The `lib/` folder of the nvidia-cuda-runtime-cu12 wheel (holds libcudart.so.12)."""
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "lib"
    return folder if folder.is_dir() else None


def perf_analyzer_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the CUDA runtime wheel's `lib/`
    first on LD_LIBRARY_PATH. libb64 needs nothing: Debian installs it on the loader's path."""
    env = dict(os.environ if base is None else base)
    folders = [str(d) for d in (cuda_runtime_lib_dir(),) if d is not None]
    if env.get("LD_LIBRARY_PATH"):
        folders.append(env["LD_LIBRARY_PATH"])
    if folders:
        env["LD_LIBRARY_PATH"] = ":".join(folders)
    return env


def missing_libraries(binary: Path | None = None, env: Mapping[str, str] | None = None) -> list[str]:
    """Shared libraries the loader cannot find for perf_analyzer in `env`, per `ldd`."""
    binary = binary or perf_analyzer_binary()
    env = perf_analyzer_environment() if env is None else dict(env)
    result = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True, check=False)
    return [line.split("=>")[0].strip() for line in result.stdout.splitlines() if "not found" in line]


def check_perf_analyzer(env: Mapping[str, str] | None = None) -> Path:
    """The binary, or a UserError that says which library is missing and where it comes from."""
    binary = perf_analyzer_binary()
    missing = missing_libraries(binary, env)
    if missing:
        hints = "; ".join(f"{lib}: {_PROVIDERS.get(lib, 'install it')}" for lib in missing)
        raise UserError(f"perf_analyzer cannot run, missing shared libraries: {hints}")
    return binary


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    """`mixtral-triton-perf-analyzer ARGS...`: perf_analyzer ARGS... with its libraries found.
    Replaces this process, so perf_analyzer's exit status, output and signals are the caller's."""
    env = perf_analyzer_environment()
    binary = check_perf_analyzer(env)
    arguments = sys.argv[1:] if argv is None else argv
    os.execve(binary, [str(binary), *arguments], env)
