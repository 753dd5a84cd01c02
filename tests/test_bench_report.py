"""The benchmark report says only what its results file holds: cells from their rounds,
verdicts from intervals, dirty sections marked on every row (no server: results are built
with the benchmark's own statistics from request records)."""

import re
from pathlib import Path

import pytest

from mixtral_triton.bench import report
from mixtral_triton.bench.closed_loop import Measurement
from mixtral_triton.bench.request_clients import Record
from mixtral_triton.bench.statistics import cell_summary
from mixtral_triton.bench.targets import cores_needed, targets
from mixtral_triton.bench.uncertainty import CONFIDENCE, INCONCLUSIVE, MET, MISSED
from mixtral_triton.bench.workload import Shape

SHAPE = Shape(128, 32)


def a_round(tokens_per_s: float, ttft_s: float = 0.02, requests: int = 4, server_cpu_s: float = 1.0) -> Measurement:
    """One closed-loop round of one worker: requests back to back, tokens evenly spaced."""
    records, now = [], 0.0
    for _ in range(requests):
        record = Record(sent=now)
        first = now + ttft_s
        for i in range(SHAPE.output_tokens):
            record.add(first + i / tokens_per_s, 1)
        records.append(record)
        now = record.token_times[-1]
    part = Measurement(records, wall_s=now, client_cpu_s=0.1, server_cpu_s=server_cpu_s, gateway_cpu_s=None,
                       load_1m=1.0)
    part.steady()
    return part


def a_cell(path: str, rates: list[float], **kwargs) -> dict:
    return cell_summary([a_round(r, **kwargs) for r in rates], path, SHAPE, 1)


def serving_results(engine: list[float], ensemble: list[float], dirty: bool = False) -> dict:
    paths = {"engine_grpc": {SHAPE.label: {"1": a_cell("engine_grpc", engine)}},
             "ensemble_grpc": {SHAPE.label: {"1": a_cell("ensemble_grpc", ensemble)}}}
    setup = {"model": "tiny", "engine_max_batch_size": 8, "decoding": "greedy", "output_length": "forced",
             "load": "closed loop", "requests_per_round": {"1": 4}, "rounds": len(engine),
             "shapes": [SHAPE.label], "concurrencies": [1]}
    machine = {"git_commit": "0123456789abcdef", "git_dirty": dirty, "git_dirty_paths": ["x.py"] if dirty else []}
    return {"serving": {"setup": setup, "paths": paths, "prescreen": {}, "missing": {}, "server_crashes": []},
            "runs": {"serving": {"date_utc": "2026-12-03T00:00:00+00:00", "machine": machine, "duration_s": 1}}}


def ensemble_row(results: dict) -> dict:
    return next(r for r in targets(results) if r["target"].startswith("ensemble gRPC") and "c=1)" in r["target"])


def test_a_cell_is_the_median_of_its_rounds_with_an_interval():
    cell = a_cell("ensemble_grpc", [100.0, 120.0, 80.0])
    estimate = cell["output_tokens_per_s_estimate"]
    assert len(cell["rounds"]) == estimate["n"] == 3
    # one worker: its requests back to back, each 32 tokens in TTFT + 31 gaps
    assert estimate["median"] == pytest.approx(SHAPE.output_tokens / (0.02 + (SHAPE.output_tokens - 1) / 100.0))
    assert estimate["low"] < estimate["median"] < estimate["high"]
    assert cell["output_tokens_per_s"] == estimate["median"]
    assert cell["failed"] == 0 and cell["exact_length"] == 12


@pytest.mark.parametrize("ensemble, verdict", [
    ([96.0, 95.0, 97.0, 96.0], MET),           # 0.95-0.97x every round
    ([80.0, 82.0, 81.0, 79.0], MISSED),        # ~0.8x every round
    ([80.0, 99.0, 85.0, 98.0], INCONCLUSIVE),  # straddles 0.9x
])
def test_the_ensemble_target_follows_the_interval_of_paired_rounds(ensemble, verdict):
    row = ensemble_row(serving_results([100.0] * 4, ensemble))
    assert row["verdict"] == verdict
    assert row["estimate"]["n"] == 4 and "n=4" in row["measured"]


