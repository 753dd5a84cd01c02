"""The trtllm-build wrapper: the exact command for 8x22B at tp 4, the checkpoint checks, and
a run against a stand-in trtllm-build on PATH (TensorRT-LLM itself is not installed here)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from mixtral_triton.errors import UserError
from mixtral_triton.trtllm_build import BUILD_LOG, BUILD_RECORD, engine_main, plan_main, prepare_build, run_build

# A TensorRT-LLM checkpoint's config.json for Mixtral-8x22B converted fp16 at tp 4 (the
# fields the wrapper reads; the converter writes more).
CHECKPOINT_CONFIG = {
    "architecture": "MixtralForCausalLM", "dtype": "float16", "vocab_size": 32000,
    "hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 56,
    "num_attention_heads": 48, "num_key_value_heads": 8, "max_position_embeddings": 65536,
    "moe": {"num_experts": 8, "top_k": 2},
    "mapping": {"world_size": 4, "tp_size": 4, "pp_size": 1, "moe_tp_size": 4, "moe_ep_size": 1},
}


def write_checkpoint(folder: Path, config: dict = CHECKPOINT_CONFIG, ranks: int = 4) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    for r in range(ranks):
        (folder / f"rank{r}.safetensors").write_bytes(b"")
    return folder


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "ckpt")


def expected_command(ckpt: Path, out: Path, max_batch_size: int, workers: int = 1) -> list[str]:
    return ["trtllm-build", "--checkpoint_dir", str(ckpt), "--output_dir", str(out),
            "--gemm_plugin", "float16", "--gpt_attention_plugin", "float16", "--moe_plugin", "float16",
            "--kv_cache_type", "paged", "--tokens_per_block", "32",
            "--remove_input_padding", "enable", "--context_fmha", "enable",
            "--use_paged_context_fmha", "enable",
            "--max_batch_size", str(max_batch_size), "--max_input_len", "4096", "--max_seq_len", "5120",
            "--max_num_tokens", "8192", "--max_beam_width", "1", "--workers", str(workers)]


# max_batch_size: the 128/128 requests the KV cache admits (H100) or the roofline's throughput
# knee (A100, B200); with --workload 4096/1024, the full-length requests that fit.
@pytest.mark.parametrize("gpu, workload, max_batch_size", [
    ("H100-80GB", [], 637), ("A100-80GB", [], 602), ("B200-180GB", [], 1202),
    ("H100-80GB", ["--workload", "4096/1024"], 31), ("A100-80GB", ["--workload", "4096/1024"], 32)])
def test_dry_run_prints_the_exact_command(ckpt, tmp_path, capsys, gpu, workload, max_batch_size):
    out = tmp_path / "engines"
    assert engine_main(["--checkpoint-dir", str(ckpt), "--output-dir", str(out), "--gpu", gpu,
                        "--workers", "2", "--dry-run"] + workload) == 0
    printed = capsys.readouterr()
    assert shlex.split(printed.out) == expected_command(ckpt, out, max_batch_size, workers=2)
    assert "70.62 GB" in printed.err  # the plan, on stderr
    assert not out.exists()


def test_the_converters_checkpoint_is_accepted(tiny_checkpoint, tmp_path):
    from mixtral_triton.convert.mapping import resolve
    from mixtral_triton.convert.writer import convert

    convert(tiny_checkpoint, tmp_path / "tp4", parallel=resolve(tp=4), dtype="float16", log=lambda _: None)
    build = prepare_build(tmp_path / "tp4", tmp_path / "engines", "A100-40GB", 64, 32)
    # Lengths shorter than the seed's 128/128: sized for full-length requests of the engine.
    assert (build.plan.tp, build.plan.max_seq_len, build.plan.workload) == (4, 96, "64/32")
    assert build.plan.max_batch_size == min(build.plan.kv_admitted_requests, build.plan.throughput_batch, 2048)
    assert build.command[:3] == ["trtllm-build", "--checkpoint_dir", str(tmp_path / "tp4")]
    # Without lengths, the defaults fit the fixture's 4096 positions (4096 + 1024 would not).
    build = prepare_build(tmp_path / "tp4", tmp_path / "engines", "A100-40GB")
    assert (build.plan.max_input_len, build.plan.max_seq_len, build.plan.workload) == (3072, 4096, "128/128")


def test_the_plan_follows_the_checkpoint_split(tmp_path):
    config = CHECKPOINT_CONFIG | {"mapping": {"world_size": 8, "tp_size": 8, "pp_size": 1,
                                              "moe_tp_size": 4, "moe_ep_size": 2}}
    build = prepare_build(write_checkpoint(tmp_path / "tp8", config, ranks=8), tmp_path / "out",
                          "A100-40GB")
    assert (build.plan.tp, build.plan.ep, build.plan.gpus) == (8, 2, 8)


@pytest.mark.parametrize("change, message", [
    ({"dtype": "bfloat16"}, r"bfloat16 checkpoint; the engine is built fp16"),
    ({"mapping": {"world_size": 4, "tp_size": 2, "pp_size": 2}}, r"split tp 2, pp 2"),
    ({"mapping": {"world_size": 8, "tp_size": 8, "pp_size": 1}}, r"lacks rank4.safetensors, .*rank7"),
])
def test_unbuildable_checkpoints_are_refused(tmp_path, change, message):
    folder = write_checkpoint(tmp_path / "bad", CHECKPOINT_CONFIG | change)
    with pytest.raises(UserError, match=message):
        prepare_build(folder, tmp_path / "out", "H100-80GB")


def test_bad_options_are_one_line(ckpt, tmp_path, capsys):
    common = ["--checkpoint-dir", str(ckpt), "--output-dir", str(tmp_path / "o"), "--dry-run"]
    for argv, message in [
        (common + ["--gpu", "H100-80GB", "--workers", "5"], "--workers must be between 1 and 4"),
        (common + ["--gpu", "A100-40GB"], "does not fit"),
        (common + ["--gpu", "H100-80GB", "--max-input-len", "-1"], "--max-input-len must be between"),
        (common[2:] + ["--gpu", "H100-80GB", "--checkpoint-dir", str(tmp_path)], "no readable config.json"),
        (common[:4], "the following arguments are required: --gpu"),
    ]:
        assert engine_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_without_tensorrt_llm_a_build_asks_for_the_image_or_dry_run(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"trtllm-build not found: .* --dry-run"):
        run_build(prepare_build(ckpt, tmp_path / "out", "H100-80GB"))


FAKE_TRTLLM_BUILD = """#!{python}
import argparse, json, pathlib, sys
p = argparse.ArgumentParser()
p.add_argument("--output_dir")
args, _ = p.parse_known_args()
out = pathlib.Path(args.output_dir)
(out / "config.json").write_text("{{}}")
for r in range({ranks}):
    (out / f"rank{{r}}.engine").write_bytes(b"engine")
    # What a build logs per rank: TensorRT-LLM's MiB summary and TensorRT's byte counts.
    print(f"[TRT-LLM] [I] Activation memory size: {{3000.5 + r:.2f}} MiB", flush=True)
    print(f"[TRT] [I] Total Weights Memory: {{70_600_000_000 + r}} bytes", flush=True)
