"""The capacity plan: exact 8x22B figures, the plans for 4 x 80 GB GPUs, and the refusals."""

from __future__ import annotations

import json
import math

import pytest

from mixtral_triton.capacity import (GPU_MEMORY_BYTES, HEADROOM_BYTES, MIXTRAL_8X22B, PLAN_WORKLOADS,
                                     SERVER_CONTEXT_RESERVE_BYTES, BuildMeasurement, ModelShape, Workload,
                                     cancellation_check_period_ms, engine_lengths,
                                     gateway_max_concurrency, hpa_active_requests_target, kv_admitted_requests,
                                     kv_bytes_per_token, parameter_count, plan_capacity, weight_bytes)
from mixtral_triton.errors import UserError
from mixtral_triton.fixture import SIZES, FixtureSize, hub_config
from mixtral_triton.fixture.checkpoint import hub_tensor_shapes
from mixtral_triton.roofline import (GPUS, PLAN_GPUS, decode_step_seconds, expected_experts, step_bounds,
                                     step_bytes_per_gpu, throughput_batch, workload_plan, workload_plan_markdown)
from mixtral_triton.trtllm_build import plan_main

REAL_8X22B = FixtureSize(**{**SIZES["real-shaped"].__dict__, "num_hidden_layers": 56})


def test_parameter_count_is_the_sum_of_the_hub_tensors():
    shapes = hub_tensor_shapes(REAL_8X22B, 32000)
    assert parameter_count(MIXTRAL_8X22B) == sum(math.prod(shape) for _, shape in shapes)
    assert ModelShape.from_config(hub_config(REAL_8X22B, 32000)) == MIXTRAL_8X22B


def test_8x22b_fp16_figures():
    router_fp32_extra = 56 * 8 * 6144 * 2  # the router stays float32
    assert weight_bytes(MIXTRAL_8X22B) == parameter_count(MIXTRAL_8X22B) * 2 + router_fp32_extra
    assert weight_bytes(MIXTRAL_8X22B) == 281_246_773_248  # about 281 GB
    # The embedding stays whole on every rank; the rest splits four ways.
    assert weight_bytes(MIXTRAL_8X22B, tp=4) == 70_615_904_256  # about 70.6 GB
    assert kv_bytes_per_token(MIXTRAL_8X22B) == 56 * 2 * 8 * 128 * 2 == 224 * 1024
    assert kv_bytes_per_token(MIXTRAL_8X22B, tp=4) == 56 * 1024


@pytest.mark.parametrize("gpu", ["A100-80GB", "H100-80GB"])
def test_four_80gb_gpus_fit(gpu):
    plan = plan_capacity(gpu, 4, max_input_len=4096, max_output_len=1024)
    assert plan.tp == 4 and plan.max_seq_len == 5120
    assert plan.weight_bytes_per_gpu == 70_615_904_256
    reserve = (plan.context_reserve_bytes + plan.activation_bytes + plan.headroom_bytes
               + plan.server_context_reserve_bytes)
    assert plan.weight_bytes_per_gpu + reserve + plan.kv_cache_bytes_per_gpu <= GPU_MEMORY_BYTES[gpu]
    assert plan.kv_cache_tokens * plan.kv_bytes_per_token_per_gpu <= plan.kv_cache_bytes_per_gpu
    assert plan.kv_cache_tokens % plan.tokens_per_block == 0
    assert 30 <= plan.full_length_requests == plan.kv_cache_tokens // 5120 <= 40
    # Sized for the seed's 128/128 requests, not for full-length ones: 256 tokens = 8 blocks each.
    assert plan.workload == "128/128"
    assert plan.kv_admitted_requests == plan.kv_cache_tokens // 32 // 8 >= 600
    assert plan.max_batch_size == min(plan.kv_admitted_requests, plan.throughput_batch) >= 256
    assert plan.max_num_tokens == 8192
    assert 0.8 <= plan.kv_cache_free_gpu_mem_fraction <= 0.95


