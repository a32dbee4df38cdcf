"""Unit helpers for axes and labels (binary byte units, token counts, FLOPs)."""
from __future__ import annotations

BYTE_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


def byte_unit(max_bytes: float) -> tuple[str, float]:
    """The largest binary unit in which `max_bytes` is >= 1 (so an axis reads 1.5 GiB, not 1610612736 B)."""
    for name, div in BYTE_UNITS:
        if abs(max_bytes) >= div:
            return name, float(div)
    return "B", 1.0


def tokens(n: float) -> str:
    """131072 -> '128K', 1048576 -> '1M' (powers of two read as K = 1024 tokens, like model cards)."""
    n = int(n)
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    if n >= 10_000:
        return f"{n / 1000:.0f}K" if n < 1e6 else f"{n / 1e6:.1f}M"
    return f"{n:,}"


def flops(x: float) -> str:
    for name, div in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {name}"
    return f"{x:.0f} FLOP"


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"
