"""How a generation's chunks are written out on each route: the predict contract's text
stream or JSON, and OpenAI's completions and chat objects (whole, or as server-sent events).
What the objects hold is documented by gateway/schemas.py's response models."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid

from mixtral_triton.client.ensemble import PLAIN, Chunk, GenerationOptions
from mixtral_triton.gateway.http_errors import GatewayError
from mixtral_triton.gateway.openai_requests import OpenAIRequest
from mixtral_triton.protocol import RequestError


def usage_of(last: Chunk, completion_tokens: int | None = None) -> dict:
    """The usage; `completion_tokens`: those of every choice (n > 1), else `last`'s."""
    completion = last.completion_tokens if completion_tokens is None else completion_tokens
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": completion,
            "total_tokens": last.prompt_tokens + completion}


def token_string(token: bytes, prefix: str = "") -> str:
    """A token's text; a token that is not whole UTF-8 (part of a character) as its bytes
    escaped, "\\xNN..." (OpenAI's spelling: chat's bare, whose `bytes` carry the raw bytes;
    legacy completions' after the prefix "bytes:")."""
    try:
        return token.decode("utf-8")
    except UnicodeDecodeError:
        return prefix + "".join(f"\\x{b:02x}" for b in token)


class Format:
    """One response's wire format. Streaming formats write `opening()`, then `piece()` for
    each chunk's text, then `closing()` with the last chunk; whole formats answer `whole()`
    as JSON. `openai` picks the error body's names."""

    streaming = False
    media_type = "application/json"
    openai = False
    user: str | None = None  # OpenAI's `user` label, logged with the request
    options: GenerationOptions = PLAIN  # what the ensemble is asked beyond the predict fields

    def opening(self, first: Chunk) -> bytes:
        return b""

    def piece(self, chunk: Chunk) -> bytes:
        raise NotImplementedError

    def closing(self, last: Chunk) -> bytes:
        raise NotImplementedError

    def stream_error(self, error: GatewayError) -> bytes:
        raise NotImplementedError

    def whole(self, sequences: dict[int, list[Chunk]]) -> dict:
        """The answer from every chunk of each sequence (by sequence_index)."""
        raise NotImplementedError

    def rename(self, exc: RequestError) -> RequestError:
        return exc


class PredictStream(Format):
    """`stream: true`: only the completion's text, chunk by chunk."""

    streaming = True
    media_type = "text/plain; charset=utf-8"

    def piece(self, chunk: Chunk) -> bytes:
        return chunk.text.encode("utf-8")

    def closing(self, last: Chunk) -> bytes:
        return last.text.encode("utf-8")

    def stream_error(self, error: GatewayError) -> bytes:
        return f"\n[error: {error.message}]\n".encode("utf-8")


class PredictWhole(Format):
    def whole(self, sequences: dict[int, list[Chunk]]) -> dict:
        chunks = sequences[0]
        return {"result": "".join(c.text for c in chunks), "finish_reason": chunks[-1].finish_reason,
                "usage": usage_of(chunks[-1])}


_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class _OpenAIFormat(Format):
    openai = True
    object = ""
    id_prefix = ""

    def __init__(self, request: OpenAIRequest, model: str):
        self.request = request
        self.model = model
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.user = request.user
        self.options = request.options
        self._tokens: dict[int, int] = {}  # completion tokens so far, by choice
        self._chars: dict[int, int] = {}  # characters of text so far, by choice (text_offset)
        self._ended = 0  # choices finished
        if request.predict.stream:
            self.streaming = True
            self.media_type = "text/event-stream; charset=utf-8"

    def rename(self, exc: RequestError) -> RequestError:
        return self.request.rename(exc)

    def _seen(self, chunk: Chunk) -> Chunk:
        self._tokens[chunk.sequence_index] = chunk.completion_tokens
        return chunk

    def _usage(self, chunk: Chunk) -> dict:
        """The usage so far, the completion tokens summed over the choices."""
        return usage_of(chunk, sum(self._tokens.values()) if self._tokens else None)

    def _event(self, data: dict, chunk: Chunk | None = None) -> bytes:
        """One event; with continuous_usage_stats a chunk's event carries its usage so far."""
        if chunk is not None and self.request.continuous_usage:
            data = {**data, "usage": self._usage(chunk)}
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        # Escaped, as JSON allows: line splitters such as Python's str.splitlines (requests'
        # iter_lines) break a line at these, which would cut an event's JSON in two.
        text = text.translate(_LINE_BREAKS)
        return f"data: {text}\n\n".encode("utf-8")

    def _head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def _choice(self, chunk: Chunk, content: dict, finish_reason: str | None) -> dict:
        """One choice of `chunk`'s sequence; `content` holds its text (completions), delta or
        message (chat)."""
        return {"index": chunk.sequence_index, **content, "logprobs": self._log_probs(chunk),
                "finish_reason": finish_reason}

    def _chunk(self, chunk: Chunk, content: dict, finish_reason: str | None = None) -> dict:
        """A streamed chunk: the one choice `chunk` is a piece of."""
        return {**self._head(self.object), "choices": [self._choice(chunk, content, finish_reason)]}

    def _log_probs(self, chunk: Chunk):
        raise NotImplementedError

    def _closing_events(self, final: dict, last: Chunk) -> bytes:
        """A choice's finishing chunk; after the last choice's, the usage and [DONE]."""
        self._ended += 1
        if self._ended < self.options.sequences:
            return self._event(final, last)
        if self.request.include_usage:  # OpenAI's shape: a last chunk with no choices
            out = self._event(final, last) + self._event({**self._head(self.object), "choices": [],
                                                          "usage": self._usage(last)})
        else:  # the usage rides on the finishing chunk (an extension OpenAI clients ignore)
            out = self._event({**final, "usage": self._usage(last)})
        return out + b"data: [DONE]\n\n"

    def _whole(self, object_: str, sequences: dict[int, list[Chunk]], content) -> dict:
        """The whole answer: a choice per sequence, `content(text)` its text or message."""
        choices = []
        for index in sorted(sequences):
            chunks = sequences[index]
            merged = _merged(chunks)
            self._seen(merged)
            choices.append(self._choice(merged, content(merged.text), merged.finish_reason))
        return {**self._head(object_), "choices": choices, "usage": self._usage(merged)}

    def stream_error(self, error: GatewayError) -> bytes:
        return self._event(error.body(openai=True))


