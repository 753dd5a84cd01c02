"""The benchmark's targets and their verdicts, from the results file alone.

Each row: what is targeted, the estimate (median, 95% interval, n) it rests on, and the
verdict of mixtral_triton.bench.uncertainty (met / missed / inconclusive / not measured),
with the section it came from so that the report can say when and on which tree that
section was measured.
"""

from __future__ import annotations

from mixtral_triton.bench.uncertainty import (NOT_MEASURED, Estimate, exact_verdict, median_interval, paired_ratio,
                                              unpaired_ratio, verdict)

# Serving on CPU (issue 9 and earlier): the ensemble's and the gateway's overhead, in-flight
# batching, flat per-token cost.
ENSEMBLE_OVER_ENGINE_TOK_S = 0.9
GATEWAY_OVER_ENSEMBLE_TOK_S = 0.9
GATEWAY_TTFT_OVER_ENSEMBLE = 1.10
BATCHING_C8_OVER_C1 = 3.0
ITL_256_OVER_16 = 1.10
TARGET_CONCURRENCIES = (1, 8)
# Converter.
CONVERTER_OVER_COPY = 0.5
CONVERTER_PEAK_RSS_BYTES = 2 * 10**9
# Scale (issue 12): against tensorrtllm_backend's own ensemble with a no-op stand-in, and
# the paced stand-in at the highest concurrency.
OURS_OVER_ANCHOR_TOK_S = 1.0
OURS_OVER_ANCHOR_TTFT = 1.0
OURS_OVER_ANCHOR_CPU_PER_TOKEN = 1.0
DELIVERED_OVER_STANDIN = 0.9
MEMORY_PER_STREAM_BYTES = 2 * 2**20
# Gateway (issue 24): its CPU per relayed token, and the capacity the overlays deploy.
GATEWAY_CPU_S_PER_1K_TOKENS = 0.05
GATEWAY_TARGET_CELL = ("128/128", 128)
GATEWAY_CAPACITY_OVER_PLAN = 1.2
SIZING_MIN_CONCURRENCY = 64  # streams per worker of a pod at capacity (mixtral_triton.gateway.sizing)


def cell(results: dict, path: str, shape: str, concurrency: int) -> dict | None:
    return (((results.get("serving") or {}).get("paths") or {}).get(path) or {}).get(shape, {}).get(str(concurrency))


def rounds_of(c: dict | None, key: str) -> list:
    return [r.get(key) for r in (c or {}).get("rounds") or []]


def show(e: Estimate | None, digits: int = 3, unit: str = "x") -> str:
    """`median [low, high] n=k`, or – when not measured."""
    if e is None:
        return "–"
    return f"{e.median:.{digits}f}{unit} [{e.low:.{digits}f}, {e.high:.{digits}f}] {e.samples}"


def show_change(e: Estimate | None) -> str:
    """A ratio as a change in percent: `+4% [-2%, +9%] n=k`."""
    if e is None:
        return "–"
    pct = lambda x: f"{(x - 1) * 100:+.0f}%"  # noqa: E731
    return f"{pct(e.median)} [{pct(e.low)}, {pct(e.high)}] {e.samples}"


def _row(section: str, target: str, estimate: Estimate | None, goal: float, higher: bool = True,
         shown: str | None = None, note: str = "") -> dict:
    return {"section": section, "target": target, "estimate": estimate.to_dict() if estimate else None,
            "measured": shown if shown is not None else show(estimate), "verdict": verdict(estimate, goal, higher),
            "note": note}


