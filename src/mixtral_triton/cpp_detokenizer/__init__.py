"""The streaming detokenizer as a C++ Triton backend: the served `postprocessing` model of
every filled repository, CPU and GPU (docs/serving.md, "The C++ detokenizer").

It calls the `tensorrt_llm` model in-process through the server API, turns each engine
response's new token ids into whole UTF-8 text through the token table, cuts stop strings,
and sends its responses directly from the server's threads: no Python stub, so no IPC
round trip per response, and no HTTP hop to the engine. A `stop` request that reaches it
cancels the running streams of its request id in the engine itself.

`install` puts it into a model folder (the library, which Triton loads from there, and the
token tables); the fill calls it for `postprocessing`. Built with the machine's g++ (C++17;
`build`, cached by the sources' hash); the Triton symbols resolve from the server that loads
it. No Triton headers are needed: triton_api.h declares what it uses.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from mixtral_triton.errors import UserError

BACKEND = "mixtral_detokenizer"  # config.pbtxt `backend:`; the library is libtriton_<BACKEND>.so
LIBRARY = f"libtriton_{BACKEND}.so"
SOURCES = ("detokenizer.cc", "text_rules.h", "triton_api.h")
# The token tables, by skip_special_tokens: special tokens empty (the default), or their text.
TABLE_FILES = {True: "token_table.bin", False: "token_table_special.bin"}
_HERE = Path(__file__).resolve().parent


def default_cache_dir() -> Path:
    """Where `install` keeps compiled libraries: the user's cache folder ($XDG_CACHE_HOME, else
    ~/.cache), so that every fill on a machine (tests, the build job, repeated `serve.sh`) compiles
    once per version of the sources; a clean clone or a fresh container compiles in seconds."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mixtral-triton" / "cpp-detokenizer"


def sources_digest() -> str:
    """A hash of the backend's sources: a compiled library is kept per value."""
    return hashlib.sha256(b"".join((_HERE / name).read_bytes() for name in SOURCES)).hexdigest()[:16]


def cxx_compiler() -> str:
    """The machine's C++17 compiler (what `build` compiles with)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise UserError("the C++ detokenizer needs a C++17 compiler: apt-get install -y g++")
    return compiler


def build(out_dir: Path) -> Path:
    """The backend library, compiled into `out_dir/<hash of the sources>/` unless it is there.

    One folder per version of the sources, so that checkouts of different versions sharing one
    cache never hand each other the wrong library; the library is written under another name
    and renamed into place, so fills running at once never read half of one."""
    folder = out_dir / sources_digest()
    library = folder / LIBRARY
    if library.is_file():
        return library
    compiler = cxx_compiler()
    folder.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{LIBRARY}.", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall",
                               "-Wextra", "-Werror", "-pthread", "-o", partial, str(_HERE / "detokenizer.cc")],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"compiling the C++ detokenizer failed:\n{done.stderr[-3000:]}")
        os.chmod(partial, 0o755)
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


def write_token_tables(tokenizer_dir: Path, folder: Path) -> int:
    """The token tables (mixtral_triton.text.load_token_table; TABLE_FILES, by
    skip_special_tokens) as the backend reads them: a little-endian uint32 count, then per id
    a uint32 length and the bytes. Returns the vocabulary size."""
    from mixtral_triton.text import load_token_table

    for skip, name in TABLE_FILES.items():
        table = load_token_table(tokenizer_dir, skip)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<I", len(table)))
            for piece in table:
                f.write(struct.pack("<I", len(piece)) + piece)
    return len(table)


def install(folder: Path, tokenizer_dir: Path, cache_dir: Path | None = None) -> None:
    """Make `folder` (a filled `postprocessing` model) this backend's: the compiled library,
    which Triton loads from the model's folder, and the token tables (TABLE_FILES)."""
    library = build(cache_dir or default_cache_dir())
    shutil.copy2(library, folder / LIBRARY)
    write_token_tables(tokenizer_dir, folder)
