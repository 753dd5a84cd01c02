"""The TP-simulated reference forward on converted checkpoints against transformers' Mixtral.

The checkpoints come from the project's converter, so these tests check the converter's
shard layout as much as the reference forward: a wrong split gives wrong logits.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral_triton.convert import convert, resolve
from mixtral_triton.errors import UserError
from mixtral_triton.reference import ReferenceModel

# name -> the converter's parallel options
LAYOUTS = {
    "tp1": dict(tp=1),
    "tp2": dict(tp=2),
    "tp4": dict(tp=4),
    "ep4": dict(tp=4, moe_ep=4),  # expert parallelism: 2 whole experts per rank
    "tp2ep2": dict(tp=4, moe_tp=2, moe_ep=2),  # hybrid: half of 4 experts' intermediate per rank
    "tp8pp2": dict(tp=8, pp=2),  # 4 KV heads copied to 8 ranks; one layer per pipeline stage
}
pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = [[1, 415, 2936, 9060, 285, 1142], [1, 22557],
           [1, 851, 349, 264, 1369, 302, 272, 11843, 1587, 28723, 13, 1014]]


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    """Converted checkpoints, made on first use: name -> folder."""
    root = tmp_path_factory.mktemp("trtllm")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            convert(tiny_checkpoint, root / name, parallel=resolve(**LAYOUTS[name]), log=lambda line: None)
            made[name] = root / name
        return made[name]

    return get


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def full_logits(model: ReferenceModel, tokens: list[int]) -> torch.Tensor:
    return model.step([tokens], [model.new_sequence()], all_positions=True)[0]


def greedy(model: ReferenceModel, prompt: list[int], count: int) -> list[int]:
    cache = model.new_sequence()
    logits = model.step([prompt], [cache])[0]
    out = []
    for _ in range(count):
        out.append(int(logits.argmax()))
        logits = model.step([[out[-1]]], [cache])[0]
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_match_transformers(layout, checkpoints, hf_model):
    model = ReferenceModel.from_trtllm_checkpoint(checkpoints(layout))
    for prompt in PROMPTS:
        with torch.no_grad():
            expected = hf_model(torch.tensor([prompt])).logits[0]
        got = full_logits(model, prompt)
        assert got.shape == expected.shape
        # fp16 weights (exact copies of the bf16 ones) computed in float32: fp16 tolerance is ample.
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-3)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_kv_cache_decode_equals_full_recompute(checkpoints):
    model = ReferenceModel.from_trtllm_checkpoint(checkpoints("tp2"))
    tokens = PROMPTS[2] + [5, 600, 7000, 31999, 2]
    expected = full_logits(model, tokens)
    cache = model.new_sequence()
    # Prefill in two chunks, then one token per step.
    rows = [*model.step([tokens[:4]], [cache], all_positions=True)[0],
            *model.step([tokens[4:9]], [cache], all_positions=True)[0]]
    rows += [model.step([[t]], [cache])[0] for t in tokens[9:]]
    assert cache.length == len(tokens)
    torch.testing.assert_close(torch.stack(rows), expected, atol=1e-4, rtol=1e-4)


def test_packed_step_mixes_prefill_and_decode(checkpoints):
    model = ReferenceModel.from_trtllm_checkpoint(checkpoints("ep4"))
    a, b = model.new_sequence(), model.new_sequence()
    model.step([PROMPTS[0]], [a])
    # Sequence a decodes one token while b prefills, in one packed step.
    got_a, got_b = model.step([[700], PROMPTS[1]], [a, b])
    torch.testing.assert_close(got_a, full_logits(model, PROMPTS[0] + [700])[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_b, full_logits(model, PROMPTS[1])[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["tp1", "tp2ep2"])
def test_greedy_decode_matches_transformers_generate(layout, checkpoints, hf_model):
    model = ReferenceModel.from_trtllm_checkpoint(checkpoints(layout))
    for prompt in PROMPTS:
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                    pad_token_id=0)
        expected = out[0, len(prompt):].tolist()
        assert greedy(model, prompt, len(expected)) == expected


def test_misplaced_expert_halves_are_caught(checkpoints, hf_model, tmp_path):
    """The comparison has teeth: fc stored as [w1; w3] instead of [w3; w1] fails it."""
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints("tp1"), bad)
    weights = load_file(bad / "rank0.safetensors")
    fc = weights["transformer.layers.0.mlp.fc.weight"]
    weights["transformer.layers.0.mlp.fc.weight"] = torch.cat(fc.chunk(2, dim=1)[::-1], dim=1).contiguous()
    save_file(weights, bad / "rank0.safetensors")
    with torch.no_grad():
        expected = hf_model(torch.tensor([PROMPTS[0]])).logits[0]
    got = full_logits(ReferenceModel.from_trtllm_checkpoint(bad), PROMPTS[0])
    assert (got - expected).abs().max() > 0.1


def test_user_errors(checkpoints, tmp_path):
    model = ReferenceModel.from_trtllm_checkpoint(checkpoints("tp1"))
    with pytest.raises(UserError, match="token ids"):
        model.step([[32000]], [model.new_sequence()])
    with pytest.raises(UserError, match="at least one new token"):
        model.step([[]], [model.new_sequence()])
    with pytest.raises(UserError, match="no config.json"):
        ReferenceModel.from_trtllm_checkpoint(tmp_path)
    partial = tmp_path / "partial"
    shutil.copytree(checkpoints("tp2"), partial)
    (partial / "rank1.safetensors").unlink()
    with pytest.raises(UserError, match="missing rank file"):
        ReferenceModel.from_trtllm_checkpoint(partial)
