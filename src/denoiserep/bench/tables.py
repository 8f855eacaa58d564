"""Markdown helpers shared by the sections."""

from __future__ import annotations

from typing import Iterable, Sequence


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def verdict(ci: tuple[float, float], low: float, high: float) -> str:
    """Target [low, high] against a 95% interval: met or missed only where the interval says so."""
    if low <= ci[0] and ci[1] <= high:
        return "met"
    if ci[1] < low or ci[0] > high:
        return "**missed**"
    return "not resolved (the 95% interval straddles the target)"


def ci_text(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"
