"""GPU smoke test, for NVIDIA hardware with TensorRT-LLM 1.2.1 (the NGC image
tritonserver:26.07-trtllm-python-py3): convert the tiny fixture at tp 1, build a real
engine through the trtllm-build wrapper, run it with TensorRT-LLM's C++ runtime
(tensorrt_llm.runtime.ModelRunnerCpp) and compare its greedy tokens with transformers'
generate on the same checkpoint.

    python3 -m pytest -m gpu tests/test_gpu_smoke.py

Skipped, with the reason, where TensorRT-LLM or a GPU is missing.
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from mixtral_triton.trtllm_build import BUILD_RECORD, TRTLLM_BUILD, prepare_build, run_build

EOS = 2  # the fixture's eos_token_id
NEW_TOKENS = 16
PROMPTS = ["The capital of France is", "Mixtral routes every token to two of its eight experts, so"]


def _missing() -> str | None:
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "tensorrt_llm is not importable (run in the NGC image tritonserver:26.07-trtllm-python-py3)"
    if shutil.which(TRTLLM_BUILD) is None:
        return f"{TRTLLM_BUILD} is not on PATH"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


MISSING = _missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]


def _until_eos(tokens: list[int]) -> list[int]:
    # Whether a runtime keeps the end token it stopped at differs; the tokens before it must not.
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


@pytest.fixture(scope="module")
def engine_dir(tiny_checkpoint, tmp_path_factory):
    from mixtral_triton.convert.mapping import resolve
    from mixtral_triton.convert.writer import convert

    work = tmp_path_factory.mktemp("gpu")
    convert(tiny_checkpoint, work / "ckpt", parallel=resolve(tp=1), dtype="float16")
    # The plan only sizes the engine's limits here: the tiny model fits any of the GPU types,
    # so the smallest is named whatever this machine has.
    return run_build(prepare_build(work / "ckpt", work / "engine", "A100-40GB",
                                   max_input_len=64, max_output_len=NEW_TOKENS))


def test_engine_folder_is_complete(engine_dir):
    assert (engine_dir / "config.json").is_file()
    assert (engine_dir / "rank0.engine").stat().st_size > 0
    assert (engine_dir / BUILD_RECORD).is_file()


def test_greedy_tokens_match_transformers(engine_dir, tiny_checkpoint):
    from tensorrt_llm.runtime import ModelRunnerCpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]

    runner = ModelRunnerCpp.from_dir(engine_dir=str(engine_dir), rank=0,
                                     kv_cache_free_gpu_memory_fraction=0.1)
    try:
        out = runner.generate([torch.tensor(ids, dtype=torch.int32) for ids in prompts],
                              max_new_tokens=NEW_TOKENS, end_id=EOS, pad_id=EOS, top_k=1,
                              return_dict=True, output_sequence_lengths=True)
    finally:
        runner.session.shutdown()
    # output_ids is [batch, beams, max_seq_len]: the prompt, the new tokens, then end_id padding.
    engine_tokens = [
        _until_eos(out["output_ids"][i, 0, len(ids):int(out["sequence_lengths"][i, 0])].tolist())
        for i, ids in enumerate(prompts)]

    # The fixture's weights keep clear margins between the top tokens, so the float32
    # reference and the fp16 engine choose the same tokens.
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).cuda().eval()
    reference = [
        _until_eos(model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, eos_token_id=EOS, pad_token_id=EOS)[0, len(ids):].tolist())
        for ids in prompts]

    assert all(reference), "the reference stopped at once: the comparison would prove nothing"
    assert engine_tokens == reference
