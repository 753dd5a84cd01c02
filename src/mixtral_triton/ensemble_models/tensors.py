"""Reading request tensors as Python values, with errors that name the tensor."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from mixtral_triton.protocol import RequestError


def scalar(inputs: Mapping[str, np.ndarray], name: str):
    """The single value of an optional scalar input as a Python value, or None if absent.

    Triton gives scalars as [1] or, in a batched model, [1, 1]: anything else is a
    request for several items at once, which these models do not serve.
    """
    array = inputs.get(name)
    if array is None:
        return None
    flat = array.reshape(-1)
    if flat.size != 1:
        raise RequestError(name, f"{name} must hold one value, got {flat.size}")
    value = flat[0]
    if isinstance(value, bytes):
        return text(name, value)
    return value.item()


def strings(inputs: Mapping[str, np.ndarray], name: str) -> list[str]:
    """An optional list-of-strings input (BYTES [-1]); empty strings are padding and dropped."""
    array = inputs.get(name)
    if array is None:
        return []
    return [s for s in (text(name, item) for item in array.reshape(-1)) if s]


def text(name: str, raw) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(name, f"{name} must be valid UTF-8 text, got invalid byte "
                           f"0x{raw[exc.start]:02x} at offset {exc.start}") from None
