"""Mixtral forward pass computed from the rank shards of a TensorRT-LLM checkpoint, the way
the TP ranks of an engine compute it.

Every rank holds only its shard (the layout of TensorRT-LLM's Llama/Mixtral converter):

* ``attention.qkv`` is column-parallel: the rank's query heads, then its KV heads (copies
  of a KV head when there are fewer KV heads than ranks).
* ``attention.dense`` and ``mlp.proj`` are row-parallel: each rank's product is a partial
  sum, and the engine all-reduces them; here the partial results are summed.
* ``mlp.router`` is replicated in float32; ``mlp.fc`` is ``[w3; w1]`` per expert, split by
  ``moe_tp`` on the intermediate dimension and by ``moe_ep`` on the expert dimension.
  A rank applies its experts (or expert slices) to the tokens routed to them; the sum
  over ranks is the MoE output.
* ``lm_head`` is vocabulary-parallel (padded to a multiple of ``tp``); the slices are
  gathered and the padding dropped.

So a wrong split in the converter shows up as wrong logits, whatever ``tp``/``moe_tp``/
``moe_ep``/``pp`` the checkpoint was written for. Weights are read memory-mapped from the
safetensors files and computed in float32; the model is meant for small checkpoints.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open

from mixtral_triton.errors import UserError

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a TensorRT-LLM checkpoint's config.json that the forward needs."""

    dtype: torch.dtype  # of every weight but the router's, which is float32
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    norm_epsilon: float
    rotary_base: float
    num_experts: int
    top_k: int
    tp_size: int
    pp_size: int
    moe_tp_size: int
    moe_ep_size: int
    use_parallel_embedding: bool
    embedding_sharding_dim: int

    @classmethod
    def from_json(cls, config: dict) -> "ModelConfig":
        try:
            mapping, moe = config["mapping"], config["moe"]
            tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
            moe_tp, moe_ep = int(mapping.get("moe_tp_size", -1)), int(mapping.get("moe_ep_size", -1))
            # TensorRT-LLM's Mapping fills an unset (-1) MoE size from tp_size.
            if moe_tp == -1 and moe_ep == -1:
                moe_tp, moe_ep = tp, 1
            elif moe_tp == -1:
                moe_tp = tp // moe_ep
            elif moe_ep == -1:
                moe_ep = tp // moe_tp
            num_heads = int(config["num_attention_heads"])
            result = cls(
                dtype=_DTYPES[config["dtype"]],
                vocab_size=int(config["vocab_size"]),
                hidden_size=int(config["hidden_size"]),
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
                head_size=int(config.get("head_size") or int(config["hidden_size"]) // num_heads),
                norm_epsilon=float(config["norm_epsilon"]),
                rotary_base=float(config.get("rotary_base", 10000.0)),
                num_experts=int(moe["num_experts"]),
                top_k=int(moe["top_k"]),
                tp_size=tp,
                pp_size=pp,
                moe_tp_size=moe_tp,
                moe_ep_size=moe_ep,
                use_parallel_embedding=bool(config.get("use_parallel_embedding", False)),
                embedding_sharding_dim=int(config.get("embedding_sharding_dim", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"config.json is not a TensorRT-LLM Mixtral checkpoint config: {exc!r}") from exc
        result._check_supported(config)
        return result

    def _check_supported(self, config: dict) -> None:
        if config.get("position_embedding_type", "rope_gpt_neox") != "rope_gpt_neox":
            raise UserError(f"unsupported position_embedding_type {config['position_embedding_type']!r}")
        if config.get("rotary_scaling"):
            raise UserError("rotary_scaling is not supported by the reference forward")
        if config.get("hidden_act", "swiglu") != "swiglu":
            raise UserError(f"unsupported hidden_act {config['hidden_act']!r} (Mixtral's MoE is swiglu)")
        # 1 = RENORMALIZE: softmax over the top-k router logits, as Mixtral routes.
        if int(config["moe"].get("normalization_mode", 1)) != 1:
            raise UserError("only the RENORMALIZE MoE normalization mode (Mixtral's) is supported")
        if self.moe_tp_size * self.moe_ep_size != self.tp_size:
            raise UserError(f"mapping: moe_tp_size ({self.moe_tp_size}) x moe_ep_size ({self.moe_ep_size}) "
                            f"must equal tp_size ({self.tp_size})")
        if (self.num_experts % self.moe_ep_size or self.intermediate_size % self.moe_tp_size
                or self.num_heads % self.tp_size):
            raise UserError("mapping: experts must divide by moe_ep_size, intermediate_size by moe_tp_size "
                            "and attention heads by tp_size")


@dataclass
class _RankLayer:
    """One decoder layer as one TP rank holds it, in float32. Matrices are stored transposed
    ([in, out], contiguous): x @ w is then about 3x faster on CPU than x @ w.T."""

    input_layernorm: torch.Tensor
    qkv: torch.Tensor  # [hidden, (q_heads + 2 * kv_heads) * head_size]
    dense: torch.Tensor  # [q_heads * head_size, hidden]
    post_layernorm: torch.Tensor
    router: torch.Tensor  # [hidden, num_experts]
    fc: torch.Tensor  # [local_experts, hidden, 2 * local_inter], columns [w3 | w1]
    proj: torch.Tensor  # [local_experts, local_inter, hidden]
    q_heads: int
    kv_heads: int
    first_expert: int  # global index of this rank's expert 0


class SequenceCache:
    """The KV cache of one sequence: per layer and TP rank, that rank's K and V heads."""

    def __init__(self, num_layers: int, tp_size: int):
        self.length = 0  # tokens already in the cache (= position of the next token)
        self.keys: list[list[torch.Tensor | None]] = [[None] * tp_size for _ in range(num_layers)]
        self.values: list[list[torch.Tensor | None]] = [[None] * tp_size for _ in range(num_layers)]

    def append(self, layer: int, rank: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new [kv_heads, n, head_size] K/V; returns all of the sequence's K/V."""
        if self.keys[layer][rank] is not None:
            k = torch.cat([self.keys[layer][rank], k], dim=1)
            v = torch.cat([self.values[layer][rank], v], dim=1)
        self.keys[layer][rank], self.values[layer][rank] = k, v
        return k, v


class ReferenceModel:
    """The TP-simulated Mixtral; see the module docstring."""

    def __init__(self, config: ModelConfig, embeddings: list[torch.Tensor], layers: list[list[_RankLayer]],
                 ln_f: torch.Tensor, lm_heads: list[torch.Tensor]):
        self.config = config
        self._embeddings = embeddings  # per TP rank
        self._layers = layers  # [layer][tp_rank]
        self._ln_f = ln_f
        self._lm_heads = lm_heads  # per TP rank, vocabulary slices, [hidden, vocab / tp]
        # Computed like transformers' default RoPE so that the angles match to the last bit.
        self._inv_freq = 1.0 / (config.rotary_base
                                ** (torch.arange(0, config.head_size, 2, dtype=torch.int64).float() / config.head_size))

    @classmethod
    def from_trtllm_checkpoint(cls, path: str | Path) -> "ReferenceModel":
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UserError(f"{path} is not a TensorRT-LLM checkpoint folder (no config.json)")
        config = ModelConfig.from_json(json.loads(config_file.read_text(encoding="utf-8")))
        tp = config.tp_size
        vocab_slice = -(-config.vocab_size // tp)  # lm_head is padded to a multiple of tp
        embeddings: list[torch.Tensor] = []
        layers: list[list[_RankLayer]] = []
        ln_f, lm_heads = None, []
        for pp_rank in range(config.pp_size):
            shards = [_Shard(path / f"rank{pp_rank * tp + tp_rank}.safetensors", config.dtype)
                      for tp_rank in range(tp)]
            if pp_rank == 0:
                whole = None if config.use_parallel_embedding else (config.vocab_size, config.hidden_size)
                embeddings = [s.take("transformer.vocab_embedding.weight", whole) for s in shards]
            # A stage's layers are numbered from 0 in its files, in model order.
            for local in range(shards[0].layer_count()):
                layers.append([_load_layer(config, s, local, tp_rank) for tp_rank, s in enumerate(shards)])
            if pp_rank == config.pp_size - 1:
                ln_f = shards[0].take("transformer.ln_f.weight", (config.hidden_size,))
                lm_heads = [_in_major(s.take("lm_head.weight", (vocab_slice, config.hidden_size))) for s in shards]
        if len(layers) != config.num_layers:
            raise UserError(f"{path}: the rank files hold {len(layers)} layers, config.json says {config.num_layers}")
        return cls(config, embeddings, layers, ln_f, lm_heads)

    def new_sequence(self) -> SequenceCache:
        return SequenceCache(self.config.num_layers, self.config.tp_size)

    @torch.inference_mode()
    def step(self, tokens: Sequence[Sequence[int]], caches: Sequence[SequenceCache],
             all_positions: bool = False) -> list[torch.Tensor]:
        """Run the new tokens of several sequences as one packed batch (prefills and decodes
        mixed) and append them to the sequences' caches.

        Returns, per sequence, the float32 logits of its last new token ([vocab_size]), or of
        every new token ([n, vocab_size]) with ``all_positions``.
        """
        self._check_step(tokens, caches)
        counts = [len(t) for t in tokens]
        ids = torch.tensor([t for seq in tokens for t in seq], dtype=torch.long)
        positions = torch.cat([torch.arange(c.length, c.length + n) for c, n in zip(caches, counts)])
        cos, sin = self._rope(positions)
        h = self._embed(ids)
        for index, ranks in enumerate(self._layers):
            x = _rms_norm(h, ranks[0].input_layernorm, self.config.norm_epsilon)
            h = h + sum(self._attention(index, rank, layer, x, cos, sin, counts, caches)
                        for rank, layer in enumerate(ranks))
            x = _rms_norm(h, ranks[0].post_layernorm, self.config.norm_epsilon)
            h = h + sum(_moe(layer, x, self.config.top_k) for layer in ranks)
        for cache, n in zip(caches, counts):
            cache.length += n
        if not all_positions:
            h = h[torch.tensor(counts).cumsum(0) - 1]
        logits = self._lm_head(_rms_norm(h, self._ln_f, self.config.norm_epsilon))
        if not all_positions:
            return list(logits)
        return list(logits.split(counts))

    def _check_step(self, tokens: Sequence[Sequence[int]], caches: Sequence[SequenceCache]) -> None:
        if len(tokens) != len(caches) or not tokens:
            raise UserError("step needs one cache per sequence and at least one sequence")
        if len({id(c) for c in caches}) != len(caches):
            raise UserError("a sequence's cache appears twice in one step")
        for seq in tokens:
            if not seq:
                raise UserError("every sequence in a step needs at least one new token")
            if min(seq) < 0 or max(seq) >= self.config.vocab_size:
                raise UserError(f"token ids must be in [0, {self.config.vocab_size})")

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self._inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)  # GPT-NeoX style: rotate the two halves
        return angles.cos()[:, None, :], angles.sin()[:, None, :]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        tables = self._embeddings
        if not self.config.use_parallel_embedding:
            return tables[0][ids]  # every rank holds the whole table and looks up the same rows
        if self.config.embedding_sharding_dim == 1:
            return torch.cat([table[ids] for table in tables], dim=-1)  # all-gather of hidden slices
        out, start = 0, 0
        for table in tables:  # vocabulary slices: each rank fills the ids it owns, then all-reduce
            local = ids - start
            owned = (local >= 0) & (local < table.shape[0])
            out = out + table[local.clamp(0, table.shape[0] - 1)] * owned[:, None]
            start += table.shape[0]
        return out

    def _attention(self, index: int, rank: int, layer: _RankLayer, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, counts: list[int], caches: Sequence[SequenceCache]) -> torch.Tensor:
        """One rank's attention over the packed tokens: its partial sum of the dense output."""
        d = self.config.head_size
        qkv = x @ layer.qkv
        q, k, v = qkv.split([layer.q_heads * d, layer.kv_heads * d, layer.kv_heads * d], dim=-1)
        q = _rotate(q.view(-1, layer.q_heads, d), cos, sin)
        k = _rotate(k.view(-1, layer.kv_heads, d), cos, sin)
        v = v.view(-1, layer.kv_heads, d)
        group = layer.q_heads // layer.kv_heads
        outputs, start = [], 0
        for cache, n in zip(caches, counts):
            keys, values = cache.append(index, rank, k[start:start + n].transpose(0, 1),
                                        v[start:start + n].transpose(0, 1))
            total = keys.shape[1]
            # Query head j reads KV head j // group, as grouped-query attention does.
            scores = q[start:start + n].transpose(0, 1) @ keys.repeat_interleave(group, 0).transpose(1, 2)
            scores = scores / math.sqrt(d)
            query_pos = torch.arange(total - n, total)[:, None]
            scores = scores.masked_fill(torch.arange(total)[None, :] > query_pos, float("-inf"))
            attended = scores.softmax(dim=-1) @ values.repeat_interleave(group, 0)
            outputs.append(attended.transpose(0, 1).reshape(n, -1))
            start += n
        return torch.cat(outputs) @ layer.dense

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.cat([x @ head for head in self._lm_heads], dim=-1)  # all-gather
        return logits[:, :self.config.vocab_size]  # drop the padding rows of the last slice


def _moe(layer: _RankLayer, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """One rank's MoE output for the packed tokens: its experts (or expert slices) only."""
    logits = x @ layer.router
    top_logits, top_experts = logits.topk(top_k, dim=-1)
    weights = top_logits.softmax(dim=-1)  # RENORMALIZE: softmax over the chosen experts
    out = torch.zeros_like(x)
    local_count = layer.fc.shape[0]
    for expert in top_experts.unique().tolist():
        local = expert - layer.first_expert
        if not 0 <= local < local_count:
            continue  # another EP rank owns this expert
        token, slot = (top_experts == expert).nonzero(as_tuple=True)
        up, gate = (x[token] @ layer.fc[local]).chunk(2, dim=-1)  # fc is [w3; w1]
        y = (F.silu(gate) * up) @ layer.proj[local]
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


def _in_major(weight: torch.Tensor) -> torch.Tensor:
    """[..., out, in] -> contiguous [..., in, out]."""
    return weight.transpose(-1, -2).contiguous()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class _Shard:
    """One rank{N}.safetensors file, opened memory-mapped."""

    def __init__(self, path: Path, dtype: torch.dtype):
        if not path.is_file():
            raise UserError(f"missing rank file {path}")
        self.path = path
        self._dtype = dtype
        self._file = safe_open(str(path), framework="pt")
        self._names = set(self._file.keys())

    def take(self, name: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor in float32, after checking that it has the expected shape and dtype."""
        if name not in self._names:
            raise UserError(f"{self.path.name} has no tensor {name}")
        tensor = self._file.get_tensor(name)
        if shape is not None and tuple(tensor.shape) != shape:
            raise UserError(f"{self.path.name}: {name} has shape {tuple(tensor.shape)}, expected {shape}")
        if tensor.dtype != (dtype or self._dtype):
            raise UserError(f"{self.path.name}: {name} is {tensor.dtype}, expected {dtype or self._dtype}")
        return tensor.float()

    def layer_count(self) -> int:
        return len({n.split(".")[2] for n in self._names if n.startswith("transformer.layers.")})


def _load_layer(config: ModelConfig, shard: _Shard, local: int, tp_rank: int) -> _RankLayer:
    h, d = config.hidden_size, config.head_size
    q_heads = config.num_heads // config.tp_size
    kv_heads = max(1, config.num_kv_heads // config.tp_size)  # copies of a KV head when fewer than ranks
    experts = config.num_experts // config.moe_ep_size
    inter = config.intermediate_size // config.moe_tp_size
    p = f"transformer.layers.{local}."
    moe_ep_rank = tp_rank % config.moe_ep_size  # TensorRT-LLM's Mapping.moe_ep_rank
    return _RankLayer(
        input_layernorm=shard.take(p + "input_layernorm.weight", (h,)),
        qkv=_in_major(shard.take(p + "attention.qkv.weight", ((q_heads + 2 * kv_heads) * d, h))),
        dense=_in_major(shard.take(p + "attention.dense.weight", (h, q_heads * d))),
        post_layernorm=shard.take(p + "post_layernorm.weight", (h,)),
        router=_in_major(shard.take(p + "mlp.router.weight", (config.num_experts, h), torch.float32)),
        fc=_in_major(shard.take(p + "mlp.fc.weight", (experts, 2 * inter, h))),
        proj=_in_major(shard.take(p + "mlp.proj.weight", (experts, h, inter))),
        q_heads=q_heads,
        kv_heads=kv_heads,
        first_expert=moe_ep_rank * experts,
    )
