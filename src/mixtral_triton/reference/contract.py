"""The tensorrt_llm model's tensor contract, for the CPU reference engine: its inputs as a
reference Request, and the engine's events as its outputs.

Absent inputs take TensorRT-LLM's defaults (temperature 1, top_k 0 and top_p 0 = greedy,
seed 0), so that a client sees the same behaviour from either engine model. An end_id of
-1 means no end token, as for TensorRT-LLM's executor (its LLM API sends -1 for
ignore_eos): the request ends at its length or a stop word.
"""

from __future__ import annotations

import dataclasses
from typing import Collection, Mapping, Sequence

import numpy as np

from mixtral_triton.protocol.ensemble import NO_END_ID
from mixtral_triton.protocol.guided import GUIDE_FIELD, TYPE_FIELD, read_guide
from mixtral_triton.protocol.predict import RequestError
from mixtral_triton.reference.engine import Event, Request
from mixtral_triton.reference.sampling import SamplingParams

_SAMPLING_INPUTS = {  # input name -> SamplingParams field
    "temperature": "temperature", "runtime_top_k": "top_k", "runtime_top_p": "top_p",
    "seed": "seed", "min_tokens": "min_tokens", "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
}


def _scalar(inputs: Mapping[str, np.ndarray], name: str, default=None):
    array = inputs.get(name)
    if array is None:
        return default
    value = array.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else value.item()


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


def wants_log_probs(inputs: Mapping[str, np.ndarray]) -> bool:
    return bool(_scalar(inputs, "return_log_probs", False))


def request_from_inputs(inputs: Mapping[str, np.ndarray], grammars=None) -> Request:
    """The engine request of these inputs. `grammars` (a mixtral_triton.guided.GrammarCompiler)
    compiles a guide; without one a guided request is refused (the paced stand-in has none)."""
    input_ids = inputs["input_ids"].reshape(-1)
    length = int(_scalar(inputs, "input_lengths", input_ids.size))
    if input_ids.size and not 1 <= length <= input_ids.size:  # a negative one would slice from the end
        raise ValueError(f"input_lengths must be >= 1 and <= the {input_ids.size} input_ids given, got {length}")
    sampling = {field: _scalar(inputs, name) for name, field in _SAMPLING_INPUTS.items()}
    guide = read_guide(_scalar(inputs, TYPE_FIELD), _scalar(inputs, GUIDE_FIELD))
    if guide is not None and grammars is None:
        raise RequestError(TYPE_FIELD, f"{TYPE_FIELD}: this engine (the paced stand-in of CPU load "
                           "tests) does no guided decoding")
    return Request(
        input_ids=input_ids[:length].tolist(),
        max_tokens=int(_scalar(inputs, "request_output_len")),
        end_id=None if _scalar(inputs, "end_id") == NO_END_ID else _scalar(inputs, "end_id"),
        pad_id=_scalar(inputs, "pad_id"),
        stop_words=word_list(inputs.get("stop_words_list")),
        bad_words=word_list(inputs.get("bad_words_list")),
        sampling=SamplingParams(**{k: v for k, v in sampling.items() if v is not None}),
        streaming=bool(_scalar(inputs, "streaming", False)),
        grammar=grammars.compile(guide) if guide is not None else None,
    )


def sequence_requests(request: Request, inputs: Mapping[str, np.ndarray]) -> list[Request]:
    """The request's num_return_sequences sequences. As TensorRT-LLM's executor makes child
    requests (LlmRequest::createChildRequest), sequence i draws with the request's seed + i."""
    count = int(_scalar(inputs, "num_return_sequences", 1))
    if count < 1:
        raise RequestError("num_return_sequences", f"num_return_sequences must be >= 1, got {count}")
    seed = request.sampling.seed
    return [dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, seed=(seed + i) % 2**64))
            for i in range(count)]


class ResponseStream:
    """The responses of one Triton request from the engine events of its sequences, as the
    tensorrtllm backend sends them (TensorRT-LLM 1.2.1 model_instance_state.cc
    fillTritonResponse, and LlmRequest::createResult): each response holds one sequence's
    new tokens; `sequence_index` only when the request asked for more than one sequence;
    the request's final flag on the response that ends its last sequence; a sequence that
    ends with no new token still sends a (tokenless) response when there are several.
    With return_log_probs, `output_log_probs` [1, 1, L] holds the log probability of every
    token the sequence generated so far (the executor sends its whole list each time: the
    last sequence_length of them are this response's tokens) and `cum_log_probs` [1, 1]
    their sum."""

    def __init__(self, sequence_ids: Sequence[int], prompt_tokens: int, requested: Collection[str],
                 return_log_probs: bool):
        self._index = {engine_id: i for i, engine_id in enumerate(sequence_ids)}
        self._log_probs: dict[int, list[float]] = {engine_id: [] for engine_id in sequence_ids}
        self._generated = dict.fromkeys(sequence_ids, 0)
        self._open = len(sequence_ids)
        self._prompt_tokens = prompt_tokens
        self._requested = requested
        self._return_log_probs = return_log_probs

    def respond(self, event: Event) -> tuple[dict[str, np.ndarray] | None, bool]:
        """(the response's outputs, or None for a bare final flag; whether it is the final one)."""
        engine_id = event.request_id
        self._generated[engine_id] += len(event.tokens)
        self._log_probs[engine_id] += event.log_probs
        if event.finished:
            self._open -= 1
        final = self._open == 0
        several = len(self._index) > 1
        if not event.tokens and not (several and event.finished):
            return None, final
        log_probs = self._log_probs[engine_id] if self._return_log_probs else None
        return output_arrays(event.tokens, self._prompt_tokens, self._generated[engine_id], self._requested,
                             log_probs=log_probs,
                             sequence_index=self._index[engine_id] if several else None), final


def output_arrays(tokens: Sequence[int], prompt_tokens: int, generated_so_far: int,
                  requested: Collection[str] | None = None, *, log_probs: Sequence[float] | None = None,
                  sequence_index: int | None = None) -> dict[str, np.ndarray]:
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
    if log_probs is not None:
        arrays["output_log_probs"] = np.array(log_probs, np.float32).reshape(1, 1, -1)
        arrays["cum_log_probs"] = np.array([[sum(log_probs)]], np.float32)
    if sequence_index is not None:
        arrays["sequence_index"] = np.array([[sequence_index]], np.int32)
    return arrays if requested is None else {name: a for name, a in arrays.items() if name in requested}
