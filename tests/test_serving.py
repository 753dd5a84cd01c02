"""End to end against the real Triton server on CPU (issue 4), no mocks: the ensemble
(tokenizer -> streaming detokenizer -> reference engine) over gRPC and HTTP, the engine
model called directly, and perf_analyzer.

Servers: the session's `triton_server` (checkpoint converted at TP=4), in this module one
more on the same checkpoint converted at TP=1, and for the cancellations the session's
`paced_server` (the stand-in engine, each step STEP_S at least: helpers.LONG).
"""

from __future__ import annotations

import dataclasses
import json
import queue
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import LONG
from mixtral_triton.client import PredictClient
from mixtral_triton.client.ensemble import ENSEMBLE, cancel_inputs, infer_inputs, requested_outputs, server_error
from mixtral_triton.launcher import TritonServer
from mixtral_triton.launcher.perf import check_perf_analyzer, perf_analyzer_environment
from mixtral_triton.protocol import RequestError, parse_request
from mixtral_triton.text import TextStream, token_table

ROOT = Path(__file__).resolve().parents[1]
PERF_INPUT = ROOT / "scripts" / "perf" / "ensemble_input.json"

# The repository's limits (mixtral_triton.pipeline.build_repository's defaults).
MAX_INPUT_LEN = 1024
MAX_SEQ_LEN = 2048

GREEDY_PROMPTS = {
    "english": "The capital of France is",
    "accented": "Crème brûlée, déjà vu et façade naïve :",
    "cjk": "東京の天気は今日とても",
    "emoji": "Pizza 🍕, rockets 🚀 and family 👨‍👩‍👧 make me",
}
GREEDY_TOKENS = 24

# ---------------------------------------------------------------------------- helpers

def _stream(url: str, model: str, inputs, request_id: str, outputs=None, timeout_s: float = 60):
    """All responses of one request on a gRPC stream: (results, error or None)."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    results = []
    try:
        client.async_stream_infer(model, inputs, request_id=request_id, outputs=outputs,
                                  enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=timeout_s)
            if error is not None:
                return results, error
            results.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return results, None
    finally:
        client.stop_stream()
        client.close()


_ENGINE_SAMPLING = {"temperature": np.float32, "runtime_top_k": np.int32, "runtime_top_p": np.float32,
                    "seed": np.uint64, "min_tokens": np.int32}


def engine_token_ids(url: str, prompt_ids: list[int], max_tokens: int, end_id: int,
                     **sampling) -> list[int]:
    """The completion's token ids from the `tensorrt_llm` model itself, with the TensorRT-LLM
    backend's tensors (streaming: one response per token, output_ids [1, 1, n]). Greedy
    (runtime_top_k 1) unless `sampling` (engine input name -> value) says otherwise."""
    sampling = {"runtime_top_k": 1, **sampling}
    inputs = infer_inputs({
        "input_ids": np.array([prompt_ids], np.int32),
        "input_lengths": np.array([[len(prompt_ids)]], np.int32),
        "request_output_len": np.array([[max_tokens]], np.int32),
        "end_id": np.array([[end_id]], np.int32),
        "streaming": np.array([[True]], np.bool_),
        **{name: np.array([[value]], _ENGINE_SAMPLING[name]) for name, value in sampling.items()},
    })
    results, error = _stream(url, "tensorrt_llm", inputs, "engine-direct")
    assert error is None, error
    ids = []
    for result in results:
        if not result.get_response().outputs:
            continue  # the empty final marker
        output_ids = result.as_numpy("output_ids")
        assert output_ids.ndim == 3 and output_ids.shape[:2] == (1, 1), output_ids.shape
        assert result.as_numpy("sequence_length").reshape(-1).tolist() == [output_ids.shape[2]]
        ids.extend(output_ids[0, 0].tolist())
    assert len(ids) < 2 or len(results) > 2, "the engine did not stream"
    return ids


def whole_text(table, ids: list[int]) -> str:
    """The completion's text decoded at once (not incrementally): invalid bytes become
    U+FFFD as bytes.decode does for the whole completion (mixtral_triton.text's contract)."""
    return b"".join(table[i] for i in ids).decode("utf-8", "replace")


def ensemble_raw(url: str, arrays: dict[str, np.ndarray], request_id: str = "raw"):
    """One ensemble request with exactly these tensors; the error as the client reports it."""
    results, error = _stream(url, ENSEMBLE, infer_inputs(arrays), request_id, requested_outputs())
    return results, (server_error(error) if error is not None else None)


def http_url(server, stream: bool) -> str:
    return f"http://{server.http_url}/v2/models/ensemble/{'generate_stream' if stream else 'generate'}"


def http_stream(server, body: dict) -> list[dict]:
    """The SSE events of generate_stream; each `data:` payload decoded as strict UTF-8."""
    with requests.post(http_url(server, True), json=body, stream=True, timeout=60) as reply:
        assert reply.status_code == 200, reply.text
        events = []
        for line in reply.iter_lines():
            if line:
                assert line.startswith(b"data: "), line
                events.append(json.loads(line[len(b"data: "):].decode("utf-8")))
    assert events and "error" not in events[-1], events[-1:]
    return events


def active_requests(server) -> float:
    """The engine's gauge nv_trt_llm_request_metrics{request_type="active"}."""
    text = requests.get(f"http://{server.host}:{server.ports.metrics}/metrics", timeout=5).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("nv_trt_llm_request_metrics{") and 'request_type="active"' in line]
    assert len(values) == 1, "the engine's active-request gauge is not exported"
    return values[0]


