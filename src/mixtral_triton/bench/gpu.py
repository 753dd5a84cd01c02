"""The GPU section, on paper (NOTHING here was measured): Mixtral 8x22B fp16 at TP=4 on
A100-80GB and H100-SXM, from the model's config.

Decode roofline: mixtral_triton.roofline (how it bounds a step is explained there).
KV capacity beside the weights: mixtral_triton.capacity's plan (the one the build uses).
"""

from __future__ import annotations

from mixtral_triton.capacity import MIXTRAL_8X22B, ModelShape, plan_capacity, weight_bytes
from mixtral_triton.errors import UserError
from mixtral_triton.roofline import GPUS as ROOFLINE_GPUS
from mixtral_triton.roofline import parameter_groups, step_bounds

GPUS = (ROOFLINE_GPUS["A100-80GB"], ROOFLINE_GPUS["H100-80GB"])
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
GRID = ((128, 128), (128, 2048), (2048, 128), (2048, 2048))
CONCURRENCY_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128)


def roofline(m: ModelShape = MIXTRAL_8X22B, tp: int = 4, context: int = 2048) -> dict:
    g = parameter_groups(m)
    total = sum(v for k, v in g.items() if k != "expert_one_layer")
    active = (g["attention"] + m.num_hidden_layers * m.top_k * g["expert_one_layer"] + g["router"]
              + g["norms"] + g["lm_head"] + m.hidden_size)
    rows = []
    for gpu in GPUS:
        half = context // 2
        kv_tokens = plan_capacity(gpu.name, tp, half, context - half, model=m).kv_cache_tokens
        for batch in BATCHES:
            b = step_bounds(gpu.name, batch, context, tp, m)
            memory_s, compute_s = b["memory_s"], b["compute_s"]
            step = max(memory_s, compute_s)
            rows.append({"gpu": gpu.label, "batch": batch, "context": context,
                         "experts_touched_per_layer": round(b["experts_touched"], 2),
                         "weight_gb_per_gpu": b["weights"] / 1e9, "kv_gb_per_gpu": b["kv"] / 1e9,
                         "step_ms_memory_bound": memory_s * 1e3, "step_ms_compute_bound": compute_s * 1e3,
                         "bound": "memory" if memory_s >= compute_s else "compute",
                         "tokens_per_s_per_sequence_max": 1 / step,
                         "tokens_per_s_total_max": batch / step,
                         "fits_kv_cache": batch * context <= kv_tokens, "kv_cache_tokens": kv_tokens})
    return {"model": "mistral-community/Mixtral-8x22B-v0.1", "tp": tp, "dtype": "float16",
            "parameters_total": total, "parameters_active_per_token": active,
            "weights_per_gpu_whole_shard_gb": weight_bytes(m, tp) / 1e9,
            "context_assumed": context, "gpus": [gpu.__dict__ for gpu in GPUS], "rows": rows}


def kv_capacity(tp: int = 4) -> list[dict]:
    out = []
    for gpu in GPUS:
        for isl, osl in GRID:
            try:
                plan = plan_capacity(gpu.name, tp, isl, osl)
            except UserError as exc:
                out.append({"gpu": gpu.label, "isl": isl, "osl": osl, "error": str(exc)})
                continue
            out.append({"gpu": gpu.label, "isl": isl, "osl": osl,
                        "weights_gb_per_gpu": plan.weight_bytes_per_gpu / 1e9,
                        "kv_cache_gb_per_gpu": plan.kv_cache_bytes_per_gpu / 1e9,
                        "kv_kib_per_token_per_gpu": plan.kv_bytes_per_token_per_gpu / 1024,
                        "kv_cache_tokens": plan.kv_cache_tokens,
                        "max_batch_size_full_length": plan.full_length_requests,
                        "kv_cache_free_gpu_mem_fraction": plan.kv_cache_free_gpu_mem_fraction})
    return out


def commands(tokenizer: str = "mistral-community/Mixtral-8x22B-v0.1", url: str = "localhost:8001") -> dict:
    """The exact commands for the ISL/OSL grid with a concurrency sweep, to run on the GPU
    host against the served ensemble (GenAI-Perf from the tritonserver <yy.mm>-py3-sdk image
    of the server's release; perf_analyzer needs an input file per grid point)."""
    sweep = " ".join(str(c) for c in CONCURRENCY_SWEEP)
    genai, pa = [], []
    for isl, osl in GRID:
        genai.append(
            f"for c in {sweep}; do genai-perf profile -m ensemble --service-kind triton --backend tensorrtllm "
            f"--url {url} --tokenizer {tokenizer} "
            f"--synthetic-input-tokens-mean {isl} --synthetic-input-tokens-stddev 0 "
            f"--output-tokens-mean {osl} --output-tokens-stddev 0 --output-tokens-mean-deterministic "
            f"--streaming --concurrency $c --request-count $((c * 8 > 64 ? c * 8 : 64)) --warmup-request-count $c "
            f"--profile-export-file mixtral8x22b_tp4_{isl}_{osl}_c$c.json; done")
        pa.append(
            f"for c in {sweep}; do perf_analyzer -m ensemble -i grpc -u {url} --streaming "
            f"--input-data mixtral_{isl}_{osl}.json --concurrency-range $c "
            f"--request-count $((c * 8 > 64 ? c * 8 : 64)) "
            f"--profile-export-file pa_mixtral8x22b_tp4_{isl}_{osl}_c$c.json; done")
    return {"genai_perf": genai, "perf_analyzer": pa,
            "perf_analyzer_input": "mixtral_<isl>_<osl>.json: {\"data\": [{\"text_input\": [<prompt of exactly "
                                   "ISL tokens>], \"max_tokens\": [OSL], \"min_tokens\": [OSL], \"stream\": [true]}, ...]} "
                                   "(python -m mixtral_triton.bench.workload-style prompts: "
                                   "mixtral_triton.bench.perf_analyzer.write_input)"}


# Looked for with this project's search tools (TensorRT-LLM perf-overview pages of several
# releases, NVIDIA and vendor blogs): none publishes Mixtral 8x22B fp16 at TP=4 on
# A100/H100 with TensorRT-LLM. Listed so the reader can see what was checked.
PUBLISHED = [
    {"what": "TensorRT-LLM performance overview (all releases checked up to v1.x)",
     "url": "https://nvidia.github.io/TensorRT-LLM/performance/perf-overview.html",
     "finding": "no Mixtral 8x22B entry (Llama, Qwen3 MoE, DeepSeek, Llama 4 only); not comparable"},
    {"what": "Baseten: Faster Mixtral inference with TensorRT-LLM and quantization",
     "url": "https://www.baseten.co/blog/faster-mixtral-inference-with-tensorrt-llm-and-quantization/",
     "finding": "Mixtral 8x7B int8 on 1 x A100: 127 ms TTFT, 81 tok/s at concurrency 1 (512 in / 128 out); "
                "a different, 3x smaller model: context only"},
]


def gpu_section() -> dict:
    return {"measured": False, "roofline": roofline(), "kv_capacity": kv_capacity(), "commands": commands(),
            "published": PUBLISHED, "published_note": "no published Mixtral 8x22B fp16 TP=4 TensorRT-LLM figures found"}
