"""The C++ detokenizer backend (mixtral_triton.cpp_detokenizer) served for real: compiled
by the fill, loaded by the real Triton server as the ensemble's `postprocessing` in front of
the no-op stand-in engine, and checked against the text rules it implements
(mixtral_triton.text: the same token table, UTF-8 and stop-string rules): the same text
byte for byte at every length (cuts inside multi-byte characters included), whole
characters in every chunk, the same counts and finish reasons, many streams at once, and
stop strings cut where the character-based rules cut, wherever they fall."""

from __future__ import annotations

import asyncio

import pytest

from mixtral_triton.client import AsyncPredictClient, PredictClient
from mixtral_triton.launcher import TritonServer
from mixtral_triton.pipeline import build_repository
from mixtral_triton.protocol import parse_request
from mixtral_triton.standin import Pacing, TableModel
from mixtral_triton.text import TextStream, load_token_table

PROMPT = "Tell me about the wind."


@pytest.fixture(scope="module")
def cpp_server(tiny_checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("work-cpp-detokenizer")
    repository = build_repository(tiny_checkpoint, work, max_batch_size=64,
                                  standin=Pacing("H200-141GB", scale=0), log=lambda *_: None)
    with TritonServer(repository, log_file=work / "triton.log") as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """The text of the stand-in's first n tokens (its table, cycled), by the text rules;
    with stop strings, also the number of tokens read when the stop matched (or None)."""
    ids = TableModel.from_folders(tiny_checkpoint, tiny_checkpoint, Pacing(scale=0)).table
    table = load_token_table(tiny_checkpoint, True)

    def text(n: int, stops=(), include_stop=False):
        stream = TextStream(table, stops, include_stop)
        pieces, stopped_at = [], None
        for i in range(n):
            pieces.append(stream.push([ids[i % len(ids)]]))
            if stream.stopped:
                stopped_at = i + 1
                break
        pieces.append(stream.finish())
        return ("".join(pieces), stopped_at) if stops else "".join(pieces)

    return ids, text


def _chunks(server, max_tokens: int, stream: bool = True, **fields):
    client = PredictClient(server.grpc_url)
    request = parse_request({"prompt": PROMPT, "stream": stream, "max_tokens": max_tokens, **fields})
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


# Stops from the stand-in's text: a word, ones inside and across multi-byte characters
# (accents, emoji, a variation selector), across a newline, two ending together (the longer
# wins), one ending first though it starts later, and one that never comes.
STOPS = [["wind"], ["é c"], ["😀"], ["🌬️ —"], ["days.\nIn"], ["cold wind", "wind"], ["old", "strong, cold"],
         ["zzz"]]


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "one-response"])
@pytest.mark.parametrize("include_stop", [False, True], ids=["cut", "included"])
def test_stop_strings_cut_where_the_character_rules_cut(cpp_server, reference, stream, include_stop):
    ids, text = reference
    for stops in STOPS:
        want, stopped_at = text(len(ids), stops, include_stop)
        chunks = _chunks(cpp_server, len(ids), stream, stop=stops, include_stop_str_in_output=include_stop)
        assert "".join(c.text for c in chunks) == want, stops
        assert chunks[-1].finish_reason == ("stop" if stopped_at else "length"), stops
        # one token per engine response at this pace: the count ends with the stop's token
        assert chunks[-1].completion_tokens == (stopped_at or len(ids)), stops
        assert len(chunks) == 1 or stream, stops
