"""The bfloat16 -> float16 audit. bfloat16 reaches 3.4e38 but float16 only 65504, so a cast can
turn a weight into inf (and the engine's outputs into NaN); tiny values flush to zero.
Every source tensor that becomes float16 is read once, in bounded chunks, before any rank file
is published (the writer runs it beside the rank writes and waits for it before renaming one)."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from mixtral_triton.errors import UserError
from mixtral_triton.progress import Progress
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


def count(source: SourceCheckpoint, name: str, chunk_bytes: int, stop: threading.Event | None = None,
          bar: Progress | None = None) -> tuple[int, int]:
    """(values that would become inf, non-zero values that become zero) in one tensor."""
    info = source.tensors[name]
    counter = count_bfloat16 if info.dtype is torch.bfloat16 else count_cast
    step = rows_per_read(info, chunk_bytes)
    overflow = underflow = 0
    for start in range(0, info.shape[0], step):
        if stop is not None and stop.is_set():
            raise RuntimeError("the float16 audit was stopped")  # never a partial (passing) result
        values = source.read(name, (start, min(start + step, info.shape[0])))
        over, under = counter(values)
        overflow, underflow = overflow + over, underflow + under
        if bar is not None:
            bar.update(values.numel() * values.element_size())
        del values  # free this chunk before the next is read
    return overflow, underflow


# bfloat16 magnitudes as bits (sign cleared): 65536 (0x4780) and above round to inf in float16
# (its largest is 65504; 65280, the bfloat16 just below, is exact), up to inf itself (0x7f80;
# above it are NaNs). Non-zero magnitudes up to 2**-25 (0x3300) round to zero: float16's
# smallest subnormal is 2**-24, and 2**-25 is the tie that rounds to even, i.e. to zero.
# Both bounds minus one, as count_bfloat16 compares magnitudes minus one.
_TO_INF = (0x4780 - 1, 0x7F80 - 1)
_TO_ZERO_BELOW = 0x3300
_AUDIT_BLOCK = 2**18  # values per step: 512 KB of scratch, in the L2 cache


def count_bfloat16(values: torch.Tensor) -> tuple[int, int]:
    """count_cast's two counts for a bfloat16 tensor, from its bits alone, without casting:
    a few integer passes of numpy over cache-sized blocks, several times cheaper than casting
    and reducing (tests/test_convert.py checks both agree on all 65536 bfloat16 values)."""
    bits = values.contiguous().view(torch.int16).numpy().reshape(-1).view(np.uint16)
    scratch = np.empty(min(_AUDIT_BLOCK, bits.size), dtype=np.uint16)
    overflow = underflow = 0
    for start in range(0, bits.size, _AUDIT_BLOCK):
        block = bits[start:start + _AUDIT_BLOCK]
        magnitude = np.bitwise_and(block, 0x7FFF, out=scratch[:block.size])
        # Minus one, wrapping 0 to 0xffff: the zero range becomes one comparison, and zeros
        # leave both ranges.
        shifted = np.subtract(magnitude, 1, out=magnitude)
        underflow += int(np.count_nonzero(shifted < _TO_ZERO_BELOW))
        if shifted.max() >= _TO_INF[0]:  # almost never: count only then
            overflow += int(np.count_nonzero((shifted >= _TO_INF[0]) & (shifted <= _TO_INF[1])))
    return overflow, underflow


def count_cast(values: torch.Tensor) -> tuple[int, int]:
    """(values that become inf, non-zero values that become zero) when cast to float16."""
    half = cast(values, torch.float16, clamp_fp16=False)
    # Signs matter to neither count, so take |half| (in place unless the cast was a no-op
    # on the source's own memory). Both counts are almost always 0, so one reduction rules
    # both out and the masks are built only when it cannot: the largest |value| is finite
    # unless there is an inf (or a NaN), and the smallest is non-zero unless there is a
    # zero (zeros stay zeros, so with none in the output none was flushed).
    half = half.abs_() if half.data_ptr() != values.data_ptr() else half.abs()
    low, high = torch.aminmax(half)
    overflow = underflow = 0
    if not high < math.inf:
        overflow = int(torch.count_nonzero(torch.isinf(half)))
    if not low > 0:
        underflow = _zeros(half) - _zeros(values)
    return overflow, underflow


def _zeros(values: torch.Tensor) -> int:
    """How many values are +-0, counted on their bits by numpy (several times faster here
    than torch's count_nonzero of a mask): shifted left once, only +0 and -0 are 0."""
    bits = values.contiguous().view(_INTS[values.element_size()]).numpy()
    return int(np.count_nonzero((bits << 1) == 0))


_INTS = {2: torch.int16, 4: torch.int32}


def audit(source: SourceCheckpoint, names: list[str], workers: int, chunk_bytes: int,
          stop: threading.Event | None = None, progress: bool = False) -> AuditResult:
    result = AuditResult(tensors=len(names))
    total = sum(math.prod(source.tensors[n].shape) * source.tensors[n].dtype.itemsize for n in names)
    with Progress(total=total, desc="float16 audit", unit="B", unit_scale=True, disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        for name, (over, under) in zip(names, pool.map(lambda n: count(source, n, chunk_bytes, stop, bar), names)):
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
