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
                 prompt_tokens: int, include_stop: bool = False,
                 count_outputs: tuple[bool, bool] = (False, False)):
        self._text = TextStream(table, stop_strings, include_stop)
        self.max_tokens = max_tokens
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self._count_outputs = count_outputs
        self._counted = 0  # completion tokens reported in num_output_tokens so far

    @property
    def stopped(self) -> bool:
        """A stop string matched: the caller should stop the engine; no more text follows."""
        return self._text.stopped

    def add(self, token_ids: Sequence[int]) -> str:
        if self.stopped:
            return ""  # tokens the engine made before it heard the stop are not counted
        self.completion_tokens += len(token_ids)
        return self._text.push(token_ids)

    def count_outputs(self, completion_tokens: int) -> dict[str, int]:
        """TensorRT-LLM's own count outputs for the next response, whose text goes up to
        `completion_tokens` tokens, each only when the request asked for it
        (return_num_input_tokens / return_num_output_tokens): num_input_tokens is the
        prompt's tokens, num_output_tokens the tokens since the previous response, as its
        tensorrt_llm model counts them (they add up to the completion's). Called by the one
        thread that sends this stream's responses, in order."""
        want_input, want_output = self._count_outputs
        out = {"num_input_tokens": self.prompt_tokens} if want_input else {}
        if want_output:
            out["num_output_tokens"] = completion_tokens - self._counted
            self._counted = completion_tokens
        return out

    def finish(self, cancelled: bool = False) -> tuple[str, str]:
        """The text held back until the end, and the finish reason."""
        if cancelled and not self.stopped:
            return "", "cancelled"
        text = self._text.finish()
        if self.stopped:
            return text, "stop"
        return text, "length" if self.completion_tokens >= self.max_tokens else "stop"

