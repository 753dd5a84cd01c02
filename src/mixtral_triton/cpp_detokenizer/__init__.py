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

import functools
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
# Only the TRITONBACKEND_* entry points leave the library (as upstream backends' linker
# scripts do): no std:: template instance or unique global of ours can bind to another
# library's copy inside the server, or theirs to ours.
EXPORTS = "exports.map"
SOURCES = ("detokenizer.cc", "text_rules.h", "triton_api.h", EXPORTS)
# The token tables, by skip_special_tokens: special tokens empty (the default), or their text.
TABLE_FILES = {True: "token_table.bin", False: "token_table_special.bin"}
_HERE = Path(__file__).resolve().parent

# How the library is compiled, by flavour. `release` is what every filled repository serves
# (no -Werror: a newer compiler's new warning must not break an image build). `test` adds
# -Werror and the fault hooks (a client request id "fault:<where>" throws there) with which
# the tests prove the exception barriers. `sanitize` is `test` under AddressSanitizer and
# UndefinedBehaviorSanitizer: the server that loads it must preload their runtimes
# (sanitizer_environment).
COMMON_FLAGS = ("-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
                "-Wall", "-Wextra", "-pthread", f"-Wl,--version-script={_HERE / EXPORTS}")
FLAVOURS = {
    "release": ("-O2",),
    "test": ("-O2", "-Werror", "-DMIXTRAL_DETOKENIZER_FAULTS"),
    "sanitize": ("-O1", "-g", "-fno-omit-frame-pointer", "-Werror", "-DMIXTRAL_DETOKENIZER_FAULTS",
                 "-fsanitize=address,undefined", "-fno-sanitize-recover=all"),
}
# The flavour the fill installs, when not given: the suite's sanitizer pass sets it to
# `sanitize` (scripts/test.sh); nothing else does.
FLAVOUR_ENV = "MIXTRAL_TRITON_DETOKENIZER_FLAVOUR"
# A library compiled elsewhere (the image's builder stage, which has a compiler and the
# image's Triton headers): the fill installs it instead of compiling, if it was built from
# these sources (its `.sources` stamp, written by `build`).
PREBUILT_ENV = "MIXTRAL_TRITON_POSTPROCESSING_LIBRARY"


def default_cache_dir() -> Path:
    """Where `install` keeps compiled libraries: the user's cache folder ($XDG_CACHE_HOME, else
    ~/.cache), so that every fill on a machine (tests, the build job, repeated `serve.sh`) compiles
    once per version of the sources; a clean clone or a fresh container compiles in seconds."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mixtral-triton" / "cpp-detokenizer"


def sources_digest() -> str:
    """A hash of the backend's sources (what a prebuilt library's stamp records)."""
    return hashlib.sha256(b"".join((_HERE / name).read_bytes() for name in SOURCES)).hexdigest()[:16]


def cxx_compiler() -> str:
    """The machine's C++17 compiler (what `build` compiles with)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise UserError("the C++ detokenizer needs a C++17 compiler: apt-get install -y g++")
    return compiler


@functools.lru_cache(maxsize=None)
def _compiler_identity(compiler: str) -> str:
    """The compiler's path and its own account of its version (`--version`, first line)."""
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
    return f"{os.path.realpath(compiler)}\n{done.stdout.splitlines()[0] if done.stdout else done.returncode}"


def compile_command(flavour: str, output: str | Path, compiler: str | None = None) -> list[str]:
    if flavour not in FLAVOURS:
        raise UserError(f"unknown detokenizer flavour {flavour!r}; the flavours are {', '.join(FLAVOURS)}")
    return [compiler or cxx_compiler(), *COMMON_FLAGS, *FLAVOURS[flavour], "-o", str(output),
            str(_HERE / "detokenizer.cc")]


def build_key(flavour: str = "release") -> str:
    """What a compiled library depends on: the sources, the compiler (path and version) and
    every flag. A cached library is kept per value, so a new compiler or flag never reuses it."""
    compiler = cxx_compiler()
    digest = hashlib.sha256(sources_digest().encode())
    digest.update(_compiler_identity(compiler).encode())
    digest.update("\0".join(compile_command(flavour, "OUT", compiler)).encode())
    return f"{flavour}-{digest.hexdigest()[:16]}"


