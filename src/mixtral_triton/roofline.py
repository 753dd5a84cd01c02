"""Decode roofline on paper (NOTHING here was measured): how long one decode step of the
fp16 model takes at best on a GPU type, from the model's config and datasheet figures.

A decode step reads, on every GPU, its shard of the weights the step touches plus the KV
cache of every sequence in the batch; at small batch that traffic, not arithmetic, bounds
the step: t_step >= bytes_per_gpu / HBM bandwidth. A token activates top_k of the experts
of every layer, so a batch of one reads the attention, two experts, the router, norms and
the output head (about 39B of 8x22B's 141B parameters); a batch of B tokens touches
E(1 - (1 - k/E)^B) experts per layer on average (uniform routing), all 8 well before
B = 32, after which every step reads the whole shard. The arithmetic bound is 2 FLOPs per
touched weight per token plus attention over the context, against the dense fp16 tensor
peak. Left out: the TP all-reduces (2 per layer), kernel launch gaps and sampling, so real
steps are slower than this.

The GPU keys are mixtral_triton.capacity's, so a capacity plan and its step time name the
same hardware.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mixtral_triton.capacity import (DTYPE_BYTES, GPU_MEMORY_BYTES, MIXTRAL_8X22B, PLAN_WORKLOADS, ROUTER_BYTES,
                                     SEED_WORKLOAD, ModelShape, Workload, kv_admitted_requests, kv_bytes_per_token,
                                     mean_decode_context, plan_capacity)
from mixtral_triton.errors import UserError


@dataclass(frozen=True)
class Gpu:
    name: str  # mixtral_triton.capacity's GPU key
    label: str
    hbm_bytes_per_s: float
    fp16_dense_flops: float
    source: str


# NVIDIA's datasheets; fp16 tensor FLOPs are the dense figures (the datasheets' larger ones
# assume 2:4 sparsity, which a dense fp16 engine does not use).
GPUS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("A100-40GB", "A100-40GB SXM", 1.555e12, 312e12,
        "NVIDIA A100 Tensor Core GPU datasheet (40GB SXM: 1,555 GB/s, FP16 tensor 312 TFLOPS dense)"),
    Gpu("A100-80GB", "A100-80GB SXM", 2.039e12, 312e12,
        "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM: 2,039 GB/s, FP16 tensor 312 TFLOPS dense)"),
    Gpu("H100-80GB", "H100-SXM 80GB", 3.35e12, 989e12,
        "NVIDIA H100 Tensor Core GPU datasheet (SXM: 3.35 TB/s, FP16 tensor 989 TFLOPS dense)"),
    Gpu("H200-141GB", "H200-SXM 141GB", 4.8e12, 989e12,
        "NVIDIA H200 Tensor Core GPU datasheet (SXM: 4.8 TB/s, FP16 tensor 989 TFLOPS dense)"),
    # Drivers report a 7,680-bit bus (about 7.7 TB/s at the shipped memory clock), below the
    # datasheet's 8 TB/s: the bound here is the datasheet's, like the others.
    Gpu("B200-180GB", "B200 180GB (HGX)", 8.0e12, 2.25e15,
        "NVIDIA HGX B200 datasheet (per GPU: HBM3e 8 TB/s, FP16/BF16 tensor 2.25 PFLOPS dense)"),
)}
assert set(GPUS) == set(GPU_MEMORY_BYTES), "every GPU the capacity plan knows needs its roofline figures"
# The GPUs one 8x22B replica (4 GPUs) fits on, in the workload plan's table.
PLAN_GPUS = ("A100-80GB", "H100-80GB", "H200-141GB", "B200-180GB")


def gpu_figures(gpu: str) -> Gpu:
    if gpu not in GPUS:
        raise UserError(f"gpu must be one of {', '.join(GPUS)}, got {gpu!r}")
    return GPUS[gpu]


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
    """Bytes one GPU reads in one decode step of `batch` sequences of `context` tokens each."""
    g = parameter_groups(m)
    experts = expected_experts(batch, m)
    kv_heads = math.ceil(m.num_key_value_heads / tp)
    attention = m.num_hidden_layers * (2 * m.hidden_size * m.num_attention_heads * m.head_size // tp
                                       + 2 * m.hidden_size * kv_heads * m.head_size)
    weights = (attention + experts * m.num_hidden_layers * g["expert_one_layer"] / tp
               + math.ceil(m.vocab_size / tp) * m.hidden_size  # the rank's vocabulary slice
               + batch * m.hidden_size  # embedding rows looked up
               + g["norms"]) * DTYPE_BYTES + g["router"] * ROUTER_BYTES
    kv = batch * context * kv_bytes_per_token(m, tp)
    return {"weights": weights, "kv": kv, "total": weights + kv, "experts_touched": experts}


def step_flops_per_gpu(m: ModelShape, tp: int, batch: int, context: int) -> float:
    """FLOPs one GPU does in one decode step: 2 per touched weight per token (one expert copy
    per token choice) and, for attention, 2 x 2 per context position per head dimension
    (QK^T and PV) over the rank's query heads."""
    g = parameter_groups(m)
    per_token_weights = (g["attention"] + m.num_hidden_layers * m.top_k * g["expert_one_layer"]
                         + g["lm_head"]) / tp
    per_token_attention = 4 * context * m.num_hidden_layers * m.num_attention_heads * m.head_size / tp
    return batch * (2 * per_token_weights + per_token_attention)


