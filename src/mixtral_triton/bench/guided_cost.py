"""Guided decoding's extra cost per token on the CPU reference engine: the same decode
steps of the tiny model timed with and without an xgrammar mask, and the mask's own work
(fill the allowed-token bitmask, apply it, accept the token) timed alone, in one process,
one torch thread, the two variants alternated round by round.

    .venv/bin/python -m mixtral_triton.bench.guided_cost CHECKPOINT_DIR TOKENIZER_DIR

CHECKPOINT_DIR is a converted TensorRT-LLM checkpoint (e.g. the local stack's
trtllm-checkpoint-tp4), TOKENIZER_DIR the Hugging Face folder with its tokenizer."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mixtral_triton.guided import GrammarCompiler, GrammarMask
from mixtral_triton.protocol.guided import Guide
from mixtral_triton.reference import ReferenceModel
from mixtral_triton.reference.sampling import SamplingParams, TokenSampler

# A regex whose grammar stays open for the whole run, so every step is masked.
GUIDE = Guide("regex", "[a-z ]{100000}")
SCHEMA = Guide("json_schema", json.dumps({"type": "object", "properties": {
    "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}}))


def _decode(model, compiled, tokens: int, vocab: int) -> float:
    """Seconds per greedy decode step (model step + sampler, with the mask when compiled)."""
    sampler = TokenSampler(SamplingParams(top_k=1), [1], vocab, grammar=compiled)
    cache, feed = model.new_sequence(), [1, 1820, 338]
    model.step([feed], [cache])  # the prompt's prefill, not timed
    feed = [sampler.choose(model.step([[1]], [cache])[0])]
    start = time.perf_counter()
    for _ in range(tokens):
        feed = [sampler.choose(model.step([feed], [cache])[0])]
    return (time.perf_counter() - start) / tokens


def _mask_alone(compiled, vocab: int, tokens: int = 1000) -> float:
    """Seconds per token of the mask's own work: fill the bitmask, apply it, accept a token."""
    mask = GrammarMask(compiled, vocab)
    start = time.perf_counter()
    for _ in range(tokens):
        mask.accept(int(mask.apply(torch.zeros(vocab)).argmax()))
    return (time.perf_counter() - start) / tokens


def measure(checkpoint_dir, tokenizer_dir, tokens: int = 64, rounds: int = 5) -> dict:
    """The figures (medians over `rounds` alternated rounds of `tokens` greedy steps)."""
    torch.set_num_threads(1)
    model = ReferenceModel.from_trtllm_checkpoint(checkpoint_dir)
    vocab = model.config.vocab_size
    compiler = GrammarCompiler.from_folder(tokenizer_dir, vocab)
    t = time.perf_counter()
    compiled = compiler.compile(GUIDE)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    compiler.compile(SCHEMA)
    schema_compile_s = time.perf_counter() - t
    plain, guided, mask = [], [], []
    for _ in range(rounds):  # alternated, so that the machine's load falls on both alike
        plain.append(_decode(model, None, tokens, vocab))
        guided.append(_decode(model, compiled, tokens, vocab))
        mask.append(_mask_alone(compiled, vocab))
    ratios = sorted(g / p for g, p in zip(guided, plain))
    return {
        "guide": GUIDE.text, "tokens_per_round": tokens, "rounds": rounds, "vocab": vocab,
        "step_ms_plain_median": 1e3 * statistics.median(plain),
        "step_ms_guided_median": 1e3 * statistics.median(guided),
        "guided_over_plain": statistics.median(ratios),
        "guided_over_plain_range": [ratios[0], ratios[-1]],
        "mask_alone_ms_median": 1e3 * statistics.median(mask),
        "compile_regex_ms": 1e3 * compile_s, "compile_schema_ms": 1e3 * schema_compile_s,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir")
    parser.add_argument("tokenizer_dir")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.checkpoint_dir, args.tokenizer_dir, args.tokens, args.rounds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