def wait_until(condition, timeout_s: float, period_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(period_s)
    return condition()


def served_tp(server) -> int:
    """tp_size of the TensorRT-LLM checkpoint the server's engine model computes from."""
    config = (server.model_repository / "tensorrt_llm" / "config.pbtxt").read_text()
    checkpoint = re.search(r'key: "checkpoint_dir", value: \{ string_value: "([^"]+)"', config).group(1)
    return json.loads((Path(checkpoint) / "config.json").read_text())["mapping"]["tp_size"]


def check_chunks(chunks: list[str], whole: str) -> None:
    """Streamed chunks add up to the whole text, each is whole characters (it encodes as
    strict UTF-8: no lone surrogate standing for half a character), and a U+FFFD in a chunk
    is one the whole text has at that very place."""
    assert "".join(chunks) == whole
    offset = 0
    for chunk in chunks:
        chunk.encode("utf-8")
        for i, char in enumerate(chunk):
            if char == "\ufffd":
                assert whole[offset + i] == "\ufffd"
        offset += len(chunk)


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def table(tokenizer):
    return token_table(tokenizer)


@pytest.fixture(scope="module")
def transformers_greedy(tiny_checkpoint, tokenizer) -> dict[str, tuple[list[int], list[int]]]:
    """Per prompt: (prompt ids, greedy completion ids) from transformers in float32."""
    import torch
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for name, prompt in GREEDY_PROMPTS.items():
            ids = tokenizer.encode(prompt)
            generated = model.generate(torch.tensor([ids]),
                                       attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.eos_token_id)
            out[name] = (ids, generated[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def tp1_server(tiny_checkpoint, tmp_path_factory):
    """A second server: the same checkpoint converted at TP=1."""
    from mixtral_triton.pipeline import build_repository

    repository = build_repository(tiny_checkpoint, tmp_path_factory.mktemp("work-tp1"), tp=1,
                                  log=lambda *_: None)
    with TritonServer(repository, log_file=tmp_path_factory.mktemp("logs-tp1") / "triton.log") as server:
        yield server


@pytest.fixture(scope="module")
def client(triton_server) -> PredictClient:
    return PredictClient(triton_server.grpc_url, timeout_s=60)


# ------------------------------------------------ 1. greedy == transformers, TP 1 and 4

@pytest.mark.parametrize("name", list(GREEDY_PROMPTS))
@pytest.mark.parametrize("tp", [1, 4])
def test_greedy_matches_transformers(tp, name, request, transformers_greedy, tokenizer, table):
    server = request.getfixturevalue("tp1_server" if tp == 1 else "triton_server")
    assert served_tp(server) == tp
    prompt_ids, reference = transformers_greedy[name]
    eos = tokenizer.eos_token_id
    # transformers returns the end id it stopped at; the engine leaves it out.
    expected = reference[:reference.index(eos)] if eos in reference else reference
    expected_reason = "stop" if eos in reference else "length"

    assert engine_token_ids(server.grpc_url, prompt_ids, GREEDY_TOKENS, eos) == expected

    stream = TextStream(table)
    expected_text = stream.push(expected) + stream.finish()
    predict = PredictClient(server.grpc_url, timeout_s=60)
    whole = predict.predict(GREEDY_PROMPTS[name], stream=False, max_tokens=GREEDY_TOKENS, top_k=1)
    assert whole.text == expected_text
    assert whole.finish_reason == expected_reason
    assert whole.prompt_tokens == len(prompt_ids)
    assert whole.completion_tokens == len(expected)
    if expected_reason == "length":
        assert whole.completion_tokens == GREEDY_TOKENS
    chunks = list(predict.generate(parse_request({"prompt": GREEDY_PROMPTS[name], "top_k": 1,
                                                  "max_tokens": GREEDY_TOKENS})))
    assert "".join(c.text for c in chunks) == expected_text
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + [expected_reason]
    # And as transformers decodes it, which drops the completion's leading space (and reads
    # byte tokens differently, so only where there are none).
    if not any(tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in expected):
        assert expected_text.removeprefix(" ") == tokenizer.decode(expected, skip_special_tokens=True)


# --------------------------------- 2. streamed text == whole text, chunk by whole character

FRAGMENTS = [
    "Crème brûlée à la française", "naïve façade, déjà vu", "Ünïcödé ÄÖÜ ß", "東京の天気", "中文字符测试",
    "한국어 문장", "🙂🎉👍🏽", "👨‍👩‍👧 family", "def f(x):\n    return  x   *  2\n", "if a:\n\n\tb()  # done",
    "    ", "\n\n\n", "  spaced   out  ", "x = {'k': [1,  2]}\r\n",
]
_CHARS = st.one_of(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
                   st.sampled_from(" \n\t"))
PROMPTS = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(_CHARS, min_size=1, max_size=12)),
                   min_size=1, max_size=4).map("".join)
SAMPLING = {"temperature": st.just(1.0), "top_k": st.sampled_from([0, 50]),
            "seed": st.integers(0, 2**64 - 1), "max_tokens": st.integers(4, 24)}
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def engine_text(server, tokenizer, table, prompt, temperature, top_k, seed, max_tokens) -> tuple[str, int]:
    """What the ensemble must answer, computed without it: the engine's own token ids for
    the inputs the tokenizer model makes of these fields (top_p 1, min_tokens 1), decoded
    at once. Sampling is per request and seeded, so the ids are the ensemble's."""
    prompt_ids = tokenizer.encode(prompt)
    ids = engine_token_ids(server.grpc_url, prompt_ids, max_tokens, tokenizer.eos_token_id,
                           temperature=temperature, runtime_top_k=top_k, runtime_top_p=1.0,
                           seed=seed, min_tokens=1)
    return whole_text(table, ids), len(ids)


@PROPERTY
@given(prompt=PROMPTS, **SAMPLING)
def test_grpc_stream_equals_whole_text(triton_server, tokenizer, table, prompt, temperature, top_k,
                                       seed, max_tokens):
    client = PredictClient(triton_server.grpc_url, timeout_s=60)
    fields = dict(temperature=temperature, top_k=top_k, top_p=1.0, seed=seed, max_tokens=max_tokens)
    whole = client.predict(prompt, stream=False, **fields)
    expected, generated = engine_text(triton_server, tokenizer, table, prompt, temperature, top_k,
                                      seed, max_tokens)
    assert (whole.text, whole.completion_tokens) == (expected, generated)
    # The client decodes every chunk as strict UTF-8: a chunk ending inside a character raises.
    chunks = list(client.generate(parse_request({"prompt": prompt, "stream": True, **fields})))
    check_chunks([c.text for c in chunks], whole.text)
    last = chunks[-1]
    assert (last.finish_reason, last.completion_tokens) == (whole.finish_reason, whole.completion_tokens)


@PROPERTY
@given(prompt=PROMPTS, **SAMPLING)
def test_http_stream_equals_whole_text(triton_server, tokenizer, table, prompt, temperature, top_k,
                                       seed, max_tokens):
    body = {"text_input": prompt, "temperature": temperature, "top_k": top_k, "top_p": 1.0,
            "seed": seed, "max_tokens": max_tokens}
    reply = requests.post(http_url(triton_server, False), json={**body, "stream": False}, timeout=60)
    assert reply.status_code == 200, reply.text
    whole = json.loads(reply.content.decode("utf-8"))
    expected, generated = engine_text(triton_server, tokenizer, table, prompt, temperature, top_k,
                                      seed, max_tokens)
    assert (whole["text_output"], whole["completion_tokens"]) == (expected, generated)
    events = http_stream(triton_server, {**body, "stream": True})
    check_chunks([e["text_output"] for e in events], whole["text_output"])
    assert events[-1]["finish_reason"] == whole["finish_reason"]
    assert events[-1]["completion_tokens"] == whole["completion_tokens"]


# ------------------------------------------------------------------ 3. concurrent streams

CONCURRENT_PROMPTS = [
    "Once upon a time", "Café au lait, s'il vous plaît", "日本語で話しましょう", "Rockets 🚀🚀 go",
    "def main():\n    print('hi')\n", "Zürich, Genève und Köln", "Пример текста", "1, 2, 3, 4,",
]


def test_concurrent_streams_get_their_own_text(triton_server, client):
    def complete(prompt: str, stream: bool) -> str:
        request = parse_request({"prompt": prompt, "stream": stream, "temperature": 0, "max_tokens": 32})
        return "".join(chunk.text for chunk in client.generate(request))

    alone = [complete(prompt, False) for prompt in CONCURRENT_PROMPTS]
    assert len(set(alone)) == len(alone)

    peak = [0.0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], active_requests(triton_server))
            time.sleep(0.01)

    start = threading.Barrier(len(CONCURRENT_PROMPTS))

    def together(i: int) -> str:
        start.wait()
        return complete(CONCURRENT_PROMPTS[i], stream=i % 2 == 0)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(CONCURRENT_PROMPTS)) as pool:
            concurrent = list(pool.map(together, range(len(CONCURRENT_PROMPTS))))
    finally:
        done.set()
        watcher.join()
    assert concurrent == alone
    assert peak[0] >= 2, "the requests never shared the engine's batch"


