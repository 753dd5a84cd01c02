"""A pytest plugin for the image-compatibility run (tests/test_image_compat.py), loaded with
`-p test_image_compat_fixtures --noconftest` in .venv-image-compat: the fixture checkpoints
of conftest.py, written by the main venv (it has torch; that venv does not) and passed by path.
Holds no tests; in the main suite conftest.py's own fixtures apply."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _handed_over(variable: str) -> Path:
    folder = Path(os.environ[variable])
    assert (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists(), folder
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    return _handed_over("MIXTRAL_TRITON_TINY")


@pytest.fixture(scope="session")
def tiny_instruct_checkpoint() -> Path:
    return _handed_over("MIXTRAL_TRITON_TINY_INSTRUCT")
