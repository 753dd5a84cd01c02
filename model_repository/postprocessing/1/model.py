"""Streaming detokenizer: calls the engine (BLS) and turns its token stream into text.

Why a BLS call rather than an ensemble step: see this model's config.pbtxt. The logic is
in mixtral_triton.serving (Completion, engine_request); this file is the Triton glue.
Each request is served by a thread of its own, which reads the engine's stream (the 2.51
response iterator blocks) and answers the client's; `execute` only hands requests over.
"""

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from mixtral_triton.serving.completion import Completion
from mixtral_triton.serving.engine_request import ENGINE_OUTPUTS, engine_inputs, new_token_ids, stop_inputs
from mixtral_triton.serving.tensors import strings
from mixtral_triton.text import token_table

# Streams served at once; more wait for a thread. Far above any sensible engine batch.
MAX_STREAMS = 1024


class _Running:
    """A generation in flight, findable by the client's request id for `stop`."""

    def __init__(self):
        self.engine_id = uuid.uuid4().hex  # unique, so a stop never hits another client's run
        self.cancelled = False


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"], local_files_only=True,
                                                  trust_remote_code=False)
        self.table = token_table(tokenizer)  # once: per token, a lookup
        self.engine = params["engine_model"]
        self.pool = ThreadPoolExecutor(MAX_STREAMS, thread_name_prefix="stream")
        self.lock = threading.Lock()
        self.running: dict[str, list[_Running]] = {}

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._serve, request)
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
            if inputs["STOP"].reshape(-1)[0]:
                self._cancel(request.request_id())
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                self._generate(request.request_id(), inputs, sender)
        except Exception as exc:  # the stream must end with the error, never hang
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {exc}")),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _generate(self, client_id, inputs, sender):
        run = _Running()
        with self.lock:
            self.running.setdefault(client_id, []).append(run)
        try:
            completion = Completion(self.table, strings(inputs, "STOP_STRINGS"),
                                    int(inputs["REQUEST_OUTPUT_LEN"].reshape(-1)[0]),
                                    int(inputs["INPUT_LENGTHS"].reshape(-1)[0]))
            streaming = bool(inputs["STREAMING"].reshape(-1)[0])
            pieces = []
            stop_sent = False
            for outputs in self._engine_stream(engine_inputs(inputs), run.engine_id):
                text = completion.add(new_token_ids(outputs["output_ids"], outputs.get("sequence_length")))
                if completion.stopped and not stop_sent:
                    stop_sent = True
                    self._try_stop_engine(run.engine_id)
                if text and streaming:
                    sender.send(self._response(text, "", completion))
                elif text:
                    pieces.append(text)
            tail, reason = completion.finish(cancelled=run.cancelled)
            pieces.append(tail)
            sender.send(self._response("".join(pieces), reason, completion),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            with self.lock:
                runs = self.running[client_id]
                runs.remove(run)
                if not runs:
                    del self.running[client_id]

    def _engine_stream(self, arrays, engine_id):
        request = pb_utils.InferenceRequest(
            model_name=self.engine, request_id=engine_id, requested_output_names=list(ENGINE_OUTPUTS),
            inputs=[pb_utils.Tensor(name, array) for name, array in arrays.items()])
        for response in request.exec(decoupled=True):
            if response.has_error():
                raise RuntimeError(response.error().message())
            outputs = {name: pb_utils.get_output_tensor_by_name(response, name) for name in ENGINE_OUTPUTS}
            if outputs["output_ids"] is not None:  # the final response may carry nothing
                yield {name: t.as_numpy() for name, t in outputs.items() if t is not None}

    def _stop_engine(self, engine_id):
        for _ in self._engine_stream(stop_inputs(), engine_id):
            pass

    def _try_stop_engine(self, engine_id):
        """Stop the engine early, if it takes the stop: under a full queue (max_queue_size) it
        may refuse it, and the generation then ends by itself; its text is cut already."""
        try:
            self._stop_engine(engine_id)
        except RuntimeError as exc:
            pb_utils.Logger.log_warn(f"could not stop engine request {engine_id} early: {exc}")

    def _cancel(self, client_id):
        with self.lock:
            runs = [run for run in self.running.get(client_id, []) if not run.cancelled]
            for run in runs:
                run.cancelled = True
        for run in runs:
            self._try_stop_engine(run.engine_id)

    @staticmethod
    def _response(text, finish_reason, completion):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=object)),
            pb_utils.Tensor("finish_reason", np.array([[finish_reason.encode()]], dtype=object)),
            pb_utils.Tensor("prompt_tokens", np.array([[completion.prompt_tokens]], np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([[completion.completion_tokens]], np.int32)),
        ])

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
