"""The C++ detokenizer held to an upstream backend's standard, in the real server: it runs
inside tritonserver, so whatever goes wrong in it must end one request, never the server.

The library here is the `test` flavour (the `sanitize` one in the suite's sanitizer pass):
the served code plus fault hooks, where a client request id "fault:<where>" throws there,
so that each exception barrier is proven by an exception. The engine is the paced stand-in
(each step at least as long as the roofline's H100 step times PACE_SCALE, by the clock, not
by this machine's speed), so a generation of LONG_TOKENS cannot end by itself within any
wait below: an engine request that is still active afterwards was not cancelled. The token
table is cut just below one of the stand-in's ids, so that every stream meets an id outside
the vocabulary mid-stream.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import time
import urllib.request

import numpy as np
import pytest

from helpers import LONG, RawStream, active_requests, raw_stream, wait_active
from mixtral_triton import cpp_detokenizer
from mixtral_triton.client import PredictClient, ServerError
from mixtral_triton.ensemble_models.preprocess import Preprocessor
from mixtral_triton.launcher import TritonServer
from mixtral_triton.pipeline import build_repository
from mixtral_triton.protocol import parse_request
from mixtral_triton.standin import Pacing, TableModel
from mixtral_triton.text import TextStream, load_token_table

PROMPT = "the wind"  # ids all below the table's cut (checked in `server`)
PACE_SCALE = 100.0  # about 0.58 s per step at batch 1
LONG_TOKENS = 2000  # >= 19 minutes of paced steps: longer than every wait of these tests
MAX_INPUT_LEN, MAX_SEQ_LEN = 1024, 4096


def _cut_index(ids: list[int]) -> int:
    """The first position whose id is above every id before it: a table cut at that id keeps
    the tokens before it and loses it."""
    return next(j for j in range(1, len(ids)) if ids[j] > max(ids[:j]))


@pytest.fixture(scope="module")
def stand_in(tiny_checkpoint):
    return TableModel.from_folders(tiny_checkpoint, tiny_checkpoint, Pacing(scale=0)).table


@pytest.fixture(scope="module")
def server(tiny_checkpoint, stand_in, tmp_path_factory):
    work = tmp_path_factory.mktemp("work-hardening")
    repository = build_repository(tiny_checkpoint, work, max_batch_size=8, max_input_len=MAX_INPUT_LEN,
                                  max_seq_len=MAX_SEQ_LEN, standin=Pacing("H100-80GB", scale=PACE_SCALE),
                                  log=lambda *_: None)
    post = repository / "postprocessing"
    flavour = "sanitize" if os.environ.get(cpp_detokenizer.FLAVOUR_ENV) == "sanitize" else "test"
    shutil.copy2(cpp_detokenizer.build(cpp_detokenizer.default_cache_dir(), flavour), post / cpp_detokenizer.LIBRARY)
    cut = stand_in[_cut_index(stand_in)]
    prompt_ids = Preprocessor(tiny_checkpoint, MAX_INPUT_LEN, MAX_SEQ_LEN).tokenizer.encode(PROMPT)
    assert max(prompt_ids) < cut, "choose a PROMPT whose ids the cut table keeps"
    for name in cpp_detokenizer.TABLE_FILES.values():  # ids from `cut` up are outside the vocabulary
        table = load_token_table(tiny_checkpoint, name == cpp_detokenizer.TABLE_FILES[True])[:cut]
        (post / name).write_bytes(struct.pack("<I", len(table)) +
                                  b"".join(struct.pack("<I", len(piece)) + piece for piece in table))
    with TritonServer(repository, log_file=work / "triton.log") as triton:
        yield triton


def _generate(server, request_id: str = "", **fields):
    request = parse_request({"prompt": PROMPT, "max_tokens": LONG_TOKENS, "ignore_eos": True, **fields})
    chunks = []
    with pytest.raises(ServerError) as failed:
        for chunk in PredictClient(server.grpc_url).generate(request, request_id=request_id):
            chunks.append(chunk)
    return chunks, failed.value


def _serves(server, stand_in) -> None:
    """The server is up, and a request whose tokens all lie before the cut is served whole."""
    assert server.is_ready() and server.process.poll() is None
    before_cut = _cut_index(stand_in)
    request = parse_request({"prompt": PROMPT, "max_tokens": before_cut, "ignore_eos": True})
    chunks = list(PredictClient(server.grpc_url).generate(request))
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == before_cut


def test_an_id_outside_the_vocabulary_mid_stream_ends_the_stream_and_cancels_its_engine_request(
        server, stand_in, tiny_checkpoint):
    j = _cut_index(stand_in)
    chunks, error = _generate(server, "oov")
    assert error.status == "INTERNAL" and f"token id {stand_in[j]} is outside the vocabulary" in str(error)
    stream = TextStream(load_token_table(tiny_checkpoint, True))
    want = "".join(stream.push([i]) for i in stand_in[:j])
    assert "".join(c.text for c in chunks) == want  # every token before it, as text
    # the generation it asked for lasts >= 19 minutes: only a cancel ends it within this wait
    assert wait_active(server, lambda v: v == 0, timeout_s=20) == 0


def test_an_exception_while_a_request_starts_answers_that_request_and_the_server_goes_on(server, stand_in):
    chunks, error = _generate(server, "fault:execute")
    assert chunks == []
    assert error.status == "INTERNAL" and "detokenizer: execute: std::bad_alloc" in str(error)
    assert active_requests(server) == 0  # no engine request was started
    _serves(server, stand_in)


def test_an_exception_in_the_engine_callback_ends_that_stream_and_cancels_its_engine_request(server, stand_in):
    chunks, error = _generate(server, "fault:response")
    assert chunks == []
    assert error.status == "INTERNAL" and "detokenizer: engine response: injected fault" in str(error)
    assert wait_active(server, lambda v: v == 0, timeout_s=20) == 0
    _serves(server, stand_in)


def _answered(server, model: str) -> float:
    """Requests the model has finished (Triton's success and failure counters)."""
    with urllib.request.urlopen(f"http://{server.host}:{server.ports.metrics}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(value) for value in re.findall(
        rf'^nv_inference_request_(?:success|failure)\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$', text, re.MULTILINE))


