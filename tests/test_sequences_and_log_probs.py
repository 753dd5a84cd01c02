"""Several completions per request and log probabilities, end to end through the gRPC ensemble
on the real server (the reference engine, the C++ detokenizer): num_return_sequences n gives
n sequences, each exactly what a single request with its seed (seed + index, as TensorRT-LLM's
child requests) gives, with its own stop strings, finish reason and counts; return_log_probs
gives each piece the log probabilities and bytes of the tokens whose text it first carries,
the engine's own values, summing to cum_log_probs."""

from __future__ import annotations

import codecs
import math
from collections import defaultdict

import numpy as np
import pytest

from helpers import LONG, PROMPT, RawStream, ensemble_arrays, raw_inputs, wait_active
from mixtral_triton.client.ensemble import ENSEMBLE, chunk_of, is_final, requested_outputs

SEED = 41


def _arrays(max_tokens: int, n: int = 1, log_probs: bool = False, stream: bool = True, seed: int = SEED,
            temperature: float = 1.0, **extra) -> dict:
    return ensemble_arrays(PROMPT, max_tokens, stream=np.array([[stream]], np.bool_),
                           temperature=np.array([[temperature]], np.float32),
                           seed=np.array([[seed]], np.uint64),
                           num_return_sequences=np.array([[n]], np.int32),
                           return_log_probs=np.array([[log_probs]], np.bool_), **extra)


def _run(server, arrays: dict, request_id: str, n: int = 1, log_probs: bool = False):
    """Every chunk of one request, and whether the FINAL flag came with (or after) the last."""
    stream = RawStream(server.grpc_url, ENSEMBLE, arrays, request_id, requested_outputs(n, log_probs))
    try:
        results, error = stream.read_all(120)
    finally:
        stream.close()
    assert error is None, error.message()
    assert is_final(results[-1].get_response())
    return [c for c in (chunk_of(r.get_response()) for r in results) if c is not None]


def _by_sequence(chunks) -> dict[int, list]:
    out = defaultdict(list)
    for chunk in chunks:
        out[chunk.sequence_index].append(chunk)
    return dict(out)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "one-response"])
def test_n_sequences_are_each_what_their_own_seed_gives(triton_server, stream):
    n = 3
    chunks = _run(triton_server, _arrays(12, n, stream=stream), "n3", n)
    sequences = _by_sequence(chunks)
    assert sorted(sequences) == list(range(n))
    for index, pieces in sequences.items():
        alone = _run(triton_server, _arrays(12, 1, stream=stream, seed=SEED + index), f"alone-{index}")
        assert "".join(c.text for c in pieces) == "".join(c.text for c in alone), index
        assert [c.finish_reason for c in pieces[:-1]] == [None] * (len(pieces) - 1)
        assert pieces[-1].finish_reason == alone[-1].finish_reason
        assert pieces[-1].completion_tokens == alone[-1].completion_tokens
        assert len(pieces) == 1 or stream


