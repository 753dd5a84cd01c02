"""The Triton model repository: the templates in model_repository/, filled for a target.

`gpu` serves the TensorRT-LLM engine with the C++ `tensorrtllm` backend; `cpu` serves the
Python reference engine under the same model name and tensor contract, so the ensemble
and the pre/postprocessing models are identical on both.
"""

from mixtral_triton.repository.fill import MODELS, Settings, fill_repository
from mixtral_triton.repository.pbtxt import load_config, parse_config
from mixtral_triton.repository.wiring import wiring_problems

__all__ = ["MODELS", "Settings", "fill_repository", "load_config", "parse_config",
           "wiring_problems"]
