"""Shared fixtures: the tiny checkpoint is written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixtral_triton.fixture import write_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The default tiny Mixtral (base tokenizer, vocabulary 32000) in the on-hub layout."""
    return write_checkpoint(tmp_path_factory.mktemp("hub") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_instruct_checkpoint(tmp_path_factory) -> Path:
    """The tiny Mixtral with the Instruct tokenizer (vocabulary 32768, chat template)."""
    return write_checkpoint(tmp_path_factory.mktemp("hub") / "tiny-instruct", size="tiny",
                            tokenizer="instruct", seed=0)