def _merged(chunks: list[Chunk]) -> Chunk:
    """A sequence's chunks as one: its whole text and log probabilities, its last counts."""
    last = chunks[-1]
    if last.log_probs is None:
        return dataclasses.replace(last, text="".join(c.text for c in chunks))
    return dataclasses.replace(last, text="".join(c.text for c in chunks),
                               log_probs=tuple(p for c in chunks for p in c.log_probs),
                               token_bytes=tuple(b for c in chunks for b in c.token_bytes))


class CompletionFormat(_OpenAIFormat):
    object = "text_completion"
    id_prefix = "cmpl"

    def piece(self, chunk: Chunk) -> bytes:
        return self._event(self._chunk(chunk, {"text": chunk.text}), self._seen(chunk))

    def closing(self, last: Chunk) -> bytes:
        return self._closing_events(self._chunk(last, {"text": last.text}, last.finish_reason),
                                    self._seen(last))

    def whole(self, sequences: dict[int, list[Chunk]]) -> dict:
        return self._whole(self.object, sequences, lambda text: {"text": text})

    def _log_probs(self, chunk: Chunk) -> dict | None:
        """OpenAI's completions log probabilities of the piece's tokens; text_offset counts
        characters in the choice's text (a token inside a character: where it starts)."""
        if chunk.log_probs is None:
            return None
        start = self._chars.get(chunk.sequence_index, 0)
        offsets, before = [], b""
        for token in chunk.token_bytes:
            offsets.append(start + len(before.decode("utf-8", "ignore")))
            before += token
        self._chars[chunk.sequence_index] = start + len(chunk.text)
        return {"tokens": [token_string(t, "bytes:") for t in chunk.token_bytes],
                "token_logprobs": list(chunk.log_probs), "top_logprobs": None, "text_offset": offsets}


class ChatFormat(_OpenAIFormat):
    object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def opening(self, first: Chunk) -> bytes:
        # each choice's role first; the usage of no completion tokens yet: the prompt's
        return b"".join(self._event(self._chunk(Chunk("", None, first.prompt_tokens, 0, index),
                                                {"delta": {"role": "assistant", "content": ""}}),
                                    Chunk("", None, first.prompt_tokens, 0))
                        for index in range(self.options.sequences))

    def piece(self, chunk: Chunk) -> bytes:
        return self._event(self._chunk(chunk, {"delta": {"content": chunk.text}}), self._seen(chunk))

    def closing(self, last: Chunk) -> bytes:
        delta = {"content": last.text} if last.text else {}
        return self._closing_events(self._chunk(last, {"delta": delta}, last.finish_reason), self._seen(last))

    def whole(self, sequences: dict[int, list[Chunk]]) -> dict:
        return self._whole("chat.completion", sequences,
                           lambda text: {"message": {"role": "assistant", "content": text}})

    def _log_probs(self, chunk: Chunk) -> dict | None:
        if chunk.log_probs is None:
            return None
        return {"content": [{"token": token_string(token), "logprob": log_prob, "bytes": list(token),
                             "top_logprobs": []}
                            for token, log_prob in zip(chunk.token_bytes, chunk.log_probs)]}
