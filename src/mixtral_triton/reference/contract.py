"""The tensorrt_llm model's tensor contract, for the CPU reference engine: its inputs as a
reference Request, and the engine's events as its outputs.

Absent inputs take TensorRT-LLM's defaults (temperature 1, top_k 0 and top_p 0 = greedy,
seed 0), so that a client sees the same behaviour from either engine model. An end_id of
-1 means no end token, as for TensorRT-LLM's executor (its LLM API sends -1 for
ignore_eos): the request ends at its length or a stop word.
"""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

import numpy as np

from mixtral_triton.protocol.ensemble import NO_END_ID
from mixtral_triton.reference.engine import Request
from mixtral_triton.reference.sampling import SamplingParams

_SAMPLING_INPUTS = {  # input name -> SamplingParams field
    "temperature": "temperature", "runtime_top_k": "top_k", "runtime_top_p": "top_p",
    "seed": "seed", "min_tokens": "min_tokens", "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
}


def _scalar(inputs: Mapping[str, np.ndarray], name: str, default=None):
    array = inputs.get(name)
    return default if array is None else array.reshape(-1)[0].item()


def word_list(array: np.ndarray | None) -> list[list[int]]:
    """A stop_words_list / bad_words_list ([1, 2, N]: flat ids, then end offsets padded
    with -1) as token id sequences."""
    if array is None:
        return []
    flat, offsets = array.reshape(2, -1)
    words, start = [], 0
    for end in offsets:
        if end < 0:
            break
        words.append(flat[start:end].tolist())
        start = int(end)
    return words


def is_stop_request(inputs: Mapping[str, np.ndarray]) -> bool:
    return bool(_scalar(inputs, "stop", False))


def request_from_inputs(inputs: Mapping[str, np.ndarray]) -> Request:
    input_ids = inputs["input_ids"].reshape(-1)
    length = int(_scalar(inputs, "input_lengths", input_ids.size))
    if input_ids.size and not 1 <= length <= input_ids.size:  # a negative one would slice from the end
        raise ValueError(f"input_lengths must be >= 1 and <= the {input_ids.size} input_ids given, got {length}")
    sampling = {field: _scalar(inputs, name) for name, field in _SAMPLING_INPUTS.items()}
    return Request(
        input_ids=input_ids[:length].tolist(),
        max_tokens=int(_scalar(inputs, "request_output_len")),
        end_id=None if _scalar(inputs, "end_id") == NO_END_ID else _scalar(inputs, "end_id"),
        pad_id=_scalar(inputs, "pad_id"),
        stop_words=word_list(inputs.get("stop_words_list")),
        bad_words=word_list(inputs.get("bad_words_list")),
        sampling=SamplingParams(**{k: v for k, v in sampling.items() if v is not None}),
        streaming=bool(_scalar(inputs, "streaming", False)),
    )


def output_arrays(tokens: Sequence[int], prompt_tokens: int, generated_so_far: int,
                  requested: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """One response's outputs: output_ids [1, beams=1, n] and sequence_length [1, 1]
    count only `tokens` (the prompt is excluded, as exclude_input_in_output).

    Only the `requested` ones (the request's requested_output_names(); None: all). The
    Python backend's stub drops the outputs a request did not ask for inside
    `ResponseSender::Send` after releasing the GIL (python_backend r24.10
    `InferResponse::PruneOutputTensors`), so each dropped tensor's numpy array is freed
    without the GIL: under sustained load that corrupts the stub's heap (a segfault in
    pymalloc, seen at 256 streams from the C++ detokenizer, which asks for two outputs).
    The others are freed here, in Python, holding the GIL."""
    arrays = {
        "output_ids": np.array([[list(tokens)]], np.int32).reshape(1, 1, -1),
        "sequence_length": np.array([[len(tokens)]], np.int32),
        "num_input_tokens": np.array([[prompt_tokens]], np.int32),
        "num_output_tokens": np.array([[generated_so_far]], np.int32),
    }
    return arrays if requested is None else {name: a for name, a in arrays.items() if name in requested}
