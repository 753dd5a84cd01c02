"""Guided decoding, log probabilities and several sequences per request on the real CPU
server: the tiny random-weight Mixtral follows a JSON Schema, a regex or an EBNF grammar
only because the reference engine's xgrammar mask allows nothing else; a guide that does
not compile is refused by the tokenizer model before the engine sees the request; the
engine model (tensorrt_llm, gRPC streaming) reports the log probabilities it sampled from
and answers num_return_sequences with one sequence per sequence_index.

The ensemble path relays log probabilities and sequence indexes once the C++ detokenizer
reads them (its own change); until then they are checked on the engine model directly."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import xgrammar
from transformers import AutoTokenizer

from helpers import RawStream, ensemble_arrays, raw_stream, text_of
from mixtral_triton.guided import GrammarCompiler
from mixtral_triton.protocol.guided import Guide

PET = {"type": "object", "additionalProperties": False, "required": ["name", "kind", "tags", "owner"],
       "properties": {
           "name": {"type": "string", "maxLength": 12},
           "kind": {"enum": ["cat", "dog", "parrot"]},
           "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
           "owner": {"type": "object", "required": ["age", "verified"], "additionalProperties": False,
                     "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                                    "verified": {"type": "boolean"}}}}}
ORDER = {"type": "array", "minItems": 1, "maxItems": 2, "items": {
    "type": "object", "required": ["sku", "size"], "additionalProperties": False,
    "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                   "size": {"enum": ["S", "M", "L"]}}}}
EMAIL = r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"
SUM = 'root ::= expr\nexpr ::= term ("+" term)*\nterm ::= [0-9] | "(" expr ")"'


def _sum_grammar_matches(text: str) -> bool:
    """SUM, parsed by recursive descent."""
    def expr(i):
        i = term(i)
        while i is not None and i < len(text) and text[i] == "+":
            i = term(i + 1)
        return i

    def term(i):
        if i < len(text) and text[i].isdigit():
            return i + 1
        if i < len(text) and text[i] == "(":
            i = expr(i + 1)
            return i + 1 if i is not None and i < len(text) and text[i] == ")" else None
        return None

    return expr(0) == len(text)


def _check(kind: str, guide: str, text: str) -> None:
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), json.loads(guide))
    elif kind == "regex":
        assert re.fullmatch(guide, text), text
    elif kind == "ebnf_grammar":
        assert _sum_grammar_matches(text), text
    else:
        json.loads(text)


# 50 generations: 2 schemas x 8 seeds, 10 regex, 10 grammar, 14 free JSON; every other one
# streamed. The 36 schema, regex and grammar ones end on their own; free JSON (xgrammar's
# built-in grammar, whitespace allowed) often runs to max_tokens on a random model. Sampling at temperature 1 over the whole vocabulary: without the mask the random
# model's text would match nothing.
CASES = ([("json_schema", json.dumps(schema), seed) for schema in (PET, ORDER) for seed in range(8)]
         + [("regex", EMAIL, seed) for seed in range(10)]
         + [("ebnf_grammar", SUM, seed) for seed in range(10)]
         + [("json", "", seed) for seed in range(14)])


def _guided(kind: str, guide: str, **extra) -> dict[str, np.ndarray]:
    return {"guided_decoding_guide_type": np.array([[kind.encode()]], dtype=object),
            "guided_decoding_guide": np.array([[guide.encode()]], dtype=object), **extra}


def _sampling(seed: int, stream: bool) -> dict[str, np.ndarray]:
    return {"seed": np.array([[seed]], np.uint64), "stream": np.array([[stream]]),
            "temperature": np.array([[1.0]], np.float32), "top_k": np.array([[0]], np.int32),
            "top_p": np.array([[1.0]], np.float32)}


def _finish(results) -> str:
    last = [r for r in results if r.get_response().outputs][-1]
    return last.as_numpy("finish_reason").reshape(-1)[0].decode()


def _matcher(tiny_checkpoint, kind: str, guide: str) -> xgrammar.GrammarMatcher:
    compiler = GrammarCompiler.from_folder(tiny_checkpoint)
    return xgrammar.GrammarMatcher(compiler.compile(Guide(kind, guide)))


def test_fifty_guided_generations_follow_their_guide(triton_server, tiny_checkpoint):
    """All 50 at once (the engine batches them in flight), streamed and not: every schema,
    regex and grammar generation ends on its own and validates; a free JSON one that
    max_tokens cuts ends with `length` and is a prefix the JSON grammar accepts."""
    streams = [RawStream(triton_server.grpc_url, "ensemble",
                         ensemble_arrays("Answer:", 320, **_guided(kind, guide), **_sampling(seed, i % 2 == 0)),
                         f"guided-{i}")
               for i, (kind, guide, seed) in enumerate(CASES)]
    outcomes = []
    try:
        for stream, (kind, guide, seed) in zip(streams, CASES):
            results, error = stream.read_all(timeout_s=300)
            assert error is None, (kind, seed, error)
            outcomes.append((kind, guide, seed, text_of(results), _finish(results)))
    finally:
        for stream in streams:
            stream.close()
    json_matcher = _matcher(tiny_checkpoint, "json", "")
    for kind, guide, seed, text, finish in outcomes:
        if kind == "json" and finish == "length":
            json_matcher.reset()
            assert json_matcher.accept_string(text), (seed, text)
            continue
        assert finish == "stop", (kind, seed, text)
        _check(kind, guide, text)
    assert any(kind == "json" and finish == "stop" for kind, *_, finish in outcomes)


def _model_statistics(server, model: str) -> int:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"]
    finally:
        client.close()
    return sum(int(s.get("inference_stats", {}).get("success", {}).get("count", 0)) for s in stats)


@pytest.mark.parametrize("kind, guide, reason", [
    ("json_schema", '{"type": "object", "properties": ', "Failed to parse JSON"),
    ("json_schema", '{"type": "nothing"}', ""),
    ("regex", "[a-z", ""),
    ("ebnf_grammar", "root ::= missing_rule", "missing_rule"),
])
def test_a_guide_that_does_not_compile_is_refused_before_the_engine(triton_server, kind, guide, reason):
    engine_before = _model_statistics(triton_server, "tensorrt_llm")
    results, error = raw_stream(triton_server.grpc_url, "ensemble",
                                ensemble_arrays(**_guided(kind, guide)), "guided-bad")
    assert error is not None and "[invalid_argument:guided_decoding_guide]" in error.message(), error
    assert f"does not compile as {kind}" in error.message() and reason in error.message()
    assert _model_statistics(triton_server, "tensorrt_llm") == engine_before


@pytest.mark.parametrize("stream", [True, False])
def test_max_tokens_cuts_a_guided_output_with_length(triton_server, tiny_checkpoint, stream):
    results, error = raw_stream(triton_server.grpc_url, "ensemble", ensemble_arrays(
        "Answer:", 6, **_guided("json_schema", json.dumps(PET)), **_sampling(3, stream)))
    assert error is None
    text = text_of(results)
    assert _finish(results) == "length" and text.startswith("{")
    matcher = _matcher(tiny_checkpoint, "json_schema", json.dumps(PET))
    assert matcher.accept_string(text) and not matcher.is_terminated(), text


def test_a_stop_string_ends_a_guided_output(triton_server):
    results, error = raw_stream(triton_server.grpc_url, "ensemble", ensemble_arrays(
        "Mail:", 64, **_guided("regex", EMAIL), **_sampling(1, True),
        stop_words=np.array([[b"@"]], dtype=object)))
    assert error is None
    text = text_of(results)
    assert _finish(results) == "stop" and re.fullmatch(r"[a-z]{3,8}", text), text


def test_stop_cancels_a_guided_generation(triton_server):
    """A regex that needs 1500 letters (hundreds of steps) is cancelled by `stop` with its
    request id after its first text: it ends `cancelled`, long before its guide could end."""
    generation = RawStream(triton_server.grpc_url, "ensemble", ensemble_arrays(
        "Letters:", 1500, **_guided("regex", "[a-z]{1500}"), **_sampling(0, True)), "guided-cancel")
    try:
        first, error = generation.next()
        assert error is None
        _, error = raw_stream(triton_server.grpc_url, "ensemble",
                              ensemble_arrays(stop=np.array([[True]])), "guided-cancel")
        assert error is None
        results, error = generation.read_all()
        assert error is None and _finish(results) == "cancelled"
        assert len(text_of([first, *results])) < 1500
    finally:
        generation.close()


# ---------------------------------------------------------------------------------------
# The engine model directly: log probabilities and several sequences


ENGINE_OUTPUTS = ("output_ids", "sequence_length", "output_log_probs", "cum_log_probs", "sequence_index")


def _engine(server, ids, max_tokens, request_id, **extra):
    arrays = {"input_ids": np.array([ids], np.int32), "input_lengths": np.array([[len(ids)]], np.int32),
              "request_output_len": np.array([[max_tokens]], np.int32), "streaming": np.array([[True]]),
              "end_id": np.array([[2]], np.int32), **extra}
    outputs = [grpcclient.InferRequestedOutput(name) for name in ENGINE_OUTPUTS]
    results, error = raw_stream(server.grpc_url, "tensorrt_llm", arrays, request_id, outputs)
    assert error is None, error
    return [r for r in results if r.get_response().outputs]


def _sequences(responses) -> dict[int, dict]:
    """Per sequence index: its tokens and the log probabilities of each, read as the
    detokenizer must (the last sequence_length entries of output_log_probs are the new
    tokens'), and its last cum_log_probs."""
    out: dict[int, dict] = {}
    for r in responses:
        names = {o.name for o in r.get_response().outputs}
        index = int(r.as_numpy("sequence_index").reshape(-1)[0]) if "sequence_index" in names else 0
        seq = out.setdefault(index, {"tokens": [], "log_probs": [], "cum": None, "responses": 0})
        tokens = r.as_numpy("output_ids").reshape(-1).tolist()
        assert r.as_numpy("sequence_length").reshape(-1).tolist() == [len(tokens)]
        if "output_log_probs" in names:
            so_far = r.as_numpy("output_log_probs")
            assert so_far.shape == (1, 1, len(seq["tokens"]) + len(tokens))
            seq["log_probs"] += so_far.reshape(-1)[so_far.size - len(tokens):].tolist()
            seq["cum"] = float(r.as_numpy("cum_log_probs").reshape(-1)[0])
        seq["tokens"] += tokens
        seq["responses"] += 1
    return out


def test_greedy_log_probs_are_each_steps_maximum(triton_server, tiny_stack, tiny_checkpoint, one_torch_thread):
    """Each reported log probability is the maximum of that step's distribution, computed
    here in-process by the reference forward of the same checkpoint; they add up to
    cum_log_probs; none is positive."""
    import torch

    from mixtral_triton.reference import ReferenceModel

    ids = AutoTokenizer.from_pretrained(str(tiny_checkpoint)).encode("The mistral wind")
    responses = _engine(triton_server, ids, 12, "logprobs-greedy", runtime_top_k=np.array([[1]], np.int32),
                        return_log_probs=np.array([[True]]))
    (seq,) = _sequences(responses).values()
    assert len(seq["tokens"]) == len(seq["log_probs"]) > 0
    model = ReferenceModel.from_trtllm_checkpoint(tiny_stack.trtllm_checkpoint)
    cache, feed = model.new_sequence(), list(ids)
    for token, reported in zip(seq["tokens"], seq["log_probs"]):
        distribution = model.step([feed], [cache])[0].float().log_softmax(-1)
        assert int(distribution.argmax()) == token
        assert reported == pytest.approx(float(distribution.max()), abs=1e-4)
        feed = [token]
    assert seq["cum"] == pytest.approx(sum(seq["log_probs"]), abs=1e-4)
    assert all(p <= 0 for p in seq["log_probs"])
    assert torch.get_num_threads() == 1


def test_several_sequences_are_the_sequences_their_seeds_give(triton_server, tiny_checkpoint):
    """num_return_sequences 3 with seed s: sequence i is what one request with seed s + i
    gives (TensorRT-LLM's child requests add the sequence index to the seed); every response
    names its sequence; the request's final flag comes with the last one."""
    ids = AutoTokenizer.from_pretrained(str(tiny_checkpoint)).encode("Several")
    sampling = {"runtime_top_k": np.array([[0]], np.int32), "runtime_top_p": np.array([[1.0]], np.float32),
                "temperature": np.array([[1.0]], np.float32), "return_log_probs": np.array([[True]])}
    responses = _engine(triton_server, ids, 10, "several", num_return_sequences=np.array([[3]], np.int32),
                        seed=np.array([[41]], np.uint64), **sampling)
    assert all("sequence_index" in {o.name for o in r.get_response().outputs} for r in responses)
    sequences = _sequences(responses)
    assert set(sequences) == {0, 1, 2}
    for index, seq in sequences.items():
        (alone,) = _sequences(_engine(triton_server, ids, 10, f"alone-{index}",
                                      seed=np.array([[41 + index]], np.uint64), **sampling)).values()
        assert seq["tokens"] == alone["tokens"], index
        assert seq["log_probs"] == pytest.approx(alone["log_probs"], abs=1e-5)
        assert seq["cum"] == pytest.approx(sum(seq["log_probs"]), abs=1e-4)
        assert all(p <= 0 for p in seq["log_probs"])


def test_several_guided_sequences_each_follow_the_guide(triton_server, tiny_checkpoint):
    ids = AutoTokenizer.from_pretrained(str(tiny_checkpoint)).encode("Mail:")
    responses = _engine(triton_server, ids, 40, "several-guided", num_return_sequences=np.array([[4]], np.int32),
                        seed=np.array([[7]], np.uint64), runtime_top_p=np.array([[1.0]], np.float32),
                        **_guided("regex", EMAIL))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    sequences = _sequences(responses)
    assert set(sequences) == {0, 1, 2, 3}
    for seq in sequences.values():
        assert re.fullmatch(EMAIL, tokenizer.decode(seq["tokens"])), seq["tokens"]
