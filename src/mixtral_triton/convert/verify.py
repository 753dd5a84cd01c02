"""Check a converted checkpoint on CPU against its source: config.json as TensorRT-LLM writes
it; each rank file readable by safetensors, with exactly the expected tensors, shapes and
dtypes and bytes equal to the source values after the cast; and, across ranks, every source
tensor covered exactly, so that re-assembling the shards gives the source back."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open

from mixtral_triton.errors import UserError
from mixtral_triton.progress import Progress
from mixtral_triton.convert.layout import (DTYPES, SAFETENSORS_NAMES, Block, Output, SourceCheckpoint, iter_values,
                                           one_torch_thread, rank_layout, read_header, trtllm_config)
from mixtral_triton.convert.mapping import check_model, resolve
from mixtral_triton.convert.writer import CHUNK_BYTES, file_digest, load_manifest


def verify(src: Path, out: Path, *, chunk_bytes: int = CHUNK_BYTES, log: Callable[[str], None] = print,
           progress: bool = True) -> dict:
    """Raises UserError naming what differs. `progress`: a bar with time left on stderr over
    the bytes read (each rank file's xxh3_128, then its values against the source)."""
    out = Path(out)
    config_path = out / "config.json"
    if not config_path.is_file():
        raise UserError(f"{out} has no config.json: not a finished TensorRT-LLM checkpoint")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    try:
        mapping, dtype = config["mapping"], config["dtype"]
        parallel = resolve(mapping["tp_size"], mapping["pp_size"], mapping["moe_tp_size"], mapping["moe_ep_size"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"{config_path} lacks the field {exc}") from None
    if dtype not in DTYPES:
        raise UserError(f"{config_path} has dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    source = SourceCheckpoint(src)
    check_model(parallel, source.model)
    manifest = load_manifest(out)
    clamp_fp16 = bool(manifest and manifest["settings"]["clamp_fp16"])

    problems = []
    expected = trtllm_config(source.hf_config, source.model, parallel, dtype)
    if config != expected:
        keys = sorted(k for k in expected.keys() | config.keys() if config.get(k) != expected.get(k))
        problems.append(f"config.json differs from TensorRT-LLM's in {keys}")
    layouts = [rank_layout(source.model, parallel, rank, dtype) for rank in range(parallel.world_size)]
    present = [rank for rank in range(parallel.world_size) if (out / f"rank{rank}.safetensors").is_file()]
    total = sum((out / f"rank{rank}.safetensors").stat().st_size * bool(manifest)
                + sum(tensor.nbytes for tensor in layouts[rank]) for rank in present)
    with one_torch_thread(), Progress(total=total, desc="verifying", unit="B", unit_scale=True,
                                      disable=not progress) as bar:
        for rank, outputs in enumerate(layouts):
            path = out / f"rank{rank}.safetensors"
            if rank not in present:
                problems.append(f"{path.name} is missing")
                continue
            entry = manifest["ranks"].get(str(rank)) if manifest else None
            if manifest and (entry is None or file_digest(path, bar) != entry["xxh3_128"]):
                problems.append(f"{path.name} does not match the xxh3_128 in manifest.json")
            problems += check_rank(path, outputs, source, clamp_fp16, chunk_bytes, bar)
    problems += check_coverage(source, layouts)
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise UserError(f"verification failed: {'; '.join(problems[:5])}{more}")
    report = {"ranks": parallel.world_size, "tensors": sum(len(outputs) for outputs in layouts),
              "bytes": sum(tensor.nbytes for outputs in layouts for tensor in outputs)}
    log(f"verified {report['ranks']} ranks, {report['tensors']} tensors, {report['bytes']} bytes: "
        "names, shapes, dtypes and values match the source")
    return report


def check_rank(path: Path, outputs: list[Output], source: SourceCheckpoint, clamp_fp16: bool,
               chunk_bytes: int, bar: Progress | None = None) -> list[str]:
    try:  # the reader TensorRT-LLM uses must accept the file
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception as exc:  # safetensors raises its own error types for malformed files
        return [f"{path.name} is not a valid safetensors file ({exc})"]
    header, data_start = read_header(path)
    expected = {tensor.name: tensor for tensor in outputs}
    problems = []
    if missing := sorted(expected.keys() - header.keys()):
        problems.append(f"{path.name} lacks {missing}")
    if extra := sorted(header.keys() - expected.keys()):
        problems.append(f"{path.name} has unexpected tensors {extra}")
    with open(path, "rb") as f:
        for tensor in outputs:
            info = header.get(tensor.name)
            if info is None:
                continue
            want = (SAFETENSORS_NAMES[DTYPES[tensor.dtype]], list(tensor.shape))
            if (info["dtype"], info["shape"]) != want:
                problems.append(f"{path.name}: {tensor.name} is {info['dtype']} {info['shape']}, expected {want[0]} {want[1]}")
                continue
            f.seek(data_start + info["data_offsets"][0])
            for values in iter_values(tensor, source, clamp_fp16, chunk_bytes):
                want_bytes = values.view(torch.uint8).numpy().reshape(-1)
                got = np.frombuffer(f.read(want_bytes.nbytes), dtype=np.uint8)
                if bar is not None:
                    bar.update(want_bytes.nbytes)
                if not np.array_equal(got, want_bytes):
                    problems.append(f"{path.name}: {tensor.name} differs from the source")
                    break
    return problems


def check_coverage(source: SourceCheckpoint, layouts: list[list[Output]]) -> list[str]:
    """Every source tensor must be covered by the blocks of all ranks together, with blocks
    either identical (replicated) or disjoint, and nothing left out."""
    blocks: dict[str, set[tuple[int, int, int, int]]] = defaultdict(set)
    for outputs in layouts:
        for tensor in outputs:
            for part in tensor.parts:
                if isinstance(part, Block):
                    info = source.tensors[part.source]
                    cols = part.cols or (0, info.row_values)
                    blocks[part.source].add((*part.rows, *cols))
    problems = []
    for name, info in source.tensors.items():
        rects = sorted(blocks.get(name, ()))
        if not rects:
            problems.append(f"source tensor {name} is in no rank")
            continue
        overlaps = any(a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]
                       for i, a in enumerate(rects) for b in rects[i + 1:])
        area = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in rects)
        if overlaps or area != math.prod(info.shape):
            problems.append(f"source tensor {name} is not split into disjoint blocks covering it exactly")
    return problems
