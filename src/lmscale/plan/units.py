"""Counts with suffixes in, readable quantities out: `4M` tokens, `70e9` parameters, `12.3 GiB`."""

from __future__ import annotations

import math

from lmscale.errors import LmscaleError

SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}
"""Decimal multipliers, as model sizes and token counts are quoted (7B parameters, 2T tokens)."""
GiB = 2**30


def parse_count(text: str | float | int, option: str) -> float:
    """`"4M"`, `"2T"`, `"70e9"`, `"0.5M"`, `"1_000"` as a number; a bad value names `option`."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        cleaned = str(text).strip().replace("_", "").replace(",", "")
        scale = SUFFIXES.get(cleaned[-1:].upper(), None) if cleaned else None
        try:
            value = float(cleaned[:-1]) * scale if scale else float(cleaned)
        except ValueError:
            raise LmscaleError(
                f"{option} must be a number such as 4M, 2T or 70e9, got '{text}'"
            ) from None
    if not math.isfinite(value) or value <= 0:
        raise LmscaleError(f"{option} must be positive, got '{text}'")
    return value


def parse_counts(text: str, option: str) -> list[float]:
    """A comma-separated list of counts: `"0.5M,1M,2M"`."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise LmscaleError(f"{option} needs at least one value")
    return [parse_count(item, option) for item in items]


def fmt_count(value: float) -> str:
    """1.2B, 340M, 4.1K: three significant digits and a decimal suffix."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def fmt_bytes(n_bytes: float) -> str:
    """Bytes in GiB (as GPU memory is sized), MiB below one GiB."""
    if abs(n_bytes) >= GiB:
        return f"{n_bytes / GiB:.2f} GiB"
    return f"{n_bytes / 2**20:.1f} MiB"


def fmt_seconds(seconds: float) -> str:
    """A duration in the largest unit that keeps it readable (ms, s, min, h, days, years)."""
    if not math.isfinite(seconds):
        return "inf"
    for unit, scale in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * scale if unit != "min" else seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    return f"{seconds * 1e3:.3g} ms"


def fmt_money(dollars: float) -> str:
    """US dollars, rounded to what a budget discussion needs."""
    if dollars >= 1e6:
        return f"${dollars / 1e6:.3g}M"
    if dollars >= 1e3:
        return f"${dollars / 1e3:.3g}K"
    return f"${dollars:.2f}"
