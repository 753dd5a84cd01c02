"""The ensemble's wire format for both client flavours: the request's tensors, the cancel
request, and what one streamed response says."""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, replace

import numpy as np
import tritonclient.grpc as grpcclient

from mixtral_triton.protocol import FIELDS, PredictRequest, RequestError, ensemble_inputs
from mixtral_triton.protocol.guided import GUIDE_FIELD, TYPE_FIELD
from mixtral_triton.protocol.errors import INTERNAL, INVALID_ARGUMENT, TRITON_UNAVAILABLE, UNAVAILABLE, read_code
from mixtral_triton.ensemble_models.engine_request import stop_inputs

ENSEMBLE = "ensemble"
# How long a cancel waits for the server to end both the stop and the cancelled request.
CANCEL_WAIT_S = 10.0
OUTPUTS = ("text_output", "finish_reason", "prompt_tokens", "completion_tokens")
_DATATYPES = {np.dtype(object): "BYTES", np.dtype(np.bool_): "BOOL", np.dtype(np.int32): "INT32",
              np.dtype(np.float32): "FP32", np.dtype(np.uint64): "UINT64", np.dtype(np.float16): "FP16"}


class ServerError(RuntimeError):
    """The server refused or failed the request; `status` is the gRPC status name
    (INVALID_ARGUMENT for a bad request, UNAVAILABLE when the server is gone)."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Chunk:
    """One streamed piece. `finish_reason` ("stop", "length", "cancelled") is set on the
    last one (of its sequence) only; the counts are those so far. With several sequences
    (num_return_sequences), `sequence_index` says whose piece it is. With log probabilities
    (return_log_probs), `log_probs` and `token_bytes` are those of the tokens whose text this
    piece is the first to carry, and `cum_log_prob` the sequence's running sum."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    sequence_index: int = 0
    log_probs: tuple[float, ...] | None = None
    token_bytes: tuple[bytes, ...] | None = None
    cum_log_prob: float | None = None


@dataclass(frozen=True)
class Completion:
    """A whole completion (`stream=False`)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def new_request_id() -> str:
    """Every request carries an id: it is what a cancel names."""
    return f"mt-{uuid.uuid4().hex}"


def infer_inputs(arrays: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """gRPC inputs from numpy arrays, the Triton data type taken from each array's dtype."""
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), _DATATYPES[array.dtype])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


@dataclass(frozen=True)
class GenerationOptions:
    """What a request asks of the ensemble beyond the predict fields (the OpenAI routes' `n`
    and log probabilities): TensorRT-LLM 1.2.1's inputs of those names."""

    sequences: int = 1  # num_return_sequences
    log_probs: bool = False  # return_log_probs

    def inputs(self) -> dict[str, np.ndarray]:
        arrays = {}
        if self.sequences != 1:
            arrays["num_return_sequences"] = np.array([[self.sequences]], np.int32)
        if self.log_probs:
            arrays["return_log_probs"] = np.array([[True]], np.bool_)
        return arrays


PLAIN = GenerationOptions()


def request_inputs(request: PredictRequest, options: GenerationOptions = PLAIN) -> list[grpcclient.InferInput]:
    return infer_inputs({**ensemble_inputs(request), **options.inputs()})


def cancel_inputs() -> list[grpcclient.InferInput]:
    """`stop: true` cancels the running request of the same id (its text is ignored)."""
    return infer_inputs({"text_input": np.array([[b""]], dtype=object),
                          "max_tokens": np.array([[1]], np.int32),
                          "stop": np.array([[True]], np.bool_)})


# Outputs only some requests have: several sequences, log probabilities.
SEQUENCE_OUTPUTS = ("sequence_index",)
LOG_PROB_OUTPUTS = ("output_log_probs", "output_token_bytes", "cum_log_probs")


def requested_outputs(sequences: int = 1, log_probs: bool = False) -> list[grpcclient.InferRequestedOutput]:
    names = OUTPUTS + (SEQUENCE_OUTPUTS if sequences > 1 else ()) + (LOG_PROB_OUTPUTS if log_probs else ())
    return [grpcclient.InferRequestedOutput(name) for name in names]


# Every request on a stream asks for the empty final response, so that the client knows
# when a request has ended (a stop request answers with that marker only): the blocking
# client through its option, the asyncio paths through mixtral_triton.client.empty_final.
def generation_call(request: PredictRequest, request_id: str, options: GenerationOptions = PLAIN) -> dict:
    """One request on a stream, as the keyword arguments of the blocking client's
    `async_stream_infer(**call, enable_empty_final_response=True)` and of
    `empty_final.stream_request`."""
    return {"model_name": ENSEMBLE, "inputs": request_inputs(request, options),
            "outputs": requested_outputs(options.sequences, options.log_probs), "request_id": request_id}


