"""The C++ detokenizer backend (mixtral_triton.cpp_detokenizer) served for real: compiled
here, loaded by the real Triton server as the ensemble's `postprocessing` in front of the
no-op stand-in engine, and checked against the Python detokenizer's own logic (the same
token table and UTF-8 rules): the same text byte for byte at every length (cuts inside
multi-byte characters included), whole characters in every chunk, the same counts and
finish reasons, many streams at once, and what it does not serve yet refused by name."""

from __future__ import annotations

import asyncio

import pytest

from mixtral_triton.client import AsyncPredictClient, PredictClient
from mixtral_triton.cpp_detokenizer import build, with_cpp_detokenizer
from mixtral_triton.ensemble_models.completion import Completion
from mixtral_triton.launcher import TritonServer
from mixtral_triton.pipeline import build_repository
from mixtral_triton.protocol import RequestError, parse_request
from mixtral_triton.standin import Pacing, TableModel
from mixtral_triton.text import load_token_table

PROMPT = "Tell me about the wind."


@pytest.fixture(scope="module")
def cpp_server(tiny_checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("work-cpp-detokenizer")
    repository = build_repository(tiny_checkpoint, work / "python", max_batch_size=64,
                                  standin=Pacing("H200-141GB", scale=0), log=lambda *_: None)
    cpp = with_cpp_detokenizer(repository, tiny_checkpoint, work / "cpp-repository", build(work / "lib"))
    with TritonServer(cpp, log_file=work / "triton.log") as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """What the Python detokenizer makes of the stand-in's first n tokens (its table, cycled)."""
    ids = TableModel.from_folders(tiny_checkpoint, tiny_checkpoint, Pacing(scale=0)).table
    table = load_token_table(tiny_checkpoint, True)

    def text(n: int) -> str:
        completion = Completion(table, [], n, prompt_tokens=0)
        streamed = "".join(completion.add([ids[i % len(ids)]]) for i in range(n))
        return streamed + completion.finish()[0]

    return ids, text


def _chunks(server, max_tokens: int, stream: bool = True):
    client = PredictClient(server.grpc_url)
    request = parse_request({"prompt": PROMPT, "stream": stream, "max_tokens": max_tokens})
    return list(client.generate(request))


def test_every_length_streams_the_python_detokenizers_text(cpp_server, reference):
    ids, text = reference
    for n in range(1, len(ids) + 4):
        chunks = _chunks(cpp_server, n)
        # gRPC carries each chunk as bytes and the client decodes it strictly: a chunk that
        # split a character would have raised there
        assert "".join(c.text for c in chunks) == text(n), n
        assert not any(c.finish_reason for c in chunks[:-1]) and chunks[-1].finish_reason == "length", n
        assert chunks[-1].completion_tokens == n and chunks[-1].prompt_tokens > 0, n


def test_a_request_not_streamed_gets_one_response_with_the_whole_text(cpp_server, reference):
    ids, text = reference
    chunks = _chunks(cpp_server, len(ids), stream=False)
    assert len(chunks) == 1
    assert (chunks[0].text, chunks[0].finish_reason, chunks[0].completion_tokens) == (text(len(ids)), "length",
                                                                                       len(ids))


def test_many_streams_at_once_each_get_their_own_text(cpp_server, reference):
    _, text = reference
    lengths = [5 + (i * 7) % 60 for i in range(64)]

    async def run():
        async with AsyncPredictClient(cpp_server.grpc_url) as client:
            async def one(n: int) -> str:
                return "".join([piece async for piece in await client.predict(PROMPT, max_tokens=n)])

            return await asyncio.gather(*(one(n) for n in lengths))

    assert asyncio.run(run()) == [text(n) for n in lengths]


def test_what_it_does_not_serve_yet_is_refused_naming_the_field(cpp_server):
    client = PredictClient(cpp_server.grpc_url)
    with pytest.raises(RequestError) as refused:
        client.predict(PROMPT, stream=False, max_tokens=8, stop=["wind"])
    assert refused.value.field == "stop_strings" and "not served by the C++ detokenizer" in str(refused.value)
    # the server goes on serving
    assert _chunks(cpp_server, 3)[-1].finish_reason == "length"
