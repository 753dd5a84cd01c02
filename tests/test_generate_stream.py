"""The detokenizer's engine token streams over Triton's HTTP generate_stream
(mixtral_triton.ensemble_models.generate_stream), against the real server: the same token
ids as the engine's gRPC stream, the answer parsed however the bytes are split, a
connection reused by the next stream and closed once idle (an open one would hold the
server's shutdown), and the server's errors raised with its message."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from mixtral_triton.ensemble_models.engine_request import new_token_ids
from mixtral_triton.ensemble_models.generate_stream import (IDLE_CLOSE_S, GenerateStreamClient, GenerateStreamError,
                                                            _Stream, request_body)
from test_serving import engine_token_ids

PROMPT = "The history of the world in brief:"
MAX_TOKENS = 12


def _engine_inputs(prompt_ids: list[int], max_tokens: int, end_id: int) -> dict[str, np.ndarray]:
    """The engine request of test_serving.engine_token_ids (greedy, streaming)."""
    return {"input_ids": np.array([prompt_ids], np.int32), "input_lengths": np.array([[len(prompt_ids)]], np.int32),
            "request_output_len": np.array([[max_tokens]], np.int32), "end_id": np.array([[end_id]], np.int32),
            "streaming": np.array([[True]], np.bool_), "runtime_top_k": np.array([[1]], np.int32)}


@pytest.fixture(scope="module")
def request_inputs(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    ids = tokenizer.encode(PROMPT)
    return ids, tokenizer.eos_token_id, _engine_inputs(ids, MAX_TOKENS, tokenizer.eos_token_id)


def _address(server) -> tuple[str, int]:
    host, _, port = server.http_url.rpartition(":")
    return host, int(port)


def _raw_answer(server, body: bytes) -> bytes:
    """The server's whole answer to one generate_stream request, as bytes off the socket."""
    host, port = _address(server)
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(b"POST /v2/models/tensorrt_llm/generate_stream HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


class _Transport:
    """What the parser needs of a transport when fed bytes by hand: to be closed."""

    closed = False

    def close(self) -> None:
        self.closed = True


def _parse(pieces: list[bytes]) -> _Stream:
    stream = _Stream()
    stream.connection_made(_Transport())
    for piece in pieces:
        stream.data_received(piece)
    return stream


def test_token_ids_equal_the_engines_own_grpc_stream(triton_server, request_inputs):
    ids, eos, inputs = request_inputs
    expected = engine_token_ids(triton_server.grpc_url, ids, MAX_TOKENS, eos)

    async def streamed(request_id: str) -> list[int]:
        client = GenerateStreamClient("tensorrt_llm", *_address(triton_server))
        return [t async for batch in client.events(inputs, request_id) for r in batch for t in new_token_ids(r)]

    assert asyncio.run(streamed("gs-1")) == expected and asyncio.run(streamed("gs-2")) == expected


def test_the_next_stream_reuses_the_connection_and_an_idle_one_closes(triton_server, request_inputs):
    """Triton's shutdown waits for every open HTTP connection up to its exit timeout, so an
    idle one must close; until then the next stream saves a connect."""
    _, _, inputs = request_inputs
    port = _address(triton_server)[1]

    def connections_to_server() -> set[str]:
        """The local ends of established TCP connections to the server's HTTP port (/proc/net/tcp)."""
        rows = [row.split() for row in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        return {row[1] for row in rows if row[2].endswith(f":{port:04X}") and row[3] == "01"}

    before = connections_to_server()
    seen: list[set[str]] = []

    async def run() -> None:
        client = GenerateStreamClient("tensorrt_llm", *_address(triton_server))
        for request_id in ("gs-open-1", "gs-open-2"):
            async for _ in client.events(inputs, request_id):
                pass
            seen.append(connections_to_server() - before)
        await asyncio.sleep(IDLE_CLOSE_S + 0.5)
        seen.append(connections_to_server() - before)

    asyncio.run(run())
    assert len(seen[0]) == 1 and seen[1] == seen[0]  # kept after the first stream, reused by the second
    assert seen[2] == set()  # closed once idle


def test_the_answer_parses_the_same_however_its_bytes_are_split(triton_server, request_inputs):
    ids, eos, inputs = request_inputs
    answer = _raw_answer(triton_server, request_body(inputs, "gs-split"))
    assert b"Transfer-Encoding: chunked" in answer and answer.endswith(b"0\r\n\r\n")
    whole = _parse([answer])
    assert whole.done and whole.error is None
    events = list(whole.events)
    assert [t for e in events for t in new_token_ids(e)] == engine_token_ids(triton_server.grpc_url, ids,
                                                                              MAX_TOKENS, eos)
    for cut in range(1, len(answer)):
        split = _parse([answer[:cut], answer[cut:]])
        assert split.done and split.error is None and list(split.events) == events, cut
    assert list(_parse([answer[i:i + 1] for i in range(len(answer))]).events) == events


def test_a_server_error_is_raised_with_its_message(triton_server, request_inputs):
    _, _, inputs = request_inputs

    async def refused(model_inputs):
        client = GenerateStreamClient("tensorrt_llm", *_address(triton_server))
        with pytest.raises(GenerateStreamError) as raised:
            async for _ in client.events(model_inputs, "gs-bad"):
                pass
        return str(raised.value)

    # Refused by the server before any streaming (an error status with a JSON body) ...
    message = asyncio.run(refused({**inputs, "input_ids": np.array([[1.5]], np.float32)}))
    assert message.startswith("Unable to parse 'data'"), message
    # ... and by the engine itself, as a streamed error event.
    message = asyncio.run(refused({**inputs, "end_id": np.array([[10**6]], np.int32)}))
    assert message.startswith("[invalid_argument] end_id must be in [0, ") and "got 1000000" in message, message


def test_a_connection_closed_mid_answer_ends_the_stream_with_an_error(triton_server, request_inputs):
    _, _, inputs = request_inputs
    answer = _raw_answer(triton_server, request_body(inputs, "gs-cut"))
    stream = _parse([answer[:len(answer) // 2]])
    stream.connection_lost(None)
    assert stream.done and isinstance(stream.error, ConnectionError)
