"""Round trip and crash safety: re-assembling the rank files gives back the source weights bit
for bit (after the cast); the verifier catches damaged checkpoints; a conversion cut off
mid-rank leaves nothing a rerun trusts, and the rerun completes it."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_convert import load_hub, write_micro

from mixtral_triton.convert import convert, resolve, verify
from mixtral_triton.convert import writer
from mixtral_triton.errors import UserError

QUIET = {"log": lambda _: None}


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return write_micro(tmp_path_factory.mktemp("hub") / "micro")


def reassemble(out: Path, hf: dict) -> dict[str, torch.Tensor]:
    """The hub tensors put back together from the rank files, checking on the way that every
    replicated or duplicated copy is identical."""
    mapping = json.loads((out / "config.json").read_text())["mapping"]
    tp, pp, moe_tp, moe_ep = (mapping[k] for k in ("tp_size", "pp_size", "moe_tp_size", "moe_ep_size"))
    h, heads, kv, experts = (hf[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                             "num_local_experts"))
    ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in range(tp * pp)]

    def same(tensors: list[torch.Tensor]) -> torch.Tensor:
        assert all(torch.equal(t, tensors[0]) for t in tensors)
        return tensors[0]

    first, last = ranks[:tp], ranks[-tp:]
    hub = {"model.embed_tokens.weight": same([r["transformer.vocab_embedding.weight"] for r in first]),
           "model.norm.weight": same([r["transformer.ln_f.weight"] for r in last]),
           "lm_head.weight": torch.cat([r["lm_head.weight"] for r in last])[:hf["vocab_size"]]}
    q_rows = heads * (h // heads) // tp
    for stage, layers in enumerate(torch.tensor_split(torch.arange(hf["num_hidden_layers"]), pp)):
        group = ranks[stage * tp:(stage + 1) * tp]
        for local, layer in enumerate(layers.tolist()):
            t, p = f"transformer.layers.{local}.", f"model.layers.{layer}."
            qkv = [r[t + "attention.qkv.weight"] for r in group]
            kv_rows = (qkv[0].shape[0] - q_rows) // 2
            hub[p + "self_attn.q_proj.weight"] = torch.cat([x[:q_rows] for x in qkv])
            for name, start in (("k_proj", q_rows), ("v_proj", q_rows + kv_rows)):
                parts = [x[start:start + kv_rows] for x in qkv]
                reps = max(1, tp // kv)  # ranks sharing one duplicated KV head
                hub[f"{p}self_attn.{name}.weight"] = torch.cat([same(parts[i:i + reps])
                                                                for i in range(0, tp, reps)])
            hub[p + "self_attn.o_proj.weight"] = torch.cat([r[t + "attention.dense.weight"] for r in group], dim=1)
            hub[p + "input_layernorm.weight"] = same([r[t + "input_layernorm.weight"] for r in group])
            hub[p + "post_attention_layernorm.weight"] = same([r[t + "post_layernorm.weight"] for r in group])
            hub[p + "block_sparse_moe.gate.weight"] = same([r[t + "mlp.router.weight"] for r in group])
            pieces: dict[str, list] = {}
            for tp_rank, r in enumerate(group):
                moe_tp_rank, moe_ep_rank = tp_rank // moe_ep, tp_rank % moe_ep
                fc, proj = r[t + "mlp.fc.weight"], r[t + "mlp.proj.weight"]
                inter = fc.shape[1] // 2
                for i, e in enumerate(range(moe_ep_rank * experts // moe_ep, (moe_ep_rank + 1) * experts // moe_ep)):
                    e_ = f"{p}block_sparse_moe.experts.{e}."
                    for name, value in ((e_ + "w3.weight", fc[i, :inter]), (e_ + "w1.weight", fc[i, inter:]),
                                        (e_ + "w2.weight", proj[i])):
                        pieces.setdefault(name, [None] * moe_tp)[moe_tp_rank] = value
            for name, parts in pieces.items():
                hub[name] = torch.cat(parts, dim=1 if name.endswith("w2.weight") else 0)
    return hub


@pytest.mark.parametrize("tp,pp,moe_tp,moe_ep", [(4, 1, 4, 1), (4, 1, 1, 4), (4, 1, 2, 2), (2, 2, 2, 1)])
def test_reassembled_shards_are_the_source_after_the_cast(micro, tmp_path, tp, pp, moe_tp, moe_ep):
    out = tmp_path / "out"
    convert(micro, out, parallel=resolve(tp, pp, moe_tp, moe_ep), **QUIET)
    assert verify(micro, out, **QUIET)["ranks"] == tp * pp
    hub, hf = load_hub(micro), json.loads((micro / "config.json").read_text())
    back = reassemble(out, hf)
    assert back.keys() == hub.keys()
    for name, source in hub.items():
        want = source.float() if name.endswith("block_sparse_moe.gate.weight") else source.half()
        assert back[name].dtype == want.dtype and torch.equal(back[name], want), name


def test_tiny_default_conversion_verifies(tiny_checkpoint, tmp_path):
    convert(tiny_checkpoint, tmp_path / "out", parallel=resolve(), **QUIET)
    assert verify(tiny_checkpoint, tmp_path / "out", **QUIET) == {"ranks": 4, "tensors": 68, "bytes": 95234048}


@pytest.fixture
def converted(micro, tmp_path) -> Path:
    out = tmp_path / "out"
    convert(micro, out, parallel=resolve(2, 1), **QUIET)
    return out


def flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_catches_a_changed_value(micro, converted):
    flip_byte(converted / "rank1.safetensors", 1000)  # inside lm_head, the last tensor
    with pytest.raises(UserError, match="rank1.safetensors does not match the xxh3_128.*lm_head.weight differs"):
        verify(micro, converted, **QUIET)
    (converted / "manifest.json").unlink()  # without a manifest, the value comparison alone catches it
    with pytest.raises(UserError, match="rank1.safetensors: lm_head.weight differs from the source"):
        verify(micro, converted, **QUIET)


def test_verify_catches_missing_ranks_and_a_wrong_config(micro, converted):
    (converted / "rank0.safetensors").unlink()
    config = json.loads((converted / "config.json").read_text())
    config["moe"]["top_k"] = 1
    (converted / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config.json differs from TensorRT-LLM's in \['moe'\].*rank0.safetensors is missing"):
        verify(micro, converted, **QUIET)


def test_verify_catches_a_truncated_file(micro, converted):
    path = converted / "rank0.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match="rank0.safetensors is not a valid safetensors file"):
        verify(micro, converted, **QUIET)


def test_crash_mid_rank_leaves_nothing_trusted_and_rerun_completes(micro, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real, calls = writer.write_tensor, []

    def crashing(stream, tensor, *args):
        calls.append(tensor.name)
        if len(calls) == 30:  # rank 0 has 24 tensors: this is in the middle of rank 1
            raise RuntimeError("disk on fire")
        return real(stream, tensor, *args)

    monkeypatch.setattr(writer, "write_tensor", crashing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(micro, out, parallel=resolve(2, 1), **QUIET)
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["ranks"]) == ["0"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rank0.safetensors"]

    # What a hard kill would leave besides: a partial temporary file, and a rank file that
    # no manifest entry vouches for.
    (out / ".rank1.safetensors.tmp").write_bytes(b"partial")
    shutil.copy(out / "rank0.safetensors", out / "rank1.safetensors")
    monkeypatch.setattr(writer, "write_tensor", real)
    lines = []
    convert(micro, out, parallel=resolve(2, 1), log=lines.append)
    assert "rank 0: already written and verified" in lines
    assert any(line.startswith("rank 1: wrote rank1.safetensors") for line in lines)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "rank0.safetensors",
                                                     "rank1.safetensors"]
    verify(micro, out, **QUIET)


def test_rerun_rewrites_a_damaged_rank(micro, converted):
    flip_byte(converted / "rank0.safetensors", 10)
    lines = []
    convert(micro, converted, parallel=resolve(2, 1), log=lines.append)
    assert "rank 1: already written and verified" in lines
    assert any(line.startswith("rank 0: wrote") for line in lines)
    verify(micro, converted, **QUIET)


def test_rerun_with_other_options_is_refused(micro, converted):
    with pytest.raises(UserError, match="holds a conversion with other options"):
        convert(micro, converted, parallel=resolve(4, 1), **QUIET)


def test_parallel_workers_write_the_same_files(micro, tmp_path):
    one = convert(micro, tmp_path / "one", parallel=resolve(4, 1), workers=1, **QUIET)
    four = convert(micro, tmp_path / "four", parallel=resolve(4, 1), workers=4, **QUIET)
    assert one["ranks"] == four["ranks"]


def test_a_filesystem_without_o_direct_gets_the_same_files(micro, tmp_path, monkeypatch):
    """Rank files are written with O_DIRECT where the filesystem allows it; where it refuses
    (EINVAL, as tmpfs did before Linux 6.6), through the page cache, with the same bytes."""
    direct = convert(micro, tmp_path / "direct", parallel=resolve(2, 1), chunk_bytes=4096, **QUIET)
    real_open, refused = os.open, []

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(writer.os, "open", no_direct)
    buffered = convert(micro, tmp_path / "buffered", parallel=resolve(2, 1), chunk_bytes=4096, **QUIET)
    assert buffered["ranks"] == direct["ranks"] and (len(refused) == 2 or not hasattr(os, "O_DIRECT"))
    monkeypatch.undo()
    verify(micro, tmp_path / "buffered", **QUIET)
