"""Streaming detokenizer: calls the engine and turns its token stream into text.

Why it calls the engine itself rather than being an ensemble step after it, and why one
process serves many streams: see this model's config.pbtxt; why over loopback rather than BLS:
mixtral_triton.ensemble_models.engine_client. The logic is in mixtral_triton.ensemble_models.detokenize;
this file is the Triton glue.
"""

import asyncio
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from mixtral_triton.protocol.errors import relayed
from mixtral_triton.ensemble_models.detokenize import StreamingDetokenizer
from mixtral_triton.ensemble_models.engine_client import AsyncEngineClient
from mixtral_triton.ensemble_models.runs import RunRegistry, server_registry_path
from mixtral_triton.text import load_token_table

_NOT_FINISHED = np.array([[b""]], dtype=object)  # finish_reason of every response but the last


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        # once: per token, a lookup; the second writes special tokens (skip_special_tokens false)
        tables = {skip: load_token_table(params["tokenizer_dir"], skip) for skip in (True, False)}
        self.detokenizer = StreamingDetokenizer(
            tables, AsyncEngineClient(params["engine_model"]), RunRegistry(server_registry_path()))

    async def execute(self, requests):
        # A coroutine: the stub runs it on its event loop and takes the next request at
        # once, so this one process serves every stream routed to it concurrently.
        await asyncio.gather(*(self._serve(request) for request in requests))
        return None

    async def _serve(self, request):
        sender = request.get_response_sender()
        try:
            inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
            if inputs["STOP"].reshape(-1)[0]:
                # The tokenizer model has cancelled the runs already; this only answers.
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            prompt_tokens = inputs["INPUT_LENGTHS"].reshape(1, 1).astype(np.int32)

            def send(text, completion, completion_tokens, finish_reason, final, failure):
                # on the detokenizer's sender thread (mixtral_triton.ensemble_models.outbox)
                if failure is not None:
                    _send_error(sender, failure)
                    return
                reason = np.array([[finish_reason.encode()]], dtype=object) if final else _NOT_FINISHED
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=object)),
                    pb_utils.Tensor("finish_reason", reason),
                    pb_utils.Tensor("prompt_tokens", prompt_tokens),
                    pb_utils.Tensor("completion_tokens", np.array([[completion_tokens]], np.int32)),
                ] + [pb_utils.Tensor(name, np.array([[n]], np.int32))
                     for name, n in completion.count_outputs(completion_tokens).items()]),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)

            await self.detokenizer.generate(request.request_id(), inputs, send)
        except Exception as exc:  # the stream must end with the error, never hang
            _send_error(sender, exc)

    def finalize(self):
        # The engine channel belongs to the stub's event loop and ends with the process.
        self.detokenizer.runs.close()


def _send_error(sender, exc: Exception) -> None:
    # the engine's code, or Triton's overload wording, stays readable by the client
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(relayed(str(exc), "generation failed"))),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
