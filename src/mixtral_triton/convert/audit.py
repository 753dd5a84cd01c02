"""The bfloat16 -> float16 audit. bfloat16 reaches 3.4e38 but float16 only 65504, so a cast can
turn a weight into inf (and the engine's outputs into NaN); tiny values flush to zero.
Every source tensor that becomes float16 is read once, in bounded chunks, before anything is
written."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from mixtral_triton.errors import UserError
from mixtral_triton.convert.layout import Block, Output, SourceCheckpoint, cast, rows_per_read


@dataclass
class AuditResult:
    tensors: int = 0
    overflow: dict[str, int] = field(default_factory=dict)  # values that would be inf (without clamping)
    underflow: dict[str, int] = field(default_factory=dict)  # non-zero -> zero

    def to_json(self) -> dict:
        return {"tensors": self.tensors, "overflow": self.overflow, "underflow": self.underflow}

    def summary(self) -> str:
        return (f"float16 audit of {self.tensors} tensors: {sum(self.overflow.values())} values beyond the "
                f"float16 range in {len(self.overflow)} tensors, {sum(self.underflow.values())} values flushed "
                f"to zero in {len(self.underflow)} tensors")


def fp16_sources(layouts: list[list[Output]]) -> list[str]:
    """The source tensors that some rank stores as float16 (the router stays float32)."""
    names = {part.source for outputs in layouts for out in outputs if out.dtype == "float16"
             for part in out.parts if isinstance(part, Block)}
    return sorted(names)


def count(source: SourceCheckpoint, name: str, chunk_bytes: int) -> tuple[int, int]:
    """(values that would become inf, non-zero values that become zero) in one tensor."""
    info = source.tensors[name]
    step = rows_per_read(info, chunk_bytes)
    overflow = underflow = 0
    for start in range(0, info.shape[0], step):
        values = source.read(name, (start, min(start + step, info.shape[0])))
        half = cast(values, torch.float16, clamp_fp16=False)
        # One mask at a time, counted with count_nonzero (.sum() would widen it to int64);
        # zeros stay zeros, so the values that flush to zero are the new zeros.
        overflow += int(torch.count_nonzero(torch.isinf(half)))
        underflow += int(torch.count_nonzero(half == 0)) - int(torch.count_nonzero(values == 0))
        del values, half  # free this chunk before the next is read
    return overflow, underflow


def audit(source: SourceCheckpoint, names: list[str], workers: int, chunk_bytes: int) -> AuditResult:
    result = AuditResult(tensors=len(names))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for name, (over, under) in zip(names, pool.map(lambda n: count(source, n, chunk_bytes), names)):
            if over:
                result.overflow[name] = over
            if under:
                result.underflow[name] = under
    return result


def enforce(result: AuditResult, clamp_fp16: bool) -> None:
    """Refuse to write inf weights unless the user asked for clamping."""
    if result.overflow and not clamp_fp16:
        worst = max(result.overflow, key=result.overflow.get)
        raise UserError(f"{sum(result.overflow.values())} weights in {len(result.overflow)} tensors are beyond the "
                        f"float16 range and would become inf (e.g. {result.overflow[worst]} in {worst}); "
                        f"pass --clamp-fp16 to clamp them to +-65504, or use --dtype bfloat16")
