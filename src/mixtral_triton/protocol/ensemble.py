"""The ensemble's inputs that are not predict fields: TensorRT-LLM 1.2.1's
`inflight_batcher_llm/ensemble` inputs (names, data types and dims as upstream declares
them), plus this project's `stop`. With FIELDS they are the ensemble's whole input list
(`ensemble_input_specs`), from which the configs are checked and the tokenizer model
validates a request.

An input is either served (its value does what upstream's does), or accepted only with
the value that asks for nothing this project does not serve (beam width 1, no logits);
any other value is refused naming the input. Inputs for features not served at all (LoRA,
prompt tuning, embedding bias, encoder-decoder models) are refused whenever they are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixtral_triton.protocol.predict import FIELDS

# The end id of a request that ignores the end token (ignore_eos): TensorRT-LLM's LLM API
# sends -1 to its executor for it (tensorrt_llm/executor/base_worker.py); no token has it.
NO_END_ID = -1

ABSENT = object()  # `only`: the input must not be given at all

# The most sequences one request may ask for (num_return_sequences, OpenAI's n): each is a
# sequence of its own in the engine's batch (TensorRT-LLM makes child requests), so n of
# them take n batch slots; 8 fits the CPU reference engine's batch, and is what sampling
# several completions (best-of evaluation) routinely asks for. The detokenizer's
# kMaxSequences (detokenizer.cc) is the same bound.
MAX_RETURN_SEQUENCES = 8


@dataclass(frozen=True)
class EnsembleInput:
    name: str
    dtype: str
    dims: tuple[int, ...]
    description: str
    # None: served. ABSENT: refused whenever given. Else the one value accepted.
    only: Any = None
    ragged: bool = False  # allow_ragged_batch, as upstream declares it

    @property
    def served(self) -> bool:
        return self.only is None


_NOT_SERVED = "this server serves Mixtral without it"
ENSEMBLE_ONLY_INPUTS: tuple[EnsembleInput, ...] = (
    EnsembleInput("bad_words", "TYPE_STRING", (-1,), "Words the engine never generates."),
    EnsembleInput("end_id", "TYPE_INT32", (1,), "The end token id (default: the tokenizer's)."),
    EnsembleInput("pad_id", "TYPE_INT32", (1,), "The padding token id (default: the tokenizer's)."),
    EnsembleInput("return_num_input_tokens", "TYPE_BOOL", (1,),
                  "Add the output num_input_tokens (the prompt's tokens) to every response."),
    EnsembleInput("return_num_output_tokens", "TYPE_BOOL", (1,),
                  "Add the output num_output_tokens (the tokens of that response) to every response."),
    EnsembleInput("length_penalty", "TYPE_FP32", (1,),
                  "Beam search's length penalty; without beam search TensorRT-LLM ignores it."),
    EnsembleInput("stop", "TYPE_BOOL", (1,), "true cancels the running request of this request id."),
    # The engine is built with max_beam_width 1 (mixtral_triton.trtllm_build): TensorRT-LLM's
    # executor refuses a request whose beam width exceeds the engine's.
    EnsembleInput("beam_width", "TYPE_INT32", (1,), "Beam search needs an engine built for it; "
                  "this one is built with max_beam_width 1.", only=1),
    EnsembleInput("num_return_sequences", "TYPE_INT32", (1,),
                  f"Independent sequences for this request, 1 to {MAX_RETURN_SEQUENCES} (each "
                  "response names its sequence)."),
    EnsembleInput("return_log_probs", "TYPE_BOOL", (1,),
                  "Return the log probability of every generated token."),
    EnsembleInput("return_context_logits", "TYPE_BOOL", (1,), "Logits are not returned.", only=False),
    EnsembleInput("return_generation_logits", "TYPE_BOOL", (1,), "Logits are not returned.",
                  only=False),
    EnsembleInput("return_perf_metrics", "TYPE_BOOL", (1,), "Per-request engine metrics are not "
                  "returned (the server's metrics port has them).", only=False),
    EnsembleInput("decoder_text_input", "TYPE_STRING", (1,), "Encoder-decoder models only.", only=ABSENT),
    EnsembleInput("prompt_embedding_table", "TYPE_FP16", (-1, -1), "Prompt tuning.", only=ABSENT),
    EnsembleInput("prompt_table_extra_id", "TYPE_UINT64", (1,), "Prompt tuning.", only=ABSENT),
    EnsembleInput("prompt_vocab_size", "TYPE_INT32", (1,), "Prompt tuning.", only=ABSENT),
    EnsembleInput("embedding_bias_words", "TYPE_STRING", (-1,), "Embedding bias.", only=ABSENT),
    EnsembleInput("embedding_bias_weights", "TYPE_FP32", (-1,), "Embedding bias.", only=ABSENT),
    EnsembleInput("lora_task_id", "TYPE_UINT64", (1,), "LoRA adapters.", only=ABSENT),
    EnsembleInput("lora_weights", "TYPE_FP16", (-1, -1), "LoRA adapters.", only=ABSENT, ragged=True),
    EnsembleInput("lora_config", "TYPE_INT32", (-1, 3), "LoRA adapters.", only=ABSENT, ragged=True),
    EnsembleInput("guided_decoding_guide_type", "TYPE_STRING", (1,),
                  "Guided decoding: json, json_schema, regex or ebnf_grammar.", ragged=True),
    EnsembleInput("guided_decoding_guide", "TYPE_STRING", (1,),
                  "The JSON Schema, regex or EBNF grammar the output follows.", ragged=True),
)
ENSEMBLE_ONLY_BY_NAME = {spec.name: spec for spec in ENSEMBLE_ONLY_INPUTS}

# Inputs the ensemble requires; every other one is optional.
REQUIRED_INPUTS = ("text_input", "max_tokens")


def ensemble_input_specs() -> list[tuple[str, str, tuple[int, ...], bool]]:
    """Every ensemble input as (name, data type, dims, allow_ragged_batch): the predict
    fields' tensors and their older names, then the inputs above."""
    specs = []
    for field in FIELDS:
        if field.tensor is None:  # response_format: it feeds the guided decoding pair below
            continue
        dims = (-1,) if field.kind in ("stop", "token_ids") else (1,)
        for name in (field.tensor, *field.tensor_aliases):
            specs.append((name, field.tensor_dtype, dims, False))
    specs += [(spec.name, spec.dtype, spec.dims, spec.ragged) for spec in ENSEMBLE_ONLY_INPUTS]
    return specs


def refusal(spec: EnsembleInput, value: Any) -> str | None:
    """Why a request that gives this input with `value` is refused; None if it is not."""
    if spec.served:
        return None
    if spec.only is ABSENT:
        return f"{spec.name} is not served ({spec.description} {_NOT_SERVED}); leave it out"
    if value == spec.only:
        return None
    return f"{spec.name} must be {str(spec.only).lower()} ({spec.description}), got {value!r}"