def step_bounds(gpu: str, batch: int, context_tokens: int, tp: int = 4,
                model: ModelShape = MIXTRAL_8X22B) -> dict:
    """The memory-bound and compute-bound step times (seconds) and the bytes behind them."""
    figures = gpu_figures(gpu)
    if batch < 1:
        raise UserError(f"batch must be at least 1, got {batch}")
    if context_tokens < 0:
        raise UserError(f"context_tokens must be at least 0, got {context_tokens}")
    if tp < 1:
        raise UserError(f"tp must be at least 1, got {tp}")
    traffic = step_bytes_per_gpu(model, tp, batch, context_tokens)
    flops = step_flops_per_gpu(model, tp, batch, context_tokens)
    return {**traffic, "flops": flops,
            "memory_s": traffic["total"] / figures.hbm_bytes_per_s,
            "compute_s": flops / figures.fp16_dense_flops}


def decode_step_seconds(gpu: str, batch: int, context_tokens: int, tp: int = 4,
                        model: ModelShape = MIXTRAL_8X22B) -> float:
    """The fastest one decode step of `batch` sequences, each attending over `context_tokens`
    tokens, can run on `tp` GPUs of type `gpu`: the larger of the memory and compute bounds."""
    bounds = step_bounds(gpu, batch, context_tokens, tp, model)
    return max(bounds["memory_s"], bounds["compute_s"])


def throughput_batch(gpu: str, context_tokens: int, tp: int = 4, model: ModelShape = MIXTRAL_8X22B,
                     limit: int = 2048) -> int:
    """The smallest batch whose decode step is compute bound (tokens per second stop growing
    with the batch), or `limit` if none up to it is: long contexts stay bound by reading the KV
    cache, and there every added request still adds throughput."""
    def compute_bound(batch: int) -> bool:
        bounds = step_bounds(gpu, batch, context_tokens, tp, model)
        return bounds["compute_s"] >= bounds["memory_s"]

    if not compute_bound(limit):
        return limit
    low, high = 1, limit  # compute_bound(high) holds; both bounds grow linearly past a few experts
    while low < high:
        middle = (low + high) // 2
        if compute_bound(middle):
            high = middle
        else:
            low = middle + 1
    return low


def workload_plan(gpus: tuple[str, ...] = PLAN_GPUS, workloads: tuple[Workload, ...] = PLAN_WORKLOADS,
                  sized_for: Workload | None = None, gpu_count: int = 4,
                  model: ModelShape = MIXTRAL_8X22B) -> list[dict]:
    """How one engine per GPU type, its max_batch_size sized for `sized_for` (default 128/128), serves each shape:
    the requests its KV cache admits at once, the batch it runs (the fewer of those and
    max_batch_size), and the roofline's decode tokens per second for the replica and per user
    (each request attending over its prompt and half its output, on average)."""
    rows = []
    for gpu in gpus:
        plan = plan_capacity(gpu, gpu_count, model=model, workload=sized_for)
        for workload in workloads:
            admitted = kv_admitted_requests(plan.kv_cache_tokens, workload.input_tokens, workload.output_tokens)
            batch = min(admitted, plan.max_batch_size)
            step = decode_step_seconds(gpu, batch, mean_decode_context(workload), plan.tp, model)
            rows.append({"gpu": gpu, "workload": str(workload), "kv_admitted_requests": admitted,
                         "max_batch_size": plan.max_batch_size, "batch": batch, "step_ms": step * 1e3,
                         "tokens_per_s_replica": batch / step, "tokens_per_s_per_user": 1 / step})
    return rows


def workload_plan_markdown(rows: list[dict]) -> str:
    lines = ["| GPU (x4) | workload in/out | KV cache admits | engine max_batch_size | batch run | "
             "decode step ms | decode tok/s per replica | decode tok/s per user |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['gpu']} | {r['workload']} | {r['kv_admitted_requests']:,} | {r['max_batch_size']:,} | "
              f"{r['batch']:,} | {r['step_ms']:.1f} | {r['tokens_per_s_replica']:,.0f} | "
              f"{r['tokens_per_s_per_user']:.0f} |" for r in rows]
    return "\n".join(lines)
