"""genai-perf 0.0.16 from PyPI, as users run it, against the real CPU server: Triton's
`tensorrtllm` mode on the ensemble (gRPC streaming, plain and with
--output-tokens-mean-deterministic) and its OpenAI `completions` and `chat` modes against the
gateway. It lives in a venv of its own (scripts/tools-venv.sh genai-perf: its resolution takes
numpy 2, ours pins 1.26) and drives our perf_analyzer through mixtral-triton-perf-analyzer.

Each run must finish with every request answered, and its token counts must agree with ours:
 - input: genai-perf tokenizes the prompt without special tokens; our prompt_tokens is the
   same count plus the BOS token (completions, Triton mode).
 - output: genai-perf re-tokenizes the text it received; its figures must be the count of our
   whole streamed text under our tokenizer (no piece lost or doubled on the way). Our own
   completion_tokens counts generated ids: the requested count in deterministic runs. The two
   differ on the random-weight fixture, whose output is no natural text and does not
   re-tokenize to the ids that spelled it (on real text they coincide).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import active_requests, same_stats, templated_tokens, text_tokens, tool_venv

REQUESTS = 6
INPUT_TOKENS = 24
OUTPUT_TOKENS = 12


@pytest.fixture(scope="module")
def genai_perf() -> Path:
    return tool_venv("genai-perf") / "bin" / "genai-perf"


def profile(genai_perf: Path, work: Path, tokenizer: Path, *arguments: str) -> tuple[dict, list[dict]]:
    """Run `genai-perf profile`; its summary (profile_export_genai_perf.json) and the requests
    perf_analyzer recorded (profile_export.json: inputs and every response)."""
    command = [str(genai_perf), "profile", *arguments, "--tokenizer", str(tokenizer),
               "--num-prompts", str(REQUESTS), "--request-count", str(REQUESTS), "--concurrency", "2",
               "--synthetic-input-tokens-mean", str(INPUT_TOKENS), "--synthetic-input-tokens-stddev", "0",
               "--output-tokens-mean", str(OUTPUT_TOKENS), "--random-seed", "0",
               "--artifact-dir", str(work)]
    env = {**os.environ, "PATH": f"{genai_perf.parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, env=env, cwd=work.parent, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    summary = json.loads(next(work.rglob("profile_export_genai_perf.json")).read_text())
    export = json.loads(next(work.rglob("profile_export.json")).read_text())
    requests = [r for experiment in export["experiments"] for r in experiment["requests"]]
    assert summary["request_count"]["avg"] == REQUESTS == len(requests), summary["request_count"]
    return summary, requests


# ------------------------------------------------------------------ Triton tensorrtllm mode

def triton_answers(requests: list[dict]) -> list[dict]:
    """Per request: the text streamed, and the last response's counts and finish reason."""
    answers = []
    for request in requests:
        outputs = request["response_outputs"]
        assert outputs, f"a request got no response: {request['request_inputs']}"
        last = outputs[-1]
        answers.append({"prompt": request["request_inputs"]["text_input"],
                        "text": "".join(o.get("text_output", "") for o in outputs),
                        "prompt_tokens": int(last["prompt_tokens"]),
                        "completion_tokens": int(last["completion_tokens"]),
                        "finish_reason": last["finish_reason"]})
    return answers


@pytest.mark.parametrize("deterministic", [False, True], ids=["plain", "deterministic"])
def test_genai_perf_tensorrtllm_mode(genai_perf, triton_server, tiny_checkpoint, tmp_path, deterministic):
    arguments = ["-m", "ensemble", "--endpoint-type", "kserve", "--backend", "tensorrtllm", "--streaming",
                 "-u", triton_server.grpc_url]
    if deterministic:  # genai-perf sends min_length = max_tokens
        arguments.append("--output-tokens-mean-deterministic")
    summary, requests = profile(genai_perf, tmp_path / "artifacts", tiny_checkpoint, *arguments)
    answers = triton_answers(requests)
    assert all(a["finish_reason"] in ("length", "stop") for a in answers), answers
    same_stats(summary["input_sequence_length"], [a["prompt_tokens"] - 1 for a in answers])
    same_stats(summary["output_sequence_length"], text_tokens(tiny_checkpoint, [a["text"] for a in answers]))
    completions = [a["completion_tokens"] for a in answers]
    if deterministic:
        assert completions == [OUTPUT_TOKENS] * REQUESTS, answers
        assert {a["finish_reason"] for a in answers} == {"length"}
    else:
        assert all(1 <= n <= OUTPUT_TOKENS for n in completions), answers
    assert active_requests(triton_server) == 0


# ------------------------------------------------------------------ OpenAI modes, the gateway

def openai_answers(requests: list[dict], kind: str) -> list[dict]:
    """Per request: the streamed text, the final chunk's finish reason and usage."""
    answers = []
    for request in requests:
        text, finish, usage = "", None, None
        for output in request["response_outputs"]:
            for event in output["response"].split("\n\n"):
                data = event.removeprefix("data: ").strip()
                if not data or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                assert "error" not in chunk, chunk
                choice = chunk["choices"][0]
                text += choice["text"] if kind == "completions" else choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
                usage = chunk.get("usage") or usage
        assert finish and usage, f"a stream ended without its final chunk: {request}"
        answers.append({"payload": json.loads(request["request_inputs"]["payload"]), "text": text,
                        "finish_reason": finish, **usage})
    return answers


def test_genai_perf_openai_completions(genai_perf, base_gateway, tiny_checkpoint, tmp_path):
    # What vLLM users pass for a fixed output length: ignore_eos and min_tokens.
    summary, requests = profile(
        genai_perf, tmp_path / "artifacts", tiny_checkpoint, "-m", "mixtral", "--endpoint-type", "completions",
        "--streaming", "-u", base_gateway.url.removeprefix("http://"),
        "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{OUTPUT_TOKENS}")
    answers = openai_answers(requests, "completions")
    assert all(a["payload"]["max_tokens"] == OUTPUT_TOKENS for a in answers)
    assert [a["completion_tokens"] for a in answers] == [OUTPUT_TOKENS] * REQUESTS, answers
    assert {a["finish_reason"] for a in answers} == {"length"}
    same_stats(summary["input_sequence_length"], [a["prompt_tokens"] - 1 for a in answers])
    same_stats(summary["output_sequence_length"], text_tokens(tiny_checkpoint, [a["text"] for a in answers]))


def test_genai_perf_openai_chat(genai_perf, instruct, tiny_instruct_checkpoint, tmp_path):
    # The Instruct server: its tokenizer is the template's, so [INST] is one control token.
    summary, requests = profile(
        genai_perf, tmp_path / "artifacts", tiny_instruct_checkpoint, "-m", "mixtral-instruct",
        "--endpoint-type", "chat", "--streaming", "-u", instruct.url.removeprefix("http://"))
    answers = openai_answers(requests, "chat")
    assert all(1 <= a["completion_tokens"] <= OUTPUT_TOKENS for a in answers), answers
    # genai-perf counts the message's content; our prompt is the chat template around it.
    messages = [a["payload"]["messages"] for a in answers]
    theirs = text_tokens(tiny_instruct_checkpoint, [m[0]["content"] for m in messages])
    ours = [a["prompt_tokens"] for a in answers]
    assert ours == templated_tokens(tiny_instruct_checkpoint, messages), (ours, theirs)
    assert all(o > n for o, n in zip(ours, theirs)), (ours, theirs)
    same_stats(summary["input_sequence_length"], theirs)
    same_stats(summary["output_sequence_length"],
               text_tokens(tiny_instruct_checkpoint, [a["text"] for a in answers]))
