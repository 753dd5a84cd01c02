"""Tokenizer model: see mixtral_triton.serving.preprocess (the logic lives there).

It also carries out `stop` requests: it marks the runs of that request id cancelled and
stops their engine requests, at once. The streaming detokenizer cannot: each of its
instances is busy with one stream, so a stop could wait there behind whole generations.
"""

import json

import triton_python_backend_utils as pb_utils

from mixtral_triton.protocol import RequestError
from mixtral_triton.protocol.errors import INVALID_ARGUMENT, coded
from mixtral_triton.serving.engine_client import EngineClient
from mixtral_triton.serving.preprocess import Preprocessor
from mixtral_triton.serving.runs import RunRegistry, server_registry_path


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.preprocessor = Preprocessor(params["tokenizer_dir"], int(params["max_input_len"]),
                                         int(params["max_seq_len"]),
                                         params["add_special_tokens"].lower() == "true")
        self.output_names = [output["name"] for output in config["output"]]
        self.engine = EngineClient(params["engine_model"])
        self.runs = RunRegistry(server_registry_path())

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
        try:
            prepared = self.preprocessor.prepare(inputs, request.request_id())
        except RequestError as exc:
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(coded(INVALID_ARGUMENT, str(exc), exc.field),
                                           pb_utils.TritonError.INVALID_ARG))
        if prepared["stop"].any():
            for engine_id in self.runs.cancel(request.request_id()):
                if not self.engine.stop(engine_id):  # e.g. a full engine queue refused it
                    pb_utils.Logger.log_warn(f"could not stop engine request {engine_id}; "
                                             "its detokenizer cancels it within 50 ms")
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, prepared[name.lower()]) for name in self.output_names])

    def finalize(self):
        self.engine.close()
        self.runs.close()
