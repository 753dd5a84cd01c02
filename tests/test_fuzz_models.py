"""Every model of the served CPU repository fuzzed over gRPC (issue 23, item 5), on the
session's server: the ensemble, the tokenizer (preprocessing), the C++ detokenizer
(postprocessing, which calls the engine in-process) and the reference engine
(tensorrt_llm), and any model the repository gains (the list and each model's inputs are
read from the server, so a new model or input is fuzzed without editing this file).

Each example starts from a valid request of one model and mutates it: inputs dropped
(required ones too), unknown inputs added, values of the declared type replaced by edge
values (negative and huge integers such as 2147483647, NaN and infinities, invalid UTF-8,
empty and long strings), shapes changed (empty, ragged, a batch of two, up to 4096
elements), data types swapped. Decoupled models get the request on a gRPC stream, the
others a plain ModelInfer. Properties:

* every request is answered: an error, or responses up to the one flagged final (waited
  for as such; a generation that was accepted is ended by a `stop` with its request id,
  so a huge output length cannot leave a long generation running);
* what is answered is well formed: a non-empty error message, text_output valid UTF-8,
  output_ids inside the vocabulary;
* afterwards the server is live and ready, every model is ready, the engine runs nothing.

Bounded for CI: MAX_EXAMPLES per model, derandomized (the same examples on every run),
no example database. The detokenizer's own field checks, which the tokenizer model makes
for the ensemble, are the explicit cases at the end.
"""

from __future__ import annotations

import queue
import time
from collections import Counter

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from helpers import PROMPT, RawStream, ensemble_arrays, raw_inputs, raw_stream, wait_active

MAX_EXAMPLES = 100  # per model: about 2 s each on 2 cores
VOCAB = 32000  # the tiny fixture's vocabulary
# A request the server has not answered in this long is reported as unanswered (a hang).
ANSWER_WITHIN_S = 120
# An accepted generation is stopped at its first response, or, when it sends none before its
# end (not streamed), after STOP_AFTER_S and again every STOP_AFTER_S: this only bounds the
# test's time (a huge output length would otherwise run to max_seq_len), it is no event.
STOP_AFTER_S = 1.0
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

INT32_EDGES = [-2**31, -5, -1, 0, 1, 2, 3, 7, VOCAB - 1, VOCAB, 2**31 - 1]
INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3", b"ok\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\x00\xff"]
WRONG_DTYPES = [np.int64, np.float64, np.int8, np.uint8, np.uint32, np.float16, np.bool_, np.object_]


# ------------------------------------------------------------------ the models, from the server

class Model:
    """One served model: its declared inputs (name -> (numpy dtype, dims without the
    batch), optional), whether it is decoupled, and a valid request to mutate."""

    def __init__(self, client: grpcclient.InferenceServerClient, name: str):
        config = client.get_model_config(name, as_json=True)["config"]
        self.name = name
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        self.inputs = {i["name"]: (_numpy_dtype(i["data_type"]), [int(d) for d in i["dims"]], bool(i.get("optional")))
                       for i in config["input"]}
        self.valid: dict[str, np.ndarray] = {}
        self.stop: dict[str, np.ndarray] | None = None  # a stop for a request id, where the model has one


def _numpy_dtype(config_type: str):
    triton = config_type.removeprefix("TYPE_")
    return np.object_ if triton == "STRING" else np.dtype(triton_to_np_dtype(triton)).type


def _zeros(model: Model) -> dict[str, np.ndarray]:
    """A model of unknown purpose: its required inputs, one element each, zeros."""
    arrays = {}
    for name, (dtype, dims, optional) in model.inputs.items():
        if not optional:
            shape = ([1] if model.batched else []) + [1 if d < 0 else d for d in dims]
            arrays[name] = np.full(shape, b"" if dtype is np.object_ else 0, dtype=dtype)
    return arrays


@pytest.fixture(scope="module")
def models(triton_server) -> dict[str, Model]:
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    names = sorted(m.name for m in client.get_model_repository_index().models)
    assert {"ensemble", "preprocessing", "postprocessing", "tensorrt_llm"} <= set(names), names
    found = {name: Model(client, name) for name in names}
    # Valid requests: the ensemble's own; the tokenizer's outputs for it are the detokenizer's
    # inputs, and (lower-cased) the engine's.
    ensemble = found["ensemble"]
    ensemble.valid = ensemble_arrays(PROMPT, 4, stream=np.array([[True]], np.bool_))
    ensemble.stop = ensemble_arrays("", 1, stop=np.array([[True]], np.bool_))
    found["preprocessing"].valid = ensemble_arrays(PROMPT, 4)
    prepared = client.infer("preprocessing", raw_inputs(found["preprocessing"].valid))
    post = found["postprocessing"]
    post.valid = {name: prepared.as_numpy(name) for name in post.inputs}
    post.stop = {**post.valid, "STOP": np.array([[True]], np.bool_)}
    engine = found["tensorrt_llm"]
    engine.valid = {"input_ids": prepared.as_numpy("INPUT_IDS"), "input_lengths": prepared.as_numpy("INPUT_LENGTHS"),
                    "request_output_len": prepared.as_numpy("REQUEST_OUTPUT_LEN"),
                    "streaming": np.array([[True]], np.bool_)}
    engine.stop = {"input_ids": np.array([[1]], np.int32), "input_lengths": np.array([[1]], np.int32),
                   "request_output_len": np.array([[1]], np.int32), "stop": np.array([[True]], np.bool_)}
    for model in found.values():
        if not model.valid:
            model.valid = _zeros(model)
    client.close()
    return found


