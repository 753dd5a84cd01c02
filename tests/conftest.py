"""Shared fixtures: the tiny checkpoint is written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixtral_triton.fixture import write_checkpoint


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model's matrices are too small to share: on a busy 2-core runner a second
    intra-op thread makes every step many times slower (tests using the model in-process)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The default tiny Mixtral (base tokenizer, vocabulary 32000) in the on-hub layout."""
    return write_checkpoint(tmp_path_factory.mktemp("hub") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_instruct_checkpoint(tmp_path_factory) -> Path:
    """The tiny Mixtral with the Instruct tokenizer (vocabulary 32768, chat template)."""
    return write_checkpoint(tmp_path_factory.mktemp("hub") / "tiny-instruct", size="tiny",
                            tokenizer="instruct", seed=0)


@pytest.fixture(scope="session")
def cpu_repository(tiny_checkpoint, tmp_path_factory) -> Path:
    """The filled CPU model repository of the tiny checkpoint, converted at TP=4."""
    from mixtral_triton.pipeline import build_repository

    return build_repository(tiny_checkpoint, tmp_path_factory.mktemp("work"), tp=4,
                            log=lambda *_: None)


@pytest.fixture(scope="session")
def triton_server(cpu_repository, tmp_path_factory):
    """The real Triton server on the CPU repository, shared by the session's tests
    (tests that stop or break a server start their own)."""
    from mixtral_triton.launcher import TritonServer

    server = TritonServer(cpu_repository, log_file=tmp_path_factory.mktemp("logs") / "triton.log")
    server.start()
    yield server
    server.stop()
