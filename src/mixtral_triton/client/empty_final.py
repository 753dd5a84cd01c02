"""gRPC streams whose every request asks Triton for the empty final response.

A decoupled model (the ensemble, the engine) may end a request with a response that carries
no outputs, only the final flag; the client sees it, and so knows the request ended, only
when the request set the parameter `triton_enable_empty_final_response`. tritonclient 2.51
lets a caller set it through `parameters`; the 2.7x clients (the GPU image's) refuse it
there as a reserved name, and only their blocking client has an `enable_empty_final_response`
option. So the asyncio client (mixtral_triton.client.aio, the gateway's) builds
each request here, with the flag set on the request itself, and open the stream on the
client's own gRPC stub: the same requests and responses as the client's `stream_infer`, on
both versions (tested against 2.51 and the image's 2.71).
"""

from __future__ import annotations

from typing import AsyncIterator

import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import InferenceServerException

EMPTY_FINAL = "triton_enable_empty_final_response"


def stream_request(model_name: str, inputs, request_id: str = "", outputs=None) -> service_pb2.ModelInferRequest:
    """One request of a stream (the arguments of tritonclient's stream calls)."""
    request = _get_inference_request(model_name=model_name, inputs=inputs, model_version="",
                                     request_id=request_id, outputs=outputs, sequence_id=0,
                                     sequence_start=False, sequence_end=False, priority=0,
                                     timeout=None, parameters=None)
    request.parameters[EMPTY_FINAL].bool_param = True
    return request


class _Responses:
    """(ModelInferResponse, None) or (None, InferenceServerException) per response: the
    protobuf itself, which client/ensemble.py reads (no InferResult wrapper per response);
    `cancel()` ends the call."""

    def __init__(self, grpc_call):
        self._call = grpc_call
        self._responses = grpc_call.__aiter__()

    def __aiter__(self) -> "_Responses":
        return self

    async def __anext__(self):
        response = await self._responses.__anext__()
        if response.error_message:
            return None, InferenceServerException(msg=response.error_message)
        return response.infer_response, None

    def cancel(self) -> bool:
        return self._call.cancel()


def open_stream(client: grpcaio.InferenceServerClient, calls: AsyncIterator[dict]) -> _Responses:
    """A ModelStreamInfer call sending `calls` (dicts of stream_request's arguments) as they
    come; iterate the result for the responses."""
    async def requests():
        async for call in calls:
            yield stream_request(**call)

    return _Responses(client._client_stub.ModelStreamInfer(requests()))
