"""One command from a checkpoint folder to a filled model repository, for both targets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mixtral_triton.repository import load_config
from mixtral_triton.repository.wiring import wiring_problems

BUILD = [sys.executable, str(Path(__file__).parents[1] / "build" / "build_model_repository.py")]
MODELS = ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing")


def _build(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(BUILD + args, capture_output=True, text=True, timeout=300)


def _configs(repository: Path) -> dict:
    return {m: load_config(repository / m / "config.pbtxt") for m in MODELS}


def test_checkpoint_to_cpu_repository_in_one_command(tiny_checkpoint, tmp_path):
    result = _build([str(tiny_checkpoint), "--work-dir", str(tmp_path), "--tp", "2"])
    assert result.returncode == 0, result.stderr
    repository = tmp_path / "model_repository-cpu"
    configs = _configs(repository)
    assert wiring_problems(configs) == []
    engine = {k: v.string_value for k, v in configs["tensorrt_llm"].parameters.items()}
    checkpoint = Path(engine["checkpoint_dir"])
    assert json.loads((checkpoint / "config.json").read_text())["mapping"]["tp_size"] == 2
    assert sorted(p.name for p in checkpoint.glob("rank*.safetensors")) == ["rank0.safetensors",
                                                                           "rank1.safetensors"]
    # The detokenizer is the compiled C++ backend, in the model's folder with its token table.
    assert configs["postprocessing"].backend == "mixtral_detokenizer"
    assert (repository / "postprocessing" / "libtriton_mixtral_detokenizer.so").is_file()
    assert (repository / "postprocessing" / "token_table.bin").is_file()
    # A rerun resumes: the converted ranks are verified and kept.
    again = _build([str(tiny_checkpoint), "--work-dir", str(tmp_path), "--tp", "2"])
    assert again.returncode == 0 and "already written and verified" in again.stdout


def test_gpu_target_prints_the_engine_build_and_fills_a_parsing_repository(tiny_checkpoint, tmp_path):
    result = _build([str(tiny_checkpoint), "--work-dir", str(tmp_path), "--target", "gpu"])
    assert result.returncode == 0, result.stderr
    assert "trtllm-build --checkpoint_dir" in result.stdout
    configs = _configs(tmp_path / "model_repository-gpu")
    assert configs["tensorrt_llm"].backend == "tensorrtllm"
    assert wiring_problems(configs) == []
    params = {k: v.string_value for k, v in configs["tensorrt_llm"].parameters.items()}
    assert params["gpt_model_path"] == str(tmp_path / "engine-tp4")


def test_not_a_checkpoint_is_a_one_line_error(tmp_path):
    result = _build([str(tmp_path), "--work-dir", str(tmp_path / "w")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not a Hugging Face checkpoint folder" in result.stderr.strip()
