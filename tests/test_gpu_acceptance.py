"""scripts/gpu_acceptance.py, the one command that accepts a GPU deployment. No GPU here: its
--dry-run runs for real (every step and command printed, each project command parsed by its
own script's parser, nothing run or written), and the report renders a results file of its
format. What it measures on a GPU has not been run by this project."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from mixtral_triton.bench.report import markdown
from mixtral_triton.capacity import PLAN_WORKLOADS, plan_capacity
from mixtral_triton.gpu_acceptance import (concurrencies, memory_against_plan, roofline_cell, summary_text,
                                           verdicts)
from test_deploy import _check_commands

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_acceptance.py"
STEPS = ["the machine", "GPU smoke tests", "the capacity plan", "the engine", "the plan again",
         "fill the model repository", "serve in orchestrator mode", "serve in leader mode", "write the results"]


def dry_run(tmp_path: Path, *extra: str) -> str:
    result = subprocess.run([sys.executable, str(SCRIPT), "--gpu", "H100-80GB", "--tokenizer-dir", str(tmp_path / "hf"),
                             "--work-dir", str(tmp_path / "work"), "--results", str(tmp_path / "results.json"),
                             "--dry-run", *extra], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_dry_run_prints_every_step_and_command_and_runs_nothing(tmp_path):
    out = dry_run(tmp_path, "--checkpoint-dir", str(tmp_path / "ckpt"))
    titles = re.findall(r"^== step (\d+): (.*)$", out, re.M)
    assert [int(n) for n, _ in titles] == list(range(1, len(STEPS) + 1))
    assert all(title.startswith(step) for (_, title), step in zip(titles, STEPS)), titles
    commands = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]
    # Every project command accepts its arguments (its own argparse parser, nothing run).
    project = [(str(ROOT / c[1]), c[2:]) for c in commands
               if len(c) > 1 and re.fullmatch(r"(build|scripts|client)/[\w/-]+\.py", c[1])]
    assert {Path(s).relative_to(ROOT).as_posix() for s, _ in project} >= {
        "build/plan_capacity.py", "build/build_engine.py", "build/fill_model_repository.py",
        "scripts/launch_triton.py", "client/gateway.py", "scripts/bench/run.py"}
    problems = _check_commands([(s, a) for s, a in project if not s.endswith("bench/run.py")])
    assert not problems, "\n".join(problems)
    # The fill carries the plan's numbers, cancellation_check_period_ms included.
    plan = plan_capacity("H100-80GB", 4)
    fill = next(c for c in commands if "build/fill_model_repository.py" in c)
    assert fill[fill.index("--triton-max-batch-size") + 1] == str(plan.max_batch_size)
    assert fill[fill.index("--cancellation-check-period-ms") + 1] == str(plan.cancellation_check_period_ms) == "23"
    # genai-perf over every shape of the plan at its concurrencies, in both modes.
    genai = [c for c in commands if c[:2] == ["genai-perf", "profile"]]
    cells = {(c[c.index("--synthetic-input-tokens-mean") + 1], c[c.index("--output-tokens-mean") + 1],
              int(c[c.index("--concurrency") + 1])) for c in genai}
    assert cells == {(str(w.input_tokens), str(w.output_tokens), n) for w in PLAN_WORKLOADS
                     for n in concurrencies(plan, w)}
    assert len(genai) == 2 * len(cells)
    # The server command each mode runs, as the launcher prints it (no GPU needed for that).
    assert re.search(r"^TRTLLM_ORCHESTRATOR=1 /opt/tritonserver/bin/tritonserver ", out, re.M)
    assert re.search(r"^mpirun --allow-run-as-root -x TRTLLM_ORCHESTRATOR=0 -n 1 ", out, re.M)
    assert not (tmp_path / "work").exists() and not (tmp_path / "results.json").exists()


def test_dry_run_takes_a_built_engine_and_one_mode(tmp_path):
    out = dry_run(tmp_path, "--engine-dir", str(tmp_path / "engine"), "--mode", "leader", "--skip-smoke",
                  "--shapes", "128/128")
    assert "the engine: taken from" in out and "build/build_engine.py" not in out
    assert "serve in leader mode" in out and "serve in orchestrator mode" not in out
    assert "skipped (--skip-smoke)" in out
    assert {c for c in re.findall(r"--synthetic-input-tokens-mean (\d+)", out)} == {"128"}


def test_bad_options_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--gpu", "H100-80GB", "--tokenizer-dir", "x", "--dry-run"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--checkpoint-dir" in result.stderr and "Traceback" not in result.stderr


def test_a_results_file_renders_as_the_measured_gpu_section():
    """The format the acceptance run writes, with figures made up for this test (no GPU has run
    it): the report shows them against the roofline, with the verdicts."""
    plan = plan_capacity("H100-80GB", 4)
    shape = PLAN_WORKLOADS[0]
    bound = roofline_cell(plan, shape, 1)
    measured = {"requests": 16, "output_tokens_per_s": 0.8 * bound["tokens_per_s_replica"],
                "ttft_ms_p50": 3 * bound["ttft_ms"], "ttft_ms_p99": 4 * bound["ttft_ms"],
                "itl_ms_p50": 1.25 * bound["itl_ms"], "itl_ms_p99": 1.5 * bound["itl_ms"]}
    judged = verdicts(measured, bound, 1)
    assert judged == {"tokens_per_s_replica": "met", "tokens_per_s_per_user": "met", "itl_ms_p50": "met",
                      "ttft_ms_p50": "missed"}
    gib = 2**30
    gpus = {i: {"total_mib": 81559, "used_mib": 81559 - (3 if i else 1) * 1024,
                "processes": {100 + i: 70000, **({7: 600} if i == 0 else {})}}
            for i in range(4)}
    memory = memory_against_plan(plan, gpus, server_pid=7)
    assert [r["verdict"] for r in memory] == ["met"] * 4 and memory[0]["server_process_bytes"] == 600 * 2**20
    gpus[0]["processes"][7] = 2048  # a server context larger than its reserve
    assert memory_against_plan(plan, gpus, server_pid=7)[0]["verdict"] == "missed"
    run = {"schema": 1, "date_utc": "2026-12-01T00:00:00+00:00", "gpu": "H100-80GB", "gpus": 4,
           "machine": {"git": "0123456789abcdef", "nvidia-smi": "4 x H100", "ompi_info": "Open MPI v4.1.7"},
           "smoke_tests": "met", "plan_estimated": plan.to_dict(),
           "modes": {"orchestrator": {"cells": [{"workload": str(shape), "concurrency": 1, "measured": measured,
                                                 "roofline": bound, "verdicts": judged}],
                                      "memory": memory, "server_exit_code": 0,
                                      "predict": {"status": "met", "characters": 300, "first_chunk_ms": 180.0,
                                                  "text_start": "Mistral", "total_ms": 3000.0}}}}
    text = markdown({"gpu_acceptance": json.loads(json.dumps(run))}, ROOT / "bench" / "plots", ROOT)
    section = text.split("## GPU, measured")[1].split("\n## ")[0]
    assert "| orchestrator | 128/128 | 1 | 16 |" in section and "**MISSED**" in section and "**met**" in section
    assert "Open MPI v4.1.7" in section and "first text after 180 ms" in section
    assert "server exited 0 on SIGTERM" in section
    assert "orchestrator 128/128 c=1" in summary_text(run)
    assert 0.99 * gib < memory[0]["headroom_bytes"] < 1.01 * gib
    # Without a results file the section says it was not measured.
    assert "Not measured yet" in markdown({}, ROOT / "bench" / "plots", ROOT)
