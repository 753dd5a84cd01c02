"""Convert a Hugging Face Mixtral checkpoint to the TensorRT-LLM 1.2.1 checkpoint format of
MixtralForCausalLM (config.json and one rank{r}.safetensors per rank), and verify one.
layout.py says what each rank holds and why; writer.py writes it with bounded memory and
resumes after a crash; verify.py checks it against the source on CPU."""

from mixtral_triton.convert.layout import Output, SourceCheckpoint, rank_layout, trtllm_config
from mixtral_triton.convert.mapping import ModelShape, Parallel, resolve
from mixtral_triton.convert.verify import verify
from mixtral_triton.convert.writer import convert

__all__ = ["ModelShape", "Output", "Parallel", "SourceCheckpoint", "convert", "rank_layout", "resolve",
           "trtllm_config", "verify"]
