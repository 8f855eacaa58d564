"""Comparisons that NaN cannot pass.

``max(0.0, nan)`` is 0.0 and ``nan > tolerance`` is False, so a check written with ``max`` and ``>``
reports a NaN error as "no error". Every check of an error or a metric against a bound goes through
these helpers instead: the worst of several values is NaN when any is, and a value is within a bound
only when it is a number at or below it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch


def worst(values: Iterable[float]) -> float:
    """The largest value; NaN if any value is NaN; 0.0 for none."""
    result = 0.0
    for value in values:
        value = float(value)
        if math.isnan(value):
            return math.nan
        result = max(result, value)
    return result


def within(value: float, bound: float) -> bool:
    """``value <= bound``, and False for NaN (written out so that no caller inverts it into ``>``)."""
    return float(value) <= bound


def max_abs_difference(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """``max |actual − reference|`` in float64: NaN when either holds NaN or an infinity they do not
    share exactly, inf when one is infinite where the other is finite; 0.0 for empty tensors."""
    if not reference.numel():
        return 0.0
    reference, actual = reference.double(), actual.double()
    same = reference == actual  # equal infinities are no difference
    difference = torch.where(same, torch.zeros_like(reference), (actual - reference).abs())
    return float(difference.max())


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold NaN or an infinity."""
    return [name for name, tensor in tensors.items()
            if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all())]
