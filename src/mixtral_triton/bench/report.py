"""bench/results/latest.json -> BENCHMARKS.md (and, through plots.py, bench/plots/*.png).

Every figure in the report is computed here from the results file, so the report can be
regenerated without measuring again (`scripts/bench/run.py --report-only`) and says nothing
the run did not measure. Each section names the run that measured it (date, commit, and
whether the tree was dirty; a dirty section's every table row and target says so). Ratios
are only taken between figures of the same section, measured in the same run.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from mixtral_triton.bench.anchor import ANCHOR_REPOSITORY
from mixtral_triton.bench.plots import SHORT, plots
from mixtral_triton.bench.request_clients import PATH_TITLES, PATHS
from mixtral_triton.bench.statistics import ITL_WINDOW
from mixtral_triton.bench.targets import (GATEWAY_CPU_S_PER_1K_TOKENS, GATEWAY_TARGET_CELL, TARGET_CONCURRENCIES,
                                          cell as _cell, gateway_cell)
from mixtral_triton.bench.targets import cores_needed, rounds_of, show, show_change, targets
from mixtral_triton.bench.uncertainty import (CONFIDENCE, Estimate, INCONCLUSIVE, MET, MISSED, median_interval,
                                              paired_ratio, unpaired_ratio)

GB = 10**9
DIRTY = " (DIRTY tree)"


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def _f(value, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def _x(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}x"


def _verdict(verdict: str) -> str:
    return {MET: "**met**", MISSED: "**MISSED**", INCONCLUSIVE: "*inconclusive*"}.get(verdict, verdict)


def _run(results: dict, section: str) -> dict:
    return (results.get("runs") or {}).get(section) or {}


def dirty(results: dict, section: str) -> bool:
    return bool((_run(results, section).get("machine") or {}).get("git_dirty"))


def _mark(results: dict, section: str) -> str:
    """What every figure of a section measured on a dirty tree carries."""
    return DIRTY if dirty(results, section) else ""


def _run_line(info: dict) -> str:
    if not info:
        return "not run"
    m = info.get("machine") or {}
    paths = m.get("git_dirty_paths") or []
    return (f"{info.get('date_utc')}, commit `{(m.get('git_commit') or '?')[:12]}`"
            + (f", **DIRTY tree** ({len(paths)} path(s) differ: {', '.join(paths[:4])}"
               f"{', ...' if len(paths) > 4 else ''})" if m.get("git_dirty") else ", clean tree")
            + f", {'--quick' if info.get('quick') else 'full'}, {info.get('duration_s', 0):.0f} s, "
              f"load average {m.get('load_average_at_start')} -> {info.get('load_average_at_end')}")


def _in_repository(command: str) -> str:
    """A command with its files named by their paths in the repository (bench/.work/...,
    scripts/...), not by the folders of the machine that ran it."""
    return re.sub(r"(?<=\s)/\S*?/(?=(bench/\.work|scripts)/)", "", command)


def _estimate_cell(estimate: dict | None, digits: int = 1) -> str:
    if not estimate:
        return "–"
    return (f"{estimate['median']:,.{digits}f} [{estimate['low']:,.{digits}f}, {estimate['high']:,.{digits}f}]")


# ---------------------------------------------------------------------------- sections

def _header(results: dict, rel) -> list[str]:
    m = results.get("machine") or {}
    runs = results.get("runs") or {}
    lines = ["# Benchmarks", "",
             "Regenerate everything below (results, tables, plots) with one command, on a clean tree "
             "(a dirty one is refused unless `--allow-dirty`, and then every figure it measured is marked):", "",
             "```bash", ".venv/bin/python scripts/bench/run.py            # every section",
             ".venv/bin/python scripts/bench/run.py --quick    # fewer cells and rounds",
             ".venv/bin/python scripts/bench/run.py --only serving|converter|perf_analyzer|scale|gateway",
             ".venv/bin/python scripts/bench/run.py --only scale --anchor PATH   # PATH: tensorrtllm_backend",
             "```", "",
             "Raw results: `bench/results/latest.json`. Every figure below is computed from them by "
             "`mixtral_triton.bench.report`.", "",
             f"**How to read it.** Each cell is measured in n rounds; a figure is the median of its rounds with a "
             f"{CONFIDENCE:.0%} bootstrap interval of that median in brackets (`median [low, high] n=k`). A ratio "
             "between two paths is taken round by round (the paths interleaved within a round, so this machine's "
             "load drifts fall on both). A target is **met** only when its whole interval clears it, **MISSED** "
             "when the whole interval lies on the wrong side, *inconclusive* otherwise. "
             + (f"This machine ({m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB) is shared: "
                if m.get("cores") and m.get("memory_bytes") else "")
             + "read ratios, not absolutes.", "",
             "| section | measured |", "|---|---|"]
    for name in ("serving", "perf_analyzer", "converter", "scale", "gateway"):
        lines.append(f"| {name} | {_run_line(runs.get(name) or {})} |")
    pk = m.get("packages") or {}
    if m:
        lines += ["", f"Machine: {m.get('cpu_model')}, {m.get('cores')} cores, Python {m.get('python')}, "
                  + ", ".join(f"{k} {v}" for k, v in pk.items() if v) + "."]
    lines.append("")
    return lines


def _targets(results: dict) -> list[str]:
    lines = ["## Targets", "", "| target | measured: median [95% interval] n | verdict | note |", "|---|---|---|---|"]
    for row in targets(results):
        lines.append(f"| {row['target']} | {row['measured']}{_mark(results, row['section'])} | "
                     f"{_verdict(row['verdict'])} | {row.get('note', '')} |")
    return lines + ["", "What the figures say about each target: [Findings](#findings).", ""]


def _serving(results: dict, plot_dir: Path, rel) -> list[str]:
    serving = results.get("serving")
    if not serving:
        return []
    setup = serving["setup"]
    mark = _mark(results, "serving")
    paths = serving.get("paths") or {}
    per_round = setup.get("requests_per_round") or {}
    lines = ["## Serving on CPU" + mark, "",
             f"- Model: {setup['model']}; engine max batch {setup['engine_max_batch_size']}; "
             f"decoding {setup['decoding']}.",
             f"- Output length: {setup['output_length']}. Exact length held: "
             + ", ".join(f"{SHORT[p]} {sum((c.get('exact_length') or 0) for s in v.values() for c in s.values())}"
                         f"/{sum(c['requests'] - c['failed'] for s in v.values() for c in s.values())}"
                         for p, v in paths.items() if p != "gateway_predict")
             + " requests; (d) counts text chunks, not tokens (prescreen: "
             + ", ".join(f"{k}: {v['kept']}/{v['prompts']} prompts reach max_tokens greedily"
                         for k, v in serving.get("prescreen", {}).items()) + ").",
             f"- Load: {setup['load']}. Each cell in {setup.get('rounds')} rounds of "
             + ", ".join(f"{n} (c={c})" for c, n in per_round.items())
             + " requests, the paths interleaved A B C D, D C B A, ... (the load column: 1-minute load average "
               "after each round, our own processes included).",
             "- Paths: " + "; ".join(PATH_TITLES[p] for p in PATHS) + ". One Triton server for all of them (and "
             "perf_analyzer); the gateway runs as its own process on the same cores.",
             "- TTFT: send to the first token; ITL: gaps between tokens (a response with k tokens after a gap g "
             "counts k gaps of g/k), percentiles over all gaps of the cell.",
             "- CPU columns: CPU seconds per 1,000 output tokens of Triton (server + model stubs), the gateway, "
             "and this load generator.", ""]
    for path, why in (serving.get("missing") or {}).items():
        lines.append(f"> **{SHORT.get(path, path)} MISSING**: {why}")
    crashes = serving.get("server_crashes") or []
    if crashes:
        lines.append(f"> **tritonserver died or hung {len(crashes)} time(s) during this run** (the round was rerun "
                     "on a restarted server): "
                     + "; ".join(f"{c.get('kind', 'exit')} during {c['during']}"
                                 + (f" (defunct: {', '.join(c['defunct_processes'])})" if c.get("defunct_processes")
                                    else "") for c in crashes) + ".")
    lines.append("")
    for shape in setup["shapes"]:
        lines += [f"### {shape} (input/output tokens){mark}", "",
                  "| path | c | n | tok/s: median [95%] | TTFT p50 ms: median [95%] | TTFT p90 / p99 ms | "
                  "ITL p50 / p90 / p99 ms | failed | CPU s/1k tok: Triton / gateway / client | load |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in setup["concurrencies"]:
            for path in PATHS:
                cell = _cell(results, path, shape, c)
                if not cell:
                    continue
                k = (cell["output_tokens"] or 1) / 1000
                t, i = cell["ttft_ms"], cell["itl_ms"]
                lines.append(
                    f"| {SHORT[path]}{mark} | {c} | {len(cell.get('rounds') or [])} | "
                    f"{_estimate_cell(cell.get('output_tokens_per_s_estimate'))} | "
                    f"{_estimate_cell(cell.get('ttft_p50_ms_estimate'))} | {_f(t['p90'])} / {_f(t['p99'])} | "
                    f"{_f(i['p50'], 2)} / {_f(i['p90'], 2)} / {_f(i['p99'], 2)} | {cell['failed']}/{cell['requests']}"
                    f"{' (rerun after crash)' if cell.get('rerun_after_crash') else ''} | "
                    f"{_f((cell['server_cpu_s'] or 0) / k, 2)} / "
                    f"{_f(cell['gateway_cpu_s'] / k, 2) if cell.get('gateway_cpu_s') is not None and path == 'gateway_predict' else '–'} / "
                    f"{_f(cell['client_cpu_s'] / k, 2)} | {', '.join(f'{x:.1f}' for x in cell.get('load_1m', []))} |")
        lines += ["", "Ratios, paired by round (median [95% interval] n): output tok/s and TTFT p50.", "",
                  "| c | (b)/(a) tok/s | (c)/(b) tok/s | (d)/(b) tok/s | (b)/(a) TTFT | (d)/(b) TTFT | "
                  "tok/s vs c=1: (a) / (b) |", "|---|---|---|---|---|---|---|"]
        for c in setup["concurrencies"]:
            def paired(p: str, q: str, key: str):
                return show(paired_ratio(rounds_of(_cell(results, p, shape, c), key),
                                         rounds_of(_cell(results, q, shape, c), key)), 2)

            def scale(p: str):
                if c == 1:
                    return "–"
                return show(unpaired_ratio(rounds_of(_cell(results, p, shape, c), "output_tokens_per_s"),
                                           rounds_of(_cell(results, p, shape, 1), "output_tokens_per_s")), 2)

            lines.append(f"| {c}{mark} | {paired('ensemble_grpc', 'engine_grpc', 'output_tokens_per_s')} | "
                         f"{paired('ensemble_http', 'ensemble_grpc', 'output_tokens_per_s')} | "
                         f"{paired('gateway_predict', 'ensemble_grpc', 'output_tokens_per_s')} | "
                         f"{paired('ensemble_grpc', 'engine_grpc', 'ttft_p50_ms')} | "
                         f"{paired('gateway_predict', 'ensemble_grpc', 'ttft_p50_ms')} | "
                         f"{scale('engine_grpc')} / {scale('ensemble_grpc')} |")
        lines.append("")
        position = [(p, _cell(results, p, shape, 1)) for p in PATHS]
        position = [(p, c) for p, c in position if c and c.get("itl_window_256_ms")]
        if position:
            lines += [f"ITL by position at c=1 (median over requests of the mean gap over the {ITL_WINDOW} tokens "
                      "ending at that token; exact single-token gaps in brackets; the change is per request, median [95%]):",
                      "", "| path | token 16 ms | token 256 ms | 256 vs 16 |", "|---|---|---|---|"]
            for p, c in position:
                lines.append(f"| {SHORT[p]}{mark} | {_f(c['itl_window_16_ms'], 2)} ({_f(c['itl_token_16_ms'], 2)}) | "
                             f"{_f(c['itl_window_256_ms'], 2)} ({_f(c['itl_token_256_ms'], 2)}) | "
                             f"{show_change(median_interval(c.get('itl_256_over_16_per_request') or []))} |")
            lines.append("")
    for shape, batches in (serving.get("in_process_engine") or {}).items():
        first, last = list(batches)[0], list(batches)[-1]
        ratio = unpaired_ratio(batches[last].get("output_tokens_per_s_rounds") or [],
                               batches[first].get("output_tokens_per_s_rounds") or [])
        lines += [f"In-process reference engine, no Triton ({shape}, one torch thread, before the server "
                  f"started){mark}: "
                  + "; ".join(f"batch {b}: {_estimate_cell(v.get('output_tokens_per_s_estimate'))} tok/s "
                              f"({_f(v['step_ms'], 1)} ms/step)" for b, v in batches.items())
                  + (f" -> batch {last} / batch {first} = {show(ratio, 2)}" if len(batches) > 1 else "") + ".", ""]
    for name, title in (("serving_throughput.png", "throughput"), ("serving_ttft.png", "TTFT"),
                        ("serving_itl.png", "ITL"), ("itl_by_position.png", "ITL by position")):
        if (plot_dir / name).exists():
            lines.append(f"![{title}]({rel(plot_dir / name)})")
    return lines + [""]


def _perf_analyzer(results: dict) -> list[str]:
    pa = results.get("perf_analyzer")
    if not pa:
        return []
    mark = _mark(results, "perf_analyzer")
    version = ((_run(results, "perf_analyzer").get("machine") or {}).get("packages") or {}).get("tritonclient")
    lines = ["## perf_analyzer beside ours" + mark, "",
             f"perf_analyzer of `tritonclient[all]` {version} against the same server, `--request-count` requests "
             "per concurrency (as many as our cell, all rounds together) and `--profile-export-file`; TTFT/ITL/tok/s "
             "are computed from its export with the same code as ours (statistics.summarize), its own summary "
             "(infer/s, average request latency) beside. perf_analyzer starts all C requests at once and its tok/s "
             "is over the whole run (one measurement, no rounds); ours staggers the workers and reports the median "
             "of the rounds' steady windows, so at c > 1 its TTFT includes the burst.", ""]
    if pa.get("missing"):
        lines += [f"> perf_analyzer MISSING: {pa['missing']}", ""]
    lines += ["| input | c | tool | tok/s | req/s | TTFT p50 ms | ITL p50 ms | e2e p50 ms | PA infer/s | "
              "PA avg latency ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in pa.get("runs", []):
        fe = run.get("from_export") or {}
        summ = run.get("summary") or {}
        label = f"{run['input']}" + (f" ({run['shape']})" if run.get("shape") else " (scripts/perf/ensemble_input.json)")
        if run.get("error"):
            lines.append(f"| {label}{mark} | {run['concurrency']} | perf_analyzer | error: {run['error'][:120]} "
                         "| | | | | | |")
            continue
        lines.append(f"| {label}{mark} | {run['concurrency']} | perf_analyzer | {_f(fe.get('output_tokens_per_s'))} | "
                     f"{_f(fe.get('requests_per_s'), 2)} | {_f((fe.get('ttft_ms') or {}).get('p50'))} | "
                     f"{_f((fe.get('itl_ms') or {}).get('p50'), 2)} | {_f((fe.get('e2e_ms') or {}).get('p50'))} | "
                     f"{_f(summ.get('infer_per_s'), 2)} | {_f(summ.get('avg_latency_ms'))} |")
        ours = _cell(results, "ensemble_grpc", run["shape"], run["concurrency"]) if run.get("shape") else None
        if ours:
            lines.append(f"| {label}{_mark(results, 'serving')} | {run['concurrency']} | ours, (b) ensemble gRPC | "
                         f"{_f(ours['output_tokens_per_s'])} | {_f(ours['requests_per_s'], 2)} | "
                         f"{_f(ours['ttft_ms']['p50'])} | {_f(ours['itl_ms']['p50'], 2)} | "
                         f"{_f(ours['e2e_ms']['p50'])} | | |")
    lines += ["", "Commands as run (the server's port is chosen free each run):", ""]
    lines += [f"    {_in_repository(run['command'])}" for run in pa.get("runs", [])]
    return lines + [""]


def _converter(results: dict, plot_dir: Path, rel) -> list[str]:
    conv = results.get("converter")
    if not conv:
        return []
    mark = _mark(results, "converter")
    ck, lt = conv["checkpoint"], conv["largest_tensor"]
    lines = ["## Converter" + mark, "",
             f"Source: {ck['size']}, {ck['source_bytes'] / GB:.2f} GB in {ck['shards']} shards (written once by "
             "`mixtral_triton.fixture.write_checkpoint` and kept). Converted to "
             f"TP={conv['tp']} {conv['dtype']} by `mixtral_triton.convert.writer.convert` in a child process; the "
             "baseline is `shutil.copyfile` of the same shards, fsynced, taken before and after each conversion "
             "(source in the page cache for all). One conversion per worker count: its ratio's interval is the "
             "plain copies' spread only.", "",
             "| run | seconds | source MB/s | vs copy | CPU s (user + system) | peak RSS (VmHWM) | "
             "sampled peak anon / file | output GB |", "|---|---|---|---|---|---|---|---|",
             f"| plain copy, {len(conv['copy_s'])} runs{mark} | {' / '.join(_f(s) for s in conv['copy_s'])} | "
             f"{_f(conv['copy_bytes_per_s'] / 1e6, 0)} (mean) | 1.00x | | | | {ck['source_bytes'] / GB:.2f} |"]
    for w, c in conv["conversions"].items():
        sp = c["sampled_peak_bytes"]
        lines.append(f"| convert, workers={w}{' (default)' if str(conv['default_workers']) == w else ''}{mark} | "
                     f"{_f(c['wall_s'])} | {_f(c['source_bytes_per_s'] / 1e6, 0)} | {_x(c['throughput_ratio_vs_copy'])} | "
                     f"{_f(c.get('cpu_user_s'))} + {_f(c.get('cpu_system_s'))} | "
                     f"{c['vm_hwm_bytes'] / GB:.2f} GB | {sp['RssAnon'] / GB:.2f} / {sp['RssFile'] / GB:.2f} GB | "
                     f"{c['output_bytes'] / GB:.2f} |")
    first = next(iter(conv["conversions"].values()))
    lines += ["", f"Largest tensor: `{lt['name']}` {lt['shape']} {lt['dtype']}, {lt['bytes'] / 1e6:.0f} MB; "
              f"peak RSS is {conv['peak_rss_over_largest_tensor']:.2f}x that, of which "
              f"{first['rss_after_imports_bytes'] / 1e6:.0f} MB is the interpreter with torch imported. "
              f"Output {first['output_bytes'] / GB:.2f} GB against {ck['source_bytes'] / GB:.2f} GB of source "
              "(every rank holds the whole input embedding).", ""]
    if (plot_dir / "converter.png").exists():
        lines += [f"![converter]({rel(plot_dir / 'converter.png')})", ""]
    return lines


def _scale(results: dict) -> list[str]:
    scale = results.get("scale")
    if not scale:
        return []
    mark = _mark(results, "scale")
    setup, paced, anchor = scale["setup"], scale.get("paced") or {}, scale.get("anchor") or {}
    ps = paced.get("setup") or {}
    pacing = ps.get("pacing") or {}
    plan = scale.get("plan") or {}
    lines = ["## Scale: the pipeline in front of a stand-in engine" + mark, "",
             f"- Engine: `mixtral_triton.standin`, tokens from a fixed table (spaces, accents, emoji), no math; "
             f"{ps.get('model', '')}. Paced: each step lasts the decode roofline's step time of "
             f"{pacing.get('gpu')} at TP={pacing.get('tp')} for the batch x {pacing.get('scale')} (this machine "
             f"cannot stream at a GPU's pace), in-flight batching up to {ps.get('engine_max_batch_size')}; at a mean "
             f"context of {ps.get('paced_context_tokens')} tokens that pace alone gives "
             + ", ".join(f"{_f(v)} tok/s at c={c}" for c, v in (ps.get("paced_tokens_per_s") or {}).items()) + ".",
             f"- Requests: {setup['shape']} (input/output tokens), closed loop as in the serving section, each cell in "
             f"{setup['rounds']} rounds of " + ", ".join(f"{max(setup['min_requests'], setup['requests_per_worker'] * c)} "
                                                         f"(c={c})" for c in setup["concurrencies"])
             + " requests; the three paths interleaved within a round.",
             "- Paths: the stand-in alone over gRPC (what it delivers with nothing in front of it), the ensemble over "
             "gRPC, the gateway's /predict. CPU: seconds per 1,000 streamed tokens of Triton (server and every stub) "
             "and of the gateway; memory: the peak proportional set size (shared pages split among their sharers) of "
             "Triton, its stubs and, on its path, the gateway, sampled during each round.",
             "- Capacity plan: " + (f"{plan['workload']} on {plan['gpu']}: batch {plan['batch']}, "
                                   f"{_f(plan['tokens_per_s_replica'], 0)} decode tok/s per replica "
                                   f"(`{plan['source']}`)" if plan.get("tokens_per_s_replica")
                                   else "not available") + ".", ""]
    for why in (scale.get("missing") or {}).values():
        lines.append(f"> **gateway MISSING**: {why}")
    if paced.get("error"):
        lines += [f"> **The paced cells were not measured**: {paced['error']}", ""]
    alone = paced.get("standin_alone") or {}
    rows = [("stand-in alone", alone)] + [(SHORT.get(p, p), cells) for p, cells in (paced.get("paths") or {}).items()]
    lines += ["| path | c | n | tok/s: median [95%] | of the stand-in alone (paired) | TTFT p50 / p90 / p99 ms | "
              "ITL p50 / p90 / p99 ms | failed | CPU s/1k tok: Triton / gateway | peak memory MiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in setup["concurrencies"]:
        for title, cells in rows:
            cell = cells.get(str(c))
            if not cell:
                continue
            t, i = cell["ttft_ms"], cell["itl_ms"]
            k = (cell["output_tokens"] or 1) / 1000
            peaks = [r["peak_memory_bytes"] for r in cell.get("rounds") or [] if r.get("peak_memory_bytes")]
            fraction = ("–" if cells is alone else
                        show(paired_ratio(rounds_of(cell, "output_tokens_per_s"),
                                          rounds_of(alone.get(str(c)), "output_tokens_per_s")), 2))
            lines.append(f"| {title}{mark} | {c} | {len(cell.get('rounds') or [])} | "
                         f"{_estimate_cell(cell.get('output_tokens_per_s_estimate'))} | {fraction} | "
                         f"{_f(t['p50'])} / {_f(t['p90'])} / {_f(t['p99'])} | "
                         f"{_f(i['p50'], 2)} / {_f(i['p90'], 2)} / {_f(i['p99'], 2)} | "
                         f"{cell['failed']}/{cell['requests']} | {_f((cell['server_cpu_s'] or 0) / k, 2)} / "
                         f"{_f(cell['gateway_cpu_s'] / k, 2) if cell.get('gateway_cpu_s') is not None else '–'} | "
                         f"{_f(max(peaks) / 2**20, 0) if peaks else '–'} |")
    lines.append("")
    cores = [(p, cores_needed(scale, p)) for p in (paced.get("paths") or {})]
    if any(e for _, e in cores):
        lines += ["CPU cores a replica's pipeline needs at the capacity plan's throughput (CPU s per token at the "
                  "highest concurrency x plan tok/s, round by round): "
                  + "; ".join(f"{SHORT.get(p, p)}: {show(e, 1, '')}" for p, e in cores if e) + f"{mark}.", ""]
    lines += ["### The no-op stand-in behind tensorrtllm_backend's ensemble and ours" + mark, ""]
    if anchor.get("skipped"):
        return lines + [f"Not measured: {anchor['skipped']}.", ""]
    a = anchor["setup"]
    source = a["anchor"]
    lines += [f"Anchor: [{ANCHOR_REPOSITORY}](https://github.com/{ANCHOR_REPOSITORY}) at tag {source['tag']} "
              f"(commit `{source.get('commit') or '?'}`), "
              "all_models/inflight_batcher_llm preprocessing/postprocessing/ensemble, filled with "
              + ", ".join(f"{k}={v}" for k, v in source.get("filled", {}).items() if k != "tokenizer_dir")
              + f"; engine: {a['engine']}; request: {a['request']}; {a['shape']} tokens, {a['rounds']} rounds of "
              + ", ".join(f"{n} (c={c})" for c, n in a["requests_per_round"].items())
              + " requests, the two servers taking turns within a round. Ours is the repository as filled at "
              "the measured commit (its `postprocessing` the C++ detokenizer, `mixtral_triton.cpp_detokenizer`, "
              "where the commit serves it).", "",
              "| pipeline | c | n | tok/s: median [95%] | TTFT p50 ms: median [95%] | ITL p50 / p99 ms | "
              "Triton CPU s/1k tok: median [95%] | failed | byte-exact |", "|---|---|---|---|---|---|---|---|---|"]
    for c in a["concurrencies"]:
        for side, title in (("ours", "ours"), ("anchor", "tensorrtllm_backend")):
            cell = (anchor.get(side) or {}).get(str(c))
            if not cell:
                continue
            lines.append(f"| {title}{mark} | {c} | {len(cell.get('rounds') or [])} | "
                         f"{_estimate_cell(cell.get('output_tokens_per_s_estimate'))} | "
                         f"{_estimate_cell(cell.get('ttft_p50_ms_estimate'))} | "
                         f"{_f(cell['itl_ms']['p50'], 2)} / {_f(cell['itl_ms']['p99'], 2)} | "
                         f"{_estimate_cell(cell.get('server_cpu_s_per_1k_tokens_estimate'), 2)} | "
                         f"{cell['failed']}/{cell['requests']} | {cell['byte_exact_requests']}/{cell['requests']} |")
    return lines + [""]


def _gateway(results: dict) -> list[str]:
    from mixtral_triton.bench.gateway_cost import cores_for_plan, overlay_capacity

    gateway = results.get("gateway")
    if not gateway:
        return []
    mark = _mark(results, "gateway")
    setup, plan, overlays = gateway["setup"], gateway["plan"], overlay_capacity()
    lines = ["## Gateway: the HTTP relay's cost per token", "",
             f"- Triton with the paced stand-in engine ({setup['gpu']} at TP={setup['tp']}, pace x "
             f"{setup['pace_scale']}, engine batch up to {setup['engine_max_batch_size']}); {setup['model']}.",
             f"- `client/gateway.py --workers W` in front of it, started as users start it. Load: closed loop, C "
             f"workers, `{setup['request']}`; {setup['rounds']} rounds per cell of max({setup['min_requests']}, "
             f"{setup['requests_per_worker']} x C) requests.",
             "- Gateway CPU: utime + stime of the gateway's processes (supervisor and workers) over the round, per "
             "1,000 relayed tokens (requests x output tokens; each streams exactly its length). One core relays "
             "1,000 / that tok/s; a replica's plan needs plan tok/s x that / 1,000 cores, one worker process each. "
             "tok/s is over the steady window (the last client worker's first send to the first one's last token): "
             "with one request per client worker it is short at the highest c, so read CPU per token there.",
             "", "| workers | shape | c | requests | tok/s: median [95%] | gateway CPU-s / 1k tok: median [95%] | "
             "tok/s per gateway core | cores (processes) for one replica's plan | failed | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for workers, by_shape in gateway["cells"].items():
        for shape in setup["shapes"]:
            for c, cell in (by_shape.get(shape) or {}).items():
                cost = cell.get("gateway_cpu_s_per_1k_tokens_estimate")
                cores = cores_for_plan(cost["median"], plan["tokens_per_s_replica"]) if cost else None
                lines.append(f"| {workers} | {shape} | {c} | {cell['requests']} | "
                             f"{_estimate_cell(cell.get('output_tokens_per_s_estimate'))}{mark} | "
                             f"{_estimate_cell(cost, 3)}{mark} | "
                             f"{_f(1000 / cost['median'], 0) if cost else '–'}{mark} | "
                             f"{f'{cores[0]:.1f} ({cores[1]})' if cores else '–'}{mark} | {cell['failed']} | "
                             f"{', '.join(str(x) for x in cell.get('load_1m') or [])} |")
    lines += ["", f"A replica's plan: {_f(plan['tokens_per_s_replica'], 0)} tok/s ({plan['gpu']}, {plan['workload']}, "
              f"batch {plan['batch']}; `{plan['source']}`).", ""]
    shape, c = setup.get("request_path_shape"), str(setup.get("request_path_concurrency"))
    for workers, by_shape in gateway["cells"].items():
        cell = (by_shape.get(shape) or {}).get(c)
        per_request = (cell or {}).get("gateway_cpu_s_per_1k_tokens_estimate")  # one token per request
        if per_request:
            lines.append(f"- The request path alone, {workers} worker(s) ({shape}: one token each, c={c}, "
                         f"{cell['requests']} requests): {_estimate_cell(per_request, 2)}{mark} ms of gateway CPU per "
                         f"request (parse and validate, open the gRPC stream, the first response, the end); over a "
                         f"128-token answer {per_request['median'] / 128:.4f} s per 1,000 tokens.")
    lines.append("")
    lines += [f"What the Kubernetes overlays deploy (`mixtral_triton.gateway.sizing`, rendered from the code "
              f"when this report is written, at "
              f"{overlays['relay_cpu_s_per_1k_tokens']} CPU-s per 1,000 tokens, for the "
              f"{overlays['triton_max_replicas']} Triton replicas the HPA may run):", "",
              "| GPU (x4) | plan tok/s per replica | needed (x1.2, every replica) | gateway pods x workers | "
              "capacity tok/s | over the plan |", "|---|---|---|---|---|---|"]
    for gpu, o in overlays["gpus"].items():
        lines.append(f"| {gpu} | {_f(o['tokens_per_s_replica'], 0)} | "
                     f"{_f(1.2 * o['tokens_per_s_replica'] * overlays['triton_max_replicas'], 0)} | "
                     f"{o['pods']} x {o['workers_per_pod']} | {_f(o['tokens_per_s_capacity'], 0)} | "
                     f"{o['headroom']:.2f}x |")
    lines.append("")
    return lines


def _guided(results: dict) -> list[str]:
    guided = results.get("guided")
    if not guided:
        return []
    mark = _mark(results, "guided")
    low, high = guided["guided_over_plain_range"]
    return ["## Guided decoding: the mask's cost per token on the CPU reference engine", "",
            f"- `mixtral_triton.bench.guided_cost`: the tiny model (vocabulary {guided['vocab']}), one torch thread, "
            f"{guided['rounds']} rounds of {guided['tokens_per_round']} greedy decode steps with and without an "
            f"xgrammar mask, alternated round by round; the guide the regex `{guided['guide']}`, which stays open "
            "and allows many tokens at every step (near the worst case). The mask alone: fill the bitmask of "
            "allowed tokens, apply it to the logits, accept the token.", "",
            "| decode step, plain | decode step, guided | guided / plain: median [range] | the mask alone | "
            "compile: that regex | compile: a small JSON schema |", "|---|---|---|---|---|---|",
            f"| {_f(guided['step_ms_plain_median'], 2, ' ms')}{mark} | {_f(guided['step_ms_guided_median'], 2, ' ms')}"
            f"{mark} | {_x(guided['guided_over_plain'])} [{_x(low)}, {_x(high)}]{mark} | "
            f"{_f(guided['mask_alone_ms_median'], 2, ' ms')}{mark} | {_f(guided['compile_regex_ms'], 1, ' ms')}{mark} | "
            f"{_f(guided['compile_schema_ms'], 1, ' ms')}{mark} |", "",
            "The mask's work depends on the vocabulary and the grammar, not on the model: on this tiny model it "
            "is about as long as a decode step; on Mixtral 8x22B (TensorRT-LLM masks on the GPU, overlapped with "
            "the step) its share would be far smaller. Not measured on a GPU here.", ""]


def _gpu(results: dict, plot_dir: Path, rel) -> list[str]:
    gpu = results.get("gpu")
    if not gpu:
        return []
    rf = gpu["roofline"]
    rows = rf["rows"]
    first_row = rows[0] if rows else {}
    saturated = next((r["batch"] for r in rows if r["gpu"] == first_row.get("gpu")
                      and r["experts_touched_per_layer"] >= max(x["experts_touched_per_layer"] for x in rows) - 0.05),
                     None)
    lines = ["## GPU (on paper: NOT MEASURED here)", "",
             "> Nothing in this section ran on a GPU. It is arithmetic on the model config "
             "(`mixtral_triton.bench.gpu`, `mixtral_triton.capacity`) and datasheet bandwidths.", "",
             f"Mixtral 8x22B: {rf['parameters_total'] / 1e9:.1f}B parameters, "
             f"{rf['parameters_active_per_token'] / 1e9:.1f}B active per token (attention, the experts a token "
             f"routes to, router, norms, output head). fp16 at TP={rf['tp']}: "
             f"{rf['weights_per_gpu_whole_shard_gb']:.1f} GB of weights per GPU. A decode step reads each GPU's share "
             "of the weights it touches plus the KV cache of the batch (context "
             f"{rf['context_assumed']} tokens assumed); bound = bytes / HBM bandwidth (compute bound shown where it "
             "would bind; all-reduces, launch gaps and sampling not included, so real steps are slower). A batch "
             "touches E(1-(1-k/E)^B) experts per layer"
             + (f": {first_row['experts_touched_per_layer']:.0f} at batch {first_row['batch']}, all by batch "
                f"{saturated}" if first_row and saturated else "") + ".", "",
             "| GPU | batch | experts/layer | weights GB/GPU | KV GB/GPU | step ms (memory) | step ms (compute) | "
             "tok/s per sequence <= | tok/s total <= | batch x context fits the KV cache |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gpu']} | {r['batch']} | {r['experts_touched_per_layer']:.2f} | "
                     f"{r['weight_gb_per_gpu']:.1f} | {r['kv_gb_per_gpu']:.2f} | {r['step_ms_memory_bound']:.2f} | "
                     f"{r['step_ms_compute_bound']:.2f} | {r['tokens_per_s_per_sequence_max']:.0f} | "
                     f"{r['tokens_per_s_total_max']:,.0f} | "
                     f"{'yes' if r['fits_kv_cache'] else 'NO (%s tokens)' % format(r['kv_cache_tokens'], ',')} |")
    lines += ["", "Bandwidths: " + "; ".join(g["source"] for g in rf["gpus"]) + ".", "",
              "KV cache beside the weights (`mixtral_triton.capacity.plan_capacity`, the plan the build uses):", "",
              "| GPU | ISL/OSL | weights GB/GPU | KV cache GB/GPU | KV KiB/token/GPU | KV tokens | "
              "full-length requests at once |", "|---|---|---|---|---|---|---|"]
    for k in gpu["kv_capacity"]:
        if "error" in k:
            lines.append(f"| {k['gpu']} | {k['isl']}/{k['osl']} | {k['error']} | | | | |")
        else:
            lines.append(f"| {k['gpu']} | {k['isl']}/{k['osl']} | {k['weights_gb_per_gpu']:.1f} | "
                         f"{k['kv_cache_gb_per_gpu']:.1f} | {k['kv_kib_per_token_per_gpu']:.0f} | "
                         f"{k['kv_cache_tokens']:,} | {k['max_batch_size_full_length']} |")
    from mixtral_triton.capacity import SEED_WORKLOAD
    from mixtral_triton.roofline import workload_plan, workload_plan_markdown

    lines += ["", "The capacity plan by workload (`build/plan_capacity.py --table`, rendered from the library "
              f"when this report is written): one engine per GPU type, max_batch_size sized for {SEED_WORKLOAD}; "
              "the requests of each shape its KV cache admits, the batch it runs, and the roofline's decode "
              "tok/s (docs/runbook.md):", "", workload_plan_markdown(workload_plan())]
    lines += ["", "Published reference figures: " + gpu["published_note"] + ". Checked:", ""]
    for p in gpu["published"]:
        lines.append(f"- [{p['what']}]({p['url']}): {p['finding']}")
    cmds = gpu["commands"]
    lines += ["", "Commands for the GPU host (ISL/OSL grid, concurrency sweep; server on gRPC 8001). "
              "GenAI-Perf from the `nvcr.io/nvidia/tritonserver:<yy.mm>-py3-sdk` image of the server's release "
              "(its flags change between releases: check `genai-perf profile --help`; NVIDIA now points new work "
              "to AIPerf); `--output-tokens-mean-deterministic` sends min_tokens = max_tokens as we do here:", "",
              "```bash"] + cmds["genai_perf"] + ["", "# or perf_analyzer, one input file per grid point, "
              "written by mixtral_triton.bench.perf_analyzer.write_input:"] + cmds["perf_analyzer"] + ["```", ""]
    if (plot_dir / "gpu_roofline.png").exists():
        lines += [f"![gpu roofline]({rel(plot_dir / 'gpu_roofline.png')})", ""]
    return lines


def _gpu_measured(results: dict) -> list[str]:
    """scripts/gpu_acceptance.py's results file (bench/results/gpu-acceptance.json), when one was
    written on a GPU host: measured against the roofline plan, with its verdicts."""
    run = results.get("gpu_acceptance")
    if not run:
        return ["## GPU, measured", "", "Not measured yet: no GPU has run `scripts/gpu_acceptance.py` for this "
                "project (its results file, bench/results/gpu-acceptance.json, renders here).", ""]
    machine = run.get("machine") or {}
    plan = run.get("plan_measured") or run["plan_estimated"]
    lines = ["## GPU, measured", "",
             f"`scripts/gpu_acceptance.py` on {run['gpus']} x {run['gpu']}, {run['date_utc']}, commit "
             f"`{(machine.get('git') or '?')[:12]}`; GPUs: {machine.get('nvidia-smi', '?')}; "
             f"{machine.get('ompi_info', 'Open MPI ?').splitlines()[0] if machine.get('ompi_info') else 'Open MPI ?'}. "
             f"Smoke tests: {run.get('smoke_tests', 'not run')}. Plan: max_batch_size {plan['max_batch_size']}, "
             f"kv_cache_free_gpu_mem_fraction {plan['kv_cache_free_gpu_mem_fraction']}, "
             f"cancellation_check_period_ms {plan['cancellation_check_period_ms']} (weights: "
             f"{plan['weights_source']}, activations: {plan['activations_source']}). Each cell is one genai-perf run "
             "(n requests); throughput is **met** at half the roofline or more, latency at twice it or less.", "",
             "| mode | workload | concurrency | n | decode tok/s replica (roofline) | tok/s per user (roofline) | "
             "TTFT p50 / p99 ms (roofline) | ITL p50 / p99 ms (roofline) | verdicts |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, measured in run["modes"].items():
        for cell in measured["cells"]:
            m, b, v = cell["measured"], cell["roofline"], cell["verdicts"]
            lines.append(f"| {mode} | {cell['workload']} | {cell['concurrency']} | {m['requests']} | "
                         f"{m['output_tokens_per_s']:,.0f} ({b['tokens_per_s_replica']:,.0f}) | "
                         f"{1e3 / m['itl_ms_p50']:.0f} ({b['tokens_per_s_per_user']:.0f}) | "
                         f"{m['ttft_ms_p50']:.0f} / {m['ttft_ms_p99']:.0f} ({b['ttft_ms']:.0f}) | "
                         f"{m['itl_ms_p50']:.1f} / {m['itl_ms_p99']:.1f} ({b['itl_ms']:.1f}) | "
                         + ", ".join(f"{k} {_verdict(x)}" for k, x in v.items()) + " |")
    lines += ["", "GPU memory with the engine loaded and served (nvidia-smi), against the plan:", "",
              "| mode | GPU | used GiB (planned) | headroom GiB (planned) | server process GiB (planned) | verdict |",
              "|---|---|---|---|---|---|"]
    for mode, measured in run["modes"].items():
        for r in measured["memory"]:
            lines.append(f"| {mode} | {r['gpu_index']} | {r['used_bytes'] / 2**30:.2f} ({r['planned_used_bytes'] / 2**30:.2f}) | "
                         f"{r['headroom_bytes'] / 2**30:.2f} ({r['planned_headroom_bytes'] / 2**30:.2f}) | "
                         f"{r['server_process_bytes'] / 2**30:.2f} ({r['planned_server_bytes'] / 2**30:.2f}) | "
                         f"{_verdict(r['verdict'])} |")
    lines += [""] + [f"- {mode}: the seed's `/predict` client through the gateway: {_verdict(m['predict']['status'])}, "
                     f"first text after {_f(m['predict']['first_chunk_ms'], 0)} ms, {m['predict']['characters']} "
                     f"characters; the server exited {m['server_exit_code']} on SIGTERM."
                     for mode, m in run["modes"].items()] + [""]
    return lines


# ---------------------------------------------------------------------------- findings

def findings(results: dict) -> list[str]:
    """What the figures of this results file say about each target. Every figure here is
    computed from the results; causes are stated as text where a figure would have to come
    from outside the run."""
    out: list[str] = []

    def add(text: str) -> None:
        out.append(f"{len(out) + 1}. {text}")

    serving = results.get("serving") or {}
    shapes = (serving.get("setup") or {}).get("shapes") or []
    mark = _mark(results, "serving")
    low, high = TARGET_CONCURRENCIES
    if shapes and serving.get("paths"):
        shape = shapes[0]
        ip = (serving.get("in_process_engine") or {}).get(shape) or {}

        def scaling(path: str):
            return unpaired_ratio(rounds_of(_cell(results, path, shape, high), "output_tokens_per_s"),
                                  rounds_of(_cell(results, path, shape, low), "output_tokens_per_s"))

        in_process = unpaired_ratio((ip.get(str(high)) or {}).get("output_tokens_per_s_rounds") or [],
                                    (ip.get(str(low)) or {}).get("output_tokens_per_s_rounds") or [])
        if scaling("ensemble_grpc") and scaling("engine_grpc"):
            add(f"**In-flight batching, c={low} -> c={high} ({shape}){mark}.** tok/s grows "
                f"{show(scaling('engine_grpc'), 2)} for the engine model alone over gRPC, "
                f"{show(scaling('ensemble_grpc'), 2)} through the ensemble, and {show(in_process, 2)} for the "
                "reference engine in-process with no Triton at all. Where the in-process figure is as low as the "
                "served ones, the limit is the CPU reference engine's own step, whose cost grows with the batch "
                "(its output head and the experts a larger batch touches are compute on one core), not Triton, the "
                "ensemble or the gateway; the GPU engine reads the weights once per step for the whole batch "
                "(see the roofline), which is where in-flight batching pays.")
        for c in TARGET_CONCURRENCIES:
            a, b = _cell(results, "engine_grpc", shape, c), _cell(results, "ensemble_grpc", shape, c)
            if not (a and b):
                continue
            r = paired_ratio(rounds_of(b, "output_tokens_per_s"), rounds_of(a, "output_tokens_per_s"))
            cpu = paired_ratio(rounds_of(b, "server_cpu_s_per_1k_tokens"), rounds_of(a, "server_cpu_s_per_1k_tokens"))
            ca = median_interval(rounds_of(a, "server_cpu_s_per_1k_tokens"))
            cb = median_interval(rounds_of(b, "server_cpu_s_per_1k_tokens"))
            add(f"**Ensemble vs engine alone ({shape}, c={c}){mark}: {show(r)}.** Triton's CPU seconds per 1,000 "
                f"tokens: {show(ca, 2, '')} on the engine path, {show(cb, 2, '')} through the ensemble "
                f"({show(cpu, 2)} of it): the tokenizer, the detokenizer's stream from the engine and its text, and "
                "the ensemble's extra hops. Whether that extra CPU costs throughput depends on whether a core is "
                "free beside the engine's stepping thread: see the load column.")
    gaps = []
    for shape in shapes:
        for c in TARGET_CONCURRENCIES:
            g, b = _cell(results, "gateway_predict", shape, c), _cell(results, "ensemble_grpc", shape, c)
            if g and b:
                diff = [x - y for x, y in zip(rounds_of(g, "ttft_p50_ms"), rounds_of(b, "ttft_p50_ms"))
                        if x is not None and y is not None]
                gaps.append(f"{shape} c={c}: {show(median_interval(diff), 1, ' ms')}")
    if gaps:
        add(f"**Gateway TTFT over the ensemble's, p50, per round{mark}**: " + "; ".join(gaps) + ". The gateway is "
            "a second process on the same cores: it parses and validates the JSON, opens a gRPC stream to Triton per "
            "request and relays each chunk through its event loop (its CPU per 1,000 tokens is in the tables). Where "
            "the interval straddles the target the verdict is inconclusive: more rounds would decide it.")
    crashes = serving.get("server_crashes") or []
    hangs = [c for c in crashes if c.get("kind") == "hang"]
    if serving:
        add(f"**Server failures during the run{mark}**: {len(hangs)} hang(s), {len(crashes) - len(hangs)} exit(s)"
            + (": " + "; ".join(f"{c.get('kind')} during {c['during']}" for c in crashes) if crashes else "")
            + ". The benchmark gives each request "
            "a deadline and restarts the server when one passes or the server dies, rerunning that round; the "
            "crashes found while writing this benchmark and their fixes are told in docs/reliability.md.")
    for shape in shapes:
        cell = _cell(results, "ensemble_grpc", shape, 1)
        eng = _cell(results, "engine_grpc", shape, 1)
        if cell and eng and cell.get("itl_window_256_ms") and eng.get("itl_window_256_ms"):
            extra16 = cell["itl_window_16_ms"] - eng["itl_window_16_ms"]
            extra256 = cell["itl_window_256_ms"] - eng["itl_window_256_ms"]
            add(f"**ITL at token 256 vs token 16 ({shape}, c=1){mark}**: ensemble "
                f"{show_change(median_interval(cell.get('itl_256_over_16_per_request') or []))}, engine alone "
                f"{show_change(median_interval(eng.get('itl_256_over_16_per_request') or []))} (per request). The "
                f"ensemble's own share (ensemble minus engine, medians) is {extra16:+.2f} ms at token 16 and "
                f"{extra256:+.2f} ms at token 256; the engine's own change is attention over a longer context.")
    conv = results.get("converter")
    if conv:
        cmark = _mark(results, "converter")
        default = conv["conversions"][str(conv["default_workers"])]
        cpu = (default.get("cpu_user_s") or 0) + (default.get("cpu_system_s") or 0)
        best_w, best = max(conv["conversions"].items(), key=lambda kv: kv[1]["throughput_ratio_vs_copy"])
        add(f"**Converter at {_x(conv['throughput_ratio'], 3)} of a plain copy with the default "
            f"workers={conv['default_workers']}, {_x(best['throughput_ratio_vs_copy'], 3)} with workers={best_w}"
            f"{cmark}** (peak RSS {conv['peak_rss_bytes'] / GB:.2f} GB). The baseline is `shutil.copyfile`, "
            f"`sendfile` inside the kernel: {conv['copy_bytes_per_s'] / 1e6:,.0f} MB/s here (runs of "
            f"{', '.join(_f(x) for x in conv['copy_s'])} s), through the page cache. The converter moves every byte "
            f"through user space (mmap read, bf16->fp16 cast, xxh3_128) and writes it with O_DIRECT, past the page "
            f"cache the copy fills; it writes {default['output_bytes'] / conv['checkpoint']['source_bytes']:.2f}x "
            f"the bytes it reads; it used {cpu:.1f} s of CPU in {default['wall_s']:.1f} s with "
            f"workers={conv['default_workers']}. How sure: the copy's cost is mostly the kernel allocating "
            f"page-cache pages, which on this virtual machine varies severalfold between runs (compare the copy "
            f"runs above, and the copy's MB/s across this report's history), while the conversion bypasses it; "
            f"so the ratio moves with the copy, and the conversion's own seconds and CPU are the steadier figure.")
    for text in scale_findings(results):
        add(text)
    for text in gateway_findings(results):
        add(text)
    return out


def gateway_findings(results: dict) -> list[str]:
    gateway = results.get("gateway")
    if not gateway:
        return []
    mark = _mark(results, "gateway")
    shape, c = GATEWAY_TARGET_CELL
    out = []
    for workers in gateway["cells"]:
        cost = Estimate.from_dict((gateway_cell(results, int(workers), shape, c) or {})
                                  .get("gateway_cpu_s_per_1k_tokens_estimate"))
        if cost is None:
            continue
        out.append(f"**Gateway, {workers} worker(s), {shape} at c={c}{mark}**: {show(cost, 3, ' s')} of CPU per "
                   f"1,000 relayed tokens, {cost.median / GATEWAY_CPU_S_PER_1K_TOKENS:.1f}x the target's "
                   f"{GATEWAY_CPU_S_PER_1K_TOKENS} s; one core relays {1000 / cost.median:,.0f} tok/s, and a replica's "
                   f"plan ({_f(gateway['plan']['tokens_per_s_replica'], 0)} tok/s) needs "
                   f"{cost.median * gateway['plan']['tokens_per_s_replica'] / 1000:.1f} cores of gateway. Per token the "
                   "gateway reads one gRPC message (grpc.aio: a poller thread that wakes the event loop) and writes one "
                   "HTTP chunk (a send system call); what is left in Python is a small share of its time (the profile, "
                   "before and after, is in docs/serving.md). The gateway scales out by worker processes instead: "
                   "the overlays size them from this cost.")
    return out


def scale_findings(results: dict) -> list[str]:
    scale = results.get("scale") or {}
    paced, anchor = scale.get("paced") or {}, scale.get("anchor") or {}
    mark = _mark(results, "scale")
    out = []
    if paced.get("error"):
        instances = (paced.get("setup") or {}).get("model_instances") or {}
        out.append(f"**The paced stand-in's server did not start{mark}**: {paced['error']}. Its model "
                   "repository starts " + ", ".join(f"{n} {m}" for m, n in instances.items())
                   + " instance(s), each Python one a stub process of its own, all at once.")
    alone = paced.get("standin_alone") or {}
    for path, cells in (paced.get("paths") or {}).items():
        top = str(max(int(c) for c in cells))
        delivered = paired_ratio(rounds_of(cells[top], "output_tokens_per_s"),
                                 rounds_of(alone.get(top), "output_tokens_per_s"))
        ideal = (paced.get("setup") or {}).get("paced_tokens_per_s", {}).get(top)
        cores = cores_needed(scale, path)
        cpu = median_interval(rounds_of(cells[top], "server_cpu_s_per_1k_tokens"))
        out.append(f"**{SHORT.get(path, path)} in front of the paced stand-in at c={top}{mark}**: "
                   f"{show(delivered, 2)} of what the stand-in alone delivered "
                   f"({_estimate_cell((alone.get(top) or {}).get('output_tokens_per_s_estimate'))} tok/s; its pace "
                   f"alone would give {_f(ideal)} tok/s). Triton with every stub spent {show(cpu, 2, ' s')} of CPU "
                   "per 1,000 streamed tokens"
                   + (f"; at the capacity plan's {scale['plan']['workload']} throughput on {scale['plan']['gpu']} "
                      f"({_f(scale['plan']['tokens_per_s_replica'], 0)} tok/s per replica) the pipeline needs "
                      f"{show(cores, 1, ' cores')}" if cores else "")
                   + ". The stand-in engine's own stub is inside that figure (see its row alone): on a GPU the "
                   "engine runs in the C++ backend instead.")
    for path, m in (paced.get("memory_per_stream") or {}).items():
        e = m.get("estimate")
        if e:
            out.append(f"**Memory per additional stream, {SHORT.get(path, path)}{mark}**: "
                       f"{e['median'] / 2**20:.2f} MiB [{e['low'] / 2**20:.2f}, {e['high'] / 2**20:.2f}] "
                       f"(peak proportional set size of Triton, its stubs{' and the gateway' if path == 'gateway_predict' else ''}, "
                       f"c={m['from_concurrency']} -> c={m['to_concurrency']}, per round).")
    if anchor.get("skipped"):
        out.append(f"**Beside tensorrtllm_backend's ensemble: not measured** ({anchor['skipped']}).")
    for c, ours in (anchor.get("ours") or {}).items():
        theirs = (anchor.get("anchor") or {}).get(c)
        if not theirs:
            continue
        ratio = lambda key: paired_ratio(rounds_of(ours, key), rounds_of(theirs, key))  # noqa: E731
        out.append(f"**No-op stand-in, ours against the anchor, c={c}{mark}**: streamed tok/s "
                   f"{show(ratio('output_tokens_per_s'), 2)}, TTFT p50 {show(ratio('ttft_p50_ms'), 2)}, Triton CPU "
                   f"per token {show(ratio('server_cpu_s_per_1k_tokens'), 2)}; text byte-exact in "
                   f"{ours['byte_exact_requests']}/{ours['requests']} of ours and {theirs['byte_exact_requests']}/"
                   f"{theirs['requests']} of the anchor's requests"
                   + (f" (the anchor's begins {theirs['text_example']['got'][:60]!r} where the tokens stand for "
                      f"{theirs['text_example']['expected'][:60]!r})" if theirs.get("text_example") else "") + ".")
    return out


def markdown(results: dict, plot_dir: Path, root: Path) -> str:
    # Links relative to the repository, also for --results/--plots outside it.
    rel = lambda p: os.path.relpath(Path(p).resolve(), root)  # noqa: E731
    lines = (_header(results, rel) + _targets(results) + _serving(results, plot_dir, rel)
             + _perf_analyzer(results) + _converter(results, plot_dir, rel) + _scale(results)
             + _gateway(results) + _guided(results) + _gpu_measured(results) + _gpu(results, plot_dir, rel))
    lines += ["## Findings", ""] + findings(results) + [""]
    return "\n".join(lines)


def write_report(results: dict, root: Path, plot_dir: Path, out_file: Path) -> list[Path]:
    written = plots(results, plot_dir)
    out_file.write_text(markdown(results, plot_dir, root) + "\n", encoding="utf-8")
    return [out_file, *written]
