"""Number formatting for labels, metric cards and the CLI: bytes (binary units), counts, tokens, FLOPs, ratios.

The one place these strings are made; app/ and pages/ import from here.
"""
from __future__ import annotations

__all__ = ["BYTE_UNITS", "byte_unit", "human_bytes", "human_count", "tokens", "flops", "ratio_text"]

BYTE_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


def byte_unit(max_bytes: float) -> tuple[str, float]:
    """The largest binary unit in which `max_bytes` is >= 1 (so an axis reads 1.5 GiB, not 1610612736 B)."""
    for name, div in BYTE_UNITS:
        if abs(max_bytes) >= div:
            return name, float(div)
    return "B", 1.0


def human_bytes(n: float) -> str:
    """Binary units: 1536 -> '1.50 KiB', 100 -> '100 B'."""
    name, div = byte_unit(n)
    return f"{n:.0f} B" if name == "B" else f"{n / div:.2f} {name}"


def human_count(n: float) -> str:
    """1_234_567_890 -> '1.23B'."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


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
    """1.5e12 -> '1.50 TFLOP' (decimal units, as FLOP counts are quoted)."""
    for name, div in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {name}"
    return f"{x:.0f} FLOP"


def ratio_text(value: float, target: float | None = None) -> str:
    """A ratio as shown beside its target: two decimals, three where two would round onto the target and so hide
    on which side it lies (1.399× against a 1.4× target is not "1.40×"). No target (None or NaN): two decimals."""
    text = f"{value:.2f}×"
    return f"{value:.3f}×" if float(text[:-1]) == target and value != target else text