def test_each_sequence_cuts_its_own_stop_string(triton_server):
    n = 2
    texts = {i: "".join(c.text for c in _run(triton_server, _arrays(24, 1, seed=SEED + i), f"free-{i}"))
             for i in range(n)}
    stop = texts[0][len(texts[0]) // 2:][:3]  # from sequence 0's text: it must cut there
    assert stop.strip() and stop not in texts[0][:len(texts[0]) // 2]
    stops = np.array([[stop.encode()]], dtype=object)  # the ensemble's stop_words
    sequences = _by_sequence(_run(triton_server, _arrays(24, n, stop_words=stops), "n2-stop", n))
    for index, pieces in sequences.items():
        alone = _run(triton_server, _arrays(24, 1, seed=SEED + index, stop_words=stops), f"alone-stop-{index}")
        assert "".join(c.text for c in pieces) == "".join(c.text for c in alone), index
        assert (pieces[-1].finish_reason, pieces[-1].completion_tokens) == (alone[-1].finish_reason,
                                                                            alone[-1].completion_tokens)
    assert sequences[0][-1].finish_reason == "stop"


def _engine_log_probs(server, max_tokens: int) -> list[float]:
    """The greedy log probabilities the engine model itself streams for the same request
    (each response's new tokens are the last sequence_length entries of output_log_probs)."""
    from mixtral_triton.ensemble_models.engine_request import engine_inputs
    from mixtral_triton.ensemble_models.preprocess import Preprocessor
    import json
    from pathlib import Path
    from mixtral_triton.repository.fill import MARKER

    record = json.loads((Path(server.model_repository) / MARKER).read_text())
    prepared = Preprocessor(Path(record["tokenizer_dir"]), record["max_input_len"], record["max_seq_len"]).prepare(
        _arrays(max_tokens, log_probs=True, temperature=0.0))
    prepared = {name.upper(): array for name, array in prepared.items()}  # as the ensemble maps them
    import tritonclient.grpc as grpcclient
    stream = RawStream(server.grpc_url, "tensorrt_llm", engine_inputs(prepared), "engine-log-probs",
                       [grpcclient.InferRequestedOutput(name) for name in
                        ("output_ids", "sequence_length", "output_log_probs")])
    try:
        results, error = stream.read_all(120)
    finally:
        stream.close()
    assert error is None, error.message()
    values = []
    for result in results:
        if not result.get_response().outputs:
            continue
        new = int(result.as_numpy("sequence_length").reshape(-1)[0])
        listed = result.as_numpy("output_log_probs").reshape(-1)
        values.extend(float(v) for v in listed[len(listed) - new:])
    return values


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "one-response"])
def test_log_probs_are_the_engines_aligned_with_the_text_and_sum_to_cum_log_probs(triton_server, stream):
    chunks = _run(triton_server, _arrays(24, log_probs=True, stream=stream, temperature=0.0), "log-probs",
                  log_probs=True)
    reported = [p for c in chunks for p in c.log_probs]
    assert len(reported) == chunks[-1].completion_tokens == 24
    # the same values in the same order (float noise of the engine's batch aside)
    assert reported == pytest.approx(_engine_log_probs(triton_server, 24), abs=1e-4)
    assert all(p <= 0 for p in reported)
    assert chunks[-1].cum_log_prob == pytest.approx(math.fsum(reported), abs=1e-4)
    # each piece's text is exactly what its tokens' bytes add (bytes of a character not yet
    # whole wait, as the text does)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    for chunk in chunks:
        assert len(chunk.token_bytes) == len(chunk.log_probs)
        assert decoder.decode(b"".join(chunk.token_bytes)) == chunk.text


def test_log_probs_of_several_sequences_are_each_their_own(triton_server):
    n = 2
    sequences = _by_sequence(_run(triton_server, _arrays(10, n, log_probs=True), "n2-log-probs", n, True))
    for index, pieces in sequences.items():
        alone = _run(triton_server, _arrays(10, 1, log_probs=True, seed=SEED + index), f"alone-lp-{index}",
                     log_probs=True)
        assert [p for c in pieces for p in c.log_probs] == pytest.approx([p for c in alone for p in c.log_probs])


def test_one_stop_cancels_every_sequence(paced_server):
    n = 2
    stream = RawStream(paced_server.grpc_url, ENSEMBLE, _arrays(LONG, n, temperature=0.0), "n2-cancel",
                       requested_outputs(n))
    try:
        assert stream.next(30)[1] is None
        assert wait_active(paced_server, lambda v: v >= 1) >= 1
        stop = RawStream(paced_server.grpc_url, ENSEMBLE, ensemble_arrays("", 1, stop=np.array([[True]], np.bool_)),
                         "n2-cancel")
        _, stop_error = stop.read_all(30)
        stop.close()
        assert stop_error is None
        results, error = stream.read_all(30)
    finally:
        stream.close()
    assert error is None
    ends = {c.sequence_index: c.finish_reason for c in (chunk_of(r.get_response()) for r in results) if c is not None and c.finish_reason}
    assert ends == {0: "cancelled", 1: "cancelled"}
    assert wait_active(paced_server, lambda v: v == 0, 20) == 0


def test_more_sequences_than_served_are_refused_naming_the_field(triton_server):
    stream = RawStream(triton_server.grpc_url, ENSEMBLE, _arrays(4, 9), "n9", requested_outputs(9))
    try:
        results, error = stream.read_all(30)
    finally:
        stream.close()
    assert error is not None and "[invalid_argument:num_return_sequences]" in error.message()