def test_a_request_already_cancelled_when_it_starts_never_reaches_the_engine(server, stand_in, direct_inputs):
    """The `test` library's hook holds a request with this id until the server has marked it
    cancelled (its gRPC client cancels the stream; Triton 2.51 passes that on to a model
    called directly, not to the steps of an ensemble), so the detokenizer meets it cancelled
    at its start, as it meets a request the ensemble cancelled while it queued (Triton 2.71)."""
    before = _answered(server, "postprocessing")
    inputs = _with(direct_inputs, REQUEST_OUTPUT_LEN=np.array([[LONG_TOKENS]], np.int32),
                   STREAMING=np.array([[True]], np.bool_))
    stream = RawStream(server.grpc_url, "postprocessing", inputs, "fault:hold-until-cancelled")
    try:
        assert stream.next(30)[1] is None  # the hook's empty response: the request is in execute
    finally:
        stream.close(cancel=True)
    deadline = time.monotonic() + 50  # the hook gives up at 60 s: an answer before that saw the cancel
    while _answered(server, "postprocessing") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _answered(server, "postprocessing") == before + 1  # it has been through execute
    assert active_requests(server) == 0  # and started no generation (its first step alone lasts >= 0.58 s)
    _serves(server, stand_in)


# ---- called directly (any gRPC client can): what the tokenizer model would have refused


@pytest.fixture(scope="module")
def direct_inputs(tiny_checkpoint):
    """The postprocessing model's inputs for one good request, as the tokenizer model makes them."""
    prepared = Preprocessor(tiny_checkpoint, MAX_INPUT_LEN, MAX_SEQ_LEN).prepare(
        {"text_input": np.array([[PROMPT.encode()]], dtype=object), "max_tokens": np.array([[4]], np.int32)})
    return {name.upper(): array for name, array in prepared.items()}  # as the ensemble maps them


def _with(inputs: dict, **changes) -> dict:
    return {**inputs, **changes}


def _bytes(*values: bytes) -> np.ndarray:
    return np.array([list(values)], dtype=object)