sys.exit({code})
"""


@pytest.fixture
def fake_trtllm_build(tmp_path, monkeypatch):
    """Put a stand-in trtllm-build on PATH that writes `ranks` engines and exits with `code`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))

    def install(ranks: int = 4, code: int = 0) -> None:
        script = bin_dir / "trtllm-build"
        script.write_text(FAKE_TRTLLM_BUILD.format(python=sys.executable, ranks=ranks, code=code))
        script.chmod(0o755)

    return install


def test_a_build_checks_the_engines_and_records_how_they_were_made(ckpt, tmp_path, fake_trtllm_build):
    fake_trtllm_build()
    build = prepare_build(ckpt, tmp_path / "engines", "H100-80GB")
    out = run_build(build)
    record = json.loads((out / BUILD_RECORD).read_text())
    assert record["command"] == build.command
    assert record["plan"]["max_batch_size"] == 637
    assert record["versions"]["tensorrt_llm"] is None  # not installed here
    assert record["checkpoint_dir"] == str(ckpt)
    # What the build reported, the largest rank's, and each rank engine's size.
    assert record["memory"] == {"reported": {"activation_bytes": round(3003.5 * 2**20), "weight_bytes": 70_600_000_003},
                                "rank_engine_bytes": [6, 6, 6, 6]}
    assert "Total Weights Memory" in (out / BUILD_LOG).read_text()
    assert record["model"]["num_hidden_layers"] == 56


def test_the_plan_runs_again_from_the_build_record_with_the_measured_memory(ckpt, tmp_path, fake_trtllm_build,
                                                                            capsys):
    fake_trtllm_build()
    out = run_build(prepare_build(ckpt, tmp_path / "engines", "H100-80GB"))
    capsys.readouterr()
    assert plan_main(["--from-build-record", str(out), "--json"]) == 0
    replanned = json.loads(capsys.readouterr().out)
    assert replanned["activations_source"] == replanned["weights_source"] == "measured (trtllm-build)"
    assert replanned["activation_bytes"] == round(3003.5 * 2**20)  # not the 2.28 GB estimate
    assert replanned["weight_bytes_per_gpu"] == 70_600_000_003
    assert (replanned["gpu"], replanned["tp"], replanned["workload"]) == ("H100-80GB", 4, "128/128")
    # More activations than estimated: a smaller KV cache, never a larger batch than the engine's.
    assert replanned["kv_admitted_requests"] < 637 and replanned["max_batch_size"] == replanned["kv_admitted_requests"]
    for row in replanned["memory_per_gpu"]:
        assert row["headroom"] >= 2**30 and row["activations"] == replanned["activation_bytes"]

    # A record without measurements (an older build) is refused in one line.
    old = json.loads((out / BUILD_RECORD).read_text())
    del old["memory"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert plan_main(["--from-build-record", str(tmp_path / "old.json")]) == 2
    assert "has no plan, model or memory" in capsys.readouterr().err


def test_a_failed_or_incomplete_build_is_reported(ckpt, tmp_path, fake_trtllm_build):
    fake_trtllm_build(code=3)
    with pytest.raises(UserError, match=r"trtllm-build failed with exit code 3"):
        run_build(prepare_build(ckpt, tmp_path / "a", "H100-80GB"))
    fake_trtllm_build(ranks=3)
    with pytest.raises(UserError, match=r"exited 0 but .* lacks rank3.engine"):
        run_build(prepare_build(ckpt, tmp_path / "b", "H100-80GB"))


def test_a_non_empty_output_folder_is_refused(ckpt, tmp_path, fake_trtllm_build):
    fake_trtllm_build()
    out = tmp_path / "engines"
    out.mkdir()
    (out / "rank7.engine").write_bytes(b"old")
    with pytest.raises(UserError, match=r"--output-dir .* is not empty"):
        run_build(prepare_build(ckpt, out, "H100-80GB"))