# ----------------------------------------------------------------------------- 4. seeds

def test_same_seed_repeats_and_other_seeds_differ(triton_server, client):
    prompt = "Write a poem about the sea:"
    fields = dict(temperature=1.0, top_k=0, top_p=1.0, max_tokens=32)

    def sample(seed: int) -> str:
        completion = client.predict(prompt, stream=False, seed=seed, **fields)
        assert completion.completion_tokens == 32
        return completion.text

    seeds = [7, 8, 7 + 2**32, 2**63 + 7, 2**64 - 1]  # the high bits of a seed count too
    texts = [sample(seed) for seed in seeds]
    assert sample(seeds[0]) == texts[0]
    assert sample(seeds[-1]) == texts[-1]
    assert len(set(texts)) == len(texts)
    # The seed travels the same through HTTP's JSON as through gRPC's UINT64.
    for seed, text in ((seeds[0], texts[0]), (seeds[-1], texts[-1])):
        reply = requests.post(http_url(triton_server, False), timeout=60, json={
            "text_input": prompt, "seed": seed, **fields})
        assert reply.status_code == 200, reply.text
        assert reply.json()["text_output"] == text


# ------------------------------------------------------------------------- 5. cancel

# These run on the paced server (helpers.LONG): a LONG generation there lasts 90 s at least
# whatever the machine, so it is still running at each cancel below, and leaving the engine
# within the waits below is the cancellation's doing.