def serving_targets(results: dict) -> list[dict]:
    rows = []
    serving = results.get("serving") or {}
    shapes = (serving.get("setup") or {}).get("shapes") or []

    def paired(p: str, q: str, shape: str, c: int, key: str) -> Estimate | None:
        return paired_ratio(rounds_of(cell(results, p, shape, c), key), rounds_of(cell(results, q, shape, c), key))

    for shape in shapes:
        for c in TARGET_CONCURRENCIES:
            r = paired("ensemble_grpc", "engine_grpc", shape, c, "output_tokens_per_s")
            rows.append(_row("serving", f"ensemble gRPC >= {ENSEMBLE_OVER_ENGINE_TOK_S}x engine alone, output tok/s "
                                        f"({shape}, c={c})", r, ENSEMBLE_OVER_ENGINE_TOK_S))
    missing = (serving.get("missing") or {}).get("gateway_predict")
    note = f"(d) missing: {missing}" if missing else ""
    for shape in shapes:
        for c in TARGET_CONCURRENCIES:
            r = paired("gateway_predict", "ensemble_grpc", shape, c, "output_tokens_per_s")
            t = paired("gateway_predict", "ensemble_grpc", shape, c, "ttft_p50_ms")
            rows.append(_row("serving", f"gateway >= {GATEWAY_OVER_ENSEMBLE_TOK_S}x ensemble gRPC, output tok/s "
                                        f"({shape}, c={c})", r, GATEWAY_OVER_ENSEMBLE_TOK_S, note=note))
            rows.append(_row("serving", f"gateway TTFT p50 within {(GATEWAY_TTFT_OVER_ENSEMBLE - 1) * 100:+.0f}% of "
                                        f"ensemble gRPC ({shape}, c={c})", t, GATEWAY_TTFT_OVER_ENSEMBLE,
                             higher=False, shown=show_change(t), note=note))
    low, high = TARGET_CONCURRENCIES
    for shape in shapes:
        def scaling(path: str) -> Estimate | None:
            return unpaired_ratio(rounds_of(cell(results, path, shape, high), "output_tokens_per_s"),
                                  rounds_of(cell(results, path, shape, low), "output_tokens_per_s"))

        rows.append(_row("serving", f"in-flight batching: tok/s at c={high} >= {BATCHING_C8_OVER_C1:g}x c={low}, "
                                    f"ensemble gRPC ({shape})", scaling("ensemble_grpc"), BATCHING_C8_OVER_C1,
                         note=f"engine alone: {show(scaling('engine_grpc'), 2)}"))
    for shape in shapes:
        c = cell(results, "ensemble_grpc", shape, 1)
        if c and c.get("itl_256_over_16_per_request"):
            r = median_interval(c["itl_256_over_16_per_request"])
            e = median_interval((cell(results, "engine_grpc", shape, 1) or {}).get("itl_256_over_16_per_request") or [])
            rows.append(_row("serving", f"per-token cost flat: ITL at token 256 within "
                                        f"{(ITL_256_OVER_16 - 1) * 100:+.0f}% of token 16, ensemble gRPC c=1 ({shape})",
                             r, ITL_256_OVER_16, higher=False, shown=show_change(r),
                             note=f"engine alone: {show_change(e)}; per request"))
    return rows


def converter_targets(results: dict) -> list[dict]:
    conv = results.get("converter")
    if not conv:
        return []
    source = conv["checkpoint"]["source_bytes"]
    default = conv["conversions"][str(conv["default_workers"])]
    copies = [source / s for s in conv["copy_s"] if s]
    r = unpaired_ratio([default["source_bytes_per_s"]], copies)
    rss = conv["peak_rss_bytes"]
    return [
        _row("converter", f"converter >= {CONVERTER_OVER_COPY}x plain copy throughput (same source bytes, "
                          f"TP={conv['tp']}, workers={conv['default_workers']})", r, CONVERTER_OVER_COPY,
             note="n = conversions / plain copies"),
        {"section": "converter", "target": f"converter peak RSS <= {CONVERTER_PEAK_RSS_BYTES / 10**9:g} GB",
         "estimate": None, "measured": f"{rss / 10**9:.2f} GB ({conv['peak_rss_over_largest_tensor']:.2f}x the "
                                       "largest tensor; the peak of the run)",
         "verdict": exact_verdict(rss, CONVERTER_PEAK_RSS_BYTES, higher_is_better=False), "note": ""},
    ]


