"""256 concurrent streams through the ensemble on one CPU server (issue 12): every stream is
complete and byte-exact, with bounded memory. The detokenizer (postprocessing, the C++
backend) runs inside tritonserver, so its memory per stream is the server process's growth.

The server has its own repository: the reference engine batches 256 requests (the session
server's batch is 8, so 248 of them would wait in the engine's queue instead of streaming).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mixtral_triton.client import AsyncPredictClient
from mixtral_triton.launcher import TritonServer
from mixtral_triton.protocol import parse_request
from mixtral_triton.soak import rss_kib

STREAMS = 256
MAX_TOKENS = 16
MAX_RSS_PER_STREAM_KIB = 2 * 1024  # the bound on memory per additional stream
# Accents, CJK and emoji (byte-fallback tokens: characters split across tokens), and
# prompts of different lengths, so that the batch mixes them.
SUBJECTS = ["the sea", "crème brûlée", "東京の天気", "rockets 🚀 and pizza 🍕", "a long winter night in the north"]


def prompt(i: int) -> str:
    return f"Story {i} about {SUBJECTS[i % len(SUBJECTS)]}:" + " and then" * (i % 7)


@pytest.fixture(scope="module")
def wide_server(cpu_repository, tiny_checkpoint, tmp_path_factory):
    from mixtral_triton.repository.fill import Settings, fill_repository

    work = tmp_path_factory.mktemp("many-streams")
    settings = Settings(target="cpu", tokenizer_dir=tiny_checkpoint, max_batch_size=STREAMS,
                        checkpoint_dir=cpu_repository.parent / "trtllm-checkpoint-tp4")
    server = TritonServer(fill_repository(settings, work / "repository"), log_file=work / "triton.log")
    server.start()
    yield server
    server.stop()


async def _all(url: str, stream: bool) -> list[tuple[str, list[str], str, int]]:
    """Every request at once: (whole text, its chunks, finish reason, completion tokens)."""
    async with AsyncPredictClient(url, timeout_s=600) as client:
        async def one(i: int):
            request = parse_request({"prompt": prompt(i), "stream": stream, "max_tokens": MAX_TOKENS,
                                     "temperature": 0})
            chunks = [chunk async for chunk in client.generate(request)]
            texts = [chunk.text for chunk in chunks]
            return "".join(texts), texts, chunks[-1].finish_reason, chunks[-1].completion_tokens

        return await asyncio.gather(*(one(i) for i in range(STREAMS)))


def test_256_concurrent_streams_are_complete_and_byte_exact(wide_server):
    server_pid = wide_server.process.pid  # tritonserver, the detokenizer inside it
    asyncio.run(_all(wide_server.grpc_url, stream=True))  # warm-up: channels, allocator pools
    before = rss_kib(server_pid)
    peak = before
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(server_pid) or 0)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        streamed = asyncio.run(_all(wide_server.grpc_url, stream=True))
    finally:
        done.set()
        sampler.join()
    whole = asyncio.run(_all(wide_server.grpc_url, stream=False))

    for i, ((text, chunks, reason, tokens), (reference, _, reference_reason, reference_tokens)) in \
            enumerate(zip(streamed, whole)):
        assert reason in ("stop", "length"), (i, reason)
        assert 1 <= tokens <= MAX_TOKENS and (reason == "stop" or tokens == MAX_TOKENS), (i, reason, tokens)
        assert (text, reason, tokens) == (reference, reference_reason, reference_tokens), i
        for chunk in chunks:
            chunk.encode("utf-8")  # whole characters only: no half of a split character
    assert sum(reason == "length" for _, _, reason, _ in streamed) > STREAMS // 2
    assert len({text for text, *_ in streamed}) > STREAMS // 2, "the prompts should give different texts"
    growth_kib = peak - before
    print(f"\ntritonserver RSS before {before} KiB, peak {peak} KiB: {growth_kib / STREAMS:.1f} KiB per stream")
    assert growth_kib / STREAMS <= MAX_RSS_PER_STREAM_KIB
    assert wide_server.process.poll() is None and wide_server.process.pid == server_pid