@pytest.fixture(scope="module")
def paced_client(paced_server) -> PredictClient:
    return PredictClient(paced_server.grpc_url, timeout_s=60)


def test_leaving_a_stream_early_cancels_it_on_the_server(paced_server, paced_client):
    texts, active_while_running = [], None
    started = time.monotonic()
    for text in paced_client.predict("Tell me a very long story:", max_tokens=LONG, temperature=0):
        texts.append(text)
        if len(texts) == 3:
            active_while_running = active_requests(paced_server)
            break  # the client cancels the request on the server (ensemble `stop`)
    assert active_while_running == 1
    assert wait_until(lambda: active_requests(paced_server) == 0, timeout_s=30), \
        "the engine still generates for a stream the client left"
    # Leaving the loop returns once the server has let go (the client waits for that): had
    # the request run on, it would have taken its LONG tokens' time (90 s at least).
    assert time.monotonic() - started < 60, "leaving the stream waited for the whole generation"
    after = paced_client.predict("Still serving?", stream=False, max_tokens=4, temperature=0)
    assert after.finish_reason == "length"


def test_engine_model_hears_a_cancelled_grpc_stream(paced_server):
    """Called directly (no ensemble between), the engine sees Triton's cancellation."""
    responses: queue.Queue = queue.Queue()
    grpc = grpcclient.InferenceServerClient(paced_server.grpc_url)
    grpc.start_stream(callback=lambda result, error: responses.put((result, error)))
    grpc.async_stream_infer("tensorrt_llm", infer_inputs({
        "input_ids": np.array([[1, 415, 5565, 302]], np.int32), "input_lengths": np.array([[4]], np.int32),
        "request_output_len": np.array([[LONG]], np.int32), "streaming": np.array([[True]], np.bool_)}),
        request_id="engine-cancel")
    for _ in range(3):
        result, error = responses.get(timeout=30)
        assert error is None, error
    assert active_requests(paced_server) == 1
    grpc.stop_stream(cancel_requests=True)
    grpc.close()
    assert wait_until(lambda: active_requests(paced_server) == 0, timeout_s=30)


