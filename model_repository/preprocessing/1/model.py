"""Tokenizer model: see mixtral_triton.ensemble_models.preprocess (the logic lives there).

A `stop` request (stop true, with the id of the request to cancel) only passes through: the
ensemble keeps its request id, and the detokenizer (postprocessing, the C++ backend)
cancels that id's running streams in the engine itself and answers it.
"""

import json

import triton_python_backend_utils as pb_utils

from mixtral_triton.protocol import RequestError
from mixtral_triton.protocol.errors import INVALID_ARGUMENT, coded
from mixtral_triton.ensemble_models.preprocess import Preprocessor


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.preprocessor = Preprocessor(params["tokenizer_dir"], int(params["max_input_len"]),
                                         int(params["max_seq_len"]),
                                         params["add_special_tokens"].lower() == "true")
        self.output_names = [output["name"] for output in config["output"]]

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
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, prepared[name.lower()]) for name in self.output_names])
