"""The streaming detokenizer as a C++ Triton backend: a measured prototype of where the
`postprocessing` model goes next (docs/serving.md, "The C++ detokenizer").

Why: per streamed token the Python detokenizer pays one blocking IPC round trip to the
server per response (a decoupled Python model cannot batch its sends) and one HTTP hop to
read the engine, and so costs more CPU per token than TensorRT-LLM's own, batched but
inexact, postprocessing. This backend does the same work inside the server: it calls the
`tensorrt_llm` model in-process and sends its responses directly, with the Python
detokenizer's token table and UTF-8 rules, byte for byte the same text.

It is not what a repository serves yet: stop strings, echo, skip_special_tokens false,
return_num_*_tokens and runs in the cancellation registry are still the Python model's
alone (requests that need them are refused here, naming the field). `with_cpp_detokenizer`
makes a copy of a filled CPU repository whose `postprocessing` is this backend, for the
tests and for measuring it.

Built with the machine's g++ (C++17); the Triton symbols resolve from the server that
loads it. No Triton headers are needed: triton_api.h declares what it uses.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess
from pathlib import Path

from mixtral_triton.errors import UserError

BACKEND = "mixtral_detokenizer"  # config.pbtxt `backend:`; the library is libtriton_<BACKEND>.so
LIBRARY = f"libtriton_{BACKEND}.so"
SOURCES = ("detokenizer.cc", "triton_api.h")
# The token tables, by skip_special_tokens: special tokens empty (the default), or their text.
TABLE_FILES = {True: "token_table.bin", False: "token_table_special.bin"}
# As the Python detokenizer's MIN_RESPONSE_INTERVAL_S.
MIN_RESPONSE_INTERVAL_US = 2000
_HERE = Path(__file__).resolve().parent


def build(out_dir: Path) -> Path:
    """The backend library in `out_dir`, compiled unless one of the same sources is there."""
    digest = hashlib.sha256(b"".join((_HERE / name).read_bytes() for name in SOURCES)).hexdigest()[:16]
    out_dir.mkdir(parents=True, exist_ok=True)
    library, stamp = out_dir / LIBRARY, out_dir / f"{LIBRARY}.sources"
    if library.is_file() and stamp.is_file() and stamp.read_text() == digest:
        return library
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise UserError("the C++ detokenizer needs a C++17 compiler: apt-get install -y g++")
    partial = library.with_name(library.name + ".partial")
    done = subprocess.run([compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall",
                           "-Wextra", "-Werror", "-pthread", "-o", str(partial), str(_HERE / "detokenizer.cc")],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"compiling the C++ detokenizer failed:\n{done.stderr[-3000:]}")
    partial.replace(library)
    stamp.write_text(digest)
    return library


def write_token_tables(tokenizer_dir: Path, folder: Path) -> int:
    """The Python detokenizer's token tables (TABLE_FILES, by skip_special_tokens) as the
    backend reads them: a little-endian uint32 count, then per id a uint32 length and the
    bytes. Returns the vocabulary size."""
    from mixtral_triton.text import load_token_table

    for skip, name in TABLE_FILES.items():
        table = load_token_table(tokenizer_dir, skip)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<I", len(table)))
            for piece in table:
                f.write(struct.pack("<I", len(piece)) + piece)
    return len(table)


def with_cpp_detokenizer(repository: Path, tokenizer_dir: Path, out: Path, library: Path) -> Path:
    """A copy of the filled CPU `repository` in `out` whose `postprocessing` model is this
    backend (same name, inputs and outputs, so the ensemble is unchanged)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(repository, out, ignore=shutil.ignore_patterns("__pycache__"))
    model = out / "postprocessing"
    config = (model / "config.pbtxt").read_text(encoding="utf-8")
    shutil.rmtree(model)
    (model / "1").mkdir(parents=True)
    config = config.replace('backend: "python"', f'backend: "{BACKEND}"')
    # One instance: the backend keeps no state per instance and never blocks in execute.
    config = re.sub(r"instance_group \[.*?\]\n", "instance_group [ { count: 1, kind: KIND_CPU } ]\n", config,
                    flags=re.S)
    config += ('parameters: { key: "min_response_interval_us", value: { string_value: '
               f'"{MIN_RESPONSE_INTERVAL_US}" }} }}\n')
    (model / "config.pbtxt").write_text(config, encoding="utf-8")
    shutil.copy2(library, model / LIBRARY)
    write_token_tables(tokenizer_dir, model)
    return out