def test_stop_request_with_the_same_id_cancels_a_generation(paced_server, paced_client):
    request = parse_request({"prompt": "Count slowly to ten thousand:", "max_tokens": LONG, "temperature": 0})
    chunks: list = []
    failure: list = []

    def generate():
        try:
            for chunk in paced_client.generate(request, request_id="test-cancel-me"):
                chunks.append(chunk)
        except Exception as exc:  # reported below
            failure.append(exc)

    generation = threading.Thread(target=generate)
    generation.start()
    assert wait_until(lambda: len(chunks) >= 5 or failure, timeout_s=30)
    assert not failure and active_requests(paced_server) == 1
    _, error = ensemble_raw(paced_server.grpc_url, {
        "text_input": np.array([[b""]], dtype=object), "max_tokens": np.array([[1]], np.int32),
        "stop": np.array([[True]], np.bool_)}, request_id="test-cancel-me")
    assert error is None, error
    generation.join(10)
    assert not generation.is_alive() and not failure, failure
    last = chunks[-1]
    assert last.finish_reason == "cancelled"
    assert 5 <= last.completion_tokens < LONG
    assert wait_until(lambda: active_requests(paced_server) == 0, timeout_s=30)
    # The client's own cancel request (what it sends when a caller leaves) is accepted too.
    _, error = _stream(paced_server.grpc_url, ENSEMBLE, cancel_inputs(), "no-such-request")
    assert error is None, error


