"""The converter's output format: per-rank names, shapes and dtypes, and per-rank values
compared with an independent re-statement of TensorRT-LLM's converter in plain torch ops
(split, KV-head duplication, [w3; w1] concatenation, vocabulary padding); option checks,
the float16 audit, bounded reads and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral_triton.convert import ModelShape, convert, resolve
from mixtral_triton.convert import layout as layout_module
from mixtral_triton.convert.cli import main
from mixtral_triton.convert.layout import ZeroRows, rank_layout, read_header
from mixtral_triton.convert.mapping import check_model
from mixtral_triton.convert.writer import WORKER_PEAK_CHUNKS
from mixtral_triton.errors import UserError
from mixtral_triton.fixture.checkpoint import hub_tensor_shapes, random_weight
from mixtral_triton.fixture.sizes import FixtureSize, hub_config

ROOT = Path(__file__).resolve().parents[1]

# A Mixtral small enough to convert in a fraction of a second, with dimensions that exercise
# the edge cases: 2 KV heads (duplicated at TP 4), 3 layers (uneven over 2 stages), and a
# vocabulary of 1001 (lm_head padded at TP 2 and 4).
MICRO = FixtureSize(hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=3, num_local_experts=4, max_position_embeddings=256)
MICRO_VOCAB = 1001


def write_micro(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """The micro Mixtral in the hub layout (two shards and an index); `edit` may change weights."""
    folder.mkdir(parents=True)
    tensors = {name: random_weight(name, shape, seed=1) for name, shape in hub_tensor_shapes(MICRO, MICRO_VOCAB)}
    if edit:
        edit(tensors)
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        save_file({name: tensors[name] for name in part}, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {name: file for file, part in shards.items() for name in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(hub_config(MICRO, MICRO_VOCAB)))
    return folder


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return write_micro(tmp_path_factory.mktemp("hub") / "micro")


def trtllm_rank(hub: dict, hf: dict, rank: int, tp: int, pp: int, moe_tp: int, moe_ep: int,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What TensorRT-LLM's converter puts in rank{rank}.safetensors, written the way its
    convert.py does it (whole tensors, torch.chunk, dup_kv_weight, pad then split)."""
    h, heads, kv, experts = (hf[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                             "num_local_experts"))
    head_size = h // heads
    tp_rank, pp_rank = rank % tp, rank // tp
    moe_tp_rank, moe_ep_rank = tp_rank // moe_ep, tp_rank % moe_ep
    rank_experts = range(moe_ep_rank * experts // moe_ep, (moe_ep_rank + 1) * experts // moe_ep)
    out = {}
    if pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = hub["model.embed_tokens.weight"].to(dtype)
    layers = torch.tensor_split(torch.arange(hf["num_hidden_layers"]), pp)[pp_rank].tolist()
    for local, layer in enumerate(layers):
        p, t = f"model.layers.{layer}.", f"transformer.layers.{local}."
        q, k, v = (hub[f"{p}self_attn.{x}_proj.weight"] for x in "qkv")
        if kv < tp:  # dup_kv_weight
            k, v = (w.reshape(kv, 1, head_size, h).expand(kv, tp // kv, head_size, h).reshape(-1, h) for w in (k, v))
        out[t + "attention.qkv.weight"] = torch.cat([w.chunk(tp)[tp_rank] for w in (q, k, v)]).to(dtype)
        out[t + "attention.dense.weight"] = hub[p + "self_attn.o_proj.weight"].chunk(tp, dim=1)[tp_rank].to(dtype)
        out[t + "input_layernorm.weight"] = hub[p + "input_layernorm.weight"].to(dtype)
        out[t + "post_layernorm.weight"] = hub[p + "post_attention_layernorm.weight"].to(dtype)
        out[t + "mlp.router.weight"] = hub[p + "block_sparse_moe.gate.weight"].float()
        w1, w2, w3 = (torch.stack([hub[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] for e in rank_experts])
                      for w in ("w1", "w2", "w3"))
        w1, w3 = (w.chunk(moe_tp, dim=1)[moe_tp_rank] for w in (w1, w3))
        out[t + "mlp.fc.weight"] = torch.cat([w3, w1], dim=-2).to(dtype)
        out[t + "mlp.proj.weight"] = w2.chunk(moe_tp, dim=2)[moe_tp_rank].to(dtype)
    if pp_rank == pp - 1:
        out["transformer.ln_f.weight"] = hub["model.norm.weight"].to(dtype)
        lm_head = hub["lm_head.weight"]
        lm_head = torch.nn.functional.pad(lm_head, (0, 0, 0, -lm_head.shape[0] % tp))
        out["lm_head.weight"] = lm_head.chunk(tp)[tp_rank].to(dtype)
    return out


def load_hub(folder: Path) -> dict[str, torch.Tensor]:
    hub = {}
    for file in folder.glob("*.safetensors"):
        hub.update(load_file(str(file)))
    return hub


def assert_matches_trtllm(src: Path, out: Path, tp: int, pp: int, moe_tp: int, moe_ep: int, dtype: torch.dtype):
    hub, hf = load_hub(src), json.loads((src / "config.json").read_text())
    for rank in range(tp * pp):
        got = load_file(str(out / f"rank{rank}.safetensors"))
        want = trtllm_rank(hub, hf, rank, tp, pp, moe_tp, moe_ep, dtype)
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
            assert torch.equal(got[name].view(torch.uint8), tensor.contiguous().view(torch.uint8)), name


@pytest.mark.parametrize("tp,pp,moe_tp,moe_ep,dtype", [
    (1, 1, 1, 1, "float16"),
    (2, 1, 2, 1, "float16"),   # lm_head padded to 1002 rows
    (4, 1, 4, 1, "float16"),   # 2 KV heads duplicated over 4 ranks
    (4, 1, 1, 4, "float16"),   # one expert per rank
    (4, 1, 2, 2, "bfloat16"),  # hybrid MoE split
    (2, 2, 2, 1, "float32"),   # 3 layers over 2 stages: 2 then 1
])
def test_rank_files_match_trtllm_converter(micro, tmp_path, tp, pp, moe_tp, moe_ep, dtype):
    convert(micro, tmp_path / "out", parallel=resolve(tp, pp, moe_tp, moe_ep), dtype=dtype, log=lambda _: None)
    assert_matches_trtllm(micro, tmp_path / "out", tp, pp, moe_tp, moe_ep, getattr(torch, dtype))


# Tiny: hidden 256, 16 heads of 16, 4 KV heads, 8 experts, inter 512, vocab 32000, 2 layers.
@pytest.mark.parametrize("tp,moe_tp,moe_ep,qkv_rows,experts,inter", [
    (1, 1, 1, 384, 8, 512),
    (2, 2, 1, 192, 8, 256),
    (4, 4, 1, 96, 8, 128),
    (4, 1, 4, 96, 2, 512),
    (4, 2, 2, 96, 4, 256),
])
def test_tiny_names_shapes_dtypes(tiny_checkpoint, tmp_path, tp, moe_tp, moe_ep, qkv_rows, experts, inter):
    out = tmp_path / "out"
    convert(tiny_checkpoint, out, parallel=resolve(tp, 1, moe_tp, moe_ep), log=lambda _: None)
    want = {"transformer.vocab_embedding.weight": ("F16", [32000, 256]),
            "transformer.ln_f.weight": ("F16", [256]),
            "lm_head.weight": ("F16", [32000 // tp, 256])}
    for layer in range(2):
        t = f"transformer.layers.{layer}."
        want |= {t + "input_layernorm.weight": ("F16", [256]),
                 t + "attention.qkv.weight": ("F16", [qkv_rows, 256]),
                 t + "attention.dense.weight": ("F16", [256, 256 // tp]),
                 t + "post_layernorm.weight": ("F16", [256]),
                 t + "mlp.router.weight": ("F32", [8, 256]),
                 t + "mlp.fc.weight": ("F16", [experts, 2 * inter, 256]),
                 t + "mlp.proj.weight": ("F16", [experts, 256, inter])}
    for rank in range(tp):
        header, _ = read_header(out / f"rank{rank}.safetensors")
        assert {name: (info["dtype"], info["shape"]) for name, info in header.items()} == want
    assert_matches_trtllm(tiny_checkpoint, out, tp, 1, moe_tp, moe_ep, torch.float16)


def test_config_json(tiny_checkpoint, tmp_path):
    convert(tiny_checkpoint, tmp_path / "out", parallel=resolve(4, 1, None, 2), log=lambda _: None)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "MixtralForCausalLM"
    assert (config["dtype"], config["hidden_act"], config["vocab_size"]) == ("float16", "swiglu", 32000)
    assert (config["num_key_value_heads"], config["head_size"], config["rotary_base"]) == (4, 16, 1e6)
    assert config["moe"]["num_experts"] == 8 and config["moe"]["top_k"] == 2
    assert config["moe"]["normalization_mode"] == 1
    assert config["mapping"] == {
        "world_size": 4, "gpus_per_node": 8, "cp_size": 1, "tp_size": 4, "pp_size": 1, "moe_tp_size": 2,
        "moe_cluster_size": 1, "moe_ep_size": 2, "attn_tp_size": -1, "attn_cp_size": -1, "cp_config": {},
        "enable_attention_dp": False, "enable_lm_head_tp_in_adp": False}
    assert config["quantization"]["quant_algo"] is None


def test_lm_head_padding_layout():
    model = ModelShape(hidden_size=64, num_heads=4, num_kv_heads=2, head_size=16, num_layers=1, num_experts=4,
                       top_k=2, intermediate_size=32, vocab_size=10)
    parallel = resolve(4, 1)  # 10 rows padded to 12: 3 per rank, the last rank gets 1 row and 2 zeros
    heads = [next(o for o in rank_layout(model, parallel, r, "float16") if o.name == "lm_head.weight")
             for r in range(4)]
    assert [h.shape for h in heads] == [(3, 64)] * 4
    assert heads[3].parts[0].rows == (9, 10) and heads[3].parts[1] == ZeroRows(2)


def test_defaults_split_experts_by_tp():
    assert resolve() == resolve(4, 1, 4, 1)
    assert resolve(4, moe_ep=4) == resolve(4, 1, 1, 4)
    assert resolve(4, moe_tp=2) == resolve(4, 1, 2, 2)


@pytest.mark.parametrize("options,model,message", [
    ({"tp": 0}, None, "--tp-size must be at least 1"),
    ({"tp": 4, "pp": -1}, None, "--pp-size must be at least 1"),
    ({"tp": 4, "moe_tp": 2, "moe_ep": 4}, None, "--moe-tp-size (2) times --moe-ep-size (4) must equal --tp-size (4)"),
    ({"tp": 4, "moe_ep": 8}, None, "--moe-tp-size (0) times --moe-ep-size (8) must equal --tp-size (4)"),
    ({"tp": 3}, (16, 4, 8, 512, 2), "--tp-size 3 must divide the 16 attention heads"),
    ({"tp": 6}, (12, 8, 8, 512, 2), "--tp-size 6 must divide, or be a multiple of, the 8 key/value heads"),
    ({"tp": 4, "pp": 3}, (16, 4, 8, 512, 2), "--pp-size 3 is larger than the 2 layers"),
    ({"tp": 6, "moe_ep": 3}, (12, 6, 8, 512, 2), "--moe-ep-size 3 must divide the 8 experts"),
    ({"tp": 8}, (16, 8, 8, 100, 2), "--moe-tp-size 8 must divide the expert intermediate size 100"),
])
def test_bad_parallelism_is_refused(options, model, message):
    with pytest.raises(UserError) as err:
        parallel = resolve(**options)
        if model is not None:
            heads, kv, experts, inter, layers = model
            check_model(parallel, ModelShape(hidden_size=heads * 16, num_heads=heads, num_kv_heads=kv, head_size=16,
                                             num_layers=layers, num_experts=experts, top_k=2,
                                             intermediate_size=inter, vocab_size=1000))
    assert message in str(err.value)


def test_bad_options_fail_before_any_work(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="--tp-size 3 must divide the 16 attention heads"):
        convert(tiny_checkpoint, out, parallel=resolve(3, 1), log=lambda _: None)
    with pytest.raises(UserError, match="--dtype must be one of"):
        convert(tiny_checkpoint, out, parallel=resolve(4, 1), dtype="int8", log=lambda _: None)
    assert not out.exists()


def test_audit_refuses_inf_unless_clamping(tmp_path):
    def edit(tensors):
        tensors["model.layers.1.block_sparse_moe.experts.2.w1.weight"][3, 5] = 1e6
        tensors["model.layers.0.self_attn.o_proj.weight"][0, 0] = 1e-9
    src = write_micro(tmp_path / "hub", edit)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"1 weights in 1 tensors are beyond the float16 range .*experts\.2\.w1"):
        convert(src, out, parallel=resolve(2, 1), log=lambda _: None)
    assert not out.exists()

    manifest = convert(src, out, parallel=resolve(2, 1), clamp_fp16=True, log=lambda _: None)
    assert manifest["audit"]["overflow"] == {"model.layers.1.block_sparse_moe.experts.2.w1.weight": 1}
    assert manifest["audit"]["underflow"]["model.layers.0.self_attn.o_proj.weight"] >= 1
    # Expert 2's w1 rows 3 sits in rank 0's fc (moe_tp 2 splits 32 rows into 16): after its w3 half.
    fc = load_file(str(out / "rank0.safetensors"))["transformer.layers.1.mlp.fc.weight"]
    assert fc[2, 16 + 3, 5].item() == 65504.0 and torch.isfinite(fc).all()

    manifest = convert(src, tmp_path / "bf16", parallel=resolve(2, 1), dtype="bfloat16", log=lambda _: None)
    assert manifest["audit"] is None  # nothing to audit: bfloat16 keeps the range


def test_reads_are_bounded(micro, tmp_path, monkeypatch):
    """Every source read stays within the chunk size, whatever the tensor size."""
    biggest = []
    read = layout_module.SourceCheckpoint.read

    def recording_read(self, name, rows, cols=None):
        block = read(self, name, rows, cols)
        biggest.append(block.numel() * block.element_size())
        return block

    monkeypatch.setattr(layout_module.SourceCheckpoint, "read", recording_read)
    convert(micro, tmp_path / "out", parallel=resolve(2, 1), chunk_bytes=4096, log=lambda _: None)
    assert max(biggest) <= 4096 and len(biggest) > 100


def test_memory_budget_limits_workers(micro, tmp_path):
    lines = []
    convert(micro, tmp_path / "out", parallel=resolve(4, 1), workers=4,
            memory_budget=2 * WORKER_PEAK_CHUNKS * 2**20, chunk_bytes=2**20, log=lines.append)
    assert "--memory-budget allows 2 of the 4 workers" in lines
    with pytest.raises(UserError, match="--memory-budget 1000 bytes is below"):
        convert(micro, tmp_path / "out2", parallel=resolve(4, 1), memory_budget=1000, log=lambda _: None)


@pytest.mark.parametrize("argv,message", [
    (["convert", "SRC", "OUT", "--tp-size", "0"], "--tp-size must be at least 1"),
    (["convert", "SRC", "OUT", "--tp-size", "four"], "argument --tp-size: invalid int value: 'four'"),
    (["convert", "SRC", "OUT", "--moe-tp-size", "2", "--moe-ep-size", "4"], "must equal --tp-size (4)"),
    (["convert", "SRC", "OUT", "--memory-budget", "lots"], "expected a size such as 512M or 8G"),
    (["convert", "SRC", "OUT", "--dtype", "int4"], "argument --dtype: invalid choice: 'int4'"),
    (["convert", "SRC"], "the following arguments are required: out"),
    (["convert", "/nonexistent/hub", "OUT"], "/nonexistent/hub has no config.json"),
    (["verify", "/nonexistent/hub", "/nonexistent/out"], "/nonexistent/out has no config.json"),
    (["shrink"], "invalid choice: 'shrink'"),
])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "OUT").exists()


def test_build_script_converts_and_verifies(micro, tmp_path):
    script = ROOT / "build" / "convert_checkpoint.py"
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, script, "convert", micro, out, "--tp-size", "2", "--workers", "2",
                           "--memory-budget", "1G"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, script, "verify", micro, out], capture_output=True, text=True)
    assert done.returncode == 0 and "verified 2 ranks" in done.stdout, done.stderr
    done = subprocess.run([sys.executable, script, "convert", micro, tmp_path / "x", "--pp-size", "9"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == "convert_checkpoint.py: error: --pp-size 9 is larger than the 3 layers\n"