def test_bigger_gpus_hold_more_kv_and_expert_parallelism_keeps_the_weight_share():
    h100 = plan_capacity("H100-80GB", 4, 4096, 1024)
    h200 = plan_capacity("H200-141GB", 4, 4096, 1024)
    assert h200.kv_cache_tokens > 5 * h100.kv_cache_tokens
    assert plan_capacity("H100-80GB", 4, 4096, 1024, ep=4).weight_bytes_per_gpu == h100.weight_bytes_per_gpu
    assert plan_capacity("H200-141GB", 8, 4096, 1024).kv_bytes_per_token_per_gpu == 28 * 1024


def test_long_prompts_raise_max_num_tokens():
    assert plan_capacity("H100-80GB", 4, 16384, 1024).max_num_tokens == 16384


def test_four_40gb_gpus_are_refused_with_the_numbers():
    with pytest.raises(UserError, match=r"70\.62 GB per GPU at tp 4.*A100-40GB has 42\.95 GB.*8 x A100-40GB"):
        plan_capacity("A100-40GB", 4, 4096, 1024)


def test_a_kv_cache_too_small_for_one_request_is_refused():
    with pytest.raises(UserError, match=r"one request of 65536 tokens needs"):
        plan_capacity("A100-80GB", 4, 49152, 16384)


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpu="V100"), r"--gpu must be one of A100-40GB, A100-80GB, H100-80GB, H200-141GB, B200-180GB"),
    (dict(gpus=9), r"--gpus must be between 1 and 8, got 9"),
    (dict(tp=2), r"--tp must equal --gpus \(4\)"),
    (dict(ep=3), r"--ep must divide .* one of 1, 2, 4, got 3"),
    (dict(max_input_len=0), r"--max-input-len must be between 1 and 65535, got 0"),
    (dict(max_output_len=65536), r"--max-output-len must be between 1 and 61440"),
    (dict(gpus=3), r"--tp 3 must divide"),
])
def test_bad_options_name_the_allowed_range(kwargs, message):
    args = dict(gpu="H100-80GB", gpus=4, max_input_len=4096, max_output_len=1024) | kwargs
    with pytest.raises(UserError, match=message):
        plan_capacity(**args)


def test_table_and_json():
    plan = plan_capacity("H100-80GB", 4, 4096, 1024)
    assert json.loads(plan.to_json()) == plan.to_dict()
    table = plan.table()
    assert "weights per GPU" in table and "70.62 GB" in table and "224 KiB" in table


