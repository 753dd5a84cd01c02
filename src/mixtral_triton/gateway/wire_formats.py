"""How a generation's chunks are written out on each route: the predict contract's text
stream or JSON, and OpenAI's completions and chat objects (whole, or as server-sent events).
What the objects hold is documented by gateway/schemas.py's response models."""

from __future__ import annotations

import json
import time
import uuid

from mixtral_triton.client.ensemble import Chunk
from mixtral_triton.gateway.http_errors import GatewayError
from mixtral_triton.gateway.openai_requests import OpenAIRequest
from mixtral_triton.protocol import RequestError


def usage_of(last: Chunk) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


class Format:
    """One response's wire format. Streaming formats write `opening()`, then `piece()` for
    each chunk's text, then `closing()` with the last chunk; whole formats answer `whole()`
    as JSON. `openai` picks the error body's names."""

    streaming = False
    media_type = "application/json"
    openai = False
    user: str | None = None  # OpenAI's `user` label, logged with the request

    def opening(self, first: Chunk) -> bytes:
        return b""

    def piece(self, chunk: Chunk) -> bytes:
        raise NotImplementedError

    def closing(self, last: Chunk) -> bytes:
        raise NotImplementedError

    def stream_error(self, error: GatewayError) -> bytes:
        raise NotImplementedError

    def whole(self, text: str, last: Chunk) -> dict:
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
    def whole(self, text: str, last: Chunk) -> dict:
        return {"result": text, "finish_reason": last.finish_reason, "usage": usage_of(last)}


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
        if request.predict.stream:
            self.streaming = True
            self.media_type = "text/event-stream; charset=utf-8"

    def rename(self, exc: RequestError) -> RequestError:
        return self.request.rename(exc)

    def _event(self, data: dict, chunk: Chunk | None = None) -> bytes:
        """One event; with continuous_usage_stats a chunk's event carries its usage so far."""
        if chunk is not None and self.request.continuous_usage:
            data = {**data, "usage": usage_of(chunk)}
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        # Escaped, as JSON allows: line splitters such as Python's str.splitlines (requests'
        # iter_lines) break a line at these, which would cut an event's JSON in two.
        text = text.translate(_LINE_BREAKS)
        return f"data: {text}\n\n".encode("utf-8")

    def _head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def _chunk(self, choice: dict, finish_reason: str | None) -> dict:
        """A chunk of the one choice; `choice` holds its text (completions) or delta (chat)."""
        return {**self._head(self.object), "choices": [
            {"index": 0, **choice, "logprobs": None, "finish_reason": finish_reason}]}

    def _closing_events(self, final: dict, last: Chunk) -> bytes:
        if self.request.include_usage:  # OpenAI's shape: a last chunk with no choices
            out = self._event(final, last) + self._event({**self._head(self.object), "choices": [],
                                                          "usage": usage_of(last)})
        else:  # the usage rides on the finishing chunk (an extension OpenAI clients ignore)
            out = self._event({**final, "usage": usage_of(last)})
        return out + b"data: [DONE]\n\n"

    def stream_error(self, error: GatewayError) -> bytes:
        return self._event(error.body(openai=True))


class CompletionFormat(_OpenAIFormat):
    object = "text_completion"
    id_prefix = "cmpl"

    def piece(self, chunk: Chunk) -> bytes:
        return self._event(self._chunk({"text": chunk.text}, None), chunk)

    def closing(self, last: Chunk) -> bytes:
        return self._closing_events(self._chunk({"text": last.text}, last.finish_reason), last)

    def whole(self, text: str, last: Chunk) -> dict:
        return {**self._chunk({"text": text}, last.finish_reason), "usage": usage_of(last)}


class ChatFormat(_OpenAIFormat):
    object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def opening(self, first: Chunk) -> bytes:
        # the usage of no completion tokens yet: the prompt's
        return self._event(self._chunk({"delta": {"role": "assistant", "content": ""}}, None),
                           Chunk("", None, first.prompt_tokens, 0))

    def piece(self, chunk: Chunk) -> bytes:
        return self._event(self._chunk({"delta": {"content": chunk.text}}, None), chunk)

    def closing(self, last: Chunk) -> bytes:
        delta = {"content": last.text} if last.text else {}
        return self._closing_events(self._chunk({"delta": delta}, last.finish_reason), last)

    def whole(self, text: str, last: Chunk) -> dict:
        return {**self._head("chat.completion"), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
             "finish_reason": last.finish_reason}], "usage": usage_of(last)}
