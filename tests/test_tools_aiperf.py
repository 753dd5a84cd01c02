"""aiperf 0.13.0 from PyPI (genai-perf's successor), as users run it, against the real CPU
server: its OpenAI `completions` and `chat` endpoint types on the gateway, streaming, and its
`template` endpoint type on Triton's HTTP generate_stream of the ensemble (aiperf 0.13.0 has
no KServe gRPC endpoint, so no `tensorrtllm` mode as genai-perf has). It lives in a venv of
its own (scripts/tools-venv.sh aiperf: its resolution takes numpy 2, ours pins 1.26).

Each run must finish with every request answered and no error, with time to first token and
inter-token latency measured, and its token counts must agree with ours:
 - input: aiperf's --synthetic-input-tokens-mean is the server's count, special tokens in (it
   draws the prompt one BOS shorter; for chat with --apply-chat-template, the template's
   tokens shorter), so our prompt_tokens is the requested count everywhere. Its reported
   input length is the prompt's (or message's) own tokens: ours less the BOS for completions,
   less the template's tokens for chat (see test_aiperf_chat); none for generate_stream.
 - output: aiperf re-tokenizes the text it received; its output lengths must be the count of
   our whole streamed text under our tokenizer (no piece lost or doubled on the way). It
   reads our `usage` too (it asks for stream_options.include_usage): its usage figures must be
   ours, and our completion_tokens the requested count (output length fixed: ignore_eos and
   min_tokens on the OpenAI routes, min_length on the ensemble). The text's count and the
   generated count differ on the random-weight fixture, whose output is no natural text.

aiperf 0.13.0 refuses a local tokenizer folder when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is
set (it looks the folder up as a hub id in the cache; ai-dynamo/aiperf pull request 1339): a
folder needs no hub, so the runs go without them.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import active_requests, same_stats, short_tmpdir, templated_tokens, text_tokens, tool_venv

REQUESTS = 8
INPUT_TOKENS = 24
OUTPUT_TOKENS = 32
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # see the module's docstring


@pytest.fixture(scope="module")
def aiperf() -> Path:
    return tool_venv("aiperf") / "bin" / "aiperf"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def profile(aiperf: Path, work: Path, tokenizer: Path, *arguments: str) -> tuple[dict, list[dict]]:
    """Run `aiperf profile`; its summary (profile_export_aiperf.json) and, per request, what
    it sent (`payload`), the JSON events it received (`events`) and its own per-request
    figures (profile_export.jsonl), each by name."""
    command = [str(aiperf), "profile", *arguments, "--streaming", "--tokenizer", str(tokenizer),
               "--request-count", str(REQUESTS), "--concurrency", "2",
               "--synthetic-input-tokens-mean", str(INPUT_TOKENS), "--synthetic-input-tokens-stddev", "0",
               "--output-tokens-mean", str(OUTPUT_TOKENS), "--random-seed", "0",
               "--artifact-dir", str(work), "--export-level", "raw", "--ui", "none", "--no-gpu-telemetry"]
    env = {name: value for name, value in os.environ.items() if name not in OFFLINE_FLAGS}
    with short_tmpdir() as tmp:  # its dataset's memory-mapped files, its sockets
        run = subprocess.run(command, env={**env, "TMPDIR": str(tmp)}, cwd=work.parent, capture_output=True,
                             text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    export = work / "profile_export_aiperf.json"
    assert export.exists(), (work / "logs" / "aiperf.log").read_text()[-6000:]  # it exits 0 even then
    summary = json.loads(export.read_text())
    assert summary["request_count"]["avg"] == REQUESTS, summary["request_count"]
    assert summary["request_error_rate"]["avg"] == 0 and not summary["error_summary"], summary["error_summary"]
    figures = {r["metadata"]["x_request_id"]: {name: m["value"] for name, m in r["metrics"].items()}
               for r in read_jsonl(work / "profile_export.jsonl")}
    requests = []
    for record in read_jsonl(work / "profile_export_raw.jsonl"):
        assert record["status"] == 200, record
        events = [json.loads(packet["value"]) for response in record["responses"] for packet in response["packets"]
                  if packet["name"] == "data" and packet["value"] != "[DONE]"]
        requests.append({"payload": record["payload"], "events": events,
                         "figures": figures[record["metadata"]["x_request_id"]]})
    assert len(requests) == len(figures) == REQUESTS
    for request in requests:  # streamed: both measured for every request
        assert {"time_to_first_token", "inter_token_latency"} <= request["figures"].keys(), request["figures"]
    assert {"time_to_first_token", "inter_token_latency"} <= summary.keys()
    return summary, requests


def figure(requests: list[dict], name: str) -> list[int]:
    """aiperf's per-request figure `name`, request by request."""
    return [int(r["figures"][name]) for r in requests]


# ------------------------------------------------------------------ OpenAI endpoint types, the gateway

def openai_answers(requests: list[dict], kind: str) -> list[dict]:
    """Per request: our streamed text, the final chunk's finish reason and usage."""
    answers = []
    for request in requests:
        text, finish, usage = "", None, None
        for chunk in request["events"]:
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:  # none in the usage chunk
                text += choice["text"] if kind == "completions" else choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
            usage = chunk.get("usage") or usage
        assert finish and usage, f"a stream ended without its final chunk: {request}"
        answers.append({"text": text, "finish_reason": finish, **usage})
    return answers