# ------------------------------------------------------------------ the mutations

def _elements(dtype) -> st.SearchStrategy:
    if dtype is np.object_:
        return st.one_of(st.sampled_from(INVALID_UTF8), st.binary(max_size=24),
                         st.text(max_size=24).map(lambda t: t.encode("utf-8", "surrogatepass")),
                         st.sampled_from([b"", b"\x00", PROMPT.encode(), "😀 café".encode(), b"w" * 100_000]))
    if dtype is np.bool_:
        return st.booleans()
    if np.issubdtype(dtype, np.floating):
        info = np.finfo(dtype)
        return st.one_of(st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1.0, -1.0,
                                          float(info.max), float(info.tiny)]),
                         st.floats(width=min(64, info.bits), allow_nan=True))
    info = np.iinfo(dtype)
    edges = [v for v in INT32_EDGES + [int(info.min), int(info.max)] if info.min <= v <= info.max]
    return st.one_of(st.sampled_from(edges), st.integers(int(info.min), int(info.max)))


@st.composite
def _array(draw, dtype, shape) -> np.ndarray:
    count = int(np.prod(shape)) if shape else 1
    if count > 64:  # a huge shape: one short drawn value repeated (drawing 4096 would be slow)
        value = draw(_elements(dtype))
        values = [value[:64] if isinstance(value, bytes) else value] * count
    else:
        values = [draw(_elements(dtype)) for _ in range(count)]
    if dtype is np.object_:
        return np.array(values, dtype=object).reshape(shape)
    with np.errstate(all="ignore"):
        return np.array(values, dtype=np.float64 if np.issubdtype(dtype, np.floating) else object).astype(dtype) \
            .reshape(shape)


def _declared_shape(draw, model: Model, dims: list[int]) -> list[int]:
    sizes = st.one_of(st.integers(0, 8), st.just(4096))
    return ([draw(st.sampled_from([1, 1, 1, 2]))] if model.batched else []) + \
        [draw(sizes) if d < 0 else d for d in dims]


@st.composite
def mutated(draw, model: Model) -> dict[str, np.ndarray]:
    arrays = dict(model.valid)
    names = sorted(model.inputs)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["value", "value", "value", "shape", "dtype", "drop", "add", "unknown"]))
        name = draw(st.sampled_from(names))
        dtype, dims, _ = model.inputs[name]
        if kind == "value":  # the declared type and a declared shape, any value
            shape = list(arrays[name].shape) if name in arrays and draw(st.booleans()) else \
                _declared_shape(draw, model, dims)
            arrays[name] = draw(_array(dtype, shape))
        elif kind == "shape":  # the declared type, any small shape (rank 0 to 3)
            shape = draw(st.lists(st.integers(0, 3), max_size=3))
            arrays[name] = draw(_array(dtype, shape))
        elif kind == "dtype":
            wrong = draw(st.sampled_from([t for t in WRONG_DTYPES if t is not dtype]))
            arrays[name] = draw(_array(wrong, list(arrays.get(name, np.zeros([1, 1])).shape)))
        elif kind == "drop":
            arrays.pop(name, None)
        elif kind == "add":  # an optional input the valid request leaves out
            arrays[name] = draw(_array(dtype, _declared_shape(draw, model, dims)))
        else:
            unknown = draw(st.one_of(st.sampled_from(["FOO", "text_output", "INPUT_IDS", "input_ids", "Max_Tokens",
                                                      "stop ", ""]),
                                     st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)))
            if unknown not in model.inputs:
                arrays[unknown] = draw(_array(draw(st.sampled_from([np.int32, np.object_, np.float32])), [1, 1]))
    return arrays


# ------------------------------------------------------------------ sending, and the answer

def _final(result) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


