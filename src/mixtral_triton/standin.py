"""A stand-in for the GPU engine in CPU load tests: no math, tokens from a fixed table, each
step as long as the decode roofline says the GPU's would be.

It plugs into the same in-flight-batching Engine as the reference model (admission up to
max_batch_size, cancellation, queue bound, stop words, max_seq_len), so the whole serving
pipeline in front of it runs as it would in front of the real engine, and only the engine's
arithmetic is replaced by a wait:

* every request generates the table's tokens in order (cycling), whatever its prompt; the
  table is a fixed text with spaces, punctuation, accents and emoji (byte-fallback tokens,
  so split UTF-8 reaches the detokenizer), encoded once by the repository's tokenizer;
* a step of a batch of B sequences of mean context C takes
  ``pace_scale x mixtral_triton.roofline.decode_step_seconds(gpu, B, C, tp)``, measured from
  the end of the previous step, so the engine thread's own work (handing out the tokens)
  overlaps the wait as the host overlaps the GPU; ``pace_scale`` 0 is the no-op stand-in
  that emits as fast as the engine loop turns. Prefill is not paced (at 128-token prompts
  it is a small share of a decode-bound step).

CPU repositories only (``--cpu-engine standin``): it is never part of the GPU path.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mixtral_triton.errors import UserError
from mixtral_triton.roofline import decode_step_seconds

# Text whose tokens the stand-in emits: words with their leading spaces, a newline,
# punctuation, accented letters and emoji, so that streamed text must be decoded exactly.
TABLE_TEXT = ("The mistral is a strong, cold wind that blows from the north over the Rhône "
              "valley to the Gulf of Lion. Café crème, naïve façade: 😀 🌬️ — it can last "
              "for days.\nIn winter it brings clear skies; in summer, fires. ")


@dataclass(frozen=True)
class Pacing:
    """The GPU whose decode steps the stand-in imitates; scale 0: no waiting at all."""

    gpu: str = "H100-80GB"
    tp: int = 4
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.scale >= 0:
            raise UserError(f"the stand-in's pace scale must be >= 0, got {self.scale}")
        if self.scale:
            decode_step_seconds(self.gpu, 1, 1, self.tp)  # an unknown GPU is refused here, not mid-run

    def step_seconds(self, contexts: Sequence[int]) -> float:
        if not self.scale or not contexts:
            return 0.0
        mean_context = max(1, round(sum(contexts) / len(contexts)))
        return self.scale * decode_step_seconds(self.gpu, len(contexts), mean_context, self.tp)


@dataclass(frozen=True)
class _Config:
    vocab_size: int


class TableSequence:
    """What the stand-in keeps of a sequence: its length, which picks its next table token."""

    def __init__(self) -> None:
        self.length = 0  # prompt + generated tokens so far
        self.generated = 0


class TableSampler:
    """The Engine's sampler for the stand-in: the step already chose the token, with
    certainty (log probability 0). It has no grammar: guided decoding is refused before."""

    log_prob = 0.0
    terminated = False

    @staticmethod
    def choose(token: int) -> int:
        return token


class TableModel:
    """The model interface the Engine steps (``config.vocab_size``, ``new_sequence``,
    ``step``), answering each sequence with its next table token after the paced wait."""

    def __init__(self, table: Sequence[int], vocab_size: int, pacing: Pacing = Pacing()):
        if not table:
            raise UserError("the stand-in's token table is empty")
        if any(not 0 <= t < vocab_size for t in table):
            raise UserError(f"the stand-in's token table must hold ids in [0, {vocab_size})")
        self.config = _Config(vocab_size)
        self.table = tuple(table)
        self.pacing = pacing
        self._previous_end = 0.0

    @classmethod
    def from_folders(cls, tokenizer_dir: str | Path, checkpoint_dir: str | Path, pacing: Pacing) -> "TableModel":
        """The table encoded by the repository's tokenizer; the vocabulary from the checkpoint."""
        from tokenizers import Tokenizer  # what the detokenizer reads too; no torch import

        tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise UserError(f"the stand-in engine needs {tokenizer_file}")
        table = Tokenizer.from_file(str(tokenizer_file)).encode(TABLE_TEXT, add_special_tokens=False).ids
        config = json.loads((Path(checkpoint_dir) / "config.json").read_text(encoding="utf-8"))
        return cls(table, int(config["vocab_size"]), pacing)

    @staticmethod
    def new_sampler(request) -> TableSampler:
        return TableSampler()

    @staticmethod
    def new_sequence() -> TableSequence:
        return TableSequence()

    def step(self, tokens: Sequence[Sequence[int]], caches: Sequence[TableSequence]) -> list[int]:
        for new, cache in zip(tokens, caches):
            cache.length += len(new)
        wait = self.pacing.step_seconds([c.length for c in caches])
        if wait:
            start = max(time.monotonic(), self._previous_end)
            self._previous_end = start + wait
            left = self._previous_end - time.monotonic()
            if left > 0:
                time.sleep(left)
        chosen = []
        for cache in caches:
            chosen.append(self.table[cache.generated % len(self.table)])
            cache.generated += 1
        return chosen
