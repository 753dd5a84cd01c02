"""The gateway's errors as HTTP answers: a status and the JSON error body, in the predict
routes' names or OpenAI's."""

from __future__ import annotations

from typing import Mapping

from mixtral_triton.protocol import RequestError


class ModelNotFound(RequestError):
    """`model` names a model this gateway does not serve (404, as OpenAI answers)."""


class GatewayError(Exception):
    """An error answered with an HTTP status and the JSON error body."""

    def __init__(self, status: int, type_: str, message: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type_, message, field
        self.headers = dict(headers or {})

    @classmethod
    def of_request_error(cls, exc: RequestError) -> "GatewayError":
        if isinstance(exc, ModelNotFound):
            return cls(404, "not_found_error", str(exc), exc.field)
        return cls(400, "invalid_request_error", str(exc), exc.field)

    def body(self, openai: bool) -> dict:
        """The predict routes' {"message", "type", "field"}; OpenAI's routes add its own
        names, `param` (= field) and `code`, so that OpenAI clients read them."""
        error = {"message": self.message, "type": self.type, "field": self.field}
        if openai:
            error.update(param=self.field, code=None)
        return {"error": error}