def test_cli_prints_the_plan_and_refuses_in_one_line(capsys, tmp_path):
    assert plan_main(["--gpu", "H100-80GB", "--gpus", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weight_bytes_per_gpu"] == 70_615_904_256

    config = tmp_path / "config.json"
    config.write_text(json.dumps(hub_config(SIZES["tiny"], 32000)))
    assert plan_main(["--gpu", "A100-40GB", "--gpus", "1", "--model-config", str(tmp_path),
                      "--max-input-len", "64", "--max-output-len", "64"]) == 0
    assert "max_batch_size" in capsys.readouterr().out

    for argv in (["--gpu", "A100-40GB"], ["--gpu", "H100-80GB", "--gpus", "two"], []):
        assert plan_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err


def test_every_planned_gpu_has_roofline_figures():
    assert set(GPUS) == set(GPU_MEMORY_BYTES)


def test_a_batch_of_one_reads_two_experts_and_a_large_batch_the_whole_shard():
    assert expected_experts(1, MIXTRAL_8X22B) == 2
    assert 7.99 < expected_experts(32, MIXTRAL_8X22B) < 8
    # Every expert touched: the whole tp-4 shard is read except the embedding table, of
    # which only the batch's rows are looked up.
    batch, h = 256, MIXTRAL_8X22B.hidden_size
    weights = step_bytes_per_gpu(MIXTRAL_8X22B, 4, batch, 0)["weights"]
    expected = weight_bytes(MIXTRAL_8X22B, 4) - (MIXTRAL_8X22B.vocab_size - batch) * h * 2
    assert weights == pytest.approx(expected, rel=1e-12)


def test_decode_step_is_bandwidth_bound_at_small_batch_and_compute_bound_at_large():
    # Batch 1 on H100: about 19.5 GB of touched weights per GPU at 3.35 TB/s.
    one = decode_step_seconds("H100-80GB", 1, 2048)
    assert one == step_bounds("H100-80GB", 1, 2048)["memory_s"]
    assert 5.5e-3 < one < 6.2e-3
    # Memory bound: H200's 4.8 TB/s against H100's 3.35 (same FLOPs).
    assert one / decode_step_seconds("H200-141GB", 1, 2048) == pytest.approx(4.8 / 3.35)
    # Compute bound at a batch of thousands: the same dense fp16 peak, the same time.
    big = step_bounds("H100-80GB", 4096, 256)
    assert big["compute_s"] > big["memory_s"]
    assert decode_step_seconds("H100-80GB", 4096, 256) == decode_step_seconds("H200-141GB", 4096, 256)
    # More sequences or longer contexts never make a step faster; more sequences make more tokens.
    steps = [decode_step_seconds("A100-80GB", b, 1024) for b in (1, 8, 64, 512)]
    assert steps == sorted(steps)
    assert [b / s for b, s in zip((1, 8, 64, 512), steps)] == sorted(b / s for b, s in zip((1, 8, 64, 512), steps))
    assert decode_step_seconds("A100-80GB", 64, 4096) > decode_step_seconds("A100-80GB", 64, 128)
    # A smaller model (the tiny fixture's shape) steps faster than 8x22B on the same GPUs.
    tiny = ModelShape.from_config(hub_config(SIZES["tiny"], 32000))
    assert decode_step_seconds("H100-80GB", 8, 128, tp=1, model=tiny) < decode_step_seconds("H100-80GB", 8, 128)


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpu="V100"), r"gpu must be one of A100-40GB, .*B200-180GB, got 'V100'"),
    (dict(batch=0), r"batch must be at least 1, got 0"),
    (dict(context_tokens=-1), r"context_tokens must be at least 0, got -1"),
])
def test_decode_step_refuses_bad_input(kwargs, message):
    with pytest.raises(UserError, match=message):
        decode_step_seconds(**(dict(gpu="H100-80GB", batch=1, context_tokens=0) | kwargs))


