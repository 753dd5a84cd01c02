"""The tokenizer model's logic: validate an ensemble request, tokenize it, and produce the
engine's inputs.

The ensemble takes TensorRT-LLM's `inflight_batcher_llm` input names; every value is
checked by the same field table as the predict API (mixtral_triton.protocol), so a bad
request gets the same message whichever way it came in. A field the ensemble request
leaves out keeps TensorRT-LLM's meaning, not the predict API's default: with no sampling
field at all, decoding is greedy, as TensorRT-LLM does; `stream` defaults to false.

A `stop` request (stop true) is checked for its request id and passes on with placeholder
values: the detokenizer (postprocessing, mixtral_triton.cpp_detokenizer) reads STOP and
cancels the running streams of that request id itself.
"""

from __future__ import annotations

import functools

import secrets
from pathlib import Path
from typing import Mapping

import numpy as np

from mixtral_triton.protocol import (
    ENSEMBLE_ONLY_INPUTS, FIELDS, MAX_STOP_CHARS, MAX_STOPS, RequestError, check_lengths, parse_request)
from mixtral_triton.protocol.ensemble import ABSENT, MAX_RETURN_SEQUENCES, NO_END_ID, refusal
from mixtral_triton.protocol.guided import GUIDE_FIELD, TYPE_FIELD, read_guide
from mixtral_triton.guided import GrammarCompiler
from mixtral_triton.ensemble_models.tensors import scalar, strings
from mixtral_triton.text import words_list

# Engine inputs this model produces, in the order of its config's outputs. Their names in
# the config are these, upper-cased (a model cannot have an input and an output of one name).
ENGINE_INPUTS = (
    "input_ids", "input_lengths", "request_output_len", "end_id", "pad_id", "stop_words_list",
    "bad_words_list", "streaming", "temperature", "runtime_top_k", "runtime_top_p", "seed",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens", "stop",
    "num_return_sequences", "return_log_probs", "guided_decoding_guide_type", "guided_decoding_guide",
)
# What the detokenizer (postprocessing) needs besides the engine's inputs (upper-cased in the
# config too).
DETOKENIZER_INPUTS = ("stop_strings", "echo_text", "include_stop_str_in_output",
                      "skip_special_tokens", "return_num_input_tokens", "return_num_output_tokens")


