"""The Python clients (blocking and asyncio) and client/predict.py against the real Triton
server: equal texts, every validation rule naming its field, cancellation that reaches
the engine (its `active` request gauge returns to 0)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import LONG, PROMPT, case_id, greedy_whole, invalid_values, raw_stream, wait_active
from mixtral_triton.client import AsyncPredictClient, PredictClient
from mixtral_triton.protocol import RequestError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------


def test_sync_and_async_streams_equal_the_whole_completion(triton_server):
    whole = greedy_whole(triton_server)
    assert whole.finish_reason == "length" and whole.completion_tokens == 24
    assert any(ord(c) > 127 for c in whole.text)  # the random model writes non-ASCII too

    pieces = list(PredictClient(triton_server.grpc_url).predict(PROMPT, max_tokens=24, temperature=0))
    assert len(pieces) > 1 and "".join(pieces) == whole.text

    async def run():
        async with AsyncPredictClient(triton_server.grpc_url) as client:
            assert await client.is_ready()
            streamed = [p async for p in await client.predict(PROMPT, max_tokens=24, temperature=0)]
            completion = await client.predict(PROMPT, stream=False, max_tokens=24, temperature=0)
            return streamed, completion

    streamed, completion = asyncio.run(run())
    assert len(streamed) > 1 and "".join(streamed) == whole.text
    assert completion == whole


@pytest.mark.parametrize("case", invalid_values(), ids=case_id)
def test_every_rule_names_its_field_in_both_clients(triton_server, case):
    name, value = case
    fields = {name: value}
    prompt = fields.pop("prompt", PROMPT)
    with pytest.raises(RequestError) as sync_error:
        PredictClient(triton_server.grpc_url).predict(prompt, **fields)
    assert sync_error.value.field == name

    async def run():
        async with AsyncPredictClient(triton_server.grpc_url) as client:
            await client.predict(prompt, **fields)

    with pytest.raises(RequestError) as async_error:
        asyncio.run(run())
    assert async_error.value.field == name
    assert str(async_error.value) == str(sync_error.value)


def test_unknown_field_is_named(triton_server):
    with pytest.raises(RequestError) as error:
        PredictClient(triton_server.grpc_url).predict(PROMPT, max_new_tokens=3)
    assert error.value.field == "max_new_tokens"


@pytest.mark.parametrize("fields, field", [
    ({"max_tokens": 2**31 - 1}, "max_tokens"),  # valid JSON, more than the engine's room
    ({"prompt": "wind " * 1100}, "prompt"),  # more than max_input_len tokens
], ids=["max_tokens", "prompt"])
def test_the_servers_own_checks_come_back_naming_the_field(triton_server, fields, field):
    prompt = fields.pop("prompt", PROMPT)
    with pytest.raises(RequestError) as sync_error:
        list(PredictClient(triton_server.grpc_url).predict(prompt, **fields))
    assert sync_error.value.field == field and "engine" in str(sync_error.value)

    async def run():
        async with AsyncPredictClient(triton_server.grpc_url) as client:
            await client.predict(prompt, stream=False, **fields)

    with pytest.raises(RequestError) as async_error:
        asyncio.run(run())
    assert async_error.value.field == field and str(async_error.value) == str(sync_error.value)


def test_async_client_cancels_when_the_consumer_stops_or_the_task_is_cancelled(paced_server):
    """On the paced server: the LONG generations cannot end before the test ends them."""
    assert wait_active(paced_server, lambda v: v == 0) == 0

    async def run():
        async with AsyncPredictClient(paced_server.grpc_url) as client:
            # 1. the consumer leaves the loop (the generator is closed)
            stream = client.generate(_request(LONG))
            await anext(stream)
            assert await asyncio.to_thread(wait_active, paced_server, lambda v: v >= 1) >= 1
            await stream.aclose()
            assert await asyncio.to_thread(wait_active, paced_server, lambda v: v == 0, 30) == 0

            # 2. the task is cancelled
            started = asyncio.Event()

            async def consume():
                async for _ in await client.predict(PROMPT, max_tokens=LONG, temperature=0):
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await asyncio.to_thread(wait_active, paced_server, lambda v: v == 0, 30) == 0

            # 3. the client still works on the same channel
            completion = await client.predict(PROMPT, stream=False, max_tokens=4, temperature=0)
            assert completion.completion_tokens == 4

    asyncio.run(run())


def test_async_client_against_no_server():
    from mixtral_triton.client import ServerError
    from mixtral_triton.launcher import free_ports

    url = f"127.0.0.1:{free_ports().grpc}"

    async def run():
        async with AsyncPredictClient(url, timeout_s=10) as client:
            assert not await client.is_ready()
            async for _ in await client.predict(PROMPT):
                pass

    with pytest.raises(ServerError) as error:
        asyncio.run(run())
    assert error.value.status == "UNAVAILABLE"


def _request(max_tokens: int):
    from mixtral_triton.protocol import parse_request

    return parse_request({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})


# ---------------------------------------------------------------------------------------
# client/predict.py


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "client" / "predict.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_cli_prints_the_stream_and_the_whole(triton_server):
    whole = greedy_whole(triton_server, 16)
    streamed = _cli(PROMPT, "--max-tokens", "16", "--temperature", "0", "--url",
                    triton_server.grpc_url, "--usage")
    not_streamed = _cli(PROMPT, "--max-tokens", "16", "--temperature", "0", "--url",
                        triton_server.grpc_url, "--no-stream")
    out, err = streamed.communicate(timeout=60)
    assert streamed.returncode == 0, err.decode()
    assert out.decode("utf-8") == whole.text + "\n"
    assert "finish_reason=length" in err.decode() and "completion_tokens=16" in err.decode()
    out, err = not_streamed.communicate(timeout=60)
    assert not_streamed.returncode == 0, err.decode()
    assert out.decode("utf-8") == whole.text + "\n"


def test_cli_errors_are_one_line(triton_server):
    from mixtral_triton.launcher import free_ports

    bad = _cli(PROMPT, "--top-p", "2", "--url", triton_server.grpc_url)
    too_long = _cli(PROMPT, "--max-tokens", "100000", "--url", triton_server.grpc_url)
    no_server = _cli(PROMPT, "--url", f"127.0.0.1:{free_ports().grpc}")
    for process, words in ((bad, "top_p must be > 0 and <= 1, got 2.0"),
                           (too_long, "max_tokens must be <= "),
                           (no_server, "failed to connect")):
        out, err = process.communicate(timeout=60)
        lines = err.decode().strip().splitlines()
        assert process.returncode == 2 and len(lines) == 1, err.decode()
        assert lines[0].startswith("predict.py: error: ") and words in lines[0]


def test_cli_ctrl_c_cancels_on_the_server_and_exits_130(paced_server):
    """On the paced server: the LONG generation (90 s at least) cannot end before the
    Ctrl-C."""
    assert wait_active(paced_server, lambda v: v == 0) == 0
    process = _cli(PROMPT, "--max-tokens", str(LONG), "--temperature", "0", "--url",
                   paced_server.grpc_url, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert process.stdout.read(1)  # the stream has begun
        assert wait_active(paced_server, lambda v: v >= 1) >= 1
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err.decode()
    assert "[cancelled]" in err.decode() and "Traceback" not in err.decode()
    assert wait_active(paced_server, lambda v: v == 0, 30) == 0  # not 90 s: the engine stopped


# ---------------------------------------------------------------------------------------
# The ensemble's upstream inputs and vLLM's extensions, on the real server


def _ensemble(server, arrays: dict, outputs=None, request_id="t-fields"):
    """One streamed ensemble request with raw inputs: (texts, last outputs, error)."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    from mixtral_triton.client.ensemble import ENSEMBLE, infer_inputs, requested_outputs

    base = {"text_input": np.array([[PROMPT.encode()]], dtype=object),
            "max_tokens": np.array([[8]], np.int32), "stream": np.array([[True]]),
            "top_k": np.array([[1]], np.int32)}
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(ENSEMBLE, infer_inputs({**base, **arrays}), request_id=request_id,
                                  outputs=outputs if outputs is not None else requested_outputs())
        texts, last = [], {}
        while True:
            result, error = answers.get(timeout=60)
            if error is not None:
                return texts, last, error
            response = result.get_response()
            last = {o.name: result.as_numpy(o.name).reshape(-1)[0] for o in response.outputs}
            texts.append(last["text_output"].decode() if "text_output" in last else "")
            if last.get("finish_reason", b""):
                return texts, last, None
    finally:
        client.stop_stream()
        client.close()


