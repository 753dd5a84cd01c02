import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
            for word in text.decode("utf-8").split(" "):
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("text_output", np.array([word.encode("utf-8")], dtype=object)),
                    # Lets the test check which interpreter the stub embedded and imported from.
                    pb_utils.Tensor("python_executable", np.array([sys.executable.encode()], dtype=object)),
                ]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
