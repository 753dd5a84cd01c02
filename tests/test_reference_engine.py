"""The reference engine: in-flight batching, sampling and finishing with TensorRT-LLM's
executor semantics, on the tiny model converted by the project's converter."""

from __future__ import annotations

import threading

import pytest
import torch

from mixtral_triton.convert import convert, resolve
from mixtral_triton.errors import UserError
from mixtral_triton.reference import Engine, ReferenceModel, Request, SamplingParams, TokenSampler

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = [[1, 415, 2936, 9060, 285, 1142], [1, 22557], [1, 851, 349, 264, 1369, 302, 272, 11843], [1, 5, 6]]
TIMEOUT = 30


@pytest.fixture(scope="module")
def model(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trtllm") / "tp2"
    convert(tiny_checkpoint, folder, parallel=resolve(tp=2), log=lambda line: None)
    return ReferenceModel.from_trtllm_checkpoint(folder)


@pytest.fixture
def engine(model):
    steps: list[list[int]] = []
    with Engine(model, max_batch_size=4, on_step=steps.append) as e:
        e.steps = steps  # the request ids of every step, for the tests to inspect
        yield e


def alone(model, request: Request) -> tuple[list[int], str]:
    with Engine(model) as e:
        return e.submit(request).result(TIMEOUT)


def greedy_reference(model, prompt: list[int], count: int) -> list[int]:
    return alone(model, Request(prompt, max_tokens=count))[0]


def test_concurrent_requests_get_the_tokens_they_get_alone(model):
    requests = [Request(p, max_tokens=6 + 3 * i) for i, p in enumerate(PROMPTS)]
    expected = [alone(model, r) for r in requests]
    steps: list[list[int]] = []
    with Engine(model, max_batch_size=3, on_step=steps.append) as e:
        handles = [e.submit(r) for r in requests]
        assert [h.result(TIMEOUT) for h in handles] == expected
        assert e.active_count == 0
    assert max(len(s) for s in steps) == 3
    # The fourth request waited for a free slot, then ran beside the others still going.
    fourth = handles[3].id
    assert fourth not in steps[0]
    assert any(fourth in s and len(s) > 1 for s in steps)


def test_new_request_joins_the_running_batch(engine):
    first = engine.submit(Request(PROMPTS[0], max_tokens=100_000))
    next(first.events(TIMEOUT))  # first is decoding now
    second = engine.submit(Request(PROMPTS[1], max_tokens=3))
    assert second.result(TIMEOUT)[1] == "length"
    first.cancel()
    assert first.result(TIMEOUT)[1] == "cancelled"
    joined = next(i for i, s in enumerate(engine.steps) if second.id in s)
    assert joined > 0 and engine.steps[0] == [first.id]
    assert engine.steps[joined] == [first.id, second.id]  # its prefill ran with first's decode


def test_streaming_sends_only_new_tokens(engine, model):
    expected = greedy_reference(model, PROMPTS[2], 5)
    events = list(engine.submit(Request(PROMPTS[2], max_tokens=5)).events(TIMEOUT))
    assert [e.tokens for e in events] == [(t,) for t in expected]
    assert [e.finish_reason for e in events] == [None] * 4 + ["length"]
    received = []
    handle = engine.submit(Request(PROMPTS[2], max_tokens=5, streaming=False), on_event=received.append)
    assert handle.result(TIMEOUT) == (expected, "length")
    assert [(e.tokens, e.finish_reason) for e in received] == [(tuple(expected), "length")]


def test_same_seed_repeats_and_other_seeds_differ(engine, model):
    def sampled(seed: int) -> Request:
        return Request(PROMPTS[0], max_tokens=16,
                       sampling=SamplingParams(temperature=1.5, top_p=0.95, seed=seed))

    first = alone(model, sampled(7))
    # Same seed, now sharing the batch with other requests.
    others = [engine.submit(Request(p, max_tokens=16)) for p in PROMPTS[1:]]
    assert engine.submit(sampled(7)).result(TIMEOUT) == first
    assert engine.submit(sampled(8)).result(TIMEOUT) != first
    assert all(h.result(TIMEOUT)[1] == "length" for h in others)


def test_top_k_1_and_temperature_0_are_greedy(model):
    expected = greedy_reference(model, PROMPTS[0], 12)
    for sampling in (SamplingParams(temperature=3.0, top_k=1, seed=5),
                     SamplingParams(temperature=0.0, top_p=0.9, seed=5)):
        assert alone(model, Request(PROMPTS[0], max_tokens=12, sampling=sampling)) == (expected, "length")
    assert alone(model, Request(PROMPTS[0], max_tokens=12, sampling=SamplingParams(temperature=3.0, top_k=40)))[0] \
        != expected


def test_cancel_ends_the_request_within_a_step(model):
    steps: list[list[int]] = []
    with Engine(model, max_batch_size=1, on_step=steps.append) as e:
        running = e.submit(Request(PROMPTS[0], max_tokens=100_000))
        waiting = e.submit(Request(PROMPTS[1], max_tokens=10))
        events = running.events(TIMEOUT)
        next(events), next(events)
        assert e.active_count == 2
        assert waiting.cancel()
        assert running.cancel()
        steps_at_cancel = len(steps)
        tokens, reason = running.result(TIMEOUT)
        assert reason == "cancelled"
        assert sum(running.id in s for s in steps[steps_at_cancel:]) <= 1
        assert waiting.result(TIMEOUT) == ([], "cancelled")
        assert not any(waiting.id in s for s in steps)
        assert e.active_count == 0
        assert not running.cancel()  # already finished


def test_end_id_and_stop_words_finish_with_stop(model):
    ref = greedy_reference(model, PROMPTS[3], 12)
    end_id = ref[5]
    tokens, reason = alone(model, Request(PROMPTS[3], max_tokens=12, end_id=end_id))
    assert (tokens, reason) == (ref[:ref.index(end_id)], "stop")  # the end id itself is not returned
    stop = ref[3:5]
    first_match = next(i for i in range(len(ref)) if ref[i:i + 2] == stop)
    tokens, reason = alone(model, Request(PROMPTS[3], max_tokens=12, stop_words=[[31999, 31998], stop]))
    assert (tokens, reason) == (ref[:first_match + 2], "stop")  # stop words are returned
    assert alone(model, Request(PROMPTS[3], max_tokens=12, stop_words=[[ref[0]]])) == ([ref[0]], "stop")


def test_max_tokens_and_max_seq_len_end_with_length(model):
    assert alone(model, Request(PROMPTS[0], max_tokens=4)) == (greedy_reference(model, PROMPTS[0], 4), "length")
    with Engine(model, max_seq_len=len(PROMPTS[0]) + 3) as e:
        tokens, reason = e.submit(Request(PROMPTS[0], max_tokens=10)).result(TIMEOUT)
        assert (len(tokens), reason) == (3, "length")
        with pytest.raises(UserError, match="max_seq_len"):
            e.submit(Request(list(range(1, 20)), max_tokens=1))


def test_min_tokens_suppresses_the_end_id(model):
    ref = greedy_reference(model, PROMPTS[3], 12)
    end_id = ref[1]
    tokens, _ = alone(model, Request(PROMPTS[3], max_tokens=12, end_id=end_id,
                                     sampling=SamplingParams(min_tokens=6)))
    assert len(tokens) >= 6 and end_id not in tokens[:6]
    assert tokens[0] == ref[0]


def test_bad_words_are_never_generated(model):
    ref = greedy_reference(model, PROMPTS[3], 6)
    tokens, _ = alone(model, Request(PROMPTS[3], max_tokens=6, bad_words=[[ref[0]]]))
    assert tokens[0] != ref[0]
    tokens, _ = alone(model, Request(PROMPTS[3], max_tokens=6, bad_words=[[ref[0], ref[1]]]))
    assert tokens[0] == ref[0] and tokens[1] != ref[1]


def test_penalties_follow_trtllm_order():
    logits = torch.tensor([2.0, 1.9, -1.0, 0.5])

    def pick(prompt, **params) -> int:
        return TokenSampler(SamplingParams(**params), prompt, vocab_size=4).choose(logits)

    assert pick([3]) == 0
    assert pick([0], repetition_penalty=2.0) == 1  # 2.0 / 2 < 1.9; prompt tokens count
    assert pick([0], presence_penalty=0.2) == 1
    assert pick([0, 0, 1], frequency_penalty=0.15) == 1  # 2.0 - 0.3 < 1.9 - 0.15
    assert pick([0, 0, 1], frequency_penalty=0.04) == 0
    # Temperature first: 2.0 / 2 - 0.08 < 1.9 / 2, whereas (2.0 - 0.08) / 2 > 1.9 / 2.
    assert pick([0], temperature=2.0, top_k=1, presence_penalty=0.08) == 1
    sampler = TokenSampler(SamplingParams(frequency_penalty=1.0), [3], vocab_size=4)
    assert [sampler.choose(logits) for _ in range(3)] == [0, 1, 0]  # generated tokens count too


def test_callback_and_handle_are_thread_safe(engine, model):
    expected = greedy_reference(model, PROMPTS[1], 8)
    results, lock = [], threading.Lock()

    def client() -> None:
        result = engine.submit(Request(PROMPTS[1], max_tokens=8)).result(TIMEOUT)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert results == [(expected, "length")] * 6
    assert engine.active_count == 0


@pytest.mark.parametrize("request_, message", [
    (Request([], max_tokens=4), "input_ids"),
    (Request([1, 32000], max_tokens=4), "input_ids"),
    (Request([1], max_tokens=0), "max_tokens"),
    (Request([1], max_tokens=4, end_id=-1), "end_id"),
    (Request([1], max_tokens=4, stop_words=[[]]), "stop or bad word"),
])
def test_invalid_requests_are_user_errors(engine, request_, message):
    with pytest.raises(UserError, match=message):
        engine.submit(request_)


def test_invalid_sampling_params_are_user_errors():
    for bad in (dict(top_p=1.5), dict(top_k=-1), dict(temperature=-0.1), dict(repetition_penalty=0.0),
                dict(min_tokens=-1)):
        with pytest.raises(UserError):
            SamplingParams(**bad)


def test_shutdown_cancels_unfinished_requests(model):
    e = Engine(model, max_batch_size=1)
    running = e.submit(Request(PROMPTS[0], max_tokens=100_000))
    waiting = e.submit(Request(PROMPTS[1], max_tokens=4))
    next(running.events(TIMEOUT))
    e.shutdown(TIMEOUT)
    assert running.result(TIMEOUT)[1] == "cancelled"
    assert waiting.result(TIMEOUT) == ([], "cancelled")
    with pytest.raises(UserError, match="shut down"):
        e.submit(Request(PROMPTS[1], max_tokens=4))


def test_a_failing_step_ends_its_requests_with_error(model, monkeypatch):
    with Engine(model) as e:
        monkeypatch.setattr(model, "step", lambda tokens, caches: 1 / 0)
        handle = e.submit(Request(PROMPTS[0], max_tokens=4))
        with pytest.raises(RuntimeError, match="failed"):
            handle.result(TIMEOUT)
        assert e.active_count == 0
        monkeypatch.undo()
        assert e.submit(Request(PROMPTS[0], max_tokens=4)).result(TIMEOUT)[1] == "length"  # still serving


def test_an_engine_response_holds_only_the_outputs_its_request_asked_for():
    """The stub frees an output the request did not ask for without the GIL (see
    output_arrays), so none may be made: the C++ detokenizer asks for two."""
    from mixtral_triton.reference.contract import output_arrays

    asked = output_arrays([7, 8], 5, 2, {"output_ids", "sequence_length"})
    assert set(asked) == {"output_ids", "sequence_length"}
    assert asked["output_ids"].tolist() == [[[7, 8]]] and asked["sequence_length"].tolist() == [[2]]
    assert set(output_arrays([7], 5, 1)) == {"output_ids", "sequence_length", "num_input_tokens",
                                              "num_output_tokens"}