def _first_greedy_token(server, tiny_checkpoint) -> int:
    """The token greedy decoding picks first after PROMPT, asked of the engine itself."""
    import numpy as np
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tiny_checkpoint)).encode(PROMPT)
    results, error = raw_stream(server.grpc_url, "tensorrt_llm", {
        "input_ids": np.array([ids], np.int32), "input_lengths": np.array([[len(ids)]], np.int32),
        "request_output_len": np.array([[1]], np.int32), "runtime_top_k": np.array([[1]], np.int32),
        "exclude_input_in_output": np.array([[True]], np.bool_)}, "t-first")
    assert error is None, error
    return int(next(r for r in results if r.get_response().outputs).as_numpy("output_ids").reshape(-1)[0])


def test_ignore_eos_and_min_tokens_reach_the_engine(triton_server, tiny_checkpoint):
    """With the end token made the very token greedy decoding picks first (end_id), a
    request ends at once; min_tokens (or its older name min_length) holds the end off that
    long, and ignore_eos sends the engine no end id at all."""
    import numpy as np

    end_id = {"end_id": np.array([[_first_greedy_token(triton_server, tiny_checkpoint)]], np.int32)}
    _, last, error = _ensemble(triton_server, end_id)
    assert error is None and last["completion_tokens"] == 0 and last["finish_reason"] == b"stop"
    for name in ("min_tokens", "min_length"):
        _, last, error = _ensemble(triton_server, {**end_id, name: np.array([[3]], np.int32)})
        assert error is None and last["completion_tokens"] >= 3, name
    _, last, error = _ensemble(triton_server, {**end_id, "ignore_eos": np.array([[True]])})
    assert error is None and last["completion_tokens"] == 8 and last["finish_reason"] == b"length"


