"""Stop words and bad words as TensorRT-LLM's `stop_words_list` / `bad_words_list`.

The format (triton_backend/all_models/inflight_batcher_llm/preprocessing/1/model.py of
TensorRT-LLM, whose tensorrt_llm model takes it as TYPE_INT32 dims [2, -1]): per request
an int32 array [2, N]; row 0 holds the token ids of all words one after another, row 1
the end offset of each word in row 0, padded with -1 to N. A request's array goes out
with a batch axis, [1, 2, N]; no words at all is [2, 0], as that preprocessing sends.

A word must be tokenized as it appears *in the generated text*, or the engine never
sees it. SentencePiece marks a space before a word with '▁' in the same token
('▁Paris'), and encoding a word alone also prepends '▁'. So every word is encoded as
it reads after a newline (a byte-fallback token that never merges with what follows),
and then:
- a word that starts with whitespace is encoded only that way (' Paris' -> '▁Paris');
- any other word gets both of its in-context forms: glued to what precedes it
  ('Paris' in '(Paris' -> 'Par', 'is') and after a space ('▁Paris').
Token-level matching remains approximate (tokens can merge across the word's end, as
in ' Parisian'); the exact cut is the text-level StopMatcher, which the engine's stop
words only help to reach early.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_ANCHOR = "\n"


def word_token_ids(tokenizer, word: str) -> list[list[int]]:
    """The token id sequences under which `word` can appear in generated text."""
    if not word:
        raise ValueError("a stop or bad word must be non-empty")
    forms = [word] if word[0].isspace() else [word, " " + word]
    variants = []
    for form in forms:
        ids = _in_context(tokenizer, form)
        if ids not in variants:
            variants.append(ids)
    return variants


def _in_context(tokenizer, text: str) -> list[int]:
    # A word is text: '</s>' in it means those characters, not the end-of-sequence token.
    def encode(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False, split_special_tokens=True)

    anchor = encode(_ANCHOR)
    ids = encode(_ANCHOR + text)
    if ids[:len(anchor)] != anchor or len(ids) == len(anchor):
        raise ValueError(f"cannot tokenize {text!r} apart from the text before it")
    return ids[len(anchor):]


def words_list(tokenizer, words: Sequence[str], token_words: Sequence[Sequence[int]] = ()) -> np.ndarray:
    """The [2, N] int32 array for TensorRT-LLM; [2, 0] when there are no words.
    `token_words` are words given as token ids already (vLLM's stop_token_ids)."""
    flat: list[int] = []
    ends: list[int] = []
    sequences = [ids for word in words for ids in word_token_ids(tokenizer, word)]
    for ids in sequences + [list(word) for word in token_words]:
        flat.extend(ids)
        ends.append(len(flat))
    # Every form has at least one id, so row 1 never needs more room than row 0.
    return np.array([flat, ends + [-1] * (len(flat) - len(ends))], dtype=np.int32).reshape(2, -1)
