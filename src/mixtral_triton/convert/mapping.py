"""Which rank holds what: tensor, pipeline and MoE parallelism, with the constraints that
TensorRT-LLM 1.2.1 asserts (tensorrt_llm/mapping.py, layers/moe.py, layers/linear.py and
examples/models/core/llama/convert_checkpoint.py). Every check raises a UserError naming the
command-line option, and all of them run before any tensor is read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from mixtral_triton.errors import UserError

# TensorRT-LLM's Mapping defaults that the converter leaves alone; they are written into
# config.json's "mapping" section as TensorRT-LLM's own convert_checkpoint.py writes them.
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Mixtral that parallelism splits, from the Hugging Face config.json."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    num_layers: int
    num_experts: int
    top_k: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelShape":
        if hf.get("model_type") != "mixtral":
            raise UserError(f"the source is a {hf.get('model_type')!r} model, not a Mixtral (model_type 'mixtral')")
        heads = hf["num_attention_heads"]
        return cls(
            hidden_size=hf["hidden_size"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_size=hf.get("head_dim") or hf["hidden_size"] // heads,
            num_layers=hf["num_hidden_layers"],
            num_experts=hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            intermediate_size=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
        )


class RankCoords(NamedTuple):
    tp_rank: int
    pp_rank: int
    moe_tp_rank: int
    moe_ep_rank: int


@dataclass(frozen=True)
class Parallel:
    tp: int
    pp: int
    moe_tp: int
    moe_ep: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def coords(self, rank: int) -> RankCoords:
        # Ranks are tp-major within a pipeline stage; inside a TP group the expert-parallel
        # rank varies fastest (Mapping.tp_rank, pp_rank, moe_tp_rank, moe_ep_rank).
        tp_rank = rank % self.tp
        return RankCoords(tp_rank, rank // self.tp, tp_rank // self.moe_ep, tp_rank % self.moe_ep)

    def layers(self, num_layers: int, pp_rank: int) -> range:
        """Mapping.pp_layers: torch.tensor_split, so the first num_layers % pp stages get one more."""
        base, extra = divmod(num_layers, self.pp)
        start = pp_rank * base + min(pp_rank, extra)
        return range(start, start + base + (pp_rank < extra))

    def experts(self, num_experts: int, moe_ep_rank: int) -> range:
        """Mapping.ep_experts: a contiguous block of experts per expert-parallel rank."""
        per_rank = num_experts // self.moe_ep
        return range(moe_ep_rank * per_rank, (moe_ep_rank + 1) * per_rank)

    def trtllm_mapping(self) -> dict:
        """config.json's "mapping": Mapping.to_dict() without "rank", with the attention sizes
        reset to -1 as examples/models/core/llama/convert_checkpoint.py does before saving."""
        return {
            "world_size": self.world_size,
            "gpus_per_node": GPUS_PER_NODE,
            "cp_size": 1,
            "tp_size": self.tp,
            "pp_size": self.pp,
            "moe_tp_size": self.moe_tp,
            "moe_cluster_size": 1,
            "moe_ep_size": self.moe_ep,
            "attn_tp_size": -1,
            "attn_cp_size": -1,
            "cp_config": {},
            "enable_attention_dp": False,
            "enable_lm_head_tp_in_adp": False,
        }


def resolve(tp: int = 4, pp: int = 1, moe_tp: int | None = None, moe_ep: int | None = None) -> Parallel:
    """Fill in the MoE split as convert_checkpoint.py does (neither given: experts split by
    TP; one given: the other is tp divided by it) and check the products."""
    for option, value in (("--tp-size", tp), ("--pp-size", pp), ("--moe-tp-size", moe_tp), ("--moe-ep-size", moe_ep)):
        if value is not None and value < 1:
            raise UserError(f"{option} must be at least 1, got {value}")
    if moe_tp is None and moe_ep is None:
        moe_tp, moe_ep = tp, 1
    elif moe_tp is None:
        moe_tp = tp // moe_ep
    elif moe_ep is None:
        moe_ep = tp // moe_tp
    if moe_tp * moe_ep != tp:
        raise UserError(f"--moe-tp-size ({moe_tp}) times --moe-ep-size ({moe_ep}) must equal --tp-size ({tp})")
    return Parallel(tp=tp, pp=pp, moe_tp=moe_tp, moe_ep=moe_ep)


def check_model(parallel: Parallel, model: ModelShape) -> None:
    """The splits must be even where TensorRT-LLM's layers require it."""
    p, m = parallel, model
    if m.num_heads % p.tp:
        raise UserError(f"--tp-size {p.tp} must divide the {m.num_heads} attention heads")
    # KV heads are split when there are enough of them and duplicated when there are fewer
    # than TP ranks (Linear.postprocess and dup_kv_weight assert tp % kv_heads == 0).
    if m.num_kv_heads % p.tp and p.tp % m.num_kv_heads:
        raise UserError(f"--tp-size {p.tp} must divide, or be a multiple of, the {m.num_kv_heads} key/value heads")
    if p.pp > m.num_layers:
        raise UserError(f"--pp-size {p.pp} is larger than the {m.num_layers} layers")
    if m.num_experts % p.moe_ep:
        raise UserError(f"--moe-ep-size {p.moe_ep} must divide the {m.num_experts} experts")
    if m.intermediate_size % p.moe_tp:
        raise UserError(f"--moe-tp-size {p.moe_tp} must divide the expert intermediate size {m.intermediate_size}")
