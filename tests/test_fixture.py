"""The test checkpoint has the on-hub layout of mistral-community/Mixtral-8x22B-v0.1."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, MixtralForCausalLM

from mixtral_triton.fixture import hub_config, write_checkpoint
from mixtral_triton.fixture.checkpoint import hub_tensor_shapes
from mixtral_triton.fixture.sizes import SIZES

# The field set of the hub's config.json for mistral-community/Mixtral-8x22B-v0.1.
HUB_CONFIG_FIELDS = {
    "architectures", "attention_dropout", "bos_token_id", "eos_token_id", "hidden_act",
    "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings",
    "model_type", "num_attention_heads", "num_experts_per_tok", "num_hidden_layers",
    "num_key_value_heads", "num_local_experts", "output_router_logits", "rms_norm_eps",
    "rope_theta", "router_aux_loss_coef", "sliding_window", "tie_word_embeddings",
    "torch_dtype", "transformers_version", "use_cache", "vocab_size",
}
ROUND_TRIP_TEXTS = [
    "What is the mistral wind?",
    "Crème brûlée, naïve café, São Paulo, Ærøskøbing",
    "日本語のテキストと中文文本",
    "Emoji: 🙂🚀👩‍💻 and flags 🇫🇷",
    "def f(x):\n\treturn  x  *  2   # spaces\n\n",
]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_config_has_the_hub_field_set(tiny_checkpoint):
    config = _read_json(tiny_checkpoint / "config.json")
    assert set(config) == HUB_CONFIG_FIELDS
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["model_type"] == "mixtral" and config["torch_dtype"] == "bfloat16"
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (16, 4)
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (8, 2)
    assert config["vocab_size"] == 32000
    assert _read_json(tiny_checkpoint / "generation_config.json")["eos_token_id"] == 2


def test_real_shaped_config_has_the_true_widths():
    config = hub_config(SIZES["real-shaped"], 32000)
    assert (config["hidden_size"], config["intermediate_size"]) == (6144, 16384)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (48, 8)
    shapes = dict(hub_tensor_shapes(SIZES["real-shaped"], 32000))
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 6144)
    assert shapes["model.layers.0.block_sparse_moe.experts.7.w2.weight"] == (6144, 16384)
    assert shapes["model.layers.0.block_sparse_moe.gate.weight"] == (8, 6144)


def test_index_matches_the_shards(tiny_checkpoint):
    index = _read_json(tiny_checkpoint / "model.safetensors.index.json")
    shard_files = sorted(p.name for p in tiny_checkpoint.glob("*.safetensors"))
    assert len(shard_files) > 1
    assert shard_files == [f"model-{i:05d}-of-{len(shard_files):05d}.safetensors"
                           for i in range(1, len(shard_files) + 1)]
    seen, total = {}, 0
    for name in shard_files:
        with safe_open(tiny_checkpoint / name, framework="pt") as shard:
            assert shard.metadata() == {"format": "pt"}
            for key in shard.keys():
                tensor = shard.get_tensor(key)
                assert tensor.dtype == torch.bfloat16
                total += tensor.numel() * tensor.element_size()
                seen[key] = name
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total


def test_tensor_names_are_the_hub_names(tiny_checkpoint):
    names = set(_read_json(tiny_checkpoint / "model.safetensors.index.json")["weight_map"])
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.1.block_sparse_moe.gate.weight",
            "model.layers.1.block_sparse_moe.experts.7.w1.weight",
            "model.layers.1.block_sparse_moe.experts.7.w2.weight",
            "model.layers.1.block_sparse_moe.experts.7.w3.weight",
            "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight"} <= names
    assert len(names) == 3 + 2 * (7 + 8 * 3)


def test_loads_in_transformers_with_no_missing_or_unexpected_weights(tiny_checkpoint):
    model, info = MixtralForCausalLM.from_pretrained(tiny_checkpoint, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ids = tokenizer("The mistral wind", return_tensors="pt").input_ids
    first = model.generate(ids, max_new_tokens=8, do_sample=False)
    again = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(first, again) and first.shape[1] == ids.shape[1] + 8


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, tiny_checkpoint):
    def digest(folder: Path) -> str:
        return hashlib.sha256(b"".join(
            p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()

    assert digest(write_checkpoint(tmp_path / "again", seed=0)) == digest(tiny_checkpoint)
    assert digest(write_checkpoint(tmp_path / "other", seed=1)) != digest(tiny_checkpoint)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips(tiny_checkpoint, text):
    fast = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ids = fast(text).input_ids
    assert ids[0] == 1  # BOS, as the checkpoint's tokenizer_config says
    assert fast.decode(ids, skip_special_tokens=True) == text
    import sentencepiece

    slow = sentencepiece.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))
    assert slow.encode(text) == ids[1:]  # tokenizer.json agrees with tokenizer.model


def test_tokenizer_files_are_as_on_the_hub(tiny_checkpoint):
    config = _read_json(tiny_checkpoint / "tokenizer_config.json")
    assert config["tokenizer_class"] == "LlamaTokenizer"
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, False)
    assert "chat_template" not in config  # the base model has none
    assert _read_json(tiny_checkpoint / "special_tokens_map.json") == {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert len(tokenizer) == 32000
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]


def test_instruct_tokenizer_has_the_v3_vocabulary_and_a_chat_template(tiny_instruct_checkpoint):
    assert _read_json(tiny_instruct_checkpoint / "config.json")["vocab_size"] == 32768
    tokenizer = AutoTokenizer.from_pretrained(tiny_instruct_checkpoint)
    assert len(tokenizer) == 32768
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert prompt == "<s>[INST] Hi [/INST]"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[:2] == [1, 3]  # <s> then the [INST] control token


def _cli_error(args: list[str]) -> str:
    result = subprocess.run([sys.executable, "-m", "mixtral_triton.fixture.cli", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_cli_rejects_unknown_size_in_one_line(tmp_path):
    assert "unknown size 'huge': choose one of tiny, real-shaped" in _cli_error(
        [str(tmp_path / "x"), "--size", "huge"])


def test_cli_rejects_bad_layers_tokenizer_and_existing_folder(tmp_path, tiny_checkpoint):
    assert "--layers must be between 1 and 56" in _cli_error([str(tmp_path / "x"), "--layers", "0"])
    assert "unknown tokenizer 'v9'" in _cli_error([str(tmp_path / "x"), "--tokenizer", "v9"])
    assert "already exists" in _cli_error([str(tiny_checkpoint)])
    assert "does not exist" in _cli_error([str(tmp_path / "no" / "such" / "x")])