def test_the_one_detokenizer_instance_streams_several_at_once_and_a_stop_ends_only_its_own(paced_server):
    """The detokenizer's one instance, three long streams: all three stream at once (none
    waits for another). A stop, carried out by the detokenizer itself (in-process), cancels
    its own stream at once; the other two go on, and are then stopped the same way."""
    server = paced_server
    client = PredictClient(server.grpc_url, timeout_s=60)
    request = parse_request({"prompt": "Count slowly:", "max_tokens": LONG, "temperature": 0})
    chunks: dict[str, list] = {name: [] for name in "abc"}
    failures: list = []

    def generate(name):
        try:
            for chunk in client.generate(request, request_id=name):
                chunks[name].append(chunk)
        except Exception as exc:  # reported below
            failures.append(exc)

    def stop(name):
        _, error = ensemble_raw(server.grpc_url, {
            "text_input": np.array([[b""]], dtype=object), "max_tokens": np.array([[1]], np.int32),
            "stop": np.array([[True]], np.bool_)}, request_id=name)
        if error is not None:
            failures.append(error)

    threads = {name: threading.Thread(target=generate, args=(name,)) for name in "abc"}
    for thread in threads.values():
        thread.start()
    assert wait_until(lambda: all(len(chunks[name]) >= 3 for name in "abc") or failures, timeout_s=60)
    assert not failures, failures
    stop("a")
    threads["a"].join(10)
    assert not threads["a"].is_alive() and chunks["a"][-1].finish_reason == "cancelled"
    going = {name: len(chunks[name]) for name in "bc"}
    assert wait_until(lambda: all(len(chunks[name]) > going[name] + 2 for name in "bc"), timeout_s=30)
    assert all(chunk.finish_reason is None for name in "bc" for chunk in chunks[name])
    for name in "bc":
        stop(name)
    for thread in threads.values():
        thread.join(30)
        assert not thread.is_alive()
    assert not failures, failures
    assert [chunks[name][-1].finish_reason for name in "bc"] == ["cancelled", "cancelled"]
    assert wait_until(lambda: active_requests(server) == 0, timeout_s=30)


def test_a_stop_needs_the_request_id(client, triton_server):
    _, error = ensemble_raw(triton_server.grpc_url, {
        "text_input": np.array([[b""]], dtype=object), "max_tokens": np.array([[1]], np.int32),
        "stop": np.array([[True]], np.bool_)}, request_id="")
    assert error is not None and error.field == "stop" and "id" in str(error), error


# ---------------------------------------------------------------------- 6. stop strings

def test_stop_strings_cut_the_text_before_the_stop(client):
    prompt = "The history of the world in brief:"
    reference = client.predict(prompt, stream=False, max_tokens=40, temperature=0)
    assert reference.finish_reason == "length"
    text = reference.text
    middle = len(text) // 2
    # A stop at a word start, and an arbitrary slice (it may begin and end inside tokens).
    space = text.find(" ", middle) if " " in text[middle:] else text.rfind(" ", 0, middle)
    assert space >= 0, text
    word_stop = text[space:space + 5]
    odd_stop = text[middle + 1:middle + 4]
    for stops in (word_stop, [odd_stop], ["never-in-the-text-§", word_stop]):
        first = min((text.index(s) for s in ([stops] if isinstance(stops, str) else stops) if s in text))
        expected = text[:first]
        whole = client.predict(prompt, stream=False, max_tokens=40, temperature=0, stop=stops)
        assert (whole.text, whole.finish_reason) == (expected, "stop")
        assert whole.completion_tokens < 40
        for stop in ([stops] if isinstance(stops, str) else stops):
            assert stop not in whole.text
        chunks = list(client.generate(parse_request({"prompt": prompt, "max_tokens": 40, "temperature": 0,
                                                     "stop": stops})))
        assert "".join(c.text for c in chunks) == expected
        assert chunks[-1].finish_reason == "stop"


# ------------------------------------------------------------------------ 7. validation

LONG_PROMPT = "word " * (MAX_INPUT_LEN + 100)  # one token per word: beyond max_input_len

BAD_FIELDS = [  # (predict field overrides, the ensemble's JSON, field, text the message holds)
    pytest.param({"top_p": 1.5}, {"top_p": 1.5}, "top_p", "<= 1", id="top_p"),
    pytest.param({"max_tokens": 0}, {"max_tokens": 0}, "max_tokens", ">= 1", id="max_tokens-0"),
    pytest.param({"prompt": LONG_PROMPT}, {"text_input": LONG_PROMPT}, "prompt", str(MAX_INPUT_LEN),
                 id="prompt-too-long"),
    pytest.param({"max_tokens": MAX_SEQ_LEN}, {"max_tokens": MAX_SEQ_LEN}, "max_tokens", str(MAX_SEQ_LEN),
                 id="max_tokens-beyond-max_seq_len"),
]
_FIELD_NAMES = {"prompt": r"\b(prompt|text_input)\b"}  # the ensemble's name for the prompt


def _still_serving(client) -> None:
    assert client.predict("Hello", stream=False, max_tokens=3, temperature=0).finish_reason == "length"