def check_openai_run(summary: dict, requests: list[dict], kind: str, tokenizer: Path) -> list[dict]:
    """The output length was fixed at OUTPUT_TOKENS, and aiperf's output and usage figures
    are ours; our answers."""
    answers = openai_answers(requests, kind)
    assert [a["completion_tokens"] for a in answers] == [OUTPUT_TOKENS] * REQUESTS, answers
    assert {a["finish_reason"] for a in answers} == {"length"}
    assert figure(requests, "usage_completion_tokens") == [a["completion_tokens"] for a in answers]
    assert figure(requests, "usage_prompt_tokens") == [a["prompt_tokens"] for a in answers]
    streamed = text_tokens(tokenizer, [a["text"] for a in answers])
    assert figure(requests, "output_sequence_length") == streamed, (answers, streamed)
    same_stats(summary["output_sequence_length"], streamed)
    return answers


def test_aiperf_completions(aiperf, base_gateway, tiny_checkpoint, tmp_path):
    # What vLLM users pass for a fixed output length: ignore_eos and min_tokens.
    summary, requests = profile(
        aiperf, tmp_path / "artifacts", tiny_checkpoint, "-m", "mixtral", "--endpoint-type", "completions",
        "-u", base_gateway.url, "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{OUTPUT_TOKENS}")
    assert all(r["payload"]["max_tokens"] == OUTPUT_TOKENS and r["payload"]["ignore_eos"] is True
               for r in requests), [r["payload"] for r in requests]
    answers = check_openai_run(summary, requests, "completions", tiny_checkpoint)
    assert [a["prompt_tokens"] for a in answers] == [INPUT_TOKENS] * REQUESTS, answers
    assert figure(requests, "input_sequence_length") == [INPUT_TOKENS - 1] * REQUESTS  # without the BOS
    same_stats(summary["input_sequence_length"], [INPUT_TOKENS - 1] * REQUESTS)


def test_aiperf_chat(aiperf, instruct, tiny_instruct_checkpoint, tmp_path):
    # The Instruct server: its tokenizer is the template's, so both count the same prompt.
    summary, requests = profile(
        aiperf, tmp_path / "artifacts", tiny_instruct_checkpoint, "-m", "mixtral-instruct",
        "--endpoint-type", "chat", "-u", instruct.url, "--apply-chat-template",
        "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{OUTPUT_TOKENS}")
    # aiperf asks with OpenAI's current name of the limit, max_completion_tokens.
    assert all(r["payload"]["max_completion_tokens"] == OUTPUT_TOKENS for r in requests), requests[0]["payload"]
    answers = check_openai_run(summary, requests, "chat", tiny_instruct_checkpoint)
    # With --apply-chat-template aiperf draws each message so that the prompt the template
    # renders ([INST], [/INST], the BOS) is INPUT_TOKENS long: what we count.
    messages = [r["payload"]["messages"] for r in requests]
    assert [a["prompt_tokens"] for a in answers] == templated_tokens(tiny_instruct_checkpoint, messages) \
        == [INPUT_TOKENS] * REQUESTS, answers
    # Its reported input lengths are the messages' own tokens all the same: aiperf 0.13.0
    # drops the templated count when apply_chat_template gives a BatchEncoding (as
    # transformers 5, its own pin, does) instead of a list, and counts the bare text.
    contents = [m[0]["content"] for m in messages]
    assert figure(requests, "input_sequence_length") == text_tokens(tiny_instruct_checkpoint, contents)


# ------------------------------------------------------------------ Triton's generate_stream, the ensemble

# The ensemble's tensors by name, as Triton's generate extension takes them.
GENERATE_TEMPLATE = '{"text_input": {{ text|tojson }}, "max_tokens": {{ max_tokens|tojson }}, "stream": true}'


def test_aiperf_triton_generate_stream(aiperf, triton_server, tiny_checkpoint, tmp_path):
    template = tmp_path / "generate_stream.json"  # a file: --extra-inputs splits an inline one at commas
    template.write_text(GENERATE_TEMPLATE)
    # The output length fixed as genai-perf's --output-tokens-mean-deterministic does: min_length.
    summary, requests = profile(
        aiperf, tmp_path / "artifacts", tiny_checkpoint, "-m", "ensemble", "--endpoint-type", "template",
        "-u", triton_server.http_url, "--custom-endpoint", "/v2/models/ensemble/generate_stream",
        "--extra-inputs", f"payload_template:{template}", "--extra-inputs", "response_field:text_output",
        "--extra-inputs", f"min_length:{OUTPUT_TOKENS}")
    assert all(r["payload"]["max_tokens"] == r["payload"]["min_length"] == OUTPUT_TOKENS for r in requests)
    lasts = [r["events"][-1] for r in requests]
    assert [e["completion_tokens"] for e in lasts] == [OUTPUT_TOKENS] * REQUESTS, lasts
    assert {e["finish_reason"] for e in lasts} == {"length"}
    # aiperf does not know `text_input` for a prompt, so it reports no input lengths here.
    assert [e["prompt_tokens"] for e in lasts] == [INPUT_TOKENS] * REQUESTS, lasts
    streamed = text_tokens(tiny_checkpoint, ["".join(e["text_output"] for e in r["events"]) for r in requests])
    assert figure(requests, "output_sequence_length") == streamed, streamed
    same_stats(summary["output_sequence_length"], streamed)
    assert active_requests(triton_server) == 0
