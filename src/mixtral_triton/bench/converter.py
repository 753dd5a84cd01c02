"""Converter benchmark: a real-shaped slice of Mixtral 8x22B (the true widths, 1 layer, ~5.8 GB
bf16) converted to a TP=4 float16 TensorRT-LLM checkpoint, against a plain copy of the same
source bytes in the same run, and the converting process's peak resident memory against the
largest tensor.

Fairness of the comparison: the source is read once first so that both start from the page
cache; the copy (shutil.copyfile per shard) is fsynced per file like the converter's ranks,
and runs once before and once after the conversion (the mean is the baseline; the spread
says how noisy the disk was). The conversion runs in a child process (`python -m
mixtral_triton.bench.converter --child`) whose VmHWM and ru_maxrss are its peak RSS;
the parent also samples the child's RssAnon/RssFile every 50 ms (the file part is the
memory-mapped source pages the kernel may drop at will).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mixtral_triton.errors import UserError

GB = 10**9


def ensure_fixture(work: Path, layers: int = 1, log=print) -> tuple[Path, float | None]:
    """The real-shaped checkpoint, written once and kept (returns it and the seconds spent
    writing it now, None when it was already there)."""
    from mixtral_triton.fixture import write_checkpoint

    checkpoint = work / "hub" / f"real-shaped-{layers}l"
    if (checkpoint / "config.json").exists():
        return checkpoint, None
    need = 6.5 * GB * layers
    free = shutil.disk_usage(work.parent if not work.exists() else work).free
    if free < need + 15 * GB:
        raise UserError(f"writing the real-shaped fixture needs about {need / GB:.0f} GB plus room for "
                        f"its conversion and copy; {free / GB:.1f} GB are free")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    log(f"  writing the real-shaped fixture ({layers} layer) to {checkpoint} (once)")
    start = time.perf_counter()
    write_checkpoint(checkpoint, size="real-shaped", layers=layers, seed=0)
    return checkpoint, time.perf_counter() - start


def shards(checkpoint: Path) -> list[Path]:
    return sorted(checkpoint.glob("*.safetensors"))


def largest_tensor(checkpoint: Path) -> dict:
    from mixtral_triton.convert.layout import read_header

    best = {"name": None, "bytes": 0, "shape": None, "dtype": None}
    for path in shards(checkpoint):
        header, _ = read_header(path)
        for name, info in header.items():
            size = info["data_offsets"][1] - info["data_offsets"][0]
            if size > best["bytes"]:
                best = {"name": name, "bytes": size, "shape": info["shape"], "dtype": info["dtype"]}
    return best


def read_all(files: list[Path]) -> float:
    start = time.perf_counter()
    for path in files:
        with open(path, "rb") as f:
            while f.read(64 * 2**20):
                pass
    return time.perf_counter() - start


def plain_copy(files: list[Path], target: Path) -> float:
    """shutil.copyfile of every shard, each fsynced (as the converter fsyncs its ranks)."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    start = time.perf_counter()
    for path in files:
        out = target / path.name
        shutil.copyfile(path, out)
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - start
    shutil.rmtree(target, ignore_errors=True)
    return elapsed


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def convert_in_child(src: Path, out: Path, tp: int, workers: int = 1) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "mixtral_triton.bench.converter", "--child", str(src), str(out),
            "--tp", str(tp), "--workers", str(workers)]
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    while child.poll() is None:
        status = _status(child.pid)
        for key in peaks:
            peaks[key] = max(peaks[key], status.get(key, 0))
        time.sleep(0.05)
    wall = time.perf_counter() - start
    stdout, stderr = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the conversion failed (exit {child.returncode}):\n{stderr[-2000:]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    output_bytes = sum(p.stat().st_size for p in out.glob("rank*.safetensors"))
    report.update(wall_s_parent=wall, sampled_peak_bytes=peaks, output_bytes=output_bytes)
    return report


def _child(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--child", nargs=2, type=Path, required=True)
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    src, out = args.child
    from mixtral_triton.convert.mapping import resolve
    from mixtral_triton.convert.writer import convert

    after_imports = _status(os.getpid())
    start = time.perf_counter()
    convert(src, out, parallel=resolve(tp=args.tp), workers=args.workers, log=lambda *_: None, progress=False)
    wall = time.perf_counter() - start
    status = _status(os.getpid())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall_s": wall, "vm_hwm_bytes": status.get("VmHWM"),
                      "cpu_user_s": usage.ru_utime, "cpu_system_s": usage.ru_stime,
                      "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rss_after_imports_bytes": after_imports.get("VmRSS"),
                      "rss_anon_at_end_bytes": status.get("RssAnon")}))
    return 0


def run_converter(work: Path, tp: int = 4, workers: tuple[int, ...] = (1, 2), log=print) -> dict:
    """Copy, then each conversion (default workers=1 first), a copy after each: the copy
    baseline is the mean of all copies, taken around the conversions on the same disk."""
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, fixture_s = ensure_fixture(work, log=log)
    files = shards(checkpoint)
    source_bytes = sum(p.stat().st_size for p in files)
    free = shutil.disk_usage(work).free
    if free < 2.5 * source_bytes:
        raise UserError(f"the conversion and the copy need about {2.5 * source_bytes / GB:.1f} GB free "
                        f"next to {work}; {free / GB:.1f} GB are")
    largest = largest_tensor(checkpoint)
    warm_read_s = read_all(files)  # every run starts from the page cache
    copy_s = [plain_copy(files, work / "copy")]
    log(f"  plain copy: {source_bytes / GB:.2f} GB in {copy_s[-1]:.1f} s")
    conversions = {}
    for n in workers:
        conversion = convert_in_child(checkpoint, work / f"trtllm-tp{tp}", tp, n)
        shutil.rmtree(work / f"trtllm-tp{tp}", ignore_errors=True)
        conversions[str(n)] = conversion
        log(f"  conversion (workers={n}): {conversion['wall_s']:.1f} s, "
            f"peak RSS {conversion['vm_hwm_bytes'] / GB:.2f} GB")
        copy_s.append(plain_copy(files, work / "copy"))
        log(f"  plain copy: {copy_s[-1]:.1f} s")
    copy_mean = sum(copy_s) / len(copy_s)
    copy_tput = source_bytes / copy_mean
    default = conversions[str(workers[0])]
    for conversion in conversions.values():
        conversion["source_bytes_per_s"] = source_bytes / conversion["wall_s"]
        conversion["throughput_ratio_vs_copy"] = conversion["source_bytes_per_s"] / copy_tput
    return {
        "checkpoint": {"path": str(checkpoint), "size": "real-shaped (hidden 6144, intermediate 16384, "
                       "48/8 heads, 8 experts, vocab 32000), 1 layer, bf16",
                       "source_bytes": source_bytes, "shards": len(files), "fixture_write_s": fixture_s},
        "tp": tp, "dtype": "float16",
        "largest_tensor": largest,
        "warm_read_s": warm_read_s,
        "copy_s": copy_s,
        "copy_bytes_per_s": copy_tput,
        "conversions": conversions,
        "default_workers": workers[0],
        "convert_bytes_per_s": default["source_bytes_per_s"],
        "throughput_ratio": default["throughput_ratio_vs_copy"],
        "peak_rss_bytes": max(c["vm_hwm_bytes"] for c in conversions.values()),
        "peak_rss_over_largest_tensor": max(c["vm_hwm_bytes"] for c in conversions.values()) / largest["bytes"],
    }


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1:]))