def cores_needed(scale: dict, path: str) -> Estimate | None:
    """CPU cores a replica's pipeline needs at the capacity plan's throughput: the CPU seconds
    per streamed token measured at the highest concurrency (Triton with every stub, plus the
    gateway on its path), round by round, times the plan's tokens per second."""
    paced = scale.get("paced") or {}
    rate = (scale.get("plan") or {}).get("tokens_per_s_replica")
    cells = (paced.get("paths") or {}).get(path) or {}
    if not rate or not cells:
        return None
    top = cells[str(max(int(c) for c in cells))]
    per_round = []
    for r in top.get("rounds") or []:
        server, gateway = r.get("server_cpu_s_per_1k_tokens"), r.get("gateway_cpu_s_per_1k_tokens")
        if server is not None:
            per_round.append((server + (gateway or 0.0)) / 1000 * rate)
    return median_interval(per_round)


def scale_targets(results: dict) -> list[dict]:
    scale = results.get("scale") or {}
    rows = []
    anchor = scale.get("anchor") or {}
    why = anchor.get("skipped") or ""
    for c in (scale.get("setup") or {}).get("anchor_concurrencies") or []:
        ours = (anchor.get("ours") or {}).get(str(c))
        theirs = (anchor.get("anchor") or {}).get(str(c))

        def paired(key: str) -> Estimate | None:
            return paired_ratio(rounds_of(ours, key), rounds_of(theirs, key))

        exact = (ours or {}).get("byte_exact")
        note = why or ("ours byte-exact" if exact else f"ours NOT byte-exact: {(ours or {}).get('text_errors')}")
        rows.append(_row("scale", f"no-op stand-in: our streamed tok/s >= {OURS_OVER_ANCHOR_TOK_S:g}x the anchor's "
                                  f"(c={c})", paired("output_tokens_per_s"), OURS_OVER_ANCHOR_TOK_S, note=note))
        rows.append(_row("scale", f"no-op stand-in: our TTFT p50 <= {OURS_OVER_ANCHOR_TTFT:g}x the anchor's (c={c})",
                         paired("ttft_p50_ms"), OURS_OVER_ANCHOR_TTFT, higher=False, note=why))
        rows.append(_row("scale", f"no-op stand-in: our server CPU-s per 1k tokens <= {OURS_OVER_ANCHOR_CPU_PER_TOKEN:g}x "
                                  f"the anchor's (c={c})", paired("server_cpu_s_per_1k_tokens"),
                         OURS_OVER_ANCHOR_CPU_PER_TOKEN, higher=False, note=why))
    paced = scale.get("paced") or {}
    if paced.get("error"):
        rows.append({"section": "scale", "target": "paced stand-in at the highest concurrency: no failed stream, "
                     f"delivered >= {DELIVERED_OVER_STANDIN}x the stand-in's own tok/s", "estimate": None,
                     "measured": "–", "verdict": NOT_MEASURED, "note": paced["error"]})
    top = max((int(c) for c in (paced.get("standin_alone") or {})), default=None)
    for path in ("ensemble_grpc", "gateway_predict"):
        c = ((paced.get("paths") or {}).get(path) or {}).get(str(top)) if top else None
        if not c:
            continue
        failed = sum(r["failed"] for r in c["rounds"])
        rows.append({"section": "scale", "target": f"paced stand-in, {path}, c={top}: no failed stream",
                     "estimate": None, "measured": f"{failed} of {c['requests']} failed",
                     "verdict": exact_verdict(-failed, 0), "note": "; ".join(c.get("errors") or [])})
        delivered = paired_ratio(rounds_of(c, "output_tokens_per_s"),
                                 rounds_of(paced["standin_alone"][str(top)], "output_tokens_per_s"))
        cores = cores_needed(scale, path)
        rows.append(_row("scale", f"paced stand-in, {path}, c={top}: delivered >= {DELIVERED_OVER_STANDIN}x the "
                                  "stand-in's own tok/s (or the cores needed reported)", delivered,
                         DELIVERED_OVER_STANDIN,
                         note=(f"cores a replica needs at the plan's {scale['plan']['workload']} throughput: "
                               f"{show(cores, 1, '')}" if cores else "")))
    memory = paced.get("memory_per_stream") or {}
    for path, m in memory.items():
        e = Estimate.from_dict(m.get("estimate"))
        rows.append(_row("scale", f"resident memory per additional stream <= {MEMORY_PER_STREAM_BYTES / 2**20:g} MiB "
                                  f"({path}, c={m['from_concurrency']} -> {m['to_concurrency']})", e,
                         MEMORY_PER_STREAM_BYTES, higher=False,
                         shown=show(Estimate(e.median / 2**20, e.low / 2**20, e.high / 2**20, e.n, e.n_base), 2,
                                    " MiB") if e else "–"))
    return rows