def test_the_workload_plan_admits_hundreds_of_short_requests_and_few_long_ones():
    rows = {(r["gpu"], r["workload"]): r for r in workload_plan()}
    assert {gpu for gpu, _ in rows} == set(PLAN_GPUS) >= {"A100-80GB", "H100-80GB", "H200-141GB"}
    assert {w for _, w in rows} == {"128/128", "512/256", "2048/512", "4096/1024"}
    h100 = rows["H100-80GB", "128/128"]
    assert h100["kv_admitted_requests"] >= 256 and h100["batch"] >= 256
    for (gpu, workload), r in rows.items():
        plan = plan_capacity(gpu, 4)  # one engine per GPU, sized for 128/128
        w = Workload.parse(workload)
        assert r["kv_admitted_requests"] == kv_admitted_requests(plan.kv_cache_tokens, w.input_tokens, w.output_tokens)
        assert r["batch"] == min(r["kv_admitted_requests"], plan.max_batch_size)
        assert r["tokens_per_s_replica"] == pytest.approx(r["batch"] * r["tokens_per_s_per_user"])
        assert r["step_ms"] == pytest.approx(1e3 * decode_step_seconds(gpu, r["batch"], w.input_tokens + w.output_tokens // 2))
    # The old plan ran as many requests as fit at full length, whatever their shape: at 128/128
    # the same replica now streams several times the tokens (over 10x on the 80 GB GPUs).
    for gpu in PLAN_GPUS:
        old_batch = plan_capacity(gpu, 4).full_length_requests
        assert rows[gpu, "4096/1024"]["batch"] == old_batch
        old_rate = old_batch / decode_step_seconds(gpu, old_batch, 128 + 64)
        assert rows[gpu, "128/128"]["tokens_per_s_replica"] > (10 if gpu.endswith("-80GB") else 2.5) * old_rate
    table = workload_plan_markdown(list(rows.values()))
    assert table.count("\n") == 1 + len(rows) and "| H100-80GB | 128/128 | 637 |" in table


def test_max_batch_size_stops_at_the_roofline_knee_where_the_kv_cache_admits_more():
    h200 = plan_capacity("H200-141GB", 4)
    assert h200.kv_admitted_requests > h200.throughput_batch == h200.max_batch_size
    knee = h200.throughput_batch
    below, at = step_bounds("H200-141GB", knee - 1, 192), step_bounds("H200-141GB", knee, 192)
    assert below["compute_s"] < below["memory_s"] and at["compute_s"] >= at["memory_s"]
    # Long contexts never turn compute bound: every request read adds its KV cache.
    assert throughput_batch("H100-80GB", 4608, limit=2048) == 2048
    # A workload longer than the engine's limits is refused.
    with pytest.raises(UserError, match=r"--workload 8192/128 is longer than the engine accepts"):
        plan_capacity("H100-80GB", 4, workload=Workload(8192, 128))


@pytest.mark.parametrize("text, message", [("128", "INPUT/OUTPUT"), ("a/b", "INPUT/OUTPUT"), ("0/5", "at least 1")])
def test_workload_refuses_bad_text(text, message):
    with pytest.raises(UserError, match=message):
        Workload.parse(text)
    assert Workload.parse("2048/512") in PLAN_WORKLOADS


def test_default_engine_lengths_fit_the_model():
    assert engine_lengths(MIXTRAL_8X22B) == (4096, 1024)
    tiny = ModelShape.from_config(hub_config(SIZES["tiny"], 32000))
    assert tiny.max_position_embeddings == 4096
    assert engine_lengths(tiny) == (3072, 1024)
    assert engine_lengths(tiny, max_input_len=4000) == (4000, 96)
    assert engine_lengths(tiny, max_output_len=100) == (3996, 100)
    assert plan_capacity("H100-80GB", 1, model=tiny).max_seq_len == 4096


def test_gateway_and_hpa_limits_follow_the_engine_batch():
    assert gateway_max_concurrency(708, triton_max_replicas=4, gateway_replicas=2) == 1416
    assert gateway_max_concurrency(35, triton_max_replicas=3, gateway_replicas=2) == 53  # rounded up
    assert hpa_active_requests_target(708) == 566


def generated_runbook_table(name: str, option: str, capsys) -> str:
    """The runbook's table between its `name` markers, checked to be what `option` prints now."""
    from pathlib import Path

    runbook = (Path(__file__).resolve().parents[1] / "docs" / "runbook.md").read_text()
    section = runbook.split(f"<!-- {name}: generated by build/plan_capacity.py {option}")[1]
    shown = section.split("-->\n", 1)[1].split(f"\n<!-- {name} end -->")[0]
    assert plan_main([option]) == 0
    assert shown == capsys.readouterr().out.rstrip("\n"), f"stale: paste build/plan_capacity.py {option}"
    return shown


def test_the_runbook_shows_the_generated_plan_table(capsys):
    generated_runbook_table("plan-table", "--table", capsys)


@pytest.mark.parametrize("gpu", PLAN_GPUS)
def test_every_gpu_of_the_plan_adds_up_with_gpu_0_holding_the_servers_context(gpu):
    """Orchestrator mode: the server process's own CUDA context lands on GPU 0 after the KV
    cache was sized, so the one KV fraction of every rank must leave room for it there."""
    plan = plan_capacity(gpu, 4)
    rows = plan.to_dict()["memory_per_gpu"]
    assert [r["gpu_index"] for r in rows] == [0, 1, 2, 3]
    assert json.loads(plan.to_json())["server_context_reserve_bytes"] == SERVER_CONTEXT_RESERVE_BYTES
    for row in rows:
        placed = [row[k] for k in ("weights", "activations", "kv_cache", "worker_context", "server_context")]
        assert sum(placed) + row["headroom"] == row["gpu_memory"] == GPU_MEMORY_BYTES[gpu]
        assert row["headroom"] >= HEADROOM_BYTES
        assert row["server_context"] == (SERVER_CONTEXT_RESERVE_BYTES if row["gpu_index"] == 0 else 0)
    # The KV cache is what the fraction takes of the memory free when the workers allocate it.
    free = plan.gpu_memory_bytes - plan.weight_bytes_per_gpu - plan.context_reserve_bytes - plan.activation_bytes
    assert rows[0]["kv_cache"] == int(plan.kv_cache_free_gpu_mem_fraction * free)
    assert rows[1]["headroom"] == rows[0]["headroom"] + SERVER_CONTEXT_RESERVE_BYTES


def test_cancellation_check_period_is_one_decode_step_within_bounds():
    h100 = plan_capacity("H100-80GB", 4)
    assert h100.decode_step_ms == pytest.approx(1e3 * decode_step_seconds("H100-80GB", h100.max_batch_size, 128 + 64))
    assert h100.cancellation_check_period_ms == math.floor(h100.decode_step_ms) == 23
    assert [cancellation_check_period_ms(ms) for ms in (0.01, 5.9, 37.7, 250.0)] == [5, 5, 37, 100]
    tiny = ModelShape.from_config(hub_config(SIZES["tiny"], 32000))
    assert plan_capacity("H100-80GB", 1, model=tiny).cancellation_check_period_ms == 5


def test_measured_memory_replaces_the_estimates_and_says_so():
    estimated = plan_capacity("H100-80GB", 4)
    assert (estimated.weights_source, estimated.activations_source) == ("estimate", "estimate")
    # A build that reported twice the estimated activations: less KV cache, fewer requests,
    # and never more than the engine was built for.
    measured = plan_capacity("H100-80GB", 4, measured=BuildMeasurement(activation_bytes=2 * estimated.activation_bytes),
                             engine_max_batch_size=estimated.max_batch_size)
    assert measured.activations_source == "measured (trtllm-build)" and measured.weights_source == "estimate"
    assert measured.activation_bytes == 2 * estimated.activation_bytes
    assert measured.kv_cache_tokens < estimated.kv_cache_tokens
    assert measured.max_batch_size == measured.kv_admitted_requests < estimated.max_batch_size
    smaller = plan_capacity("H100-80GB", 4, measured=BuildMeasurement(activation_bytes=estimated.activation_bytes // 4),
                            engine_max_batch_size=estimated.max_batch_size)
    assert smaller.kv_admitted_requests > estimated.max_batch_size == smaller.max_batch_size


def test_the_runbook_memory_table_is_generated_and_adds_up_on_every_gpu(capsys):
    shown = generated_runbook_table("memory-table", "--memory-table", capsys)
    rows = [line.strip("|").split("|") for line in shown.splitlines()[2:]]
    assert {row[0].strip() for row in rows} == {f"{gpu} (x4)" for gpu in PLAN_GPUS}
    covered = {}
    for gpu, indices, *figures in rows:
        first, _, last = indices.strip().partition("-")
        covered.setdefault(gpu.strip(), set()).update(range(int(first), int(last or first) + 1))
        *parts, memory = (float(f) for f in figures)
        headroom = parts[-1]
        # Each figure is rounded to 0.01 GB: the six parts add up to the GPU's memory within that.
        assert abs(sum(parts) - memory) <= 0.005 * len(parts) and headroom >= HEADROOM_BYTES / 1e9 - 0.005
    assert all(indices == {0, 1, 2, 3} for indices in covered.values())