def build(out_dir: Path, flavour: str = "release") -> Path:
    """The backend library of `flavour`, compiled into `out_dir/<build_key>/` unless it is there.

    One folder per key, so that checkouts, compilers or flavours sharing one cache never hand
    each other the wrong library; the library is written under another name and renamed into
    place, so fills running at once never read half of one. A `.sources` stamp beside it
    records the sources' digest (see PREBUILT_ENV)."""
    folder = out_dir / build_key(flavour)
    library = folder / LIBRARY
    if library.is_file():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{LIBRARY}.", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run(compile_command(flavour, partial), capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"compiling the C++ detokenizer failed:\n{done.stderr[-3000:]}")
        os.chmod(partial, 0o755)
        (folder / f"{LIBRARY}.sources").write_text(sources_digest() + "\n")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


def prebuilt_library() -> Path | None:
    """The library named by PREBUILT_ENV, checked against these sources; None when unset."""
    named = os.environ.get(PREBUILT_ENV)
    if not named:
        return None
    library = Path(named)
    stamp = library.with_name(f"{library.name}.sources")
    if not library.is_file() or not stamp.is_file():
        raise UserError(f"{PREBUILT_ENV}={named}: no library with its .sources stamp there")
    if stamp.read_text().strip() != sources_digest():
        raise UserError(f"{PREBUILT_ENV}={named} was built from other sources than these "
                        f"({stamp.read_text().strip()} != {sources_digest()}): rebuild it")
    return library


def sanitizer_environment(env: dict[str, str], report_dir: Path) -> dict[str, str]:
    """`env` for a server that loads the `sanitize` library: the sanitizer runtimes preloaded
    (an instrumented library loaded with dlopen needs its runtime first in the process) and
    every report written under `report_dir` (asan.<pid>, ubsan.<pid>), each error fatal.
    Leak checking is off: the server and its Python stubs are not instrumented, and their
    leaks at exit are not ours."""
    compiler = cxx_compiler()
    runtimes = []
    for name in ("libasan.so", "libubsan.so"):
        found = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True, check=True)
        path = os.path.realpath(found.stdout.strip())
        if not os.path.isfile(path):
            raise UserError(f"the sanitizer runtime {name} is missing: apt-get install -y g++")
        runtimes.append(path)
    report_dir.mkdir(parents=True, exist_ok=True)
    env = dict(env)
    env["LD_PRELOAD"] = " ".join(runtimes + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    env["ASAN_OPTIONS"] = (f"log_path={report_dir}/asan:detect_leaks=0:abort_on_error=1:"
                           "allocator_may_return_null=1:handle_segv=0")
    env["UBSAN_OPTIONS"] = f"log_path={report_dir}/ubsan:print_stacktrace=1:halt_on_error=1"
    return env


# Where the sanitizer runtimes write their reports for servers started by the launcher
# (default: a folder beside the server's log); the suite's sanitizer pass sets it and fails
# on any report there (tests/conftest.py).
SANITIZER_REPORTS_ENV = "MIXTRAL_TRITON_SANITIZER_REPORTS"


def is_sanitized(library: Path) -> bool:
    """Whether `library` was compiled with AddressSanitizer (it needs libasan at load)."""
    return b"libasan.so" in Path(library).read_bytes()


def sanitized_library_in(repository: Path) -> Path | None:
    """The sanitized detokenizer library a model repository serves, if it serves one."""
    for library in sorted(Path(repository).glob(f"*/{LIBRARY}")):
        if is_sanitized(library):
            return library
    return None


def sanitizer_reports(report_dir: Path) -> list[Path]:
    """The sanitizer reports written under `report_dir` (none: nothing was found)."""
    return sorted(p for p in report_dir.glob("*san.*") if p.is_file()) if report_dir.is_dir() else []


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
    """Make `folder` (a filled `postprocessing` model) this backend's: the library, which
    Triton loads from the model's folder, and the token tables (TABLE_FILES). The library is
    the prebuilt one (PREBUILT_ENV) if named, else compiled here in the flavour FLAVOUR_ENV
    names (default `release`)."""
    library = prebuilt_library() or build(cache_dir or default_cache_dir(),
                                          os.environ.get(FLAVOUR_ENV) or "release")
    shutil.copy2(library, folder / LIBRARY)
    write_token_tables(tokenizer_dir, folder)
