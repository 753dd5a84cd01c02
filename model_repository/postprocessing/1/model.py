"""Streaming detokenizer: calls the engine and turns its token stream into text.

Why it calls the engine itself rather than being an ensemble step after it, and why one
stream per instance: see this model's config.pbtxt; why over gRPC rather than BLS:
mixtral_triton.serving.engine_client. The logic is in mixtral_triton.serving (Completion,
engine_request, runs); this file is the Triton glue.
"""

import json
import time
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from mixtral_triton.protocol.errors import INTERNAL, coded, read_code
from mixtral_triton.serving.completion import Completion
from mixtral_triton.serving.engine_client import EngineClient
from mixtral_triton.serving.engine_request import engine_inputs, new_token_ids
from mixtral_triton.serving.runs import RunRegistry, server_registry_path
from mixtral_triton.serving.tensors import strings
from mixtral_triton.text import load_token_table

# How often a run looks whether a `stop` marked it cancelled (the tokenizer model, which
# takes the stop, also stops the engine at once; this covers a stop that came before the
# engine had the request). The C++ backend checks its own cancellations every 100 ms.
CANCELLATION_CHECK_PERIOD_S = 0.05


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        # once: per token, a lookup; the second writes special tokens (skip_special_tokens false)
        self.tables = {skip: load_token_table(params["tokenizer_dir"], skip) for skip in (True, False)}
        self.engine = EngineClient(params["engine_model"])
        self.runs = RunRegistry(server_registry_path())

    def execute(self, requests):
        # One stream at a time, read and answered on the stub's own thread, as TensorRT-LLM's
        # own tensorrt_llm_bls model does; concurrency comes from the instance count.
        for request in requests:
            self._serve(request)
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
            if inputs["STOP"].reshape(-1)[0]:
                # The tokenizer model has cancelled the runs already; this only answers.
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                self._generate(request.request_id(), inputs, sender)
        except Exception as exc:  # the stream must end with the error, never hang
            # the engine's own code, if it sent one, reads first in the message
            message = str(exc) if read_code(str(exc)) else coded(INTERNAL, f"generation failed: {exc}")
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _generate(self, client_id, inputs, sender):
        flag = lambda name: bool(inputs[name].reshape(-1)[0])  # noqa: E731
        completion = Completion(self.tables[flag("SKIP_SPECIAL_TOKENS")], strings(inputs, "STOP_STRINGS"),
                                int(inputs["REQUEST_OUTPUT_LEN"].reshape(-1)[0]),
                                int(inputs["INPUT_LENGTHS"].reshape(-1)[0]),
                                include_stop=flag("INCLUDE_STOP_STR_IN_OUTPUT"),
                                count_outputs=(flag("RETURN_NUM_INPUT_TOKENS"),
                                               flag("RETURN_NUM_OUTPUT_TOKENS")))
        # exclude_input_in_output false: the prompt comes first, as its own text
        echo = strings(inputs, "ECHO_TEXT")
        engine_id = uuid.uuid4().hex  # unique, so a stop never hits another client's run
        self.runs.start(client_id, engine_id)
        try:
            pieces = self._stream(engine_id, inputs, completion, sender, "".join(echo))
        finally:
            cancelled = self.runs.finish(engine_id)
        tail, reason = completion.finish(cancelled=cancelled)
        pieces.append(tail)
        sender.send(self._response("".join(pieces), reason, completion),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _stream(self, engine_id, inputs, completion, sender, echo):
        """Sends the text as it comes when streaming; returns what is left to send."""
        streaming = bool(inputs["STREAMING"].reshape(-1)[0])
        pieces = []
        if echo and streaming:
            sender.send(self._response(echo, "", completion))
        elif echo:
            pieces.append(echo)
        next_check = 0.0
        for outputs in self.engine.stream(engine_inputs(inputs), engine_id):
            text = completion.add(new_token_ids(outputs["output_ids"], outputs.get("sequence_length")))
            if text and streaming:
                sender.send(self._response(text, "", completion))
            elif text:
                pieces.append(text)
            if completion.stopped:
                break  # leaving the stream cancels the engine's request; the text is cut already
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CANCELLATION_CHECK_PERIOD_S
                if self.runs.is_cancelled(engine_id):
                    break
        return pieces

    @staticmethod
    def _response(text, finish_reason, completion):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=object)),
            pb_utils.Tensor("finish_reason", np.array([[finish_reason.encode()]], dtype=object)),
            pb_utils.Tensor("prompt_tokens", np.array([[completion.prompt_tokens]], np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([[completion.completion_tokens]], np.int32)),
        ] + [pb_utils.Tensor(name, np.array([[n]], np.int32)) for name, n in completion.count_outputs().items()])

    def finalize(self):
        self.engine.close()
        self.runs.close()
