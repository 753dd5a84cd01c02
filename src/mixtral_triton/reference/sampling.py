"""Next-token choice with TensorRT-LLM's sampling semantics, for one request at a time.

Mirrors TensorRT-LLM's decoding layers (penalty kernel, ban-words layer, top-k/top-p
sampling layers) as far as a single-beam request can see them:

* defaults are TensorRT-LLM's: temperature 1, top_k 0, top_p 0, seed 0, penalties off;
* top_k == 0 and top_p == 0 means greedy (TensorRT-LLM turns it into top_k = 1), top_k > 0
  with top_p == 0 is plain top-k, top_k == 0 with top_p > 0 is plain top-p; in addition
  temperature 0 means greedy;
* order on the logits: temperature, repetition penalty, presence penalty, frequency
  penalty (all three over prompt and generated tokens), end id banned while fewer than
  min_tokens tokens were generated, bad words banned, then greedy or top-k/top-p sampling;
* every request draws from its own generator seeded with its seed, so a seed repeats its
  output whatever else runs in the batch;
* guided decoding (a compiled xgrammar grammar) masks the logits last, to the tokens the
  grammar allows (mixtral_triton.guided), and the grammar takes the chosen token;
* `log_prob` is the log probability of the chosen token in the distribution it was drawn
  from: greedy, the softmax of the processed logits (so it is the step's maximum);
  sampling, the top-k / top-p distribution renormalised over the tokens kept.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch

from mixtral_triton.errors import UserError
from mixtral_triton.guided import GrammarMask


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int = 0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise UserError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**64:
            raise UserError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.min_tokens < 0:
            raise UserError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if not self.repetition_penalty > 0.0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0.0 or (self.top_k == 0 and self.top_p == 0.0)


def generator_seed(seed: int) -> int:
    """The torch seed for a request's 64-bit seed. torch's CPU generator (mt19937) uses only
    the low 32 bits of its seed, so seeds that differ above bit 31 (0 and 2**32) would
    sample alike, while TensorRT-LLM's curand uses all 64: fold all of them into those 32."""
    return int.from_bytes(hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=4).digest(), "little")


class TokenSampler:
    """Chooses the next tokens of one request; keeps its sequence, token counts and generator."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int], vocab_size: int,
                 end_id: int | None = None, bad_words: Sequence[Sequence[int]] = (), grammar=None):
        self.params = params
        self._grammar = GrammarMask(grammar, vocab_size) if grammar is not None else None
        self.log_prob = 0.0  # of the last token chosen
        self._end_id = end_id
        self._bad_words = [list(word) for word in bad_words]
        self._sequence = list(prompt)  # prompt and generated tokens, as the ban-words layer sees them
        self._generated = 0
        self._penalised = (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
                           or params.frequency_penalty != 0.0)
        self._counts = torch.bincount(torch.tensor(prompt, dtype=torch.long), minlength=vocab_size).float()
        self._generator = torch.Generator().manual_seed(generator_seed(params.seed))

    def choose(self, logits: torch.Tensor) -> int:
        """Pick the next token from the float32 [vocab] logits and record it as generated."""
        p = self.params
        logits = logits.float().clone()
        if p.temperature not in (0.0, 1.0):  # scaled even when greedy: it changes what penalties do
            logits /= p.temperature
        if self._penalised:
            seen = self._counts > 0
            scaled = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
            logits = torch.where(seen, scaled - p.presence_penalty, logits) - p.frequency_penalty * self._counts
        if self._end_id is not None and self._generated < p.min_tokens:
            logits[self._end_id] = float("-inf")
        for word in self._bad_words:
            # A bad word is banned when the sequence ends with all of it but its last token.
            if len(word) == 1 or self._sequence[-(len(word) - 1):] == word[:-1]:
                logits[word[-1]] = float("-inf")
        if self._grammar is not None:
            allowed = self._grammar.apply(torch.zeros_like(logits))
            logits = logits + allowed
            if not torch.isfinite(logits).any():  # min_tokens or a bad word banned all it allows:
                logits = allowed  # the grammar wins, evenly over what it allows
        if p.greedy:
            token = int(logits.argmax())
            self.log_prob = float(logits.log_softmax(-1)[token])
        else:
            token, self.log_prob = self._sample(logits)
        if self._grammar is not None:
            self._grammar.accept(token)
        self._sequence.append(token)
        self._generated += 1
        self._counts[token] += 1
        return token

    @property
    def terminated(self) -> bool:
        """The request's grammar is complete: the sequence ends here."""
        return self._grammar is not None and self._grammar.terminated

    def _sample(self, logits: torch.Tensor) -> tuple[int, float]:
        p = self.params
        probs, order = logits.softmax(dim=-1).sort(descending=True)
        if p.top_k > 0:
            probs, order = probs[:p.top_k], order[:p.top_k]
        probs = probs / probs.sum()
        if 0.0 < p.top_p < 1.0:
            # Keep the most likely tokens until their mass reaches top_p (at least one).
            keep = int((probs.cumsum(0) < p.top_p).sum()) + 1
            probs, order = probs[:keep] / probs[:keep].sum(), order[:keep]
        # Drawn in vocabulary order, not in the sorted order: near-equal probabilities swap
        # places in a sort under the last-bit differences a batch's packing makes, which
        # would change the token a seed draws whatever else runs beside it.
        kept = torch.zeros(logits.shape[-1], dtype=probs.dtype)
        kept[order] = probs
        token = int(torch.multinomial(kept, 1, generator=self._generator))
        return token, float(kept[token].log())
