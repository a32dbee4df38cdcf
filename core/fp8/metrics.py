"""FP8 quantization error metrics (SQNR, relative error, flush-to-zero and overflow counts, the same
figures on the non-outlier part) and deterministic test tensors (Gaussian, heavy-tailed, outlier
channels) for the FP8 lab.

Measures what V3 report §3.3.2 "Fine-Grained Quantization" is about: per-tensor scaling lets a few
outlier channels flush everything else to zero; 1x128 tiles / 128x128 blocks do not.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from core.fp8.formats import FP8Format
from core.fp8.scaling import dequantize, overflow_count, quantize

__all__ = ["error_metrics", "quantize_and_measure", "make_test_tensor"]


def _sqnr_db(sig: float, err: float) -> float:
    if err == 0:
        return math.inf
    if sig == 0:
        return -math.inf
    if math.isnan(err) or math.isinf(err):
        return math.nan if math.isnan(err) else -math.inf
    return 10.0 * math.log10(sig / err)


def error_metrics(x: torch.Tensor, x_hat: torch.Tensor, outlier_mask: torch.Tensor | None = None, *,
                  scale: torch.Tensor | None = None, fmt: str | FP8Format | None = None,
                  granularity: str | None = None, block_size: int = 128) -> dict:
    """Quantization error of ``x_hat`` against ``x`` (computed in float64).

    Keys: sqnr_db = 10·log10(Σx²/Σ(x-x̂)²), rel_error = ||x-x̂||_F/||x||_F, max_abs_error, mse,
    flushed_to_zero_count / _fraction (nonzero x that became exactly 0; fraction of nonzero x),
    nonfinite_count (finite x whose x̂ is NaN/inf), overflow_count, numel.
    overflow_count: if ``scale``, ``fmt`` and ``granularity`` are given it is ``overflow_count(x, scale,
    ...)`` (values clamped or turned NaN/inf); otherwise it equals nonfinite_count (visible overflows).
    With ``outlier_mask`` (bool, broadcastable to x, True = outlier) the same sqnr/rel/max/flush figures
    are added for the non-outlier part with suffix ``_non_outlier`` (whole-tensor SQNR is dominated by
    the outliers' energy and hides the damage done to everything else; docs/performance.md has figures).
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"x_hat: shape {tuple(x_hat.shape)} differs from x {tuple(x.shape)}")
    xd = x.detach().double()
    hd = x_hat.detach().double()
    err = hd - xd

    def part(sel: torch.Tensor | None) -> dict:
        xs = xd if sel is None else xd[sel]
        es = err if sel is None else err[sel]
        hs = hd if sel is None else hd[sel]
        sig = float((xs * xs).sum())
        e2 = float((es * es).sum())
        nz = xs != 0
        flushed = int((nz & (hs == 0)).sum())
        n_nz = int(nz.sum())
        return {
            "sqnr_db": _sqnr_db(sig, e2),
            "rel_error": (math.sqrt(e2 / sig) if sig > 0 else (0.0 if e2 == 0 else math.inf)),
            "max_abs_error": float(es.abs().max()) if es.numel() else 0.0,
            "mse": e2 / max(1, es.numel()),
            "flushed_to_zero_count": flushed,
            "flushed_to_zero_fraction": flushed / n_nz if n_nz else 0.0,
        }

    out = part(None)
    nonfinite = int((torch.isfinite(xd) & ~torch.isfinite(hd)).sum())
    out["nonfinite_count"] = nonfinite
    if scale is not None and fmt is not None and granularity is not None:
        out["overflow_count"] = overflow_count(x, scale, fmt, granularity, block_size)
    else:
        out["overflow_count"] = nonfinite
    out["numel"] = x.numel()
    if outlier_mask is not None:
        mask = torch.as_tensor(outlier_mask, dtype=torch.bool).expand(x.shape)
        for k, v in part(~mask).items():
            out[f"{k}_non_outlier"] = v
        out["outlier_count"] = int(mask.sum())
    return out


def quantize_and_measure(x: torch.Tensor, fmt: str | FP8Format = "e4m3", granularity: str = "tensor",
                         block_size: int = 128, overflow: str = "saturate", scale_fmt: str | None = None,
                         scale: torch.Tensor | None = None, outlier_mask: torch.Tensor | None = None) -> dict:
    """One call for the FP8 lab: quantize, dequantize and measure. Returns a dict with q, scale, x_hat
    (tensors), the ``error_metrics`` figures (overflow_count from x and the scale) and n_scales."""
    q, s = quantize(x, fmt, granularity, block_size, overflow, scale_fmt, scale)
    x_hat = dequantize(q, s, granularity, block_size)
    m = error_metrics(x, x_hat, outlier_mask, scale=s, fmt=fmt, granularity=granularity, block_size=block_size)
    m.update(q=q, scale=s, x_hat=x_hat, n_scales=s.numel())
    return m


def make_test_tensor(kind: str = "gaussian", shape: Sequence[int] = (1024, 1024), seed: int = 0,
                     outlier_channels: int = 4, outlier_scale: float = 1e4) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic float32 test data and its outlier mask (bool, x's shape).

    kind="gaussian": N(0,1). "heavy_tail": Student-t with 3 degrees of freedom (z / sqrt(chi²_3/3)).
    "outliers": N(0,1) with ``outlier_channels`` columns of the last dim (chosen by the seeded
    generator, like the few fixed hidden channels that carry LLM activation outliers) multiplied by
    ``outlier_scale``; the mask marks those columns. For the other kinds the mask is all False.
    """
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"shape: expected a non-empty tuple of positive ints, got {shape!r}")
    g = torch.Generator().manual_seed(int(seed))
    mask = torch.zeros(shape, dtype=torch.bool)
    if kind == "gaussian":
        x = torch.randn(shape, generator=g)
    elif kind == "heavy_tail":
        z = torch.randn(shape, generator=g)
        chi2 = torch.randn((3,) + shape, generator=g).pow(2).sum(0)
        x = z / torch.sqrt(chi2 / 3.0)
    elif kind == "outliers":
        K = shape[-1]
        if not 0 <= outlier_channels <= K:
            raise ValueError(f"outlier_channels: expected 0..{K} (the last dim), got {outlier_channels}")
        x = torch.randn(shape, generator=g)
        cols = torch.randperm(K, generator=g)[:outlier_channels]
        x[..., cols] *= float(outlier_scale)
        mask[..., cols] = True
    else:
        raise ValueError(f"kind: expected 'gaussian', 'heavy_tail' or 'outliers', got {kind!r}")
    return x, mask
