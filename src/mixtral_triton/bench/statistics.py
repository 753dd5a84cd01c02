"""Statistics of a benchmark cell from the client's records: throughput over the steady
window, TTFT and inter-token latency percentiles, CPU per token, and the cell's rounds with
the median and interval of each (mixtral_triton.bench.uncertainty)."""

from __future__ import annotations

import numpy as np

from mixtral_triton.bench.closed_loop import Measurement
from mixtral_triton.bench.request_clients import Record
from mixtral_triton.bench.uncertainty import median_interval
from mixtral_triton.bench.workload import Shape

ITL_WINDOW = 8  # tokens: the ITL at a position is the mean gap over the window ending there


def percentiles(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(values) * scale
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def window_itl(record: Record, token: int, window: int = ITL_WINDOW) -> float | None:
    """Mean gap (s) over the `window` tokens ending at the 1-based `token`."""
    t = record.token_times
    if len(t) < token or token - window < 1:
        return None
    return (t[token - 1] - t[token - 1 - window]) / window


def summarize(records: list[Record], shape: Shape, wall_s: float, client_cpu_s: float,
              server_cpu_s: float | None, gateway_cpu_s: float | None,
              chunk_tokens_unknown: bool = False) -> dict:
    ok = [r for r in records if r.error is None and r.token_times]
    tokens = sum(len(r.token_times) for r in ok) if not chunk_tokens_unknown else shape.output_tokens * len(ok)
    gaps = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    per_request_itl = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1)
                       for r in ok if len(r.token_times) > 1]
    summary = {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:3],
        "exact_length": sum(len(r.token_times) == shape.output_tokens for r in ok),
        "responses_per_request": float(np.mean([r.responses for r in ok])) if ok else None,
        "wall_s": wall_s,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "ttft_ms": percentiles([r.token_times[0] - r.sent for r in ok]),
        "itl_ms": percentiles(gaps),
        "itl_per_request_mean_ms": percentiles(per_request_itl),
        "e2e_ms": percentiles([r.token_times[-1] - r.sent for r in ok]),
        "client_cpu_s": client_cpu_s,
        "server_cpu_s": server_cpu_s,
        "gateway_cpu_s": gateway_cpu_s,
    }
    if shape.output_tokens >= 256:
        for token in (16, 256):
            exact = [r.token_times[token - 1] - r.token_times[token - 2] for r in ok
                     if len(r.token_times) >= token]
            windowed = [w for r in ok if (w := window_itl(r, token)) is not None]
            summary[f"itl_token_{token}_ms"] = float(np.median(exact) * 1000) if exact else None
            summary[f"itl_window_{token}_ms"] = float(np.median(windowed) * 1000) if windowed else None
        summary["itl_256_over_16_per_request"] = [
            late / early for r in ok
            if (early := window_itl(r, 16)) and (late := window_itl(r, 256)) is not None]
    return summary


def round_figures(part: Measurement, shape: Shape, chunks: bool) -> dict:
    """One round of a cell: its steady tok/s, TTFT p50 and CPU per 1,000 tokens."""
    ok = [r for r in part.records if r.error is None and r.token_times]
    tokens_per_s = part.steady_tokens_per_s
    if chunks and tokens_per_s is not None:  # /predict: chunks stand for tokens, scaled to the known total
        counted = sum(len(r.token_times) for r in ok)
        tokens_per_s *= shape.output_tokens * len(ok) / counted if counted else 1
    tokens = shape.output_tokens * len(ok) if chunks else sum(len(r.token_times) for r in ok)
    per_1k = lambda cpu: cpu / tokens * 1000 if cpu is not None and tokens else None  # noqa: E731
    return {"output_tokens_per_s": tokens_per_s,
            "ttft_p50_ms": percentiles([r.token_times[0] - r.sent for r in ok])["p50"],
            "server_cpu_s_per_1k_tokens": per_1k(part.server_cpu_s),
            "gateway_cpu_s_per_1k_tokens": per_1k(part.gateway_cpu_s),
            "failed": len(part.records) - len(ok), "wall_s": part.wall_s, "load_1m": round(part.load_1m, 2),
            "peak_memory_bytes": part.peak_memory_bytes}


def cell_summary(rounds: list[Measurement], path_name: str, shape: Shape, concurrency: int) -> dict:
    """One cell from its rounds: latency percentiles over all its requests, CPU summed, and
    each round's tok/s, TTFT p50 and CPU per token with their median and interval."""
    records = [r for part in rounds for r in part.records]
    wall = sum(p.wall_s for p in rounds)
    gateway_cpu = sum(p.gateway_cpu_s for p in rounds) if all(p.gateway_cpu_s is not None for p in rounds) else None
    chunks = path_name == "gateway_predict"
    summary = summarize(records, shape, wall, sum(p.client_cpu_s for p in rounds),
                        sum(p.server_cpu_s for p in rounds), gateway_cpu, chunk_tokens_unknown=chunks)
    per_round = [round_figures(p, shape, chunks) for p in rounds]
    summary["rounds"] = per_round
    summary["load_1m"] = [r["load_1m"] for r in per_round]
    summary["output_tokens_per_s_whole_run"] = summary["output_tokens_per_s"]
    summary["steady_window_s"] = sum(p.window_s for p in rounds)
    for key in ("output_tokens_per_s", "ttft_p50_ms", "server_cpu_s_per_1k_tokens"):
        estimate = median_interval([r[key] for r in per_round])
        summary[f"{key}_estimate"] = estimate.to_dict() if estimate else None
    if summary["output_tokens_per_s_estimate"]:  # the cell's tok/s: the median of its rounds
        summary["output_tokens_per_s"] = summary["output_tokens_per_s_estimate"]["median"]
    if chunks:
        ok = [r for r in records if r.error is None and r.token_times]
        summary["chunks_per_request"] = float(np.mean([len(r.token_times) for r in ok])) if ok else None
        summary["exact_length"] = None  # not observable from text chunks; see the prescreen
    offset, raw = 0.0, []
    for index, part in enumerate(rounds):
        for r in part.records:
            raw.append({"round": index, "round_start_s": round(offset, 4), "sent_s": round(r.sent, 4),
                        "tokens": len(r.token_times),
                        "ttft_ms": round((r.token_times[0] - r.sent) * 1000, 3) if r.token_times else None,
                        "e2e_ms": round((r.token_times[-1] - r.sent) * 1000, 3) if r.token_times else None,
                        "responses": r.responses, "error": r.error})
        offset += part.wall_s
    summary["raw"] = raw
    if shape.output_tokens >= 256 and concurrency == 1:
        # median gap at every position over the single-stream requests (ITL-vs-position plot)
        ok = [r for r in records if r.error is None and len(r.token_times) == shape.output_tokens]
        if ok:
            gaps = np.diff(np.array([r.token_times for r in ok]), axis=1) * 1000
            summary["itl_by_position_ms"] = [round(float(x), 4) for x in np.median(gaps, axis=0)]
    return summary