@pytest.mark.parametrize("name, value, message", [
    ("ECHO_TEXT", _bytes(b"\xff\xfe not UTF-8"), "[invalid_argument:ECHO_TEXT] ECHO_TEXT must be valid UTF-8"),
    ("STOP_STRINGS", _bytes(b"ok", b"\xc3"), "[invalid_argument:STOP_STRINGS] STOP_STRINGS must be valid UTF-8"),
    ("REQUEST_OUTPUT_LEN", np.array([[2147483647]], np.int32),
     "[invalid_argument:REQUEST_OUTPUT_LEN] REQUEST_OUTPUT_LEN must be in 1..{room} (the engine's max_seq_len "
     f"{MAX_SEQ_LEN} minus the prompt's {{prompt}} tokens), got 2147483647"),
    ("REQUEST_OUTPUT_LEN", np.array([[0]], np.int32), "REQUEST_OUTPUT_LEN must be in 1..{room}"),
    ("REQUEST_OUTPUT_LEN", np.array([[-5]], np.int32), "REQUEST_OUTPUT_LEN must be in 1..{room}"),
    ("INPUT_LENGTHS", np.array([[1000]], np.int32),
     "[invalid_argument:INPUT_LENGTHS] INPUT_LENGTHS must be the number of INPUT_IDS ({prompt}), got 1000"),
    ("INPUT_IDS", np.array([[1, 2147483647]], np.int32), "[invalid_argument:INPUT_IDS] INPUT_IDS must be token ids"),
    ("INPUT_IDS", np.array([[1, -3]], np.int32), "[invalid_argument:INPUT_IDS] INPUT_IDS must be token ids"),
])
def test_postprocessing_called_directly_checks_what_it_reads(server, stand_in, direct_inputs, name, value, message):
    prompt = int(direct_inputs["INPUT_LENGTHS"][0, 0])
    inputs = _with(direct_inputs, **{name: value})
    if name == "INPUT_IDS":
        inputs["INPUT_LENGTHS"] = np.array([[value.shape[1]]], np.int32)
    results, error = raw_stream(server.grpc_url, "postprocessing", inputs, timeout_s=30)
    assert error is not None, "accepted"
    assert message.format(room=MAX_SEQ_LEN - prompt, prompt=prompt) in error.message()
    assert active_requests(server) == 0  # refused before any engine work
    # the good request, sent the same way, is served (as many tokens as lie before the cut)
    good = _with(direct_inputs, REQUEST_OUTPUT_LEN=np.array([[_cut_index(stand_in)]], np.int32))
    results, error = raw_stream(server.grpc_url, "postprocessing", good, timeout_s=30)
    assert error is None and results[-1].as_numpy("finish_reason")[0, 0] == b"length"


def test_postprocessing_called_directly_refuses_a_batch_of_two(server, direct_inputs):
    doubled = {name: np.concatenate([array, array]) for name, array in direct_inputs.items()}
    results, error = raw_stream(server.grpc_url, "postprocessing", doubled, timeout_s=30)
    assert error is not None and "[invalid_argument:batch] batch must be 1 (one request per call), got 2" in error.message()
    assert active_requests(server) == 0


def test_a_direct_stream_cancelled_by_its_grpc_client_cancels_its_engine_request(paced_server, direct_inputs):
    """A gRPC client that cancels its stream to postprocessing: the server marks the request
    cancelled, and the detokenizer, seeing it at the next engine response, ends the stream and
    cancels the engine request. On the session's paced server (its served library, its full
    token table): the LONG generation asked for lasts >= 90 s."""
    inputs = _with(direct_inputs, REQUEST_OUTPUT_LEN=np.array([[LONG]], np.int32),
                   STREAMING=np.array([[True]], np.bool_))
    stream = RawStream(paced_server.grpc_url, "postprocessing", inputs, "cancelled-by-client")
    try:
        result, error = stream.next(30)
        assert error is None, error.message()
        assert wait_active(paced_server, lambda v: v == 1) == 1
    finally:
        stream.close(cancel=True)
    assert wait_active(paced_server, lambda v: v == 0, timeout_s=20) == 0