def answer(url: str, model: Model, arrays: dict[str, np.ndarray], request_id: str):
    """(responses, error message or None) of one request, waited for until its final
    response or its error; an accepted generation is stopped (see STOP_AFTER_S)."""
    if not model.decoupled:
        client = grpcclient.InferenceServerClient(url)
        try:
            return [client.infer(model.name, raw_inputs(arrays), request_id=request_id,
                                 client_timeout=ANSWER_WITHIN_S)], None
        except InferenceServerException as exc:
            assert "Deadline Exceeded" not in str(exc), f"{model.name} did not answer {request_id}"
            return [], exc.message()
        finally:
            client.close()
    stream = RawStream(url, model.name, arrays, request_id)
    results = []
    started = time.monotonic()
    stop_at = started + STOP_AFTER_S
    try:
        while True:
            try:
                result, error = stream.next(0.05)
            except queue.Empty:
                assert time.monotonic() - started < ANSWER_WITHIN_S, f"{model.name} did not answer {request_id}"
                if model.stop is not None and time.monotonic() >= stop_at:
                    _send_stop(url, model, request_id)
                    stop_at = time.monotonic() + STOP_AFTER_S
                continue
            if error is not None:
                return results, error.message()
            results.append(result)
            if _final(result):
                return results, None
            if model.stop is not None and len(results) == 1:
                _send_stop(url, model, request_id)
    finally:
        stream.close()


def _send_stop(url: str, model: Model, request_id: str) -> None:
    _, error = raw_stream(url, model.name, model.stop, request_id, timeout_s=ANSWER_WITHIN_S)
    assert error is None, error.message()


def check_well_formed(model: Model, results, error: str | None) -> None:
    if error is not None:
        assert isinstance(error, str) and error.strip(), "an empty error message"
        return
    for result in results:
        response = result.get_response()
        names = {o.name for o in response.outputs}
        if "text_output" in names:
            for text in result.as_numpy("text_output").reshape(-1):
                text.decode("utf-8")  # strict: never half a character, never invalid bytes (the
                # detokenizer echoing invalid ECHO_TEXT: fixed by the lead's C++ change)
        if "output_ids" in names and model.name == "tensorrt_llm":
            ids = result.as_numpy("output_ids")
            assert ((0 <= ids) & (ids < VOCAB)).all(), ids


def _all_ready(server, models: dict[str, Model]) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        not_ready = [name for name in models if not client.is_model_ready(name)]
        assert not not_ready, f"models not ready after the fuzz: {not_ready}"
    finally:
        client.close()
    # nothing left generating (a huge output length stopped, a refused request never started)
    assert wait_active(server, lambda v: v == 0, 60) == 0, "a fuzzed request was left running in the engine"


# ------------------------------------------------------------------ the properties

def fuzz_model(server, model: Model) -> Counter:
    """MAX_EXAMPLES mutated requests to one model; how many were accepted and refused."""
    outcomes: Counter = Counter()

    @FUZZ
    @given(arrays=mutated(model))
    def fuzz(arrays):
        request_id = f"fuzz-{model.name}-{sum(outcomes.values())}"
        results, error = answer(server.grpc_url, model, arrays, request_id)
        outcomes["refused" if error is not None else "accepted"] += 1
        check_well_formed(model, results, error)

    fuzz()
    print(f"\n{model.name}: {dict(outcomes)}")
    return outcomes


SERVED = ("ensemble", "preprocessing", "postprocessing", "tensorrt_llm")


@pytest.mark.parametrize("name", SERVED)
def test_every_model_answers_any_request_and_stays_ready(triton_server, models, name):
    outcomes = fuzz_model(triton_server, models[name])
    # the mutations keep some requests valid, so accepted ones are fuzzed too (derandomized)
    assert outcomes["accepted"] and outcomes["refused"], outcomes
    _all_ready(triton_server, models)


def test_models_the_repository_gains_are_fuzzed_too(triton_server, models):
    """The four above are the served repository today; a model added to it is fuzzed here
    from its config alone (required inputs of zeros, then the same mutations)."""
    for name in sorted(set(models) - set(SERVED)):
        fuzz_model(triton_server, models[name])
    _all_ready(triton_server, models)


# ------------------------------------------------------------------ the detokenizer's own checks

# What the tokenizer model refuses for the ensemble, the detokenizer refuses when called
# directly, naming the tensor: tests/test_detokenizer_hardening.py (exact messages).


def test_the_engine_refuses_input_lengths_outside_its_input_ids(triton_server, models):
    """Found by the fuzz: a negative input_lengths sliced the prompt from its end (the
    reference engine computed from the wrong tokens); now refused, and by the detokenizer
    called directly before the engine sees it."""
    engine, post = models["tensorrt_llm"], models["postprocessing"]
    size = engine.valid["input_ids"].size
    for length in (-5, 0, size + 1):
        _, error = answer(triton_server.grpc_url, engine, {**engine.valid, "input_lengths": np.array([[length]], np.int32)},
                          f"lengths-{length}")
        assert error is not None and "[invalid_argument]" in error and "input_lengths" in error, error
        _, error = answer(triton_server.grpc_url, post, {**post.valid, "INPUT_LENGTHS": np.array([[length]], np.int32)},
                          f"post-lengths-{length}")
        assert error is not None and "[invalid_argument:INPUT_LENGTHS] INPUT_LENGTHS must be" in error, error