def test_exclude_input_in_output_false_echoes_the_prompt_first(triton_server):
    import numpy as np

    plain, _, _ = _ensemble(triton_server, {})
    echoed, _, error = _ensemble(triton_server, {"exclude_input_in_output": np.array([[False]])})
    assert error is None and echoed[0] == PROMPT and "".join(echoed) == PROMPT + "".join(plain)
    kept, _, _ = _ensemble(triton_server, {"exclude_input_in_output": np.array([[True]])})
    assert "".join(kept) == "".join(plain)  # the chunks' boundaries follow timing, the text does not


def _declared_ensemble_outputs() -> list[str]:
    import re
    config = (Path(__file__).resolve().parents[1] / "model_repository/ensemble/config.pbtxt").read_text()
    declared = config[config.index("\noutput ["):config.index("ensemble_scheduling")]
    return re.findall(r'name: "(\w+)"', declared)


def _every_output_stream(server, arrays: dict, request_id: str) -> list[dict]:
    """A streamed ensemble request asking for every output the ensemble declares, as
    perf_analyzer does: each response's outputs, by name, as flat arrays."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    from mixtral_triton.client.ensemble import ENSEMBLE, infer_inputs

    base = {"text_input": np.array([[PROMPT.encode()]], dtype=object),
            "max_tokens": np.array([[8]], np.int32), "stream": np.array([[True]]),
            "ignore_eos": np.array([[True]])}
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(ENSEMBLE, infer_inputs({**base, **arrays}), request_id=request_id,
                                  outputs=[grpcclient.InferRequestedOutput(n) for n in _declared_ensemble_outputs()])
        responses = []
        while True:
            result, error = answers.get(timeout=60)
            assert error is None, error
            responses.append({o.name: result.as_numpy(o.name).reshape(-1)
                              for o in result.get_response().outputs})
            if responses[-1]["finish_reason"][0]:
                return responses
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.parametrize("log_probs", [False, True], ids=["plain", "return_log_probs"])
def test_every_response_carries_every_declared_output(triton_server, log_probs):
    """perf_analyzer (genai-perf's load generator) reads every output the ensemble declares
    from every response, and records whatever its buffer held for one that is absent (NaN
    floats among it, which left its profile export empty). So each response carries them
    all, with true counts, and empty log-probability outputs unless they were asked for."""
    import numpy as np

    arrays = {"return_log_probs": np.array([[True]])} if log_probs else {}
    responses = _every_output_stream(triton_server, arrays, f"t-every-output-{log_probs}")
    declared = set(_declared_ensemble_outputs())
    assert all(set(r) == declared for r in responses), [sorted(declared - set(r)) for r in responses]
    assert all(r["num_input_tokens"][0] == r["prompt_tokens"][0] > 0 for r in responses)
    assert all(r["sequence_index"][0] == 0 for r in responses)
    # per response, as TensorRT-LLM counts them: together, the completion
    assert sum(int(r["num_output_tokens"][0]) for r in responses) == responses[-1]["completion_tokens"][0] == 8
    if not log_probs:  # one placeholder each, none absent or empty
        assert all(r["output_log_probs"].tolist() == r["cum_log_probs"].tolist() == [0.0]
                   and r["output_token_bytes"].tolist() == [b""] for r in responses)
        return
    assert sum(r["output_log_probs"].size for r in responses) == 8
    assert all(r["output_log_probs"].size == r["output_token_bytes"].size for r in responses)
    assert all(r["cum_log_probs"].size == 1 and np.isfinite(r["cum_log_probs"][0]) for r in responses)
    total = float(np.concatenate([r["output_log_probs"] for r in responses]).sum())
    assert responses[-1]["cum_log_probs"][0] == pytest.approx(total, abs=1e-4)


@pytest.mark.parametrize("name, value, message", [
    ("beam_width", [[2]], "beam_width must be 1"),
    ("num_return_sequences", [[9]], "num_return_sequences must be >= 1 and <= 8"),
    ("num_return_sequences", [[0]], "num_return_sequences must be >= 1 and <= 8"),
    ("return_generation_logits", [[True]], "return_generation_logits must be false"),
    ("lora_task_id", [[7]], "lora_task_id is not served"),
    ("guided_decoding_guide_type", [[b"xml"]], "guided_decoding_guide_type must be one of json, "
     "json_schema, regex, ebnf_grammar"),
    ("guided_decoding_guide_type", [[b"structural_tag"]], "guided_decoding_guide_type must be one of"),
    ("prompt_embedding_table", [[[0.0]]], "prompt_embedding_table is not served"),
])
def test_upstream_inputs_asking_for_what_is_not_served_are_refused_by_name(triton_server, name, value, message):
    import numpy as np

    from mixtral_triton.client.ensemble import server_error
    from mixtral_triton.protocol.ensemble import ENSEMBLE_ONLY_BY_NAME

    dtype = {"TYPE_INT32": np.int32, "TYPE_BOOL": np.bool_, "TYPE_UINT64": np.uint64,
             "TYPE_STRING": object, "TYPE_FP16": np.float16}[ENSEMBLE_ONLY_BY_NAME[name].dtype]
    _, _, error = _ensemble(triton_server, {name: np.array(value, dtype=dtype)})
    assert error is not None and f"[invalid_argument:{name}]" in error.message()
    refused = server_error(error)  # our clients name the predict field: a guide is response_format's
    field = "response_format" if name.startswith("guided_decoding") else name
    assert isinstance(refused, RequestError) and refused.field == field
    assert str(refused).startswith(message.replace(name, field, 1))
    # the values that ask for nothing more are served
    _, last, error = _ensemble(triton_server, {"beam_width": np.array([[1]], np.int32),
                                               "num_return_sequences": np.array([[1]], np.int32),
                                               "return_log_probs": np.array([[False]]),
                                               "length_penalty": np.array([[1.0]], np.float32)})
    assert error is None and last["finish_reason"]


# ---------------------------------------------------------------------------------------
# Errors: our models' codes first, Triton's own wording as the fallback


@pytest.mark.parametrize("message, kind, field, status", [
    # our models (the ensemble's prefix in front, as Triton writes it)
    ("in ensemble 'ensemble', [invalid_argument:max_tokens] max_tokens must be >= 1", "request",
     "max_tokens", None),
    ("in ensemble 'ensemble', [invalid_argument:min_length] min_length must be ...", "request",
     "min_tokens", None),
    ("in ensemble 'ensemble', [unavailable] the engine's queue is full: 1 requests", "server", None,
     "UNAVAILABLE"),
    ("[internal] generation failed: [unavailable] the engine's queue is full", "server", None,
     "INTERNAL"),
    # Triton 2.51 (core r24.10, python_backend r24.10) and 2.71 (python_backend r26.07)
    ("in ensemble 'ensemble', [request id: x] Exceeds maximum queue size", "server", None, "UNAVAILABLE"),
    ("in ensemble 'ensemble', Stub process 'preprocessing_0_0' is not healthy.", "server", None,
     "UNAVAILABLE"),
    ("Stub process is not healthy.", "server", None, "UNAVAILABLE"),
    ("Failed to obtain the health mutex.", "server", None, "UNAVAILABLE"),
    ("Stub process is not healthy while waiting for is_ready()", "server", None, "UNAVAILABLE"),
    # a message in neither form keeps the transport's status (none here)
    ("max_tokens must be >= 1", "server", None, None),
])
def test_errors_are_classified_by_code_then_by_tritons_wording(message, kind, field, status):
    from mixtral_triton.client.ensemble import ServerError, server_error

    error = server_error(message)
    if kind == "request":
        assert isinstance(error, RequestError) and error.field == field
        assert not str(error).startswith("[")
    else:
        assert isinstance(error, ServerError) and error.status == status


@pytest.mark.parametrize("engine_error, status", [
    ("[unavailable] the engine's queue is full: 3 requests", "UNAVAILABLE"),  # its own code stays
    ("[request id: 0d8f] Exceeds maximum queue size", "UNAVAILABLE"),  # Triton's overload wording
    # TensorRT-LLM's executor (sent by the tensorrtllm backend as INTERNAL, uncoded)
    ("Maximum queue size of 708 has been reached, please try again later", "UNAVAILABLE"),
    ("Stub process 'tensorrt_llm_0_0' is not healthy.", "UNAVAILABLE"),
    ("CUDA error: an illegal memory access", "INTERNAL"),
])
def test_an_engine_error_relayed_by_the_detokenizer_keeps_its_kind(engine_error, status):
    from mixtral_triton.client.ensemble import ServerError, server_error
    from mixtral_triton.protocol.errors import relayed

    error = server_error(f"in ensemble 'ensemble', {relayed(engine_error, 'generation failed')}")
    assert isinstance(error, ServerError) and error.status == status
    assert engine_error.split("] ")[-1] in str(error)
