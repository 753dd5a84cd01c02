"""Machine-readable refusals. Every error our Triton models send starts with a code that
names its kind and, for a bad request, the field: `[invalid_argument:max_tokens] max_tokens
must be ...`, `[unavailable] the engine's queue is full ...`. Triton's gRPC stream carries an
error's message but not its status, and prefixes it with its own words ("in ensemble
'ensemble', "), so the clients and the gateway read the code wherever it stands in the
message, and fall back on Triton's own wording only for errors Triton makes itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

INVALID_ARGUMENT = "invalid_argument"  # the request is refused: fix it, do not retry
UNAVAILABLE = "unavailable"  # overload or a server going away: retry later
INTERNAL = "internal"  # the generation failed on the server
KINDS = (INVALID_ARGUMENT, UNAVAILABLE, INTERNAL)

_CODE = re.compile(r"\[(?P<kind>" + "|".join(KINDS) + r")(?::(?P<field>[A-Za-z0-9_]+))?\] ")


class RequestError(ValueError):
    """A request the server rejects; `field` names the offending field (None: the whole body)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class CodedError:
    kind: str
    field: str | None
    message: str  # without the code, and without what Triton put before it


def coded(kind: str, message: str, field: str | None = None) -> str:
    """The message our models send for an error of `kind` (one of KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"unknown error kind {kind!r}; the kinds are {', '.join(KINDS)}")
    return f"[{kind}:{field}] {message}" if field else f"[{kind}] {message}"


def read_code(message: str) -> CodedError | None:
    """The code of an error message from our models, wherever Triton's prefixes put it
    (the first one: an error relayed through another model keeps its origin's code)."""
    found = _CODE.search(message)
    if found is None:
        return None
    return CodedError(found.group("kind"), found.group("field"), message[found.end():])


# The server's own wording for overload or a dead model process, for errors no model of
# ours made (read from the sources of Triton core and python_backend at r24.10 = Triton 2.51
# and r26.07 = 2.71, core's wording the same in r26.06 and main; and TensorRT-LLM v1.2.1):
# - a full scheduler queue (core src/scheduler_utils.cc): "Exceeds maximum queue size";
# - a full executor queue (TensorRT-LLM cpp/tensorrt_llm/executor/executorImpl.cpp, which
#   the tensorrtllm backend sends as INTERNAL with the exception's text): "Maximum queue
#   size of N has been reached, please try again later";
# - a dead Python stub (python_backend src/stub_launcher.cc, src/python_be.cc):
#   "Stub process '<instance>' is not healthy.", "Stub process is not healthy." and
#   "Failed to obtain the health mutex." in both; 2.71 adds "Stub process is not healthy
#   while waiting for is_ready()" and "... during readiness cleanup".
# detokenizer.cc (Relayed) recognises the same phrases: keep the two lists together.
TRITON_UNAVAILABLE = re.compile(
    r"Exceeds maximum queue size"
    r"|Maximum queue size of \d+ has been reached"
    r"|Stub process( '[^']*')? is not healthy"
    r"|Failed to obtain the health mutex")


def relayed(message: str, context: str) -> str:
    """An error another model sent us, as we pass it on: its own code if it has one; Triton's
    wording for overload or a dead stub as `unavailable` (the client may retry); anything else
    as `internal`, after `context`."""
    if read_code(message) is not None:
        return message
    kind = UNAVAILABLE if TRITON_UNAVAILABLE.search(message) else INTERNAL
    return coded(kind, f"{context}: {message}")
