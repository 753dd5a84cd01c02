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

To keep a packed step cheap on CPU, the rank shards are joined once at load where the
parallel math is a pure gather or sum, so that one matmul does the work of all ranks
(see ``_join_ranks``): the column-parallel slices (qkv heads, vocabulary slices) are
concatenated in rank order, which is what gathering the ranks' outputs gives; the
row-parallel slices (dense, and each expert's ``moe_tp`` slices of fc/proj) are
concatenated along the split dimension, so the one product sums the ranks' partial
products as the all-reduce does (in another summation order: float32 rounding only).
Each rank's shard is split into its parts (q/k/v, the w3/w1 halves of fc) before joining,
so a shard with a wrong layout still gives wrong logits.
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
from mixtral_triton.reference.sampling import TokenSampler

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


@dataclass
class _Layer:
    """One decoder layer with the shards of all TP ranks joined (see ``_join_ranks``)."""

    input_layernorm: torch.Tensor
    qkv: torch.Tensor  # [hidden, (q_heads + 2 * kv_heads) * head_size], columns [q | k | v], heads in rank order
    dense: torch.Tensor  # [q_heads * head_size, hidden], the ranks' row slices in rank order
    post_layernorm: torch.Tensor
    router: torch.Tensor  # [hidden, num_experts]
    fc: torch.Tensor  # [num_experts, hidden, 2 * inter], columns [w3 | w1], moe_tp slices in rank order
    proj: torch.Tensor  # [num_experts, inter, hidden], moe_tp slices in the same order
    q_heads: int  # over all ranks
    kv_heads: int  # over all ranks (with the ranks' copies of a KV head when fewer than ranks)


def _join_ranks(ranks: list[_RankLayer], num_experts: int) -> _Layer:
    """Join the ranks' shards of one layer so that one matmul computes what the ranks compute
    and the all-gather / all-reduce combines:

    * qkv (column-parallel): each rank's q, k and v heads, concatenated in rank order. Rank
      r's query head i reads its KV head i // group; in the joined heads that is query head
      r * q + i reading KV head (r * q + i) // group = r * kv + i // group, the same head.
    * dense (row-parallel): the rows of all ranks concatenated, so (attention of all heads)
      @ dense is the sum of the ranks' partial products.
    * fc / proj per expert: the ``moe_tp`` ranks' intermediate slices of [w3; w1] and of
      proj concatenated in the same order; silu(gate) * up is elementwise on the
      intermediate dimension, so the one product is the sum of the ranks' partial outputs.
      ``moe_ep`` ranks contribute their own experts.
    * router and the norms are replicated: rank 0's copy.
    """
    first = ranks[0]
    d = first.qkv.shape[1] // (first.q_heads + 2 * first.kv_heads)
    parts = [r.qkv.split([r.q_heads * d, r.kv_heads * d, r.kv_heads * d], dim=1) for r in ranks]
    qkv = torch.cat([p[0] for p in parts] + [p[1] for p in parts] + [p[2] for p in parts], dim=1)
    ups: list[list[torch.Tensor]] = [[] for _ in range(num_experts)]
    gates: list[list[torch.Tensor]] = [[] for _ in range(num_experts)]
    projs: list[list[torch.Tensor]] = [[] for _ in range(num_experts)]
    for r in ranks:  # in rank order: for one expert, ascending moe_tp rank
        for local in range(r.fc.shape[0]):
            up, gate = r.fc[local].chunk(2, dim=-1)  # fc is [w3; w1]
            expert = r.first_expert + local
            ups[expert].append(up)
            gates[expert].append(gate)
            projs[expert].append(r.proj[local])
    fc = torch.stack([torch.cat(ups[e] + gates[e], dim=1) for e in range(num_experts)])
    proj = torch.stack([torch.cat(projs[e], dim=0) for e in range(num_experts)])
    return _Layer(
        input_layernorm=first.input_layernorm,
        qkv=qkv.contiguous(),
        dense=torch.cat([r.dense for r in ranks], dim=0).contiguous(),
        post_layernorm=first.post_layernorm,
        router=first.router,
        fc=fc.contiguous(),
        proj=proj.contiguous(),
        q_heads=sum(r.q_heads for r in ranks),
        kv_heads=sum(r.kv_heads for r in ranks),
    )


class SequenceCache:
    """The KV cache of one sequence: per layer, the K and V heads of all TP ranks (rank r's
    heads at [r * kv, (r + 1) * kv)), in a buffer that grows by doubling so that a decode
    step writes in place instead of copying the whole cache."""

    def __init__(self, num_layers: int):
        self.length = 0  # tokens already in the cache (= position of the next token)
        self.kv: list[torch.Tensor | None] = [None] * num_layers  # [2 (K, V), kv_heads, capacity, head_size]

    def append(self, layer: int, kv: torch.Tensor) -> torch.Tensor:
        """Write the new [2, kv_heads, n, head_size] K/V after the ``length`` cached tokens;
        returns the buffer (valid up to ``length + n``)."""
        n, buffer = kv.shape[2], self.kv[layer]
        end = self.length + n
        if buffer is None or buffer.shape[2] < end:
            capacity = max(end, 2 * (0 if buffer is None else buffer.shape[2]), 32)
            grown = kv.new_empty(2, kv.shape[1], capacity, kv.shape[3])
            if buffer is not None:
                grown[:, :, :self.length] = buffer[:, :, :self.length]
            self.kv[layer] = buffer = grown
        buffer[:, :, self.length:end] = kv
        return buffer


class ReferenceModel:
    """The TP-simulated Mixtral; see the module docstring."""

    def __init__(self, config: ModelConfig, embeddings: list[torch.Tensor], layers: list[list[_RankLayer]],
                 ln_f: torch.Tensor, lm_heads: list[torch.Tensor]):
        self.config = config
        self._embeddings = embeddings  # per TP rank
        self._layers = [_join_ranks(ranks, config.num_experts) for ranks in layers]
        self._ln_f = ln_f
        # lm_head is vocabulary-parallel: the product with the rank slices ([hidden, vocab / tp]
        # each) concatenated in rank order is the all-gather of the ranks' logits. The padding
        # columns of the last slice are dropped here once, as after the gather.
        self._lm_head = torch.cat(lm_heads, dim=1)[:, :config.vocab_size].contiguous()
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
        return SequenceCache(self.config.num_layers)

    def new_sampler(self, request) -> TokenSampler:
        """How a request's next token is chosen from this model's logits (the Engine asks)."""
        return TokenSampler(request.sampling, request.input_ids, self.config.vocab_size, request.end_id,
                            request.bad_words, request.grammar)

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
        plan = _AttentionPlan(counts, caches)
        h = self._embed(ids)
        for index, layer in enumerate(self._layers):
            x = _rms_norm(h, layer.input_layernorm, self.config.norm_epsilon)
            h = h + self._attention(index, layer, x, cos, sin, plan)
            x = _rms_norm(h, layer.post_layernorm, self.config.norm_epsilon)
            h = h + _moe(layer, x, self.config.top_k)
        for cache, n in zip(caches, counts):
            cache.length += n
        if not all_positions:
            h = h[torch.tensor(counts).cumsum(0) - 1]
        logits = _rms_norm(h, self._ln_f, self.config.norm_epsilon) @ self._lm_head
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

    def _attention(self, index: int, layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   plan: "_AttentionPlan") -> torch.Tensor:
        """The attention of all ranks' heads over the packed tokens, through the joined dense:
        the sum of the ranks' partial dense outputs."""
        d, kv_heads = self.config.head_size, layer.kv_heads
        group = layer.q_heads // kv_heads  # query head j reads KV head j // group (grouped-query attention)
        qkv = x @ layer.qkv
        q, k, v = qkv.split([layer.q_heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q = _rotate(q.view(-1, layer.q_heads, d), cos, sin)
        k = _rotate(k.view(-1, kv_heads, d), cos, sin)
        new_kv = torch.stack([k, v.view(-1, kv_heads, d)]).transpose(1, 2)  # [2, kv_heads, tokens, d]
        scale = math.sqrt(d)
        out = x.new_empty(x.shape[0], layer.q_heads * d)
        if plan.decodes:
            # One new token per sequence: all of them in one masked product over the caches
            # padded to the longest (the padding's scores are -inf, so its weights are 0).
            longest = max(plan.decode_lengths)
            padded = x.new_zeros(2, len(plan.decodes), kv_heads, longest, d)
            for row, (seq, token) in enumerate(plan.decodes):
                cache = plan.caches[seq]
                buffer = cache.append(index, new_kv[:, :, token:token + 1])
                padded[:, row, :, :cache.length + 1] = buffer[:, :, :cache.length + 1]
            query = q[plan.decode_tokens].view(len(plan.decodes), kv_heads, group, d)
            scores = (query @ padded[0].transpose(-1, -2)) / scale  # [batch, kv_heads, group, longest]
            scores = scores.masked_fill(plan.decode_padding, float("-inf"))
            attended = scores.softmax(dim=-1) @ padded[1]  # [batch, kv_heads, group, d]
            out[plan.decode_tokens] = attended.reshape(len(plan.decodes), -1)
        for seq, start, n in plan.prefills:
            cache = plan.caches[seq]
            buffer = cache.append(index, new_kv[:, :, start:start + n])
            total = cache.length + n
            keys, values = buffer[0, :, :total], buffer[1, :, :total]  # [kv_heads, total, d]
            query = q[start:start + n].transpose(0, 1).reshape(kv_heads, group, n, d)
            scores = (query @ keys[:, None].transpose(-1, -2)) / scale  # [kv_heads, group, n, total]
            query_pos = torch.arange(total - n, total)[:, None]
            scores = scores.masked_fill(torch.arange(total)[None, :] > query_pos, float("-inf"))
            attended = scores.softmax(dim=-1) @ values[:, None]  # [kv_heads, group, n, d]
            out[start:start + n] = attended.reshape(layer.q_heads, n, d).transpose(0, 1).reshape(n, -1)
        return out @ layer.dense


class _AttentionPlan:
    """How one step's packed tokens split into decodes (one new token, batched) and prefills
    (several, one sequence at a time); the same for every layer."""

    def __init__(self, counts: list[int], caches: Sequence[SequenceCache]):
        self.caches = caches
        self.decodes: list[tuple[int, int]] = []  # (sequence, token index)
        self.prefills: list[tuple[int, int, int]] = []  # (sequence, first token index, count)
        start = 0
        for seq, n in enumerate(counts):
            if n == 1:
                self.decodes.append((seq, start))
            else:
                self.prefills.append((seq, start, n))
            start += n
        self.decode_lengths = [caches[seq].length + 1 for seq, _ in self.decodes]
        self.decode_tokens = torch.tensor([token for _, token in self.decodes], dtype=torch.long)
        if self.decodes:
            lengths = torch.tensor(self.decode_lengths)
            # [batch, 1, 1, longest]: True where a position is past the sequence's length
            self.decode_padding = (torch.arange(max(self.decode_lengths))[None, :] >= lengths[:, None])[:, None, None]


def _moe(layer: _Layer, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """The MoE output for the packed tokens: the tokens grouped by expert, each expert (all
    its ranks' slices joined) applied once to its tokens."""
    logits = x @ layer.router
    top_logits, top_experts = logits.topk(top_k, dim=-1)
    weights = top_logits.softmax(dim=-1)  # RENORMALIZE: softmax over the chosen experts
    flat = top_experts.flatten()
    order = flat.argsort(stable=True)
    token = order // top_k
    routed = x[token]  # [tokens * top_k, hidden], grouped by expert
    outputs, start = [], 0
    for expert, count in enumerate(torch.bincount(flat, minlength=layer.fc.shape[0]).tolist()):
        if count:
            up, gate = (routed[start:start + count] @ layer.fc[expert]).chunk(2, dim=-1)  # fc is [w3; w1]
            outputs.append((F.silu(gate) * up) @ layer.proj[expert])
            start += count
    y = torch.cat(outputs) * weights.flatten()[order, None]
    return torch.zeros_like(x).index_add_(0, token, y)


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
