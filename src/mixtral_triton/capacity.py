"""Capacity plan: will the fp16 model fit on these GPUs, and with what engine limits?

All figures are per GPU (one TensorRT-LLM rank per GPU, tensor parallel over all of them,
no pipeline parallelism), computed from the model's config:

* weights: exact parameter counts x 2 bytes (fp16; the small MoE router stays float32),
  sharded as TensorRT-LLM shards them: attention and experts split over the tp ranks
  (experts over moe_tp x ep = tp), the output head split by vocabulary, and the input
  embedding, norms and router replicated on every rank (TensorRT-LLM's default: no
  parallel embedding).
* KV cache per token: layers x 2 (K and V) x KV heads x head size x 2 bytes; each rank
  holds its share of the KV heads (one whole head when tp exceeds the KV heads).
* reserve, in four parts, all documented at their constants below: the worker's CUDA context
  and communication buffers, the TensorRT activation buffers sized for max_num_tokens,
  headroom left free after the KV cache, and on GPU 0 the serving process's own CUDA context
  (orchestrator mode), which appears only after the KV cache is sized.
* KV tokens: what is left, as TensorRT-LLM allocates it: kv_cache_free_gpu_mem_fraction of
  the memory still free once the engine and its activations are loaded. One fraction applies
  to every rank, so GPU 0 (the most loaded) sets it and the other GPUs keep more headroom.
* measured, not estimated: given what trtllm-build reported for a built engine (its build
  record, `--from-build-record`), the weights and activations are those figures instead of
  the calculation, and the plan says which it used.

Engine limits by workload, not by the worst case. The engine's max_input_len/max_seq_len
bound what one request may ask for; max_batch_size bounds how many requests run at once.
TensorRT-LLM's default capacity scheduler (GUARANTEED_NO_EVICT,
cpp/tensorrt_llm/batch_manager/capacityScheduler.cpp) already admits a request only when the
free KV blocks cover *that request's* prompt + max_tokens, and stops at max_batch_size; so
max_batch_size is not what keeps the KV cache safe, and sizing it for full-length requests
(35 on 4 x H100-80GB) leaves the GPUs mostly idle at short requests. Here it is sized for a
workload shape (input/output tokens, default the seed's 128/128): as many of those requests as
the KV cache admits, but no more than the roofline's throughput knee (past it a step becomes
compute bound: more requests only slow each user without more tokens per second) and
TensorRT-LLM's own default of 2048 (its BuildConfig; its tuning guide: set max_batch_size high
enough that it does not limit throughput). Longer requests than the workload's are still
served: the scheduler admits fewer of them at once.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from mixtral_triton.errors import UserError

GiB = 2**30
DTYPE_BYTES = 2  # fp16 weights, activations and KV cache
ROUTER_BYTES = 4  # TensorRT-LLM keeps the MoE router weights in float32 (layers/moe.py)

# Total memory of each GPU as nvidia-smi reports it (MiB), which is what CUDA can allocate from.
GPU_MEMORY_BYTES: dict[str, int] = {
    "A100-40GB": 40960 * 2**20,
    "A100-80GB": 81920 * 2**20,
    "H100-80GB": 81559 * 2**20,
    "H200-141GB": 143771 * 2**20,
    "B200-180GB": 183359 * 2**20,
}
MAX_GPUS = 8  # one node; 8x22B has 8 KV heads, so tp 8 is the widest split without duplication

# Allocated before the KV cache, so outside the memory the KV fraction applies to: the CUDA
# context, cuBLAS/cuBLASLt workspaces, NCCL and the custom all-reduce IPC buffers.
CONTEXT_RESERVE_BYTES = 1 * GiB
# Left free after the KV cache: per-request decoder and sampling buffers, logits, and room for
# allocator fragmentation. Without it a full KV cache makes later small allocations fail.
HEADROOM_BYTES = 1 * GiB
# Orchestrator mode: the tritonserver process holds a CUDA context of its own on GPU 0 (its
# tensorrtllm backend makes a CUDA stream for every request it reads, TensorRT-LLM 1.2.1's
# triton_backend/inflight_batcher_llm/src/utils.cc readInputsTensors), created at the first
# request, after the workers sized their KV cache from the memory then free. So it must come
# out of what the KV fraction leaves on GPU 0, beside the headroom. An estimate (a context is a
# few hundred MiB; its size depends on the driver and the kernels loaded):
# scripts/gpu_acceptance.py measures it per process with nvidia-smi.
SERVER_CONTEXT_RESERVE_BYTES = 1 * GiB
SERVER_CONTEXT_GPU = 0
# How often TensorRT-LLM's backend looks for cancelled requests (cancellation_check_period_ms;
# its default is 100 ms): the plan sets it to one decode step of its batch, within these bounds.
# A stop string or a disconnect then frees its batch slot within about a step, instead of up to
# 100 ms (4 steps of the H100 plan) later. The cost: each check takes the lock the backend's
# response thread also takes and asks Triton, request by request, whether each active request
# was cancelled (an atomic read each): at max_batch_size requests every step, well under 1 %
# of one core.
MIN_CANCELLATION_CHECK_PERIOD_MS = 5
# What every GPU keeps beside weights, activations and the KV cache (GPU 0, the most).
_RUNTIME_RESERVE_BYTES = CONTEXT_RESERVE_BYTES + HEADROOM_BYTES + SERVER_CONTEXT_RESERVE_BYTES
DEFAULT_CANCELLATION_CHECK_PERIOD_MS = 100
# TensorRT sizes activation buffers for max_num_tokens and does not reuse every one of them
# across layers, so twice the live per-token footprint is reserved. An estimate: it has not
# been measured on a built 8x22B engine.
ACTIVATION_MARGIN = 2
# TensorRT-LLM's default; larger only adds activation memory without speeding up decoding.
DEFAULT_MAX_NUM_TOKENS = 8192
# TensorRT-LLM's own default max_batch_size (tensorrt_llm/builder.py BuildConfig): the ceiling
# here too, reached by small models (the tiny fixture) whose KV cache admits thousands.
MAX_BATCH_SIZE_CAP = 2048
# The engine's paged-KV block size (trtllm-build --tokens_per_block); KV tokens come in blocks.
TOKENS_PER_BLOCK = 32
# Keep at least this share of the free memory out of the KV cache whatever the GPU size.
MAX_KV_FRACTION = 0.95
# Engine length limits when none are given: 8x22B's usual ones, shrunk to fit a model with fewer
# positions (the tiny fixture has 4096) so that a default is always valid.
DEFAULT_MAX_INPUT_LEN = 4096
DEFAULT_MAX_OUTPUT_LEN = 1024


@dataclass(frozen=True)
class Workload:
    """A request shape: prompt tokens and generated tokens (max_tokens)."""

    input_tokens: int
    output_tokens: int

    def __str__(self) -> str:
        return f"{self.input_tokens}/{self.output_tokens}"

    @classmethod
    def parse(cls, text: str) -> Workload:
        try:
            input_tokens, output_tokens = (int(part) for part in text.split("/"))
        except ValueError:
            raise UserError(f"--workload must be INPUT/OUTPUT tokens, e.g. 128/128, got {text!r}") from None
        if input_tokens < 1 or output_tokens < 1:
            raise UserError(f"--workload tokens must be at least 1 each, got {text!r}")
        return cls(input_tokens, output_tokens)


SEED_WORKLOAD = Workload(128, 128)  # the seed's requests: short prompts, max_tokens 128
PLAN_WORKLOADS = (SEED_WORKLOAD, Workload(512, 256), Workload(2048, 512), Workload(4096, 1024))


@dataclass(frozen=True)
class ModelShape:
    """The config.json fields the plan needs (hub layout or TensorRT-LLM checkpoint layout)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    top_k: int
    max_position_embeddings: int

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        # The hub names the experts num_local_experts/num_experts_per_tok; a TensorRT-LLM
        # checkpoint keeps them under "moe" as num_experts/top_k.
        moe = config.get("moe") or {}
        if config.get("num_local_experts", moe.get("num_experts")) is None:
            raise UserError("model config has no 'num_local_experts' (or 'moe.num_experts') field")
        try:
            return cls(
                vocab_size=config["vocab_size"],
                hidden_size=config["hidden_size"],
                intermediate_size=config["intermediate_size"],
                num_hidden_layers=config["num_hidden_layers"],
                num_attention_heads=config["num_attention_heads"],
                num_key_value_heads=config["num_key_value_heads"],
                num_experts=config.get("num_local_experts", moe.get("num_experts")),
                top_k=config.get("num_experts_per_tok", moe.get("top_k")),
                max_position_embeddings=config["max_position_embeddings"],
            )
        except KeyError as exc:
            raise UserError(f"model config has no {exc.args[0]!r} field") from None

    @classmethod
    def from_file(cls, path: Path) -> ModelShape:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            return cls.from_config(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read model config {path}: {exc}") from None


# mistral-community/Mixtral-8x22B-v0.1 config.json
MIXTRAL_8X22B = ModelShape(vocab_size=32000, hidden_size=6144, intermediate_size=16384,
                           num_hidden_layers=56, num_attention_heads=48, num_key_value_heads=8,
                           num_experts=8, top_k=2, max_position_embeddings=65536)


def parameter_count(m: ModelShape, tp: int = 1) -> int:
    """Parameters held by one rank of a tp-way split (tp=1: the whole model)."""
    h, d = m.hidden_size, m.head_size
    kv_heads = math.ceil(m.num_key_value_heads / tp)
    attention = 2 * h * m.num_attention_heads * d // tp + 2 * h * kv_heads * d  # q, o; k, v
    experts = m.num_experts * 3 * h * m.intermediate_size // tp  # w1, w2, w3
    replicated = m.num_experts * h + 2 * h  # router, two norms
    layer = attention + experts + replicated
    embedding = m.vocab_size * h
    lm_head = math.ceil(m.vocab_size / tp) * h
    return m.num_hidden_layers * layer + embedding + lm_head + h  # + final norm


def weight_bytes(m: ModelShape, tp: int = 1) -> int:
    router = m.num_hidden_layers * m.num_experts * m.hidden_size
    return parameter_count(m, tp) * DTYPE_BYTES + router * (ROUTER_BYTES - DTYPE_BYTES)


def kv_bytes_per_token(m: ModelShape, tp: int = 1) -> int:
    return m.num_hidden_layers * 2 * math.ceil(m.num_key_value_heads / tp) * m.head_size * DTYPE_BYTES


def activation_bytes_per_token(m: ModelShape, tp: int, ep: int) -> int:
    """Live activations of one token in one layer on one rank, times ACTIVATION_MARGIN."""
    h = m.hidden_size
    expert_width = m.intermediate_size // (tp // ep)
    # Each of the top_k expert copies: permuted input, fused w1|w3 output, SiLU product, output.
    moe = m.top_k * (2 * h + 3 * expert_width)
    qkv = (m.num_attention_heads // tp + 2 * math.ceil(m.num_key_value_heads / tp)) * m.head_size
    residual = 3 * h  # residual stream, normed input, all-reduced block output
    return ACTIVATION_MARGIN * (moe + qkv + residual) * DTYPE_BYTES


@dataclass(frozen=True)
class BuildMeasurement:
    """GPU memory of one built engine as trtllm-build reported it (the largest rank's), or None
    for a figure it did not report."""

    weight_bytes: int | None = None
    activation_bytes: int | None = None


MEASURED = "measured (trtllm-build)"
ESTIMATED = "estimate"


@dataclass(frozen=True)
class CapacityPlan:
    gpu: str
    gpus: int
    tp: int
    ep: int
    max_input_len: int
    max_output_len: int
    max_seq_len: int
    gpu_memory_bytes: int
    weight_bytes_total: int
    weight_bytes_per_gpu: int
    kv_bytes_per_token_total: int
    kv_bytes_per_token_per_gpu: int
    context_reserve_bytes: int
    activation_bytes: int
    headroom_bytes: int
    server_context_reserve_bytes: int
    kv_cache_bytes_per_gpu: int
    kv_cache_free_gpu_mem_fraction: float
    kv_cache_tokens: int
    workload: str
    kv_admitted_requests: int
    full_length_requests: int
    throughput_batch: int
    max_batch_size: int
    max_num_tokens: int
    tokens_per_block: int
    decode_step_ms: float
    cancellation_check_period_ms: int
    weights_source: str = ESTIMATED
    activations_source: str = ESTIMATED

    def memory_per_gpu(self) -> list[dict]:
        """Each GPU's memory as planned, in bytes: what is left once everything else is placed
        is its headroom, at least HEADROOM_BYTES on every GPU (GPU 0 also holds the server's
        context, the others keep that as extra headroom)."""
        rows = []
        for index in range(self.gpus):
            server = self.server_context_reserve_bytes if index == SERVER_CONTEXT_GPU else 0
            placed = {"weights": self.weight_bytes_per_gpu, "activations": self.activation_bytes,
                      "kv_cache": self.kv_cache_bytes_per_gpu, "worker_context": self.context_reserve_bytes,
                      "server_context": server}
            rows.append({"gpu_index": index, **placed,
                         "headroom": self.gpu_memory_bytes - sum(placed.values()),
                         "gpu_memory": self.gpu_memory_bytes})
        return rows

    def to_dict(self) -> dict:
        return {**asdict(self), "memory_per_gpu": self.memory_per_gpu()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        rows = [
            ("GPUs", f"{self.gpus} x {self.gpu} ({_gb(self.gpu_memory_bytes)} each)"),
            ("parallelism", f"tp {self.tp}, ep {self.ep} (moe_tp {self.tp // self.ep})"),
            ("weights, whole model", _gb(self.weight_bytes_total)),
            ("weights per GPU", _gb(self.weight_bytes_per_gpu)),
            ("KV per token, whole model", f"{self.kv_bytes_per_token_total / 1024:g} KiB"),
            ("KV per token per GPU", f"{self.kv_bytes_per_token_per_gpu / 1024:g} KiB"),
            ("reserve: worker CUDA context, NCCL", _gb(self.context_reserve_bytes)),
            ("reserve: activations", f"{_gb(self.activation_bytes)} (max_num_tokens {self.max_num_tokens})"),
            ("reserve: headroom", _gb(self.headroom_bytes)),
            (f"reserve: server context, GPU {SERVER_CONTEXT_GPU}", _gb(self.server_context_reserve_bytes)),
            ("weights, activations from", f"{self.weights_source}, {self.activations_source}"),
            ("KV cache per GPU", _gb(self.kv_cache_bytes_per_gpu)),
            ("KV cache tokens", f"{self.kv_cache_tokens:,} (every rank holds its heads of each)"),
            ("max_input_len / max_seq_len", f"{self.max_input_len} / {self.max_seq_len}"),
            ("workload (input/output)", self.workload),
            ("KV cache admits", f"{self.kv_admitted_requests:,} requests of the workload at once "
                                f"({self.full_length_requests} of full length)"),
            ("roofline throughput batch", f"{self.throughput_batch} (past it a decode step is compute bound)"),
            ("max_batch_size", f"{self.max_batch_size} (the fewer of the two above, at most {MAX_BATCH_SIZE_CAP})"),
            ("max_num_tokens", str(self.max_num_tokens)),
            ("kv_cache_free_gpu_mem_fraction", f"{self.kv_cache_free_gpu_mem_fraction:.2f}"),
            ("decode step (roofline)", f"{self.decode_step_ms:.1f} ms at the batch above"),
            ("cancellation_check_period_ms", str(self.cancellation_check_period_ms)),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def engine_lengths(model: ModelShape, max_input_len: int | None = None,
                   max_output_len: int | None = None) -> tuple[int, int]:
    """The engine's max_input_len and max_output_len: those given, the others defaulted so that
    input + output fit the model's positions."""
    longest = model.max_position_embeddings
    if max_output_len is None:
        room = longest - (max_input_len or 0)
        max_output_len = min(DEFAULT_MAX_OUTPUT_LEN, room if max_input_len else longest // 4)
    if max_input_len is None:
        max_input_len = max(min(DEFAULT_MAX_INPUT_LEN, longest - max_output_len), 1)
    return max_input_len, max_output_len


def kv_admitted_requests(kv_tokens: int, input_tokens: int, output_tokens: int,
                         tokens_per_block: int = TOKENS_PER_BLOCK) -> int:
    """Requests of this shape GUARANTEED_NO_EVICT admits at once: each reserves the KV blocks
    of its whole prompt + max_tokens."""
    return kv_tokens // tokens_per_block // math.ceil((input_tokens + output_tokens) / tokens_per_block)


def mean_decode_context(workload: Workload) -> int:
    """Tokens a decoding request attends over, on average over its output."""
    return workload.input_tokens + workload.output_tokens // 2


def cancellation_check_period_ms(decode_step_ms: float) -> int:
    """One decode step, in whole milliseconds, within the bounds above."""
    return min(DEFAULT_CANCELLATION_CHECK_PERIOD_MS, max(MIN_CANCELLATION_CHECK_PERIOD_MS, math.floor(decode_step_ms)))


def plan_capacity(gpu: str, gpus: int, max_input_len: int | None = None, max_output_len: int | None = None,
                  tp: int | None = None, ep: int = 1, model: ModelShape = MIXTRAL_8X22B,
                  workload: Workload | None = None, measured: BuildMeasurement | None = None,
                  engine_max_batch_size: int | None = None) -> CapacityPlan:
    """The plan, or UserError naming the option, its allowed range, or the numbers that do not fit.
    max_batch_size is sized for `workload`; by default the seed's 128/128 where the engine takes
    it, else the engine's full-length requests. `measured`: what trtllm-build reported for the
    built engine, used instead of the calculation; `engine_max_batch_size`: the built engine's,
    which a plan for it cannot exceed."""
    # The roofline builds on this module's model shapes, so it is imported here, not at the top.
    from mixtral_triton.roofline import decode_step_seconds, throughput_batch

    if gpu not in GPU_MEMORY_BYTES:
        raise UserError(f"--gpu must be one of {', '.join(GPU_MEMORY_BYTES)}, got {gpu!r}")
    if not 1 <= gpus <= MAX_GPUS:
        raise UserError(f"--gpus must be between 1 and {MAX_GPUS}, got {gpus}")
    tp = gpus if tp is None else tp
    if tp != gpus:
        raise UserError(f"--tp must equal --gpus ({gpus}): one engine spans all GPUs, one rank each, got {tp}")
    allowed_ep = [e for e in range(1, tp + 1) if tp % e == 0 and model.num_experts % e == 0]
    if ep not in allowed_ep:
        raise UserError(f"--ep must divide both --tp ({tp}) and the {model.num_experts} experts: "
                        f"one of {', '.join(map(str, allowed_ep))}, got {ep}")
    kv_heads = model.num_key_value_heads
    if (model.num_attention_heads % tp or model.intermediate_size % (tp // ep)
            or (kv_heads % tp and tp % kv_heads)):
        raise UserError(f"--tp {tp} must divide the model's {model.num_attention_heads} attention heads "
                        f"and, over --ep {ep}, its expert width {model.intermediate_size}, and divide "
                        f"or be a multiple of its {kv_heads} KV heads")
    longest = model.max_position_embeddings
    max_input_len, max_output_len = engine_lengths(model, max_input_len, max_output_len)
    if not 1 <= max_input_len < longest:
        raise UserError(f"--max-input-len must be between 1 and {longest - 1}, got {max_input_len}")
    if not 1 <= max_output_len <= longest - max_input_len:
        raise UserError(f"--max-output-len must be between 1 and {longest - max_input_len} "
                        f"(input + output at most {longest} positions), got {max_output_len}")
    max_seq_len = max_input_len + max_output_len
    if workload is None:
        fits = SEED_WORKLOAD.input_tokens <= max_input_len and SEED_WORKLOAD.output_tokens <= max_output_len
        workload = SEED_WORKLOAD if fits else Workload(max_input_len, max_output_len)
    if workload.input_tokens > max_input_len or workload.input_tokens + workload.output_tokens > max_seq_len:
        raise UserError(f"--workload {workload} is longer than the engine accepts (--max-input-len "
                        f"{max_input_len}, input + output at most {max_seq_len})")

    memory = GPU_MEMORY_BYTES[gpu]
    measured = measured or BuildMeasurement()
    weights = measured.weight_bytes or weight_bytes(model, tp)
    if weights + _RUNTIME_RESERVE_BYTES >= memory:
        raise UserError(
            f"does not fit: the fp16 weights need {_gb(weights)} per GPU at tp {tp} "
            f"(+ {_gb(_RUNTIME_RESERVE_BYTES)} runtime reserve), "
            f"and each {gpu} has {_gb(memory)}{_fits_hint(gpu, gpus, model)}")

    # A whole prompt runs in one context step: no chunked prefill needed for max_input_len.
    max_num_tokens = max(DEFAULT_MAX_NUM_TOKENS, max_input_len)
    activations = measured.activation_bytes or max_num_tokens * activation_bytes_per_token(model, tp, ep)
    free_at_kv_allocation = max(memory - weights - CONTEXT_RESERVE_BYTES - activations, 0)
    # What the KV fraction leaves must hold the headroom and, on GPU 0, the server's context.
    kv_room = max(free_at_kv_allocation - HEADROOM_BYTES - SERVER_CONTEXT_RESERVE_BYTES, 0)
    fraction = min(math.floor(100 * kv_room / free_at_kv_allocation) / 100 if kv_room else 0.0,
                   MAX_KV_FRACTION)
    kv_cache_bytes = int(fraction * free_at_kv_allocation)
    kv_per_token = kv_bytes_per_token(model, tp)
    kv_tokens = kv_cache_bytes // kv_per_token // TOKENS_PER_BLOCK * TOKENS_PER_BLOCK
    if kv_tokens < max_seq_len:
        raise UserError(
            f"does not fit: after {_gb(weights)} of weights and "
            f"{_gb(_RUNTIME_RESERVE_BYTES + activations)} of runtime reserve "
            f"(activations for max_num_tokens {max_num_tokens}), each {gpu} has {_gb(kv_cache_bytes)} "
            f"left for the KV cache, and one request of {max_seq_len} tokens needs "
            f"{_gb(max_seq_len * kv_per_token)}; lower --max-input-len/--max-output-len or use more "
            f"or larger GPUs")
    admitted = kv_admitted_requests(kv_tokens, workload.input_tokens, workload.output_tokens)
    knee = throughput_batch(gpu, mean_decode_context(workload), tp, model, MAX_BATCH_SIZE_CAP)
    max_batch_size = min(admitted, knee, MAX_BATCH_SIZE_CAP, engine_max_batch_size or MAX_BATCH_SIZE_CAP)
    # Every step holds one token per decoding request, the rest of max_num_tokens goes to prompts.
    assert max_num_tokens >= max_batch_size
    step_ms = 1e3 * decode_step_seconds(gpu, max_batch_size, mean_decode_context(workload), tp, model)
    plan = CapacityPlan(
        gpu=gpu, gpus=gpus, tp=tp, ep=ep, max_input_len=max_input_len, max_output_len=max_output_len,
        max_seq_len=max_seq_len, gpu_memory_bytes=memory,
        weight_bytes_total=weight_bytes(model), weight_bytes_per_gpu=weights,
        kv_bytes_per_token_total=kv_bytes_per_token(model), kv_bytes_per_token_per_gpu=kv_per_token,
        context_reserve_bytes=CONTEXT_RESERVE_BYTES, activation_bytes=activations,
        headroom_bytes=HEADROOM_BYTES, server_context_reserve_bytes=SERVER_CONTEXT_RESERVE_BYTES,
        kv_cache_bytes_per_gpu=kv_cache_bytes,
        kv_cache_free_gpu_mem_fraction=fraction, kv_cache_tokens=kv_tokens,
        workload=str(workload), kv_admitted_requests=admitted,
        full_length_requests=kv_admitted_requests(kv_tokens, max_input_len, max_output_len),
        throughput_batch=knee, max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
        tokens_per_block=TOKENS_PER_BLOCK, decode_step_ms=step_ms,
        cancellation_check_period_ms=cancellation_check_period_ms(step_ms),
        weights_source=MEASURED if measured.weight_bytes else ESTIMATED,
        activations_source=MEASURED if measured.activation_bytes else ESTIMATED)
    assert all(row["headroom"] >= HEADROOM_BYTES for row in plan.memory_per_gpu())
    return plan


def _fits_hint(gpu: str, asked: int, model: ModelShape) -> str:
    """Point at the smallest larger GPU count of this type whose weights fit, if any."""
    for gpus in range(asked + 1, MAX_GPUS + 1):
        if (model.num_attention_heads % gpus == 0 and model.intermediate_size % gpus == 0
                and weight_bytes(model, gpus) + _RUNTIME_RESERVE_BYTES < GPU_MEMORY_BYTES[gpu]):
            return f"; {gpus} x {gpu} would hold {_gb(weight_bytes(model, gpus))} each"
    return ""


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


MEMORY_COLUMNS = ("weights", "activations", "kv_cache", "worker_context", "server_context", "headroom")


def memory_table_markdown(plans: list[CapacityPlan]) -> str:
    """Each plan's GPUs, one row per GPU: where its memory goes, in GB, adding up to the GPU's.
    GPUs whose rows are the same share one row."""
    lines = ["| GPU (x count) | GPU index | weights | activations | KV cache | worker context | "
             "server context | headroom | sum = GPU memory |", "|---|---|---|---|---|---|---|---|---|"]
    for plan in plans:
        groups: dict[tuple, list[int]] = {}
        for row in plan.memory_per_gpu():
            groups.setdefault(tuple(row[c] for c in MEMORY_COLUMNS), []).append(row["gpu_index"])
        for values, indices in groups.items():
            shown = str(indices[0]) if len(indices) == 1 else f"{indices[0]}-{indices[-1]}"
            lines.append(f"| {plan.gpu} (x{plan.gpus}) | {shown} | "
                         + " | ".join(f"{v / 1e9:.2f}" for v in values)
                         + f" | {plan.gpu_memory_bytes / 1e9:.2f} |")
    return "\n".join(lines)


# Scale a Triton replica out before its engine's batch is full.
HPA_ACTIVE_REQUESTS_SHARE = 0.8


def gateway_max_concurrency(max_batch_size: int, triton_max_replicas: int, gateway_replicas: int) -> int:
    """Generations each gateway pod lets in: together, what the fully scaled-out Triton replicas
    run at once. Fewer would keep the HPA's extra replicas idle; more would only queue work no
    replica can start (the gateway answers 429 instead)."""
    return math.ceil(max_batch_size * triton_max_replicas / gateway_replicas)


def hpa_active_requests_target(max_batch_size: int) -> int:
    return math.floor(HPA_ACTIVE_REQUESTS_SHARE * max_batch_size)
