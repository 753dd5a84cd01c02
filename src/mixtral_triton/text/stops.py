"""Stop strings over streamed text.

The text ends before the stop that completes first (the smallest end position; of two
ending together, the longer one). That is where generation would stop, and it does not
depend on how the text was cut into chunks: streamed and non-streamed output agree.
A chunk's tail that could still begin a stop is held back until the next chunk settles
it, so stop text is never emitted; at most (longest stop - 1) characters are held.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from mixtral_triton.text.detokenizer import Detokenizer


class StopMatcher:
    """Text chunks in, the text before the first stop out; `stopped` once one matched."""

    def __init__(self, stops: Sequence[str]):
        if any(not stop for stop in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(stops)
        self._prefixes = {stop[:k] for stop in stops for k in range(1, len(stop))}
        self._first_chars = {stop[0] for stop in stops}
        self._max_held = max((len(stop) for stop in stops), default=1) - 1
        self._held = ""
        self.stopped = False
        self.matched = ""  # the stop that ended the text, once stopped

    @property
    def held(self) -> str:
        """Text withheld because it may be the start of a stop."""
        return self._held

    def push(self, text: str) -> str:
        """The part of the text now known to come before any stop."""
        if self.stopped:
            return ""
        text = self._held + text
        # Only held text plus the new chunk is searched: the rest was emitted as stop-free.
        best = None
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is not None:
            self.stopped = True
            self.matched = best[2]
            self._held = ""
            return text[:best[1]]
        keep = self._partial_stop_length(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def finish(self) -> str:
        """No more text: what was held back cannot become a stop any more."""
        text, self._held = self._held, ""
        return text

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop."""
        for k in range(min(len(text), self._max_held), 0, -1):
            if text[-k] in self._first_chars and text[-k:] in self._prefixes:
                return k
        return 0


class TextStream:
    """One request's completion: token ids in, stop-cut text out.

    `stopped` turns true once a stop string has matched; from then on no text comes out
    and the caller should end generation. With `include_stop` the matched stop string
    ends the text (vLLM's include_stop_str_in_output).
    """

    def __init__(self, table: Sequence[bytes], stop: Sequence[str] = (), include_stop: bool = False):
        self._detokenizer = Detokenizer(table)
        self._stops = StopMatcher(stop)
        self._include_stop = include_stop

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def push(self, token_ids: Iterable[int]) -> str:
        if self.stopped:
            return ""
        return self._with_stop(self._stops.push(self._detokenizer.push(token_ids)))

    def finish(self) -> str:
        if self.stopped:
            return ""
        text = self._with_stop(self._stops.push(self._detokenizer.finish()))
        return text if self.stopped else text + self._stops.finish()

    def _with_stop(self, text: str) -> str:
        return text + self._stops.matched if self.stopped and self._include_stop else text
