"""The load tests' paced stand-in engine: the table's tokens through the same in-flight
batching Engine, its pace from the decode roofline, and a CPU repository that serves it."""

from __future__ import annotations

import json

import pytest

from mixtral_triton.client import PredictClient
from mixtral_triton.errors import UserError
from mixtral_triton.launcher import TritonServer
from mixtral_triton.pipeline import build_repository
from mixtral_triton.reference import Engine, Request
from mixtral_triton.repository.fill import MARKER, Settings
from mixtral_triton.roofline import decode_step_seconds
from mixtral_triton.standin import TABLE_TEXT, Pacing, TableModel

TIMEOUT = 30
TABLE = (415, 2936, 9060, 285, 1142)  # any ids the vocabulary holds


def test_a_paced_step_lasts_the_roofline_step_times_the_scale():
    pacing = Pacing("H100-80GB", tp=4, scale=2.5)
    # The mean context of the batch: (100 + 300) / 2.
    assert pacing.step_seconds([100, 300]) == pytest.approx(2.5 * decode_step_seconds("H100-80GB", 2, 200, 4))
    # A larger batch reads more experts and more KV cache per step.
    assert pacing.step_seconds([200] * 64) > pacing.step_seconds([200] * 2)
    assert Pacing("H100-80GB", scale=0).step_seconds([100, 300]) == 0


@pytest.mark.parametrize("gpu, scale, message", [
    ("V100", 1.0, "V100"),
    ("H100-80GB", -1.0, "pace scale must be >= 0, got -1.0"),
])
def test_bad_pacing_is_refused_naming_it(gpu, scale, message):
    with pytest.raises(UserError, match=message):
        Pacing(gpu, scale=scale)


def test_table_model_refuses_ids_outside_the_vocabulary():
    with pytest.raises(UserError, match=r"ids in \[0, 1000\)"):
        TableModel((5, 1000), vocab_size=1000)


def test_every_request_gets_the_table_in_order_with_in_flight_batching():
    steps: list[list[int]] = []
    lengths = [3, 12, 7, 5, 9, 2]  # 12 > len(TABLE): the table cycles
    with Engine(TableModel(TABLE, vocab_size=32000, pacing=Pacing(scale=0)), max_batch_size=4,
                on_step=steps.append) as engine:
        handles = [engine.submit(Request([1, 2, 3], max_tokens=n)) for n in lengths]
        results = [h.result(TIMEOUT) for h in handles]
    for (tokens, reason), n in zip(results, lengths):
        assert tokens == [TABLE[i % len(TABLE)] for i in range(n)]
        assert reason == "length"
    assert max(len(s) for s in steps) == 4  # never more than max_batch_size at once
    assert any(handles[4].id in s and len(s) > 1 for s in steps)  # a waiting one joined a running batch


def test_stop_words_and_cancellation_behave_as_with_the_reference_model():
    with Engine(TableModel(TABLE, vocab_size=32000, pacing=Pacing(scale=0)), max_batch_size=2) as engine:
        stopped = engine.submit(Request([1], max_tokens=50, stop_words=[[TABLE[2], TABLE[3]]]))
        assert stopped.result(TIMEOUT) == (list(TABLE[:4]), "stop")
        # A paced GPU at 1,000x its step time runs each step for seconds: cancel the first.
        slow = Engine(TableModel(TABLE, vocab_size=32000, pacing=Pacing(scale=1000)), max_batch_size=2)
        with slow:
            handle = slow.submit(Request([1], max_tokens=50))
            assert handle.cancel()
            tokens, reason = handle.result(TIMEOUT)
        assert reason == "cancelled" and len(tokens) < 50


@pytest.fixture(scope="module")
def standin_server(tiny_checkpoint, tmp_path_factory):
    # Scale 0: the no-op stand-in (the end-to-end tests do not wait for a GPU's pace).
    repository = build_repository(tiny_checkpoint, tmp_path_factory.mktemp("work-standin"),
                                  max_batch_size=16, standin=Pacing("H200-141GB", scale=0), log=lambda *_: None)
    with TritonServer(repository, log_file=tmp_path_factory.mktemp("logs-standin") / "triton.log") as server:
        server.repository = repository
        yield server


def test_a_cpu_repository_filled_with_the_standin_serves_the_table_text(standin_server, tiny_checkpoint):
    recorded = json.loads((standin_server.repository / MARKER).read_text())
    assert (recorded["cpu_engine"], recorded["standin_gpu"], recorded["standin_pace_scale"]) == \
        ("standin", "H200-141GB", 0.0)
    from tokenizers import Tokenizer

    table = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")).encode(
        TABLE_TEXT, add_special_tokens=False).ids
    client = PredictClient(standin_server.grpc_url)
    whole = client.predict("Anything at all", stream=False, max_tokens=len(table))
    chunks = list(client.predict("Something else", stream=True, max_tokens=len(table)))
    # The table decodes to its text (its first word keeps its space, as a completion does),
    # whatever the prompt; streamed and whole agree byte for byte.
    assert whole.text.strip() == TABLE_TEXT.strip()
    assert "".join(chunks) == whole.text
    assert whole.finish_reason == "length" and whole.completion_tokens == len(table)


def test_the_standin_is_for_cpu_repositories_only(tiny_checkpoint, tmp_path):
    settings = Settings(target="gpu", tokenizer_dir=tiny_checkpoint, engine_dir=tmp_path, cpu_engine="standin")
    with pytest.raises(UserError, match="--cpu-engine standin applies to --target cpu only"):
        settings.validate_limits()
