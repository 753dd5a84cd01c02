"""`build/fill_model_repository.py`: fill the model repository for a target."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from pathlib import Path

from mixtral_triton.errors import one_line_errors
from mixtral_triton.repository.fill import (CPU_ENGINES, LOGITS_DATATYPES, MODELS, SCHEDULER_POLICIES,
                                            Settings, default_templates, fill_repository)

_HELP = {
    "tokenizer_dir": "folder with tokenizer.json or tokenizer.model (the hub checkpoint)",
    "engine_dir": "gpu: the TensorRT-LLM engine folder (trtllm-build output)",
    "checkpoint_dir": "cpu: the TensorRT-LLM checkpoint the reference engine runs",
    "triton_max_batch_size": "Triton's batch limit for every model",
    "max_batch_size": "cpu: the reference engine's in-flight batch size",
    "max_input_len": "longest prompt in tokens (at most the engine's)",
    "max_seq_len": "longest prompt plus output in tokens (at most the engine's)",
    "max_beam_width": "at most the engine's",
    "kv_cache_free_gpu_mem_fraction": "gpu: share of free GPU memory for the KV cache",
    "batch_scheduler_policy": f"gpu: one of {', '.join(SCHEDULER_POLICIES)}",
    "enable_chunked_context": "gpu: split long prompts across iterations",
    "enable_kv_cache_reuse": "gpu: reuse the KV cache of shared prompt prefixes",
    "max_queue_size": "requests queued before Triton refuses more (0: unbounded)",
    "cancellation_check_period_ms": "gpu: how often the engine looks for cancelled requests, in ms "
                                    "(the capacity plan's cancellation_check_period_ms: one decode step)",
    "logits_datatype": f"the engine's logits type: one of {', '.join(LOGITS_DATATYPES)}",
    "gpu_device_ids": "gpu: the CUDA devices of the engine's ranks, one per rank",
    "add_special_tokens": "prepend the tokenizer's BOS token to prompts",
    "skip_special_tokens": "leave special tokens out of the output text",
    "preprocessing_instance_count": "preprocessing model instances",
    "cpu_engine": f"cpu: what the engine model steps: one of {', '.join(CPU_ENGINES)} "
                  "(standin: fixed tokens at a GPU's decode pace, for load tests)",
    "standin_gpu": "cpu standin: the GPU whose roofline decode step time it waits",
    "standin_tp": "cpu standin: that GPU engine's tensor parallel size",
    "standin_pace_scale": "cpu standin: x the roofline step time (0: no waiting)",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fill_model_repository",
        description="Fill the Triton model repository from the templates in model_repository/ "
        "into a new folder (a previous fill there is replaced whole).")
    p.add_argument("--target", required=True, choices=list(MODELS),
                   help="gpu: the TensorRT-LLM engine; cpu: the Python reference engine")
    p.add_argument("--out", required=True, type=Path, help="the model repository to write")
    p.add_argument("--templates", type=Path, default=default_templates(),
                   help="the template folder (default: %(default)s)")
    # One option per setting, named after it, so that errors can name the option.
    for f in fields(Settings):
        if f.name == "target":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.default is MISSING:
            p.add_argument(flag, dest=f.name, type=Path, required=True, help=_HELP[f.name])
        elif f.default is None:
            p.add_argument(flag, dest=f.name, type=Path, help=_HELP[f.name])
        elif isinstance(f.default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=f.default, help=_HELP[f.name] + " (default: %(default)s)")
        else:
            p.add_argument(flag, dest=f.name, type=type(f.default), default=f.default,
                           help=_HELP[f.name] + " (default: %(default)s)")
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    out, templates = args.pop("out"), args.pop("templates")
    print(fill_repository(Settings(**args), out, templates))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
