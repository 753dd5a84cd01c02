"""How the C++ detokenizer is built for an image (python3 -m mixtral_triton.cpp_detokenizer,
deploy/Dockerfile's builder stage): the check of triton_api.h against a server's Triton
headers, and the library with its sources stamp. Triton's real headers are not on these
machines; the check was run against Triton core's r24.10 and r26.06 headers when written
(96 declarations, all matching; docs/serving.md). Here it runs against headers made of our
own declarations (it must pass) and of our declarations with one value and one signature
changed (it must name both)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mixtral_triton import cpp_detokenizer
from mixtral_triton.cpp_detokenizer import header_check
from mixtral_triton.errors import UserError


def _headers(folder: Path, declarations: str) -> Path:
    """An include folder whose triton/core headers hold `declarations` and backend API 1.19."""
    core = folder / "triton" / "core"
    core.mkdir(parents=True)
    (core / "tritonserver.h").write_text(declarations)
    (core / "tritonbackend.h").write_text("#pragma once\n#define TRITONBACKEND_API_VERSION_MAJOR 1\n"
                                          "#define TRITONBACKEND_API_VERSION_MINOR 19\n")
    return folder


def _changed(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


def test_the_check_covers_every_declaration_and_passes_on_the_same_declarations(tmp_path):
    text = header_check.HEADER.read_text()
    _, count = header_check.check_source(text)
    functions = text.count("TRITONSERVER_Error* TRITON") + text.count("void TRITONSERVER_ErrorDelete")
    assert count > functions >= 40  # functions, callback types, enumerators, the API version
    assert header_check.check(_headers(tmp_path, text), cpp_detokenizer.cxx_compiler()) == count


def test_a_changed_value_or_signature_is_named(tmp_path):
    text = header_check.HEADER.read_text()
    real = _changed(text, "TRITONSERVER_TYPE_BYTES = 13", "TRITONSERVER_TYPE_BYTES = 14")
    real = _changed(real, "TRITONBACKEND_RequestIsCancelled(TRITONBACKEND_Request* request, bool* is_cancelled)",
                    "TRITONBACKEND_RequestIsCancelled(TRITONBACKEND_Request* request, int* is_cancelled)")
    with pytest.raises(UserError) as mismatch:
        header_check.check(_headers(tmp_path, real), cpp_detokenizer.cxx_compiler())
    assert "TRITONSERVER_TYPE_BYTES == 13" in str(mismatch.value)
    assert "decltype(&TRITONBACKEND_RequestIsCancelled)" in str(mismatch.value)
    assert str(mismatch.value).count("differs from the server's headers") == 2


def test_the_image_build_command_checks_the_headers_then_writes_the_library_and_its_stamp(tmp_path):
    include = _headers(tmp_path / "include", header_check.HEADER.read_text())
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "mixtral_triton.cpp_detokenizer", "--out", str(out),
                           "--triton-include", str(include)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "declarations match" in done.stdout
    library = out / cpp_detokenizer.LIBRARY
    assert cpp_detokenizer.is_sanitized(library) is False
    assert (out / f"{cpp_detokenizer.LIBRARY}.sources").read_text().strip() == cpp_detokenizer.sources_digest()


def test_the_image_build_command_fails_on_a_mismatch_and_writes_nothing(tmp_path):
    changed = _changed(header_check.HEADER.read_text(), "TRITONSERVER_ERROR_CANCELLED = 7", "TRITONSERVER_ERROR_CANCELLED = 8")
    include = _headers(tmp_path / "include", changed)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "mixtral_triton.cpp_detokenizer", "--out", str(out),
                           "--triton-include", str(include)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: triton_api.h does not match") and "TRITONSERVER_ERROR_CANCELLED == 7" in done.stderr
    assert not out.exists()


def test_the_detokenizers_bound_on_sequences_is_the_protocols():
    """NUM_RETURN_SEQUENCES is bounded twice, by the tokenizer model (the protocol's
    MAX_RETURN_SEQUENCES) and by the detokenizer called directly (kMaxSequences): the same."""
    import re

    from mixtral_triton.protocol.ensemble import MAX_RETURN_SEQUENCES

    source = (Path(cpp_detokenizer.__file__).parent / "detokenizer.cc").read_text()
    assert re.search(r"constexpr int32_t kMaxSequences = (\d+);", source).group(1) == str(MAX_RETURN_SEQUENCES)