@pytest.mark.parametrize("override, body, field, detail", BAD_FIELDS)
def test_grpc_refuses_bad_fields_by_name(client, override, body, field, detail):
    # Built past the client's own checks, so that the server is the one to refuse it.
    request = dataclasses.replace(parse_request({"prompt": "Hello", "max_tokens": 8}), **override)
    with pytest.raises(RequestError) as refused:
        list(client.generate(request))
    assert refused.value.field == field
    assert detail in str(refused.value)
    _still_serving(client)


@pytest.mark.parametrize("arrays, field, detail", [
    pytest.param({"beam_width": np.array([[2]], np.int32)}, "beam_width", "beam_width must be 1",
                 id="beam_width"),
    # The ensemble's text_input is the predict API's prompt (the client names it so).
    pytest.param({"text_input": np.array([["café ".encode() + b"\xff\xfe \xc3"]], dtype=object)}, "prompt",
                 "text_input must be valid UTF-8", id="invalid-utf8"),
])
def test_grpc_refuses_bad_ensemble_inputs_by_name(triton_server, client, arrays, field, detail):
    request = {"text_input": np.array([[b"Hello"]], dtype=object), "max_tokens": np.array([[8]], np.int32),
               **arrays}
    _, error = ensemble_raw(triton_server.grpc_url, request)
    assert isinstance(error, RequestError), error
    assert error.field == field
    assert detail in str(error)
    _still_serving(client)


@pytest.mark.parametrize("override, body, field, detail", BAD_FIELDS + [
    pytest.param(None, {"beam_width": 2}, "beam_width", "must be 1", id="beam_width")])
@pytest.mark.parametrize("stream", [False, True], ids=["generate", "generate_stream"])
def test_http_refuses_bad_fields_by_name(triton_server, client, override, body, field, detail, stream):
    reply = requests.post(http_url(triton_server, stream), timeout=60,
                          json={"text_input": "Hello", "max_tokens": 8, **body})
    assert reply.status_code == 400, reply.text
    message = reply.text.removeprefix("data: ").strip()
    error = json.loads(message)["error"]
    assert re.search(_FIELD_NAMES.get(field, rf"\b{field}\b"), error), error
    assert detail in error
    _still_serving(client)


# ---------------------------------------------------------------------- 8. perf_analyzer

def test_perf_analyzer_input_feeds_the_ensemble(triton_server):
    config = grpcclient.InferenceServerClient(triton_server.grpc_url).get_model_config(
        ENSEMBLE, as_json=True)["config"]
    inputs = {tensor["name"]: tensor for tensor in config["input"]}
    data = json.loads(PERF_INPUT.read_text())["data"]
    assert data
    for step in data:
        assert {name for name, tensor in inputs.items() if not tensor.get("optional")} <= set(step)
        for name, value in step.items():
            assert name in inputs, f"{name} is not an input of the ensemble"
            assert isinstance(value, list) and len(value) == 1, "inputs are [1] per request"
        assert step["stream"] == [True]
        parse_request({"prompt": step["text_input"][0], "max_tokens": step["max_tokens"][0],
                       **{k: v[0] for k, v in step.items() if k in ("temperature", "top_k", "top_p")}})


def test_perf_analyzer_streams_the_ensemble(triton_server):
    env = perf_analyzer_environment()
    binary = check_perf_analyzer(env)  # names a missing libb64 / libcudart
    # count_windows of 4 requests: short. 4 requests of a CPU model vary by more than the
    # default 10 %, so stability is judged at 100 % (max/min within 2x) to end promptly.
    command = [str(binary), "-m", ENSEMBLE, "-i", "grpc", "--streaming", "-u", triton_server.grpc_url,
               "--input-data", str(PERF_INPUT), "--concurrency-range", "1:2",
               "--measurement-mode", "count_windows", "--measurement-request-count", "4",
               "--stability-percentage", "100"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    assert "Detected decoupled model" in report
    throughput = dict(re.findall(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec", report))
    assert set(throughput) == {"1", "2"}, report
    assert all(float(value) > 0 for value in throughput.values()), report
    assert active_requests(triton_server) == 0