def cancel_call(request_id: str) -> dict:
    """The `stop` request for `request_id`, sent on a stream of its own."""
    return {"model_name": ENSEMBLE, "inputs": cancel_inputs(), "request_id": request_id}


def probe_calls(request_id: str) -> list[dict]:
    """A `stop` for an id that runs nothing, sent straight to the tokenizer model and to the
    engine: both answer it at once, whatever the load, and a Python stub or an engine that no
    longer answers shows here."""
    return [{"model_name": "preprocessing", "inputs": cancel_inputs(), "request_id": request_id},
            {"model_name": "tensorrt_llm", "inputs": infer_inputs(stop_inputs()), "request_id": request_id}]


def ends_request(response, error) -> bool:
    """Whether a streamed response is the last of its request (an error always is)."""
    return error is not None or is_final(response)


# A response is read straight from its protobuf (service_pb2.ModelInferResponse): the gateway
# relays one per token, and tritonclient's InferResult.as_numpy (numpy arrays, a Python loop
# over BYTES elements) cost more than the rest of the relay together.
def is_final(response) -> bool:
    return response.parameters["triton_final_response"].bool_param


def chunk_of(response) -> Chunk | None:
    """The chunk a response carries, or None for the empty final marker. Each output has one
    element, in the response's raw contents: a BYTES element is its 4-byte little-endian
    length then its bytes, an INT32 its 4 little-endian bytes."""
    if not response.outputs:
        return None
    raw = {output.name: content for output, content in zip(response.outputs, response.raw_output_contents)}
    chunk = Chunk(text=_bytes_element(raw["text_output"]).decode("utf-8"),
                  finish_reason=_bytes_element(raw["finish_reason"]).decode() or None,
                  prompt_tokens=_int32(raw["prompt_tokens"]),
                  completion_tokens=_int32(raw["completion_tokens"]))
    if len(raw) == len(OUTPUTS):  # the common case: one sequence, no log probabilities
        return chunk
    return replace(chunk, sequence_index=_int32(raw["sequence_index"]) if "sequence_index" in raw else 0,
                   log_probs=_floats(raw["output_log_probs"]) if "output_log_probs" in raw else None,
                   token_bytes=_bytes_elements(raw["output_token_bytes"]) if "output_token_bytes" in raw else None,
                   cum_log_prob=_floats(raw["cum_log_probs"])[0] if "cum_log_probs" in raw else None)


def _bytes_element(raw: bytes) -> bytes:
    return raw[4:4 + int.from_bytes(raw[:4], "little")]


def _bytes_elements(raw: bytes) -> tuple[bytes, ...]:
    elements, at = [], 0
    while at + 4 <= len(raw):
        length = int.from_bytes(raw[at:at + 4], "little")
        elements.append(raw[at + 4:at + 4 + length])
        at += 4 + length
    return tuple(elements)


def _int32(raw: bytes) -> int:
    return int.from_bytes(raw[:4], "little", signed=True)


def _floats(raw: bytes) -> tuple[float, ...]:
    return struct.unpack(f"<{len(raw) // 4}f", raw)


# What a refused or failed request's error says: our models' code first
# (mixtral_triton.protocol.errors), Triton's own wording for the errors it makes itself.
# The predict field of each ensemble input (the guided decoding pair is response_format's).
_FIELD_OF_INPUT = {name: spec.name for spec in FIELDS if spec.tensor
                   for name in (spec.tensor, *spec.tensor_aliases)}
_FIELD_OF_INPUT.update({TYPE_FIELD: "response_format", GUIDE_FIELD: "response_format"})
_STATUS_OF_KIND = {UNAVAILABLE: "UNAVAILABLE", INTERNAL: "INTERNAL"}


def server_error(error) -> Exception:
    """The RequestError (naming the predict field) for a refused request; else a
    ServerError with the gRPC status the error's code or wording says (UNAVAILABLE for
    overload and a dead stub), or the one the transport gave."""
    message = error.message() if hasattr(error, "message") else str(error)
    code = read_code(message)
    if code is not None and code.kind == INVALID_ARGUMENT:
        field, message = _FIELD_OF_INPUT.get(code.field, code.field), code.message
        if code.field in (TYPE_FIELD, GUIDE_FIELD) and message.startswith(code.field):
            message = field + message[len(code.field):]  # the guide as the request gave it
        return RequestError(field, message)
    if code is not None:
        return ServerError(code.message, _STATUS_OF_KIND[code.kind])
    if TRITON_UNAVAILABLE.search(message):
        return ServerError(message, "UNAVAILABLE")
    status = error.status() if hasattr(error, "status") else None
    return ServerError(message, status.removeprefix("StatusCode.") if status else None)
