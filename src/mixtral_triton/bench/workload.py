"""Prompts of an exact token length, and the engine request the serving path makes of them.

A prompt is a run of common words, each one token after the tokenizer's word-start marker,
drawn from a fixed seed; it is re-tokenized and trimmed until the tokenizer model
(preprocessing, same tokenizer, same `add_special_tokens`) makes exactly N tokens of it.
The engine-alone path sends the very tensors the postprocessing model sends the engine for
that prompt (mixtral_triton.ensemble_models: Preprocessor.prepare, then engine_inputs), so every
path asks the engine for the same work.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixtral_triton.errors import UserError


@dataclass(frozen=True)
class Shape:
    input_tokens: int
    output_tokens: int

    @property
    def label(self) -> str:
        return f"{self.input_tokens}/{self.output_tokens}"


@dataclass(frozen=True)
class Prompt:
    text: str
    token_ids: tuple[int, ...]


def _single_token_words(tokenizer) -> list[str]:
    words = []
    for piece in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        if piece and piece.startswith("\u2581") and re.fullmatch(r"[a-z]{3,9}", piece[1:]):
            words.append(piece[1:])
    return sorted(words)


def make_prompts(tokenizer, tokens: int, count: int, seed: int = 0,
                 add_special_tokens: bool = True) -> list[Prompt]:
    """`count` distinct prompts of exactly `tokens` tokens (BOS included when the tokenizer
    model adds it)."""
    vocabulary = _single_token_words(tokenizer)
    if len(vocabulary) < 100:
        raise UserError("the tokenizer has too few single-token words to build prompts")
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        words = [rng.choice(vocabulary) for _ in range(tokens + 8)]
        for _ in range(4 * tokens):
            ids = tokenizer.encode(" ".join(words), add_special_tokens=add_special_tokens)
            if len(ids) == tokens:
                break
            if len(ids) > tokens:
                words.pop()
            else:
                words.append(rng.choice(vocabulary))
        else:
            raise UserError(f"could not build a prompt of exactly {tokens} tokens")
        prompts.append(Prompt(" ".join(words), tuple(ids)))
    return prompts


class EngineRequests:
    """The engine inputs the serving path derives from an ensemble request."""

    def __init__(self, tokenizer_dir: Path, max_input_len: int, max_seq_len: int,
                 add_special_tokens: bool = True):
        from mixtral_triton.ensemble_models.preprocess import Preprocessor

        self.preprocessor = Preprocessor(tokenizer_dir, max_input_len, max_seq_len, add_special_tokens)

    def arrays(self, ensemble_arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mixtral_triton.ensemble_models.engine_request import engine_inputs

        prepared = self.preprocessor.prepare(ensemble_arrays)
        return engine_inputs({name.upper(): value for name, value in prepared.items()})


def ensemble_arrays(prompt: Prompt, shape: Shape) -> dict[str, np.ndarray]:
    """The ensemble request of the benchmark: greedy (no sampling field: TensorRT-LLM's
    default), streaming, exactly `output_tokens` tokens (min_tokens = max_tokens)."""
    return {
        "text_input": np.array([[prompt.text.encode("utf-8")]], dtype=object),
        "max_tokens": np.array([[shape.output_tokens]], np.int32),
        "min_tokens": np.array([[shape.output_tokens]], np.int32),
        "stream": np.array([[True]], np.bool_),
        "seed": np.array([[0]], np.uint64),
    }


def http_generate_body(prompt: Prompt, shape: Shape) -> dict:
    """The same request as JSON for Triton's /v2/models/ensemble/generate_stream."""
    return {"text_input": prompt.text, "max_tokens": shape.output_tokens,
            "min_tokens": shape.output_tokens, "stream": True, "seed": 0}


def predict_body(prompt: Prompt, shape: Shape) -> dict:
    """The gateway's /predict (Truss schema): no min_tokens there, so greedy decoding
    (temperature 0) on prompts checked beforehand to run to max_tokens without an end token."""
    return {"prompt": prompt.text, "stream": True, "max_tokens": shape.output_tokens,
            "temperature": 0.0, "seed": 0}


def seed_predict_body(prompt: Prompt, shape: Shape) -> dict:
    """The seed's /predict request (the Truss schema) with vLLM's ignore_eos and min_tokens, so
    that every request streams exactly shape.output_tokens tokens, whatever the engine."""
    return {"prompt": prompt.text, "stream": True, "max_tokens": shape.output_tokens,
            "min_tokens": shape.output_tokens, "ignore_eos": True}