def test_a_slower_machine_in_one_round_does_not_move_a_paired_ratio():
    # round 2 ran at half speed on both paths: the per-round ratio is still 0.95
    row = ensemble_row(serving_results([100.0, 50.0, 100.0, 100.0], [95.0, 47.5, 95.0, 95.0]))
    assert row["estimate"]["median"] == pytest.approx(0.95, rel=0.01)
    assert row["verdict"] == MET


def test_every_figure_of_a_dirty_section_is_marked():
    md = report.markdown(serving_results([100.0] * 3, [96.0] * 3, dirty=True), Path("/nonexistent"), Path("."))
    assert "**DIRTY tree** (1 path(s) differ: x.py)" in md
    serving = md[md.index("## Serving on CPU"):md.index("## Findings")]
    rows = [line for line in serving.splitlines() if line.startswith("| ") and not line.startswith("| path")
            and not line.startswith("| c |")]
    assert rows and all(report.DIRTY in row for row in rows)
    target_rows = [line for line in md.splitlines() if line.startswith("| ensemble gRPC >=")]
    assert target_rows and all(report.DIRTY in row for row in target_rows)
    findings = md[md.index("## Findings"):]
    assert report.DIRTY in findings


def test_a_clean_section_is_not_marked():
    md = report.markdown(serving_results([100.0] * 3, [96.0] * 3), Path("/nonexistent"), Path("."))
    assert report.DIRTY not in md and "clean tree" in md


def test_a_report_of_no_results_states_no_figure():
    """Every figure comes from the results file: with none, the only number left is the
    interval's confidence level, which is the method, not a measurement."""
    md = report.markdown({}, Path("/nonexistent"), Path("."))
    numbers = set(re.findall(r"\d+(?:\.\d+)?", md))
    assert numbers == {f"{CONFIDENCE * 100:.0f}"}
    assert report.findings({}) == []


def test_the_findings_change_with_what_was_measured():
    for ensemble in ([80.0] * 3, [99.0] * 3):
        results = serving_results([100.0] * 3, ensemble)
        measured = ensemble_row(results)["measured"]  # e.g. "0.810x [0.810, 0.810] n=3"
        assert any(measured in line for line in report.findings(results))
    assert report.findings(serving_results([100.0] * 3, [80.0] * 3)) != \
        report.findings(serving_results([100.0] * 3, [99.0] * 3))


def test_cores_needed_are_cpu_per_token_times_the_plan_throughput():
    rounds = [{"server_cpu_s_per_1k_tokens": 2.0, "gateway_cpu_s_per_1k_tokens": 0.5},
              {"server_cpu_s_per_1k_tokens": 2.0, "gateway_cpu_s_per_1k_tokens": 0.5}]
    scale = {"plan": {"tokens_per_s_replica": 4000.0, "workload": "128/128", "gpu": "H100-80GB"},
             "paced": {"paths": {"gateway_predict": {"1": {"rounds": [{}]}, "256": {"rounds": rounds}}}}}
    estimate = cores_needed(scale, "gateway_predict")
    assert estimate.median == pytest.approx(10.0) and estimate.n == 2  # 2.5 ms per token x 4000 tok/s
    assert cores_needed({"paced": scale["paced"]}, "gateway_predict") is None  # no plan: no figure


def test_the_guided_section_states_its_figures_and_marks_a_dirty_run():
    guided = {"guide": "[a-z ]{100000}", "tokens_per_round": 64, "rounds": 5, "vocab": 32000,
              "step_ms_plain_median": 5.48, "step_ms_guided_median": 11.33, "guided_over_plain": 1.99,
              "guided_over_plain_range": [1.8, 2.2], "mask_alone_ms_median": 5.72, "compile_regex_ms": 28.0,
              "compile_schema_ms": 8.5}
    for dirty in (False, True):
        machine = {"git_commit": "0123456789abcdef", "git_dirty": dirty, "git_dirty_paths": ["x.py"] if dirty else []}
        results = {"guided": guided, "runs": {"guided": {"date_utc": "2026-12-07T00:00:00+00:00",
                                                         "machine": machine, "duration_s": 1}}}
        md = report.markdown(results, Path("/nonexistent"), Path("."))
        section = md[md.index("## Guided decoding"):md.index("## Findings")]
        row = next(line for line in section.splitlines() if line.startswith("| 5.48 ms"))
        assert "11.33 ms" in row and "1.99x [1.80x, 2.20x]" in row and "5.72 ms" in row
        assert (report.DIRTY in row) == dirty
