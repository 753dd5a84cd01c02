"""The model repository templates and the fill step: every filled config parses as
Triton's ModelConfig, nothing is left unfilled, the ensemble's wiring obeys Triton's
rules, the CPU reference engine has exactly the GPU engine's tensor contract, and
`postprocessing` is the compiled C++ detokenizer with its token tables on both targets."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from tritonclient.grpc.model_config_pb2 import DataType, ModelConfig, ModelInstanceGroup

from mixtral_triton import cpp_detokenizer
from mixtral_triton.errors import UserError
from mixtral_triton.protocol import FIELDS, ensemble_input_specs
from mixtral_triton.repository import MODELS, Settings, fill_repository, load_config, parse_config
from mixtral_triton.repository.cli import main
from mixtral_triton.repository.fill import MARKER, default_templates, sources_digest
from mixtral_triton.text import load_token_table
from mixtral_triton.repository.wiring import wiring_problems

TEMPLATES = default_templates()

# Inputs of TensorRT-LLM's inflight_batcher_llm ensemble (triton_backend/all_models/
# inflight_batcher_llm/ensemble/config.pbtxt, the 1.x copy in the search index; v1.2.1 itself
# could not be pinned): name -> (data type, dims). All optional but text_input and max_tokens.
UPSTREAM_ENSEMBLE_INPUTS = {
    "text_input": ("TYPE_STRING", [1]), "decoder_text_input": ("TYPE_STRING", [1]),
    "max_tokens": ("TYPE_INT32", [1]), "num_return_sequences": ("TYPE_INT32", [1]),
    "bad_words": ("TYPE_STRING", [-1]), "stop_words": ("TYPE_STRING", [-1]),
    "exclude_input_in_output": ("TYPE_BOOL", [1]), "end_id": ("TYPE_INT32", [1]),
    "pad_id": ("TYPE_INT32", [1]), "top_k": ("TYPE_INT32", [1]), "top_p": ("TYPE_FP32", [1]),
    "temperature": ("TYPE_FP32", [1]), "length_penalty": ("TYPE_FP32", [1]),
    "repetition_penalty": ("TYPE_FP32", [1]), "min_tokens": ("TYPE_INT32", [1]),
    "presence_penalty": ("TYPE_FP32", [1]), "frequency_penalty": ("TYPE_FP32", [1]),
    "seed": ("TYPE_UINT64", [1]), "return_log_probs": ("TYPE_BOOL", [1]),
    "return_context_logits": ("TYPE_BOOL", [1]), "return_generation_logits": ("TYPE_BOOL", [1]),
    "return_perf_metrics": ("TYPE_BOOL", [1]), "return_num_input_tokens": ("TYPE_BOOL", [1]),
    "return_num_output_tokens": ("TYPE_BOOL", [1]), "beam_width": ("TYPE_INT32", [1]),
    "stream": ("TYPE_BOOL", [1]), "prompt_embedding_table": ("TYPE_FP16", [-1, -1]),
    "prompt_table_extra_id": ("TYPE_UINT64", [1]), "prompt_vocab_size": ("TYPE_INT32", [1]),
    "embedding_bias_words": ("TYPE_STRING", [-1]), "embedding_bias_weights": ("TYPE_FP32", [-1]),
    "lora_task_id": ("TYPE_UINT64", [1]), "lora_weights": ("TYPE_FP16", [-1, -1]),
    "lora_config": ("TYPE_INT32", [-1, 3]), "guided_decoding_guide_type": ("TYPE_STRING", [1]),
    "guided_decoding_guide": ("TYPE_STRING", [1]),
}
# Ours beside them: the cancel flag, vLLM's sampling extensions, and min_tokens' older name
# (genai-perf sends it).
OUR_ENSEMBLE_INPUTS = {
    "stop": ("TYPE_BOOL", [1]), "ignore_eos": ("TYPE_BOOL", [1]), "stop_token_ids": ("TYPE_INT32", [-1]),
    "include_stop_str_in_output": ("TYPE_BOOL", [1]), "skip_special_tokens": ("TYPE_BOOL", [1]),
    "min_length": ("TYPE_INT32", [1]),
}

# The parameter keys of TensorRT-LLM v1.2.1's template
# (triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt), the names its
# tensorrtllm backend reads: a key spelled otherwise is silently ignored by the backend.
UPSTREAM_ENGINE_PARAMETERS = {
    "max_beam_width", "FORCE_CPU_ONLY_INPUT_TENSORS", "gpt_model_type", "gpt_model_path",
    "encoder_model_path", "max_tokens_in_paged_kv_cache", "max_attention_window_size",
    "sink_token_length", "batch_scheduler_policy", "kv_cache_free_gpu_mem_fraction",
    "cross_kv_cache_fraction", "kv_cache_host_memory_bytes", "kv_cache_onboard_blocks",
    "enable_trt_overlap", "exclude_input_in_output", "cancellation_check_period_ms",
    "stats_check_period_ms", "iter_stats_max_iterations", "request_stats_max_iterations",
    "enable_kv_cache_reuse", "normalize_log_probs", "enable_chunked_context", "gpu_device_ids",
    "participant_ids", "num_nodes", "lora_cache_optimal_adapter_size", "lora_cache_max_adapter_size",
    "lora_cache_gpu_memory_fraction", "lora_cache_host_memory_bytes", "lora_prefetch_dir",
    "decoding_mode", "executor_worker_path", "lookahead_window_size", "lookahead_ngram_size",
    "lookahead_verification_set_size", "medusa_choices", "eagle_choices", "gpu_weights_percent",
    "enable_context_fmha_fp32_acc", "multi_block_mode", "cuda_graph_mode", "cuda_graph_cache_size",
    "speculative_decoding_fast_logits", "tokenizer_dir", "guided_decoding_backend",
    "xgrammar_tokenizer_info_path",
}
# Where upstream's template points executor_worker_path: the worker binary of the NGC image.
UPSTREAM_EXECUTOR_WORKER = "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"


@pytest.fixture
def dirs(tmp_path, tiny_checkpoint) -> dict[str, Path]:
    """Stand-ins for the engine and checkpoint folders (the fill only checks they exist), and
    the tiny checkpoint's real tokenizer files (the fill writes the detokenizer's token tables)."""
    made = {name: tmp_path / name for name in ("tokenizer", "engine", "checkpoint")}
    for path in made.values():
        path.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_checkpoint / name).is_file():
            shutil.copy2(tiny_checkpoint / name, made["tokenizer"] / name)
    return made


def settings(target: str, dirs: dict[str, Path], **changes) -> Settings:
    engine = {"gpu": {"engine_dir": dirs["engine"]}, "cpu": {"checkpoint_dir": dirs["checkpoint"]}}
    return Settings(**{"target": target, "tokenizer_dir": dirs["tokenizer"], **engine[target],
                       **changes})


def fill_and_load(target: str, dirs: dict[str, Path], out: Path,
                  **changes) -> dict[str, ModelConfig]:
    fill_repository(settings(target, dirs, **changes), out)
    return {model: load_config(out / model / "config.pbtxt") for model in MODELS[target]}


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_filled_repository_parses_and_is_wired(target, dirs, tmp_path):
    out = tmp_path / "repo"
    configs = fill_and_load(target, dirs, out)
    for model, config in configs.items():
        assert config.name == model
        assert "${" not in (out / model / "config.pbtxt").read_text()
    assert wiring_problems(configs) == []
    for model in configs:
        assert (out / model / "1").is_dir(), "Triton loads no model without a version folder"
    assert {p.name for p in out.iterdir()} == set(MODELS[target]) | {MARKER}


def _table(path: Path) -> list[bytes]:
    """A token table file as the C++ backend reads it."""
    data = path.read_bytes()
    (count,), at, table = struct.unpack_from("<I", data), 4, []
    for _ in range(count):
        (length,) = struct.unpack_from("<I", data, at)
        table.append(data[at + 4:at + 4 + length])
        at += 4 + length
    assert at == len(data)
    return table


def exported_symbols(library) -> set[str]:
    """The defined dynamic symbols of a shared library (functions, objects, weak and unique)."""
    table = subprocess.run(["readelf", "--dyn-syms", "--wide", str(library)], capture_output=True, text=True,
                           check=True).stdout
    symbols = set()
    for line in table.splitlines():
        fields = line.split()  # Num: Value Size Type Bind Vis Ndx Name
        if len(fields) >= 8 and fields[0][:-1].isdigit() and fields[6] != "UND" and fields[3] != "SECTION":
            symbols.add(fields[7].split("@")[0])
    return symbols - {""}


@pytest.mark.parametrize("flavour", sorted(cpp_detokenizer.FLAVOURS))
def test_every_flavour_of_the_library_exports_only_the_backend_entry_points(flavour, tmp_path):
    library = cpp_detokenizer.build(tmp_path, flavour)
    assert {s for s in exported_symbols(library) if not s.startswith("TRITONBACKEND_")} == set()


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_postprocessing_is_the_cpp_detokenizer_with_its_library_and_tables(target, dirs, tmp_path):
    out = tmp_path / "repo"
    post = fill_and_load(target, dirs, out)["postprocessing"]
    assert post.backend == cpp_detokenizer.BACKEND == "mixtral_detokenizer"
    assert post.model_transaction_policy.decoupled
    # One instance: it keeps no state per instance and never blocks in execute.
    assert [(g.count, ModelInstanceGroup.Kind.Name(g.kind)) for g in post.instance_group] == [(1, "KIND_CPU")]
    params = {k: v.string_value for k, v in post.parameters.items()}
    record = json.loads((out / MARKER).read_text())
    assert params == {"engine_model": "tensorrt_llm", "min_response_interval_us": "2000",
                      "max_input_len": str(record["max_input_len"]), "max_seq_len": str(record["max_seq_len"])}
    # Triton loads libtriton_<backend>.so from the model's folder: a shared library exporting
    # the backend API's entry points, and nothing else (no weak std:: template instance, no
    # unique global that could bind to another library's copy inside the server).
    library = out / "postprocessing" / cpp_detokenizer.LIBRARY
    assert exported_symbols(library) == {
        "TRITONBACKEND_Initialize", "TRITONBACKEND_ModelInitialize", "TRITONBACKEND_ModelFinalize",
        "TRITONBACKEND_ModelInstanceInitialize", "TRITONBACKEND_ModelInstanceFinalize",
        "TRITONBACKEND_ModelInstanceExecute"}
    assert not (out / "postprocessing" / "1" / "model.py").exists()  # no Python stub
    # Both token tables, by skip_special_tokens, exactly the text package's.
    for skip, name in cpp_detokenizer.TABLE_FILES.items():
        assert _table(out / "postprocessing" / name) == list(load_token_table(dirs["tokenizer"], skip))


def test_the_library_is_compiled_once_per_version_of_its_sources(dirs, tmp_path):
    cache = tmp_path / "cache"
    fill_repository(settings("cpu", dirs), tmp_path / "a", library_cache=cache)
    [built] = list(cache.glob(f"*/{cpp_detokenizer.LIBRARY}"))
    assert built.parent.name == cpp_detokenizer.build_key("release")
    stamp = built.stat().st_mtime_ns
    fill_repository(settings("gpu", dirs), tmp_path / "b", library_cache=cache)
    assert built.stat().st_mtime_ns == stamp  # reused, not compiled again
    # no partial left; the stamp records the sources it was built from
    assert sorted(p.name for p in built.parent.iterdir()) == [cpp_detokenizer.LIBRARY, f"{cpp_detokenizer.LIBRARY}.sources"]
    assert (built.parent / f"{cpp_detokenizer.LIBRARY}.sources").read_text().strip() == cpp_detokenizer.sources_digest()
    for out in (tmp_path / "a", tmp_path / "b"):
        assert (out / "postprocessing" / cpp_detokenizer.LIBRARY).read_bytes() == built.read_bytes()


def test_the_build_key_follows_the_compiler_and_the_flags(tmp_path, monkeypatch):
    keys = {flavour: cpp_detokenizer.build_key(flavour) for flavour in cpp_detokenizer.FLAVOURS}
    assert len(set(keys.values())) == len(keys)  # flags differ: keys differ
    # another compiler of the same name (here: a wrapper reporting another version) is another key
    wrapper = tmp_path / "bin" / "g++"
    wrapper.parent.mkdir()
    wrapper.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "g++ (Other) 99.1"; exit 0; fi\nexec /usr/bin/g++ "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    assert cpp_detokenizer.build_key("release") != keys["release"]


def test_a_prebuilt_library_is_installed_only_with_the_stamp_of_these_sources(dirs, tmp_path, monkeypatch):
    library = cpp_detokenizer.build(tmp_path / "cache")
    monkeypatch.setenv(cpp_detokenizer.PREBUILT_ENV, str(library))
    assert cpp_detokenizer.prebuilt_library() == library
    out = fill_repository(settings("gpu", dirs), tmp_path / "repo", library_cache=tmp_path / "unused")
    assert (out / "postprocessing" / cpp_detokenizer.LIBRARY).read_bytes() == library.read_bytes()
    assert not (tmp_path / "unused").exists()  # nothing compiled
    library.with_name(f"{library.name}.sources").write_text("0123456789abcdef\n")
    with pytest.raises(UserError, match="built from other sources"):
        cpp_detokenizer.prebuilt_library()


def test_a_detokenizer_template_of_another_backend_is_refused(dirs, tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    config = templates / "postprocessing" / "config.pbtxt"
    config.write_text(config.read_text().replace('backend: "mixtral_detokenizer"', 'backend: "python"'))
    with pytest.raises(UserError, match="postprocessing must be the 'mixtral_detokenizer' backend, got 'python'"):
        fill_repository(settings("cpu", dirs), tmp_path / "repo", templates)
    assert not (tmp_path / "repo").exists()


def test_sources_digest_follows_the_templates(tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates, ignore=shutil.ignore_patterns("__pycache__"))
    assert sources_digest(templates) == sources_digest(TEMPLATES)
    (templates / "preprocessing" / "1" / "model.py").write_text("# changed\n")
    assert sources_digest(templates) != sources_digest(TEMPLATES)


def test_reference_engine_has_the_gpu_engine_contract(dirs, tmp_path):
    cpu = fill_and_load("cpu", dirs, tmp_path / "cpu")["tensorrt_llm"]
    gpu = fill_and_load("gpu", dirs, tmp_path / "gpu")["tensorrt_llm"]
    # Whole messages: name, data_type, dims, reshape, optional, allow_ragged_batch, order.
    assert list(cpu.input) == list(gpu.input)
    assert list(cpu.output) == list(gpu.output)
    assert cpu.max_batch_size == gpu.max_batch_size
    assert cpu.model_transaction_policy.decoupled and gpu.model_transaction_policy.decoupled
    assert (cpu.backend, gpu.backend) == ("python", "tensorrtllm")


def test_gpu_engine_model_matches_v1_2_1(dirs, tmp_path):
    configs = fill_and_load("gpu", dirs, tmp_path / "repo", kv_cache_free_gpu_mem_fraction=0.85,
                            cancellation_check_period_ms=23)
    config = configs["tensorrt_llm"]
    inputs = {t.name: t for t in config.input}
    outputs = {t.name: t for t in config.output}
    assert (len(inputs), len(outputs)) == (62, 21)
    required = {name for name, t in inputs.items() if not t.optional}
    assert required == {"input_lengths", "request_output_len"}
    assert DataType.Name(inputs["seed"].data_type) == "TYPE_UINT64"
    assert list(inputs["stop_words_list"].dims) == [2, -1]
    assert inputs["stop_words_list"].allow_ragged_batch
    assert list(outputs["output_ids"].dims) == [-1, -1]
    assert config.model_transaction_policy.decoupled
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["gpt_model_path"] == str(dirs["engine"].resolve())
    assert params["kv_cache_free_gpu_mem_fraction"] == "0.85"
    # The plan's one decode step (mixtral_triton.capacity), read by the backend as an int.
    assert params["cancellation_check_period_ms"] == "23"
    assert params["exclude_input_in_output"] == "true"
    # The backend fails to load without these keys (it reads them with no fallback).
    for key in ("tokenizer_dir", "guided_decoding_backend", "xgrammar_tokenizer_info_path"):
        assert key in params


def test_gpu_engine_model_is_set_for_orchestrator_mode_with_upstreams_names(dirs, tmp_path):
    config = fill_and_load("gpu", dirs, tmp_path / "repo")["tensorrt_llm"]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert set(params) <= UPSTREAM_ENGINE_PARAMETERS, set(params) - UPSTREAM_ENGINE_PARAMETERS
    # With TRTLLM_ORCHESTRATOR=1 the model spawns this worker, one per GPU listed.
    assert params["executor_worker_path"] == UPSTREAM_EXECUTOR_WORKER
    # The backend splits instances by ";" and GPUs by ",": one instance on the 4 GPUs.
    assert [[int(gpu) for gpu in group.split(",")] for group in params["gpu_device_ids"].split(";")] == [[0, 1, 2, 3]]
    assert len(config.instance_group) == 1 and config.instance_group[0].count == 1
    # Only for workers mpirun started beforehand; an empty value would not mean "unset".
    assert "participant_ids" not in params
    two = fill_and_load("gpu", dirs, tmp_path / "tp2", gpu_device_ids="2,3")["tensorrt_llm"]
    assert two.parameters["gpu_device_ids"].string_value == "2,3"


def test_ensemble_takes_every_upstream_input_and_adds_usage_outputs(dirs, tmp_path):
    configs = fill_and_load("gpu", dirs, tmp_path / "repo")
    ensemble = configs["ensemble"]
    declared = {t.name: (DataType.Name(t.data_type), list(t.dims)) for t in ensemble.input}
    assert declared == {**UPSTREAM_ENSEMBLE_INPUTS, **OUR_ENSEMBLE_INPUTS}
    assert {t.name for t in ensemble.input if not t.optional} == {"text_input", "max_tokens"}
    # ... in the order and form of the one list they come from, and the tokenizer model's too
    expected = [(n, d, list(dims), ragged) for n, d, dims, ragged in ensemble_input_specs()]
    for model in ("ensemble", "preprocessing"):
        inputs = [(t.name, DataType.Name(t.data_type), list(t.dims), t.allow_ragged_batch)
                  for t in configs[model].input]
        assert inputs == expected, model
    outputs = {t.name: DataType.Name(t.data_type) for t in ensemble.output}
    assert outputs["text_output"] == outputs["finish_reason"] == "TYPE_STRING"
    assert outputs["prompt_tokens"] == outputs["completion_tokens"] == "TYPE_INT32"
    assert outputs["num_input_tokens"] == outputs["num_output_tokens"] == "TYPE_INT32"


def test_predict_protocol_tensors_are_ensemble_inputs(dirs, tmp_path):
    ensemble = fill_and_load("cpu", dirs, tmp_path / "repo")["ensemble"]
    declared = {t.name: DataType.Name(t.data_type) for t in ensemble.input}
    for spec in FIELDS:
        for tensor in (spec.tensor,) if spec.tensor else ("guided_decoding_guide_type", "guided_decoding_guide"):
            assert declared[tensor] == spec.tensor_dtype, spec.name


def test_template_files_are_copied_and_a_refill_replaces_the_old_one(dirs, tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    (templates / "preprocessing" / "1" / "extra.py").write_text("# model\n")
    out = tmp_path / "repo"
    fill_repository(settings("gpu", dirs), out, templates)
    (out / "stale").mkdir()
    fill_repository(settings("cpu", dirs), out, templates)
    assert (out / "preprocessing" / "1" / "extra.py").read_text() == "# model\n"
    assert not (out / "stale").exists()
    assert load_config(out / "tensorrt_llm" / "config.pbtxt").backend == "python"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers
    assert (templates / "tensorrt_llm_reference" / "config.pbtxt").read_text() == \
        (TEMPLATES / "tensorrt_llm_reference" / "config.pbtxt").read_text()


def test_refuses_to_replace_a_folder_it_did_not_write(dirs, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="refusing to replace"):
        fill_repository(settings("cpu", dirs), out)
    assert (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="overlaps the templates"):
        fill_repository(settings("cpu", dirs), TEMPLATES / "out")


@pytest.mark.parametrize("target, changes, message", [
    ("gpu", {"engine_dir": None}, "--target gpu needs --engine-dir"),
    ("gpu", {"checkpoint_dir": Path("/")}, "--checkpoint-dir does not apply to --target gpu"),
    ("cpu", {"checkpoint_dir": Path("/nonexistent/ckpt")}, "checkpoint dir /nonexistent/ckpt"),
    ("cpu", {"tokenizer_dir": Path("/nonexistent/tok")}, "tokenizer directory /nonexistent/tok"),
    ("cpu", {"max_input_len": 4096, "max_seq_len": 4096}, "must be below --max-seq-len"),
    ("cpu", {"triton_max_batch_size": 0}, "--triton-max-batch-size must be at least 1"),
    ("gpu", {"kv_cache_free_gpu_mem_fraction": 1.5}, r"must be in \(0, 1\]"),
    ("gpu", {"batch_scheduler_policy": "fifo"}, "unknown batch scheduler policy 'fifo'"),
    ("gpu", {"gpu_device_ids": "0,1,1"}, "--gpu-device-ids must be distinct GPU numbers"),
    ("gpu", {"gpu_device_ids": "0;1"}, r"--gpu-device-ids must be .* got '0;1'"),
])
def test_bad_settings_are_refused_clearly(target, changes, message, dirs, tmp_path):
    with pytest.raises(UserError, match=message):
        fill_repository(settings(target, dirs, **changes), tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_tokenizer_folder_must_hold_a_tokenizer(dirs, tmp_path):
    (dirs["tokenizer"] / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json or tokenizer.model"):
        fill_repository(settings("cpu", dirs), tmp_path / "repo")


def test_unknown_placeholder_names_file_line_and_placeholder(dirs, tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES, templates)
    config = templates / "postprocessing" / "config.pbtxt"
    extra = 'parameters: { key: "x", value: { string_value: "${nope}" } }\n'
    config.write_text(config.read_text() + extra)
    line = config.read_text().count("\n")
    with pytest.raises(UserError, match=rf"{config}:{line}: no value for placeholder \$\{{nope\}}"):
        fill_repository(settings("cpu", dirs), tmp_path / "repo", templates)


def test_parse_errors_name_file_and_line():
    with pytest.raises(UserError, match=r"^cfg.pbtxt:2:1: .*no field named \"bogus\""):
        parse_config('name: "m"\nbogus: 1\n', "cfg.pbtxt")
    with pytest.raises(UserError, match="input 'a' is declared twice"):
        tensor = '{ name: "a" data_type: TYPE_INT32 dims: [ 1 ] }'
        parse_config(f'name: "m" backend: "python" input [ {tensor}, {tensor} ]', "cfg.pbtxt")


@pytest.fixture
def configs(dirs, tmp_path) -> dict[str, ModelConfig]:
    return fill_and_load("cpu", dirs, tmp_path / "repo")


def test_wiring_rejects_outputs_from_different_decoupled_lineages(configs):
    # Triton refuses an ensemble output that skips the decoupled step: "step of model
    # 'ensemble' receives inputs originated from different decoupled models".
    int32 = DataType.Value("TYPE_INT32")
    configs["preprocessing"].output.add(name="PROMPT_LENGTH", data_type=int32, dims=[1])
    configs["ensemble"].output.add(name="prompt_length", data_type=int32, dims=[1])
    configs["ensemble"].ensemble_scheduling.step[0].output_map["PROMPT_LENGTH"] = "prompt_length"
    problems = wiring_problems(configs)
    assert any("different decoupled lineages" in p for p in problems), problems


def test_wiring_rejects_unused_tensors_and_mismatched_types(configs):
    configs["ensemble"].input.add(name="spare", data_type=DataType.Value("TYPE_BOOL"), dims=[1])
    configs["postprocessing"].input[0].data_type = DataType.Value("TYPE_INT64")
    problems = wiring_problems(configs)
    assert "ensemble tensor 'spare' is unused" in problems
    assert ("ensemble tensor '_INPUT_IDS': TYPE_INT32 at preprocessing output 'INPUT_IDS' but "
            "TYPE_INT64 at postprocessing input 'INPUT_IDS'") in problems


def test_wiring_rejects_missing_names(configs):
    step = configs["ensemble"].ensemble_scheduling.step[1]
    del step.input_map["INPUT_LENGTHS"]
    step.output_map["no_such_output"] = "x"
    assert wiring_problems(configs) == [
        "postprocessing: required input 'INPUT_LENGTHS' is not mapped",
        "postprocessing: no output 'no_such_output' (mapped to 'x')",
        "ensemble tensor '_INPUT_LENGTHS' is unused",
    ]


def test_cli_fills_and_reports_errors_on_one_line(dirs, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["--target", "cpu", "--out", str(out), "--tokenizer-dir", str(dirs["tokenizer"]),
                 "--checkpoint-dir", str(dirs["checkpoint"]), "--max-input-len", "100",
                 "--max-seq-len", "200", "--no-add-special-tokens"]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    params = load_config(out / "preprocessing" / "config.pbtxt").parameters
    assert params["max_input_len"].string_value == "100"
    assert params["add_special_tokens"].string_value == "false"
    assert main(["--target", "gpu", "--out", str(out),
                 "--tokenizer-dir", str(dirs["tokenizer"])]) == 2
    assert capsys.readouterr().err.strip().endswith("error: --target gpu needs --engine-dir")


def test_gpu_engine_model_does_guided_decoding_with_xgrammar_and_the_fills_tokenizer_info(dirs, tmp_path,
                                                                                           tiny_checkpoint):
    """TensorRT-LLM 1.2.1's backend turns guided decoding on when guided_decoding_backend is
    "xgrammar" and xgrammar_tokenizer_info_path names a JSON file with encoded_vocab (the
    tokens in id order), tokenizer_str (tokenizer.json's text) and stop_token_ids
    (model_instance_state.cc getGuidedDecodingConfigFromParams; the file as
    examples/generate_xgrammar_tokenizer_info.py writes it). Built the way the executor builds
    it (metadata detected from tokenizer_str), it masks exactly as the tokenizer itself does."""
    import xgrammar
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    out = tmp_path / "repo"
    config = fill_and_load("gpu", dirs, out)["tensorrt_llm"]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["guided_decoding_backend"] == "xgrammar"
    info_path = Path(params["xgrammar_tokenizer_info_path"])
    assert info_path == out.resolve() / "tensorrt_llm" / "xgrammar_tokenizer_info.json" and info_path.is_file()
    info = json.loads(info_path.read_text())
    assert set(info) == {"encoded_vocab", "tokenizer_str", "stop_token_ids"}
    tokenizer = AutoTokenizer.from_pretrained(str(dirs["tokenizer"]))
    vocab = tokenizer.get_vocab()
    assert [vocab[token] for token in info["encoded_vocab"]] == list(range(len(vocab)))
    assert info["stop_token_ids"] == [tokenizer.eos_token_id]
    # the backend's tokenizer as transformers builds it (upstream's tool writes the same)
    assert Tokenizer.from_str(info["tokenizer_str"]).get_vocab_size() == len(vocab)

    detected = xgrammar.TokenizerInfo._detect_metadata_from_hf(info["tokenizer_str"])
    as_executor = xgrammar.TokenizerInfo(info["encoded_vocab"], detected["vocab_type"],
                                         stop_token_ids=info["stop_token_ids"],
                                         add_prefix_space=detected["add_prefix_space"])
    as_tokenizer = xgrammar.TokenizerInfo.from_huggingface(tokenizer)
    assert as_executor.vocab_type == as_tokenizer.vocab_type
    assert as_executor.add_prefix_space == as_tokenizer.add_prefix_space
    assert as_executor.decoded_vocab == as_tokenizer.decoded_vocab
    masks = []
    for tokenizer_info in (as_executor, as_tokenizer):
        matcher = xgrammar.GrammarMatcher(xgrammar.GrammarCompiler(tokenizer_info).compile_json_schema(
            '{"type": "object", "properties": {"a": {"type": "integer"}}}'))
        bitmask = xgrammar.allocate_token_bitmask(1, tokenizer_info.vocab_size)
        matcher.fill_next_token_bitmask(bitmask)
        masks.append(bitmask)
    assert masks[0].equal(masks[1])


def test_the_cpu_repository_has_no_gpu_guided_decoding_file(dirs, tmp_path):
    out = tmp_path / "repo"
    fill_and_load("cpu", dirs, out)
    assert not list(out.rglob("xgrammar_tokenizer_info.json"))


def test_bf16_logits_are_refused_for_gpus_since_the_guided_decoder_masks_fp32_or_fp16(dirs, tmp_path):
    with pytest.raises(UserError, match="TYPE_BF16 does not work with guided decoding"):
        fill_repository(settings("gpu", dirs, logits_datatype="TYPE_BF16"), tmp_path / "repo")
