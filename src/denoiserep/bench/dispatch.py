"""Counting the aten operators a computation dispatches: the hardware-independent measure of what a
training step costs where it is launch-bound (a GPU at common batches runs one kernel per non-view
operator, each with a fixed launch cost, whatever its size).

    with OperatorCount() as count:
        step()
    count.dispatched, count.kernels   # every aten op; those that are not views (≈ kernels)
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


class OperatorCount(TorchDispatchMode):
    """Every aten operator dispatched inside the block (forward, backward, optimizer), by name."""

    def __init__(self):
        super().__init__()
        self.operators: Counter[str] = Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operators[func.overloadpacket.__name__] += 1
        if func.is_view:
            self.views += 1
        return func(*args, **(kwargs or {}))

    @property
    def dispatched(self) -> int:
        return sum(self.operators.values())

    @property
    def kernels(self) -> int:
        """Operators that are not views (views reinterpret a tensor's memory and launch nothing)."""
        return self.dispatched - self.views


def count_operators(step) -> OperatorCount:
    """The operators one call of ``step()`` dispatches."""
    with OperatorCount() as count:
        step()
    return count
