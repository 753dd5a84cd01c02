"""bench/results/latest.json -> bench/plots/*.png (drawn from the results file alone).

Each plot's title names the commit its section measured, and says so when that tree was
dirty."""

from __future__ import annotations

from pathlib import Path

from mixtral_triton.bench.request_clients import PATHS
from mixtral_triton.bench.statistics import ITL_WINDOW
from mixtral_triton.bench.targets import CONVERTER_OVER_COPY, CONVERTER_PEAK_RSS_BYTES
from mixtral_triton.bench.targets import cell as _cell

SHORT = {"engine_grpc": "(a) engine", "ensemble_grpc": "(b) ensemble gRPC",
         "ensemble_http": "(c) ensemble HTTP", "gateway_predict": "(d) gateway /predict"}


def provenance(results: dict, section: str) -> str:
    """`commit abc123` (+ `, DIRTY tree` when it was) of the run that measured `section`."""
    m = ((results.get("runs") or {}).get(section) or {}).get("machine") or {}
    return f"commit {(m.get('git_commit') or '?')[:12]}" + (", DIRTY tree" if m.get("git_dirty") else "")


def _spread(estimate: dict | None) -> tuple[float | None, float, float]:
    if not estimate:
        return None, 0.0, 0.0
    return estimate["median"], estimate["low"], estimate["high"]


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    serving = results.get("serving") or {}
    shapes = (serving.get("setup") or {}).get("shapes") or []
    concurrencies = (serving.get("setup") or {}).get("concurrencies") or []
    if serving.get("paths") and shapes:
        for metric, title, fname, getter in (
                ("tok", "output tokens/s (median of rounds, 95% interval)", "serving_throughput.png",
                 lambda c: _spread(c.get("output_tokens_per_s_estimate"))),
                ("ttft", "TTFT p50 (ms) (median of rounds, 95% interval)", "serving_ttft.png",
                 lambda c: _spread(c.get("ttft_p50_ms_estimate"))),
                ("itl", "inter-token latency p50 (ms), all requests", "serving_itl.png",
                 lambda c: (c["itl_ms"]["p50"],) * 3)):
            fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
            for ax, shape in zip(axes[0], shapes):
                for path in PATHS:
                    xs, ys, below, above = [], [], [], []
                    for c in concurrencies:
                        cell = _cell(results, path, shape, c)
                        value, low, high = getter(cell) if cell else (None, 0.0, 0.0)
                        if value is not None:
                            xs.append(c)
                            ys.append(value)
                            below.append(value - low)
                            above.append(high - value)
                    if xs:
                        ax.errorbar(xs, ys, yerr=[below, above], marker="o", capsize=3, label=SHORT[path])
                if metric == "tok":
                    inproc = (serving.get("in_process_engine") or {}).get(shape)
                    if inproc:
                        xs = [int(b) for b in inproc]
                        ax.plot(xs, [inproc[str(b)]["output_tokens_per_s"] for b in xs], "k--", marker="x",
                                label="engine in-process (no Triton)")
                ax.set_xscale("log", base=2)
                ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
                ax.set_xlabel("concurrency")
                ax.set_ylabel(title)
                ax.set_title(f"{shape} (in/out tokens)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            fig.suptitle(f"CPU, tiny Mixtral, reference engine: {title}; {provenance(results, 'serving')}",
                         fontsize=9)
            fig.tight_layout()
            fig.savefig(out / fname, dpi=110)
            plt.close(fig)
            written.append(out / fname)
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = False
        for shape in shapes:
            for path in PATHS:
                cell = _cell(results, path, shape, 1)
                series = cell.get("itl_by_position_ms") if cell else None
                if series:
                    window = ITL_WINDOW
                    smooth = [sum(series[max(0, i - window + 1):i + 1]) / len(series[max(0, i - window + 1):i + 1])
                              for i in range(len(series))]
                    ax.plot(range(2, len(series) + 2), smooth, label=f"{SHORT[path]} {shape}")
                    drawn = True
        if drawn:
            ax.set_xlabel("token position")
            ax.set_ylabel("gap to previous token, ms")
            ax.set_title(f"Inter-token latency by position, concurrency 1 (median over requests, {ITL_WINDOW}-token mean; "
                         f"{provenance(results, 'serving')})", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / "itl_by_position.png", dpi=110)
            written.append(out / "itl_by_position.png")
        plt.close(fig)
    conv = results.get("converter")
    if conv:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
        labels = ["plain copy (mean)"] + [f"convert, workers={w}" for w in conv["conversions"]]
        values = [conv["copy_bytes_per_s"] / 1e6] + [c["source_bytes_per_s"] / 1e6 for c in conv["conversions"].values()]
        ax1.barh(labels, values, color=["grey"] + ["tab:blue"] * (len(values) - 1))
        ax1.axvline(conv["copy_bytes_per_s"] / 1e6 * CONVERTER_OVER_COPY, color="red", linestyle="--",
                    label=f"target {CONVERTER_OVER_COPY}x copy")
        ax1.set_xlabel("source MB/s")
        ax1.legend(fontsize=7)
        ax1.set_title("throughput (same source bytes)", fontsize=9)
        largest = conv["largest_tensor"]["bytes"] / 1e6
        rss = [c["vm_hwm_bytes"] / 1e6 for c in conv["conversions"].values()]
        ax2.barh(["largest tensor"] + [f"peak RSS, workers={w}" for w in conv["conversions"]], [largest] + rss,
                 color=["grey"] + ["tab:green"] * len(rss))
        ax2.axvline(CONVERTER_PEAK_RSS_BYTES / 1e6, color="red", linestyle="--",
                    label=f"target {CONVERTER_PEAK_RSS_BYTES / 1e9:g} GB")
        ax2.set_xlabel("MB")
        ax2.legend(fontsize=7)
        ax2.set_title("memory of the converting process", fontsize=9)
        ck = conv["checkpoint"]
        fig.suptitle(f"Converter: {ck['size']}, {ck['source_bytes'] / 1e9:.1f} GB -> TP={conv['tp']} {conv['dtype']} "
                     f"({provenance(results, 'converter')})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "converter.png", dpi=110)
        plt.close(fig)
        written.append(out / "converter.png")
    gpu = results.get("gpu")
    if gpu:
        fig, ax = plt.subplots(figsize=(7, 4))
        rows = gpu["roofline"]["rows"]
        for name in dict.fromkeys(r["gpu"] for r in rows):
            mine = [r for r in rows if r["gpu"] == name]
            ax.plot([r["batch"] for r in mine], [r["tokens_per_s_total_max"] for r in mine], marker="o",
                    label=f"{name}: total")
            ax.plot([r["batch"] for r in mine], [r["tokens_per_s_per_sequence_max"] for r in mine], marker=".",
                    linestyle="--", label=f"{name}: per sequence")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (sequences decoding together)")
        ax.set_ylabel("decode tokens/s, upper bound")
        rf = gpu["roofline"]
        ax.set_title(f"NOT MEASURED: HBM roofline, Mixtral 8x22B fp16, TP={rf['tp']}, context {rf['context_assumed']}",
                     fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "gpu_roofline.png", dpi=110)
        plt.close(fig)
        written.append(out / "gpu_roofline.png")
    return written
