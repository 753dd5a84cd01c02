"""The TensorRT-LLM checkpoint layout of MixtralForCausalLM: for each rank, every output
tensor's name, shape and dtype and the blocks of source tensors it is made of. The writer
and the verifier both work from `rank_layout`, so there is one source of truth.

Facts confirmed in NVIDIA/TensorRT-LLM, in the 1.x-era copies of these files available
(none could be pinned to the v1.2.1 tag itself; every fact below reads the same in each copy
checked, from before and after that release):

- examples/models/core/llama/convert_checkpoint.py: Mixtral goes through
  LLaMAForCausalLM.from_hugging_face and save_checkpoint, one `rank{r}.safetensors` per rank
  for world_size = tp * pp, `config.json` written once (by rank 0). With neither MoE size
  given, experts are split by TP (moe_tp = tp, moe_ep = 1); with one given, the other is
  tp // it; it asserts moe_tp * moe_ep == tp. Before saving it sets the mapping's cp_size
  (1 here) and resets attn_tp_size / attn_cp_size to -1.
- tensorrt_llm/models/llama/model.py + models/model_weights_loader.py (the default
  "unified" converter): TRT-LLM names map to hub names (transformer->model,
  vocab_embedding->embed_tokens, ln_f->norm, attention->self_attn, dense->o_proj,
  post_layernorm->post_attention_layernorm); each TP slice is ceil(width / tp) wide;
  a tensor smaller than its parameter is zero-padded at the end (`fill`); pipeline stages
  renumber their layers from 0 (`update_key_mapping`).
- tensorrt_llm/layers/linear.py (Linear.postprocess, is_qkv) and models/llama/convert.py
  (split, dup_kv_weight): `transformer.layers.N.attention.qkv.weight` is
  cat(q_rank, k_rank, v_rank) along dim 0, each split on dim 0; when num_kv_heads < tp
  each KV head is repeated tp // num_kv_heads times before the split, so TP rank r holds
  KV head r // (tp // num_kv_heads).
- `attention.dense.weight` (RowLinear, tp_dim 1) is o_proj split on its input dim 1.
- tensorrt_llm/layers/moe.py (MixtureOfExperts, MOEWeightWrapper): `mlp.router.weight` is
  a RowLinear with tp_size 1 and dtype float32, so the gate weight is replicated as float32;
  `mlp.fc.weight` is [experts_per_rank, 2 * inter / moe_tp, hidden] = per expert the up
  projection w3 then the gate w1 (fc maps to experts.E.w3 for the rank's experts followed
  by experts.E.w1, stacked and concatenated on dim -2), each split on dim 0 by moe_tp;
  `mlp.proj.weight` is w2 stacked, [experts_per_rank, hidden, inter / moe_tp], split on
  dim 1. The rank's experts are Mapping.ep_experts (a contiguous block per moe_ep rank).
  It raises unless num_experts % moe_ep == 0 and inter % moe_tp == 0.
- tensorrt_llm/mapping.py: tp_rank = rank % tp, pp_rank = rank // tp, moe_tp_rank =
  tp_rank // moe_ep, moe_ep_rank = tp_rank % moe_ep; pp_layers is torch.tensor_split (the
  first num_layers % pp stages get one more layer); to_dict gives the "mapping" section.
- models/llama/model.py, models/modeling_utils.py: `lm_head.weight` is a ColumnLinear of
  pad_vocab_size(vocab, tp) = ceil(vocab / tp) * tp rows split by TP, on the last pipeline
  stage only, with `transformer.ln_f.weight`; `transformer.vocab_embedding.weight` is
  replicated whole (use_parallel_embedding defaults to False) on the first stage only;
  `input_layernorm` / `post_layernorm` weights are replicated. All weights are in the
  checkpoint dtype except the router.
- models/llama/config.py (LLaMAConfig.from_hugging_face, to_dict), models/modeling_utils.py
  (PretrainedConfig.to_dict: __dict__ plus "mapping" without "rank" and "quantization"),
  layers/moe.py (MoeConfig.to_dict): the config.json fields written by `trtllm_config`.
  Mixtral gets hidden_act "swiglu" and MoE normalization_mode RENORMALIZE (1).

One deliberate difference: TensorRT-LLM's save_checkpoint also writes the model's three
float32 RoPE constant buffers (`embed_positions`, `rotary_inv_freq`,
`embed_positions_for_gpt_attention`, registered by Attention.create_attention_const_params).
They are not weights: the engine builder computes them from config.json and
PretrainedModel.load never requires them, so they are left out rather than recomputed with
float rounding that could differ from TensorRT-LLM's own.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch

from mixtral_triton.errors import UserError
from mixtral_triton.convert.mapping import ModelShape, Parallel

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
FP16_MAX = 65504.0


@dataclass(frozen=True)
class Block:
    """Rows [start, stop) of a source tensor, and columns [start, stop) when only some are
    taken (None: all of them, or a 1-D tensor)."""

    source: str
    rows: tuple[int, int]
    cols: tuple[int, int] | None = None


@dataclass(frozen=True)
class ZeroRows:
    """Padding rows (the vocabulary padding of lm_head)."""

    count: int


@dataclass(frozen=True)
class Output:
    """One tensor of a rank file. Its row-major bytes are its parts' rows, in order."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    parts: tuple[Block | ZeroRows, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def rank_layout(model: ModelShape, parallel: Parallel, rank: int, dtype: str) -> list[Output]:
    """The tensors of rank{rank}.safetensors, in file order."""
    m, p = model, parallel
    c = p.coords(rank)
    h = m.hidden_size
    outputs: list[Output] = []

    def add(name: str, shape: tuple[int, ...], parts: list, out_dtype: str = dtype) -> None:
        outputs.append(Output(name, shape, out_dtype, tuple(parts)))

    if c.pp_rank == 0:
        add("transformer.vocab_embedding.weight", (m.vocab_size, h),
            [Block("model.embed_tokens.weight", (0, m.vocab_size))])

    q_rows = m.num_heads * m.head_size // p.tp
    if m.num_kv_heads >= p.tp:
        kv_rows = m.num_kv_heads * m.head_size // p.tp
        kv = (c.tp_rank * kv_rows, (c.tp_rank + 1) * kv_rows)
    else:
        head = c.tp_rank // (p.tp // m.num_kv_heads)
        kv = (head * m.head_size, (head + 1) * m.head_size)
    q = (c.tp_rank * q_rows, (c.tp_rank + 1) * q_rows)
    experts = p.experts(m.num_experts, c.moe_ep_rank)
    inter = m.intermediate_size // p.moe_tp
    moe_rows = (c.moe_tp_rank * inter, (c.moe_tp_rank + 1) * inter)

    for local, layer in enumerate(p.layers(m.num_layers, c.pp_rank)):
        hub, trt = f"model.layers.{layer}", f"transformer.layers.{local}"
        attn, moe = f"{hub}.self_attn", f"{hub}.block_sparse_moe"
        add(f"{trt}.input_layernorm.weight", (h,), [Block(f"{hub}.input_layernorm.weight", (0, h))])
        add(f"{trt}.attention.qkv.weight", (q_rows + 2 * (kv[1] - kv[0]), h),
            [Block(f"{attn}.q_proj.weight", q), Block(f"{attn}.k_proj.weight", kv),
             Block(f"{attn}.v_proj.weight", kv)])
        add(f"{trt}.attention.dense.weight", (h, q_rows), [Block(f"{attn}.o_proj.weight", (0, h), q)])
        add(f"{trt}.post_layernorm.weight", (h,), [Block(f"{hub}.post_attention_layernorm.weight", (0, h))])
        add(f"{trt}.mlp.router.weight", (m.num_experts, h), [Block(f"{moe}.gate.weight", (0, m.num_experts))],
            "float32")
        add(f"{trt}.mlp.fc.weight", (len(experts), 2 * inter, h),
            [Block(f"{moe}.experts.{e}.{w}.weight", moe_rows) for e in experts for w in ("w3", "w1")])
        add(f"{trt}.mlp.proj.weight", (len(experts), h, inter),
            [Block(f"{moe}.experts.{e}.w2.weight", (0, h), moe_rows) for e in experts])

    if c.pp_rank == p.pp - 1:
        add("transformer.ln_f.weight", (h,), [Block("model.norm.weight", (0, h))])
        per_rank = -(-m.vocab_size // p.tp)  # pad_vocab_size(vocab, tp) // tp
        start = min(c.tp_rank * per_rank, m.vocab_size)
        stop = min(start + per_rank, m.vocab_size)
        parts: list = [Block("lm_head.weight", (start, stop))] if stop > start else []
        if stop - start < per_rank:
            parts.append(ZeroRows(per_rank - (stop - start)))
        add("lm_head.weight", (per_rank, h), parts)
    return outputs


def trtllm_config(hf: dict, model: ModelShape, parallel: Parallel, dtype: str) -> dict:
    """config.json as LLaMAConfig.to_dict() writes it for a Mixtral, in its key order."""
    return {
        "mlp_bias": False,
        "attn_bias": False,
        "rotary_base": hf.get("rope_theta", 10000.0),
        "rotary_scaling": hf.get("rope_scaling"),
        "residual_mlp": False,
        "disable_weight_only_quant_plugin": False,
        "moe": {
            "num_experts": model.num_experts,
            "shared_expert_intermediate_size": 0,
            "top_k": model.top_k,
            "normalization_mode": 1,  # RENORMALIZE: softmax over the top-k logits
            "sparse_mixer_epsilon": 0.01,
            "tp_mode": 0,
            "device_limited_n_group": 0,
            "device_limited_topk_group": 0,
            "device_limited_routed_scaling_factor": 1.0,
        },
        "remove_duplicated_kv_heads": False,
        "fc_after_embed": False,
        "use_input_layernorm_in_first_layer": True,
        "use_last_layernorm": True,
        "layer_idx_offset": 0,
        "embedding_multiplier": 1.0,
        "attention_multiplier": 1.0,
        "residual_multiplier": 1.0,
        "output_multiplier_scale": 1.0,
        "has_partial_lora_mask": False,
        "architecture": hf["architectures"][0],
        "dtype": dtype,
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "hidden_act": "swiglu",
        "logits_dtype": "float32",
        "norm_epsilon": hf["rms_norm_eps"],
        "runtime_defaults": None,
        "position_embedding_type": "rope_gpt_neox",
        "num_key_value_heads": model.num_kv_heads,
        "intermediate_size": model.intermediate_size,
        "max_position_embeddings": hf["max_position_embeddings"],
        "mapping": parallel.trtllm_mapping(),
        # QuantConfig without quantization; only the fields every 1.x QuantConfig accepts.
        "quantization": {
            "quant_algo": None,
            "kv_cache_quant_algo": None,
            "group_size": 128,
            "smoothquant_val": 0.5,
            "clamp_val": None,
            "use_meta_recipe": False,
            "has_zero_point": False,
            "pre_quant_scale": False,
            "exclude_modules": None,
            "mamba_ssm_cache_dtype": None,
        },
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "head_size": model.head_size,
        "qk_layernorm": False,
        "rotary_embedding_dim": model.head_size,
        "tie_word_embeddings": False,
    }


class TensorInfo(NamedTuple):
    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # where its data starts in the file

    @property
    def row_values(self) -> int:
        return self.shape[1] if len(self.shape) > 1 else 1


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (without "__metadata__") and where its data starts."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise UserError(f"{path} is not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header, 8 + size


class SourceCheckpoint:
    """A Hugging Face Mixtral folder, read lazily: each read maps one block of rows of its
    shard, so only the blocks being converted are ever in memory, and the cast reads them
    straight from the page cache. (Copying blocks out first, with read() or as safetensors'
    get_slice does, cost a quarter of the converter's CPU time in kernel copies.)"""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        config = self.folder / "config.json"
        if not config.is_file():
            raise UserError(f"{self.folder} has no config.json: not a Hugging Face checkpoint folder")
        self.hf_config = json.loads(config.read_text(encoding="utf-8"))
        self.model = ModelShape.from_hf_config(self.hf_config)
        if self.hf_config.get("tie_word_embeddings"):
            raise UserError("checkpoints with tied input and output embeddings are not supported")
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        elif (self.folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise UserError(f"{self.folder} has neither model.safetensors.index.json nor model.safetensors")
        self.files = [self.folder / name for name in files]
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            header, data_start = read_header(path)
            size = path.stat().st_size
            for name, info in header.items():
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise UserError(f"{name} in {path.name} has dtype {info['dtype']}; expected BF16, F16 or F32")
                dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
                begin, end = info["data_offsets"]
                # Reads trust these offsets, so they are checked as safetensors' own loader does.
                if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= size - data_start:
                    raise UserError(f"{name} in {path.name} has data_offsets {info['data_offsets']} that do not "
                                    f"fit its shape {list(shape)} and the file's {size} bytes")
                self.tensors[name] = TensorInfo(path, shape, dtype, data_start + begin)

    def read(self, name: str, rows: tuple[int, int], cols: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows [rows) (and columns [cols)) of a tensor: a view of a private mapping of those
        rows, unmapped when the tensor is freed."""
        info = self.tensors[name]
        row_bytes = info.row_values * info.dtype.itemsize
        first, length = info.offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        if not length:
            return torch.empty((0, *info.shape[1:]), dtype=info.dtype)
        page_start = first - first % mmap.ALLOCATIONGRANULARITY
        with open(info.path, "rb") as f:
            # Private, so that torch gets a writable buffer while the file can never be written
            # through it. (MAP_POPULATE measured no cheaper than faulting the pages in.)
            mapped = mmap.mmap(f.fileno(), first + length - page_start, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=page_start)
        block = torch.frombuffer(mapped, dtype=info.dtype, count=length // info.dtype.itemsize,
                                 offset=first - page_start).view(rows[1] - rows[0], *info.shape[1:])
        return block if cols is None else block[:, cols[0]:cols[1]]

    def check(self, outputs: list[Output]) -> None:
        """Every block must exist in the source and fit the output it fills."""
        for out in outputs:
            width = out.shape[-1] if len(out.shape) > 1 else 1
            rows = 0
            for part in out.parts:
                if isinstance(part, ZeroRows):
                    rows += part.count
                    continue
                info = self.tensors.get(part.source)
                if info is None:
                    raise UserError(f"the source checkpoint has no tensor {part.source}")
                src_width = info.row_values
                part_width = part.cols[1] - part.cols[0] if part.cols else src_width
                if part.rows[1] > info.shape[0] or (part.cols and part.cols[1] > src_width) or part_width != width:
                    raise UserError(f"source tensor {part.source} has shape {list(info.shape)}, "
                                    f"which does not fit {out.name} {list(out.shape)}")
                rows += part.rows[1] - part.rows[0]
            if rows * width != math.prod(out.shape):
                raise UserError(f"the source does not fill {out.name} {list(out.shape)}")


# Values cast per step through a float32 staging block: 512 KB, which stays in the L2 cache.
# bfloat16 -> float32 -> float16 takes two vectorised copies, about twice as fast as torch's
# direct bfloat16 -> float16 copy, and gives the same bits (the first step is exact).
CAST_BLOCK = 2**17


def cast(values: torch.Tensor, dtype: torch.dtype, clamp_fp16: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """The conversion every output value goes through (torch's round-to-nearest-even, as
    TensorRT-LLM's `.to(dtype)`); with clamping, values beyond the float16 range become
    +-65504 instead of +-inf. Contiguous: `out` (of the values' shape) when given, else new
    (or the values themselves when no conversion is needed)."""
    clamp = clamp_fp16 and dtype is torch.float16
    if out is None:
        if values.dtype == dtype and not clamp:
            return values.contiguous()
        out = torch.empty(values.shape, dtype=dtype)
    if dtype is torch.float32 or (values.dtype == dtype and not clamp):
        return out.copy_(values)
    # Blocks of whole rows, so that a column window is read in place, never copied first.
    rows_in, rows_out = values.view(1, -1) if values.dim() == 1 else values, out.view(-1, out.shape[-1])
    step = max(1, CAST_BLOCK // rows_in.shape[1])
    staging = torch.empty((min(step, rows_in.shape[0]), rows_in.shape[1]), dtype=torch.float32)
    for start in range(0, rows_in.shape[0], step):
        stop = min(start + step, rows_in.shape[0])
        block = staging[:stop - start].copy_(rows_in[start:stop])
        if clamp:
            block.clamp_(-FP16_MAX, FP16_MAX)
        rows_out[start:stop].copy_(block)
    return out


@contextmanager
def one_torch_thread():
    """torch's own threads off for the duration: the converter runs its own threads (ranks,
    hashing, the audit), and torch splitting each small copy over the same cores as well
    made the casts slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rows_per_read(info: TensorInfo, chunk_bytes: int) -> int:
    """How many whole source rows one read may take."""
    return max(1, chunk_bytes // (info.row_values * info.dtype.itemsize))


def piece_bytes(out: Output, chunk_bytes: int) -> int:
    """The most bytes of `out` one step of iter_values gives: whole rows within chunk_bytes,
    at least one row."""
    return max(chunk_bytes, _row_bytes(out))


def _row_bytes(out: Output) -> int:
    return (out.shape[-1] if len(out.shape) > 1 else 1) * DTYPES[out.dtype].itemsize


def iter_values(out: Output, source: SourceCheckpoint, clamp_fp16: bool, chunk_bytes: int,
                into: Callable[[int], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """The output tensor's values, in row-major order, a bounded chunk at a time: each step
    reads (maps) at most chunk_bytes of the source and gives at most piece_bytes. `into(n)`,
    when given, is where a step's n bytes go (n uint8 values, filled before the next step);
    else each step is a tensor of its own."""
    dtype = DTYPES[out.dtype]
    width = out.shape[-1] if len(out.shape) > 1 else 1
    row_bytes = _row_bytes(out)

    def destination(shape: tuple[int, ...]) -> torch.Tensor | None:
        return None if into is None else into(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)

    for part in out.parts:
        if isinstance(part, ZeroRows):
            step = max(1, chunk_bytes // row_bytes)
            for start in range(0, part.count, step):
                shape = (min(step, part.count - start), width)
                dest = destination(shape)
                yield torch.zeros(shape, dtype=dtype) if dest is None else dest.zero_()
            continue
        info = source.tensors[part.source]
        step = min(rows_per_read(info, chunk_bytes), max(1, chunk_bytes // row_bytes))  # within both
        for start in range(part.rows[0], part.rows[1], step):
            stop = min(start + step, part.rows[1])
            block = source.read(part.source, (start, stop), part.cols)
            yield cast(block, dtype, clamp_fp16, destination(tuple(block.shape)))
