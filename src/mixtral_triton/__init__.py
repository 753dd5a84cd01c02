"""Serve Mixtral 8x22B on Triton Inference Server with TensorRT-LLM.

The package behind the project's user-facing folders (build/, client/, scripts/,
model_repository/). Everything here also runs on CPU so that the whole serving path can
be tested without a GPU.
"""