class Preprocessor:
    """Loaded once per model instance: the tokenizer and everything derived from it."""

    def __init__(self, tokenizer_dir: Path, max_input_len: int, max_seq_len: int,
                 add_special_tokens: bool = True):
        from transformers import AutoTokenizer

        # Local files only, never remote code: the folder is a checkpoint we converted.
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True,
                                                       trust_remote_code=False)
        self.max_input_len = max_input_len
        self.max_seq_len = max_seq_len
        self.add_special_tokens = add_special_tokens
        self.vocab_size = len(self.tokenizer)
        # No token spells more characters than the longest piece (added tokens included), so
        # a prompt longer than this many characters is over max_input_len without tokenizing
        # it: a huge prompt is refused at once instead of occupying this instance for seconds
        # (4 MB take ~3 s). The factor 4 leaves room for normalizers that merge characters.
        longest_piece = max(len(piece) for piece in self.tokenizer.get_vocab())
        self.max_prompt_chars = 4 * max_input_len * longest_piece
        self.end_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id

    @functools.cached_property
    def grammars(self) -> GrammarCompiler:
        """Compiles guides: one that does not compile is refused here, before any engine work.
        Made at the first guided request (xgrammar is loaded only then)."""
        return GrammarCompiler(self.tokenizer, self.vocab_size)

    def prepare(self, inputs: Mapping[str, np.ndarray], request_id: str = "") -> dict[str, np.ndarray]:
        """Engine inputs (each [1, ...]) plus the DETOKENIZER_INPUTS."""
        if scalar(inputs, "stop"):
            if not request_id:
                raise RequestError("stop", "stop must come with the id of the request to cancel "
                                   "(gRPC request_id, HTTP \"id\")")
            return self._cancel()
        for spec in ENSEMBLE_ONLY_INPUTS:
            if spec.name in inputs:
                why = refusal(spec, None if spec.only in (None, ABSENT) else scalar(inputs, spec.name))
                if why:
                    raise RequestError(spec.name, why)
        body = {"prompt": scalar(inputs, "text_input")}
        for spec in FIELDS:
            names = [name for name in (spec.tensor, *spec.tensor_aliases) if name in inputs]
            if spec.name == "prompt" or not names:
                continue
            values = [_field_value(inputs, spec, name) for name in names]
            if any(repr(value) != repr(values[0]) for value in values[1:]):  # NaN equals itself here
                raise RequestError(names[1], f"{names[1]} is the older name of {names[0]}; "
                                   f"give one of them, or the same value, got {values[1]!r} "
                                   f"and {values[0]!r}")
            body[spec.name] = values[0]
        body.setdefault("stream", False)
        if body["prompt"] is None:
            raise RequestError("text_input", "text_input is required")
        request = parse_request(body)
        if len(request.prompt) > self.max_prompt_chars:
            raise RequestError("prompt", f"prompt must be at most {self.max_input_len} tokens (the "
                               f"engine's max_input_len), got {len(request.prompt)} characters, "
                               f"more than {self.max_input_len} tokens can spell")

        prompt_ids = self.tokenizer.encode(request.prompt, add_special_tokens=self.add_special_tokens)
        check_lengths(len(prompt_ids), request.max_tokens, max_input_len=self.max_input_len,
                      max_seq_len=self.max_seq_len)
        end_id = self._token_id(inputs, "end_id", self.end_id)
        pad_id = self._token_id(inputs, "pad_id", self.pad_id)
        if request.ignore_eos:
            end_id = NO_END_ID
        for i, token in enumerate(request.stop_token_ids):
            if token >= self.vocab_size:
                raise RequestError("stop_token_ids", f"stop_token_ids[{i}] must be a token id "
                                   f"< {self.vocab_size} (the vocabulary's size), got {token}")
        bad_words = strings(inputs, "bad_words")
        _check_word_list("bad_words", bad_words)
        sequences = _integer(inputs, "num_return_sequences", 1, 1, MAX_RETURN_SEQUENCES)
        guide = read_guide(scalar(inputs, TYPE_FIELD), scalar(inputs, GUIDE_FIELD))
        if guide is not None:
            self.grammars.compile(guide)

        temperature, top_k = request.temperature, request.top_k
        if "top_k" not in body:
            top_k = 0 if "top_p" in body else 1  # TensorRT-LLM: greedy unless top_p says otherwise
        if "temperature" not in body:
            temperature = 1.0
        if temperature == 0:  # greedy; the engine would divide the logits by it
            temperature, top_k = 1.0, 1
        seed = request.seed if request.seed is not None else secrets.randbits(63)

        values = {
            "input_ids": np.array(prompt_ids, np.int32),
            "input_lengths": len(prompt_ids),
            "request_output_len": request.max_tokens,
            "end_id": end_id,
            "pad_id": pad_id,
            "stop_words_list": _words(self.tokenizer, request.stop, request.stop_token_ids),
            "bad_words_list": _words(self.tokenizer, bad_words),
            "streaming": request.stream,
            "temperature": temperature,
            "runtime_top_k": top_k,
            "runtime_top_p": request.top_p if "top_p" in body else 1.0,
            "seed": seed,
            "repetition_penalty": request.repetition_penalty,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
            "min_tokens": request.min_tokens,
            "stop": False,
            "num_return_sequences": sequences,
            "return_log_probs": bool(scalar(inputs, "return_log_probs")),
            # Empty: no guided decoding (the tensorrtllm backend ignores a type it does not map).
            "guided_decoding_guide_type": guide.type if guide else "",
            "guided_decoding_guide": guide.text if guide else "",
        }
        out = {name: _tensor(name, values[name]) for name in ENGINE_INPUTS}
        out.update(self._detokenizer_inputs(request, inputs))
        return out

    @staticmethod
    def _detokenizer_inputs(request, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        echo = "" if request.exclude_input_in_output else request.prompt
        return {"stop_strings": _string_list(request.stop),
                "echo_text": np.array([[echo.encode("utf-8")]], dtype=object),
                "include_stop_str_in_output": _flag(request.include_stop_str_in_output),
                "skip_special_tokens": _flag(request.skip_special_tokens),
                "return_num_input_tokens": _flag(scalar(inputs, "return_num_input_tokens")),
                "return_num_output_tokens": _flag(scalar(inputs, "return_num_output_tokens"))}

    def _cancel(self) -> dict[str, np.ndarray]:
        """A `stop` request only names the request id to cancel (STOP true, read by the
        detokenizer, which cancels that id's streams); the rest is placeholder."""
        values = dict.fromkeys(ENGINE_INPUTS, 0)
        values.update(input_ids=np.array([self.end_id], np.int32), input_lengths=1,
                      request_output_len=1, end_id=self.end_id, pad_id=self.pad_id,
                      stop_words_list=_words(self.tokenizer, ()), bad_words_list=_words(self.tokenizer, ()),
                      streaming=False, temperature=1.0, runtime_top_p=1.0, repetition_penalty=1.0,
                      stop=True, num_return_sequences=1, return_log_probs=False,
                      guided_decoding_guide_type="", guided_decoding_guide="")
        out = {name: _tensor(name, values[name]) for name in ENGINE_INPUTS}
        out.update(self._detokenizer_inputs(_CANCEL, {}))
        return out

    def _token_id(self, inputs: Mapping[str, np.ndarray], name: str, default: int) -> int:
        return _integer(inputs, name, default, 0, self.vocab_size - 1)


def _integer(inputs: Mapping[str, np.ndarray], name: str, default: int, low: int, high: int) -> int:
    value = scalar(inputs, name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        rule = f"{low}" if low == high else f">= {low} and <= {high}"
        raise RequestError(name, f"{name} must be {rule}, got {value!r}")
    return value


def _check_word_list(name: str, words: list[str]) -> None:
    if len(words) > MAX_STOPS:
        raise RequestError(name, f"{name} must hold at most {MAX_STOPS} words, got {len(words)}")
    for word in words:
        if len(word) > MAX_STOP_CHARS:
            raise RequestError(name, f"{name} must hold words of at most {MAX_STOP_CHARS} "
                               f"characters, got one of {len(word)}")


def _field_value(inputs: Mapping[str, np.ndarray], spec, name: str):
    if spec.kind == "stop":
        return strings(inputs, name)
    if spec.kind == "token_ids":
        return inputs[name].reshape(-1).tolist()
    return scalar(inputs, name)


def _flag(value) -> np.ndarray:
    return np.array([[bool(value)]], np.bool_)


def _words(tokenizer, words, token_ids=()) -> np.ndarray:
    array = words_list(tokenizer, list(words), [[token] for token in token_ids])
    if array.shape[1] == 0:  # no words: one padding column, as a tensor cannot be empty here
        array = np.array([[0], [-1]], np.int32)
    return array


_ENGINE_DTYPES = {"input_ids": np.int32, "stop_words_list": np.int32, "bad_words_list": np.int32,
                  "streaming": np.bool_, "stop": np.bool_, "seed": np.uint64, "return_log_probs": np.bool_,
                  "guided_decoding_guide_type": object, "guided_decoding_guide": object,
                  "temperature": np.float32, "runtime_top_p": np.float32,
                  "repetition_penalty": np.float32, "presence_penalty": np.float32,
                  "frequency_penalty": np.float32}


def _tensor(name: str, value) -> np.ndarray:
    """[1, ...]: these models are batched (max_batch_size > 0), one request per item."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    array = np.asarray(value, dtype=_ENGINE_DTYPES.get(name, np.int32))
    return array.reshape(1, 1) if array.ndim == 0 else array[None]


# What a `stop` request's placeholder outputs are made of.
_CANCEL = parse_request({"prompt": "-", "max_tokens": 1, "stream": False})


def _string_list(items) -> np.ndarray:
    # A BYTES tensor needs at least one element; an empty string means "no stop string".
    return np.array([[s.encode("utf-8") for s in items] or [b""]], dtype=object)