def gateway_cell(results: dict, workers: int, shape: str, concurrency: int) -> dict | None:
    cells = (results.get("gateway") or {}).get("cells") or {}
    return ((cells.get(str(workers)) or {}).get(shape) or {}).get(str(concurrency))


def gateway_targets(results: dict) -> list[dict]:
    gateway = results.get("gateway")
    if not gateway:
        return []
    rows = []
    shape, c = GATEWAY_TARGET_CELL
    cost = Estimate.from_dict((gateway_cell(results, 1, shape, c) or {}).get("gateway_cpu_s_per_1k_tokens_estimate"))
    rows.append(_row("gateway", f"gateway CPU <= {GATEWAY_CPU_S_PER_1K_TOKENS} s per 1,000 relayed tokens "
                                f"({shape}, c={c}, 1 worker)", cost, GATEWAY_CPU_S_PER_1K_TOKENS, higher=False,
                     shown=show(cost, 3, " s"),
                     note=f"one core relays {1000 / cost.median:,.0f} tok/s" if cost else ""))
    from mixtral_triton.bench.gateway_cost import overlay_capacity

    overlays = overlay_capacity()  # the deployment's arithmetic at this commit, not a measurement
    headrooms = {gpu: o["headroom"] for gpu, o in (overlays.get("gpus") or {}).items()}
    if headrooms:
        worst = min(headrooms, key=headrooms.get)
        rows.append({"section": "gateway", "target": f"deployed gateway capacity >= {GATEWAY_CAPACITY_OVER_PLAN:g}x the "
                     "Triton replicas' plan throughput, every overlay", "estimate": None,
                     "measured": f"{headrooms[worst]:.2f}x at least ({worst})",
                     "verdict": exact_verdict(headrooms[worst], GATEWAY_CAPACITY_OVER_PLAN),
                     "note": f"sized at {overlays['relay_cpu_s_per_1k_tokens']} CPU-s per 1,000 tokens "
                             "(mixtral_triton.gateway.sizing, when this report is written)"})
        by_shape = (gateway.get("cells") or {}).get("1") or {}
        measured = [Estimate.from_dict(cell.get("gateway_cpu_s_per_1k_tokens_estimate"))
                    for shape in gateway["setup"]["shapes"] for conc, cell in (by_shape.get(shape) or {}).items()
                    if int(conc) >= SIZING_MIN_CONCURRENCY]
        highest = max((e.median for e in measured if e), default=None)
        rows.append({"section": "gateway", "target": "the overlays' sizing cost >= the highest measured gateway "
                     f"CPU per 1,000 tokens at c >= {SIZING_MIN_CONCURRENCY} (1 worker)", "estimate": None,
                     "measured": f"{overlays['relay_cpu_s_per_1k_tokens']} s vs {highest:.3f} s" if highest else "–",
                     "verdict": exact_verdict(overlays["relay_cpu_s_per_1k_tokens"] - highest, 0) if highest
                     else NOT_MEASURED, "note": ""})
    return rows


def targets(results: dict) -> list[dict]:
    return serving_targets(results) + converter_targets(results) + scale_targets(results) + gateway_targets(results)
