"""The GPU section, on paper (NOTHING here was measured): Mixtral 8x22B fp16 at TP=4 on
A100-80GB and H100-SXM, from the model's config.

Decode roofline: a decode step reads, on every GPU, its shard of the weights the step
touches plus the KV cache of every sequence in the batch; at small batch that traffic, not
arithmetic, bounds the step: t_step >= bytes_per_gpu / HBM bandwidth. A token activates 2
of the 8 experts of every layer, so a batch of one reads the attention, two experts, the
router, norms and the output head (about 39B of the 141B parameters); a batch of B tokens
touches E(1 - (1 - k/E)^B) experts per layer on average (uniform routing), all 8 well
before B = 32, after which every step reads the whole shard. Left out of the bound: the
TP all-reduces (2 per layer), kernel launch gaps and sampling, so real steps are slower.

KV capacity beside the weights: mixtral_triton.capacity's plan (the one the build uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mixtral_triton.capacity import (DTYPE_BYTES, MIXTRAL_8X22B, ModelShape, kv_bytes_per_token, plan_capacity,
                                     weight_bytes)
from mixtral_triton.errors import UserError


@dataclass(frozen=True)
class Gpu:
    name: str
    capacity_name: str  # mixtral_triton.capacity's GPU key
    hbm_bytes_per_s: float
    fp16_dense_flops: float
    source: str


# NVIDIA's datasheets: A100 80GB SXM (HBM2e 2,039 GB/s, 312 TFLOPS fp16 tensor dense) and
# H100 SXM5 80GB (HBM3 3.35 TB/s, 989 TFLOPS fp16 tensor dense; 1,979 is with sparsity).
GPUS = (
    Gpu("A100-80GB SXM", "A100-80GB", 2.039e12, 312e12,
        "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM: 2,039 GB/s, FP16 tensor 312 TFLOPS dense)"),
    Gpu("H100-SXM 80GB", "H100-80GB", 3.35e12, 989e12,
        "NVIDIA H100 Tensor Core GPU datasheet (SXM: 3.35 TB/s, FP16 tensor 989 TFLOPS dense)"),
)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
GRID = ((128, 128), (128, 2048), (2048, 128), (2048, 2048))
CONCURRENCY_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128)


def parameter_groups(m: ModelShape) -> dict[str, int]:
    """Whole-model parameter counts by group."""
    h, d = m.hidden_size, m.head_size
    attention = m.num_hidden_layers * (2 * h * m.num_attention_heads * d + 2 * h * m.num_key_value_heads * d)
    expert = 3 * h * m.intermediate_size  # w1, w2, w3 of one expert in one layer
    return {
        "attention": attention,
        "experts_all": m.num_hidden_layers * m.num_experts * expert,
        "expert_one_layer": expert,
        "router": m.num_hidden_layers * m.num_experts * h,
        "norms": (2 * m.num_hidden_layers + 1) * h,
        "embedding": m.vocab_size * h,
        "lm_head": m.vocab_size * h,
    }


def expected_experts(batch: int, m: ModelShape) -> float:
    """Distinct experts a batch of `batch` decode tokens touches per layer (uniform routing)."""
    return m.num_experts * (1 - (1 - m.top_k / m.num_experts) ** batch)


def step_bytes_per_gpu(m: ModelShape, tp: int, batch: int, context: int) -> dict:
    """Bytes one GPU reads in one decode step of `batch` sequences of `context` tokens."""
    g = parameter_groups(m)
    experts = expected_experts(batch, m)
    kv_heads = math.ceil(m.num_key_value_heads / tp)
    attention = m.num_hidden_layers * (2 * m.hidden_size * m.num_attention_heads * m.head_size // tp
                                       + 2 * m.hidden_size * kv_heads * m.head_size)
    weights = (attention + experts * m.num_hidden_layers * g["expert_one_layer"] / tp
               + math.ceil(m.vocab_size / tp) * m.hidden_size  # the rank's vocabulary slice
               + batch * m.hidden_size  # embedding rows looked up
               + g["norms"]) * DTYPE_BYTES + g["router"] * 4  # router weights stay float32
    kv = batch * context * kv_bytes_per_token(m, tp)
    return {"weights": weights, "kv": kv, "total": weights + kv, "experts_touched": experts}


def roofline(m: ModelShape = MIXTRAL_8X22B, tp: int = 4, context: int = 2048) -> dict:
    g = parameter_groups(m)
    total = sum(v for k, v in g.items() if k != "expert_one_layer")
    active = (g["attention"] + m.num_hidden_layers * m.top_k * g["expert_one_layer"] + g["router"]
              + g["norms"] + g["lm_head"] + m.hidden_size)
    rows = []
    for gpu in GPUS:
        half = context // 2
        kv_tokens = plan_capacity(gpu.capacity_name, tp, half, context - half, model=m).kv_cache_tokens
        for batch in BATCHES:
            b = step_bytes_per_gpu(m, tp, batch, context)
            memory_s = b["total"] / gpu.hbm_bytes_per_s
            # 2 FLOPs per weight per token over the touched weights (one expert copy per
            # token-choice), attention over the context ignored: a lower bound
            flops = 2 * batch * (g["attention"] / tp + m.num_hidden_layers * m.top_k * g["expert_one_layer"] / tp
                                 + g["lm_head"] / tp)
            compute_s = flops / gpu.fp16_dense_flops
            step = max(memory_s, compute_s)
            rows.append({"gpu": gpu.name, "batch": batch, "context": context,
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
                plan = plan_capacity(gpu.capacity_name, tp, isl, osl)
            except UserError as exc:
                out.append({"gpu": gpu.name, "isl": isl, "osl": osl, "error": str(exc)})
                continue
            out.append({"gpu": gpu.name, "isl": isl, "osl": osl,
                        "weights_gb_per_gpu": plan.weight_bytes_per_gpu / 1e9,
                        "kv_cache_gb_per_gpu": plan.kv_cache_bytes_per_gpu / 1e9,
                        "kv_kib_per_token_per_gpu": plan.kv_bytes_per_token_per_gpu / 1024,
                        "kv_cache_tokens": plan.kv_cache_tokens,
                        "max_batch_size_full_length": plan.max_batch_size,
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
