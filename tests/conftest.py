"""Shared fixtures: the tiny checkpoint, its repository and its server (the local stack,
mixtral_triton.local_stack) are built once per test session; so is the paced server (the
same repository with the paced stand-in engine, helpers.paced_settings) for the tests whose
generations must outlast an event."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers import gateway, paced_settings
from mixtral_triton import cpp_detokenizer
from mixtral_triton.launcher import TritonServer
from mixtral_triton.local_stack import LocalStack, fixture_checkpoint
from mixtral_triton.repository.fill import fill_repository


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
def tiny_stack(tmp_path_factory) -> LocalStack:
    """The local stack of the tiny Mixtral (base tokenizer, vocabulary 32000): its checkpoint
    and TP=4 repository are built on first use; `triton_server` starts its server."""
    return LocalStack(tmp_path_factory.mktemp("stack"), log=lambda *_: None)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_stack) -> Path:
    """The default tiny Mixtral (base tokenizer, vocabulary 32000) in the on-hub layout."""
    return tiny_stack.checkpoint


@pytest.fixture(scope="session")
def tiny_instruct_checkpoint(tmp_path_factory) -> Path:
    """The tiny Mixtral with the Instruct tokenizer (vocabulary 32768, chat template)."""
    return fixture_checkpoint(tmp_path_factory.mktemp("hub"), tokenizer="instruct", log=lambda *_: None)


@pytest.fixture(scope="session")
def cpu_repository(tiny_stack) -> Path:
    """The filled CPU model repository of the tiny checkpoint, converted at TP=4."""
    return tiny_stack.repository


@pytest.fixture(scope="session")
def triton_server(tiny_stack):
    """The real Triton server on the CPU repository, shared by the session's tests
    (tests that stop or break a server start their own)."""
    with tiny_stack:
        yield tiny_stack.triton


@pytest.fixture(scope="module")
def base_gateway(triton_server, tiny_checkpoint):
    """The base model (no chat template) behind a gateway with its tokenizer folder."""
    with gateway(triton_grpc_url=triton_server.grpc_url, tokenizer_dir=tiny_checkpoint) as g:
        yield g


@pytest.fixture(scope="module")
def instruct(tiny_instruct_checkpoint, tmp_path_factory):
    """A second Triton server on the Instruct checkpoint's repository (its tokenizer's control
    tokens, [INST] ...), and its gateway with that checkpoint's chat template, serving
    "mixtral-instruct"; the server is the gateway's `triton`."""
    from mixtral_triton.pipeline import build_repository

    repository = build_repository(tiny_instruct_checkpoint, tmp_path_factory.mktemp("instruct"),
                                  tp=4, log=lambda *_: None)
    server = TritonServer(repository, log_file=tmp_path_factory.mktemp("logs") / "instruct.log")
    server.start()
    try:
        with gateway(triton_grpc_url=server.grpc_url, tokenizer_dir=tiny_instruct_checkpoint,
                     model_name="mixtral-instruct") as g:
            g.triton = server
            yield g
    finally:
        server.stop()


@pytest.fixture(scope="session")
def paced_repository(cpu_repository, tmp_path_factory) -> Path:
    """The session's repository with the paced stand-in engine (helpers.STEP_S a step at
    least): a generation of helpers.LONG tokens there outlasts any test's wait."""
    return fill_repository(paced_settings(cpu_repository), tmp_path_factory.mktemp("paced") / "repository")


@pytest.fixture(scope="session")
def paced_server(paced_repository, tmp_path_factory):
    """A Triton server on the paced repository, shared by the tests that cancel, disconnect
    or overload a generation in flight."""
    with TritonServer(paced_repository, log_file=tmp_path_factory.mktemp("paced-logs") / "triton.log") as server:
        yield server


@pytest.fixture(scope="module")
def paced_gateway(paced_server):
    """A gateway in front of the paced server."""
    with gateway(triton_grpc_url=paced_server.grpc_url) as g:
        g.triton = paced_server
        yield g


def pytest_sessionfinish(session, exitstatus):
    """The sanitizer pass (scripts/test.sh: the detokenizer compiled with AddressSanitizer and
    UBSan in every server): any report they wrote fails the run, whatever the tests said."""
    folder = os.environ.get(cpp_detokenizer.SANITIZER_REPORTS_ENV)
    reports = cpp_detokenizer.sanitizer_reports(Path(folder)) if folder else []
    for report in reports:
        print(f"\n==== sanitizer report {report} ====\n{report.read_text(errors='replace')[:20000]}", file=sys.stderr)
    if reports:
        print(f"{len(reports)} sanitizer report(s): the run fails", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
