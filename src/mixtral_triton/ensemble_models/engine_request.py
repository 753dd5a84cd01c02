"""The request the detokenizer (postprocessing) sends to the tensorrt_llm model, built from
the tokenizer model's outputs (named as the engine's inputs, upper-cased), as the C++
backend builds it (mixtral_triton.cpp_detokenizer, detokenizer.cc): the benchmark's
engine-alone path sends the same. And the `stop` request the clients send the engine."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from mixtral_triton.ensemble_models.preprocess import ENGINE_INPUTS


def engine_inputs(prepared: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    inputs = {name: prepared[name.upper()] for name in ENGINE_INPUTS if name != "stop"}
    for name in ("stop_words_list", "bad_words_list"):
        if (inputs[name][..., 1, :] < 0).all():  # only padding: no words, send nothing
            del inputs[name]
    # Always stream from the engine, also when the client wants one response: a stop string
    # found in the text can then end the generation (and free its batch slot) early.
    inputs["streaming"] = np.ones((1, 1), np.bool_)
    inputs["exclude_input_in_output"] = np.ones((1, 1), np.bool_)
    return inputs


def stop_inputs() -> dict[str, np.ndarray]:
    """A request that cancels the engine's running request of the same request id."""
    return {"input_ids": np.zeros((1, 1), np.int32), "input_lengths": np.ones((1, 1), np.int32),
            "request_output_len": np.ones((1, 1), np.int32), "stop": np.ones((1, 1), np.bool_)}
