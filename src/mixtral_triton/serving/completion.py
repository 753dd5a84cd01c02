"""One request's completion as the streaming detokenizer sees it: engine tokens in, text
and (at the end) the finish reason and token counts out."""

from __future__ import annotations

from typing import Sequence

from mixtral_triton.text import TextStream

FINISH_REASONS = ("stop", "length", "cancelled")


class Completion:
    """State of one generation, kept for the life of its stream (never shared or keyed).

    The engine reports only tokens: it leaves the end id out of its output and has no
    finish reason. What ended the generation follows from what this object saw: a stop
    string, all of max_tokens, or else the engine stopping by itself (end id or its stop
    word lists) - unless the caller cancelled it.
    """

    def __init__(self, table: Sequence[bytes], stop_strings: Sequence[str], max_tokens: int,
                 prompt_tokens: int):
        self._text = TextStream(table, stop_strings)
        self.max_tokens = max_tokens
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    @property
    def stopped(self) -> bool:
        """A stop string matched: the caller should stop the engine; no more text follows."""
        return self._text.stopped

    def add(self, token_ids: Sequence[int]) -> str:
        if self.stopped:
            return ""  # tokens the engine made before it heard the stop are not counted
        self.completion_tokens += len(token_ids)
        return self._text.push(token_ids)

    def finish(self, cancelled: bool = False) -> tuple[str, str]:
        """The text held back until the end, and the finish reason."""
        if cancelled and not self.stopped:
            return "", "cancelled"
        text = self._text.finish()
        if self.stopped:
            return text, "stop"
        return text, "length" if self.completion_tokens >= self.max_tokens else "stop"
