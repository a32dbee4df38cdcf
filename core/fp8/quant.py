"""FP8 quantization for training: per-step statistics (``FP8Stats``: amax, scales, overflows, flushes, SQNR and
whether every scale is a power of 2), ``quantize_spec`` (one tensor per a recipe's ``QuantSpec``, including the
128x1 re-tiling), and the straight-through fake-quantization functions (``fake_quant``, ``quant_grad``,
``quant_act`` / ``quant_weight`` / ``quant_output_grad``, ``make_scalers``) kept for GEMMs written by hand.

V3 report §3.3.2 (fine-grained online quantization); the GEMMs that use these live in core/fp8/training.py.
"""

from __future__ import annotations

import math

import torch

from core.fp8.formats import _check_overflow, get_format
from core.fp8.recipe import FP8Recipe, QuantSpec, get_recipe
from core.fp8.scaling import DelayedScaler, _check_gran, dequantize, overflow_count, quantize

__all__ = [
    "FP8Stats", "fake_quant", "quant_grad", "quant_act", "quant_weight", "quant_output_grad", "make_scalers",
    "quantize_spec",
]


class FP8Stats:
    """Per-step FP8 statistics collector shared by FP8Linear modules (read and reset by the trainer).

    ``record`` is called for every quantized operand; entries are keyed "<module name>.<role>" with role
    act / weight / grad (Fprop / Dgrad operands), act_wgrad / grad_wgrad (re-tiled Wgrad operands), swiglu_cache;
    the routed experts' two GEMMs record under "<experts>.up" and "<experts>.down". Each entry keeps fmt,
    granularity and scale_pow2 (every scale so far an exact power of 2).
    ``snapshot()`` returns {"tensors": {key: {...}}, "overflow_count",
    "flushed_to_zero_count", "numel", "flushed_to_zero_fraction", "amax_max", "scale_min", "scale_max"}.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._entries: dict[str, dict] = {}

    def record(self, name: str, role: str, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
               fmt: str, granularity: str, block_size: int = 128, overflow: int | None = None,
               x_hat: torch.Tensor | None = None) -> None:
        """Add one quantization of ``x`` (-> ``q`` with ``scale``). ``overflow``: the overflow count if the
        caller knows it (0 for current scaling, by construction); computed from x and scale otherwise.
        ``x_hat``: the dequantized tensor, to accumulate the error energy (the entry's ``sqnr_db``)."""
        if not self.enabled:
            return
        with torch.no_grad():
            xd = x.detach()
            amax = float(xd.abs().amax())
            gran = "tile" if granularity == "tile_t" else granularity  # tile_t entries hold the transposed x
            ovf = overflow_count(xd, scale, fmt, gran, block_size) if overflow is None else int(overflow)
            sig = float(xd.double().square().sum())
            err = float((x_hat.detach().double() - xd.double()).square().sum()) if x_hat is not None else None
            flushed = int(((q == 0) & (xd != 0)).sum())
            s_min, s_max = float(scale.min()), float(scale.max())
            pow2 = bool((torch.frexp(scale.float())[0].abs() == 0.5).all())
        key = f"{name}.{role}" if name else role
        e = self._entries.get(key)
        if e is None:
            e = self._entries[key] = {"calls": 0, "numel": 0, "amax": 0.0, "last_amax": 0.0, "overflow_count": 0,
                                      "flushed_to_zero_count": 0, "scale_min": math.inf, "scale_max": 0.0,
                                      "fmt": fmt, "granularity": granularity, "scale_pow2": True,
                                      "signal_energy": 0.0, "error_energy": None}
        e["calls"] += 1
        e["numel"] += xd.numel()
        e["amax"] = max(e["amax"], amax)
        e["last_amax"] = amax
        e["overflow_count"] += ovf
        e["flushed_to_zero_count"] += flushed
        e["scale_min"] = min(e["scale_min"], s_min)
        e["scale_max"] = max(e["scale_max"], s_max)
        e["scale_pow2"] = e["scale_pow2"] and pow2
        e["signal_energy"] += sig
        if err is not None:
            e["error_energy"] = (e["error_energy"] or 0.0) + err

    def snapshot(self) -> dict:
        """Totals, and per tensor its entry plus ``sqnr_db`` = 10·log10(Σx² / Σ(x̂-x)²) (None when no error was
        recorded; inf for an exact quantization)."""
        tensors = {k: dict(v) for k, v in self._entries.items()}
        for v in tensors.values():
            sig, err = v["signal_energy"], v["error_energy"]
            v["sqnr_db"] = None if err is None else (math.inf if err == 0 else 10 * math.log10(max(sig, 1e-300) / err))
        numel = sum(v["numel"] for v in tensors.values())
        flushed = sum(v["flushed_to_zero_count"] for v in tensors.values())
        return {
            "tensors": tensors,
            "overflow_count": sum(v["overflow_count"] for v in tensors.values()),
            "flushed_to_zero_count": flushed,
            "numel": numel,
            "flushed_to_zero_fraction": flushed / numel if numel else 0.0,
            "amax_max": max((v["amax"] for v in tensors.values()), default=0.0),
            "scale_min": min((v["scale_min"] for v in tensors.values()), default=math.inf),
            "scale_max": max((v["scale_max"] for v in tensors.values()), default=0.0),
        }

    def reset(self) -> None:
        self._entries.clear()


def _qdq(x: torch.Tensor, fmt, granularity, block_size, overflow, scale_fmt, scale, scaler, stats, name, role):
    """quantize -> dequantize (in x's dtype), optionally recording stats. Shared by the autograd functions."""
    current = scaler is None and scale is None
    if scaler is not None:
        scale = scaler.scale_for(x)
    q, s = quantize(x, fmt, granularity, block_size, overflow, scale_fmt, scale)
    if stats is not None:  # current scaling cannot overflow (s >= amax/max), so skip that count
        stats.record(name, role, x, q, s, get_format(fmt).name, granularity, block_size,
                     overflow=0 if current else None)
    return dequantize(q, s, granularity, block_size).to(x.dtype)


class _FakeQuant(torch.autograd.Function):
    """Forward: quantize -> dequantize. Backward: identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, fmt, granularity, block_size, overflow, scale_fmt, scale, scaler, stats, name, role):
        return _qdq(x, fmt, granularity, block_size, overflow, scale_fmt, scale, scaler, stats, name, role)

    @staticmethod
    def backward(ctx, g):
        return (g,) + (None,) * 10


class _QuantGrad(torch.autograd.Function):
    """Forward: identity. Backward: quantize -> dequantize the incoming gradient."""

    @staticmethod
    def forward(ctx, y, fmt, granularity, block_size, overflow, scale_fmt, scaler, stats, name):
        ctx.args = (fmt, granularity, block_size, overflow, scale_fmt, scaler, stats, name)
        return y.clone()  # not a view: callers may modify the GEMM output in place

    @staticmethod
    def backward(ctx, g):
        fmt, granularity, block_size, overflow, scale_fmt, scaler, stats, name = ctx.args
        gq = _qdq(g.contiguous(), fmt, granularity, block_size, overflow, scale_fmt, None, scaler, stats, name, "grad")
        return (gq,) + (None,) * 8


def fake_quant(x: torch.Tensor, fmt: str = "e4m3", granularity: str = "tile", block_size: int = 128,
               overflow: str = "saturate", scale_fmt: str | None = None, scale: torch.Tensor | None = None, *,
               scaler: DelayedScaler | None = None, stats: FP8Stats | None = None, name: str = "",
               role: str = "act") -> torch.Tensor:
    """FP8 fake quantization with a straight-through gradient: forward returns dequantize(quantize(x))
    in x's dtype and shape; backward passes the gradient unchanged. ``scaler`` (delayed scaling) or
    ``scale`` override the current-amax scale. Works on 3-D expert weights [E, out, in] with "block"
    (one set of 128x128 blocks per expert)."""
    get_format(fmt)
    _check_gran(granularity, block_size)
    _check_overflow(overflow)
    return _FakeQuant.apply(x, fmt, granularity, block_size, overflow, scale_fmt, scale, scaler, stats, name, role)


def quant_grad(y: torch.Tensor, fmt: str = "e4m3", granularity: str = "tile", block_size: int = 128,
               overflow: str = "saturate", scale_fmt: str | None = None, *, scaler: DelayedScaler | None = None,
               stats: FP8Stats | None = None, name: str = "") -> torch.Tensor:
    """Identity forward; in backward the incoming gradient dL/dy is quantized -> dequantized with
    ``fmt``/``granularity`` (tiles along y's last dim, i.e. per token per 128 output channels), so
    the Dgrad (dX = dY·W) and Wgrad (dW = dYᵀ·X) GEMMs see an FP8 dY."""
    get_format(fmt)
    _check_gran(granularity, block_size)
    _check_overflow(overflow)
    return _QuantGrad.apply(y, fmt, granularity, block_size, overflow, scale_fmt, scaler, stats, name)


def make_scalers(recipe: str | FP8Recipe) -> dict[str, DelayedScaler] | None:
    """Delayed-scaling state for one GEMM: {"act", "weight", "grad"} scalers, or None for current scaling."""
    r = get_recipe(recipe)
    if r.scaling != "delayed":
        return None
    mk = lambda f, g: DelayedScaler(f, g, r.block_size, r.history_len, r.amax_algo, scale_fmt=r.scale_fmt)  # noqa: E731
    return {"act": mk(r.act_fmt, r.act_gran), "weight": mk(r.weight_fmt, r.weight_gran),
            "grad": mk(r.grad_fmt, r.grad_gran)}


def _scaler(scalers, role):
    return None if scalers is None else scalers.get(role)


def quant_act(x: torch.Tensor, recipe: str | FP8Recipe = "deepseek-gemm", *, stats: FP8Stats | None = None,
              name: str = "", scalers: dict | None = None) -> torch.Tensor:
    """Fake-quantize a GEMM input activation per the recipe (STE backward)."""
    r = get_recipe(recipe)
    return fake_quant(x, r.act_fmt, r.act_gran, r.block_size, r.overflow, r.scale_fmt,
                      scaler=_scaler(scalers, "act"), stats=stats, name=name, role="act")


def quant_weight(w: torch.Tensor, recipe: str | FP8Recipe = "deepseek-gemm", *, stats: FP8Stats | None = None,
                 name: str = "", scalers: dict | None = None) -> torch.Tensor:
    """Fake-quantize a weight [out, in] or expert weights [E, out, in] per the recipe (STE backward)."""
    r = get_recipe(recipe)
    return fake_quant(w, r.weight_fmt, r.weight_gran, r.block_size, r.overflow, r.scale_fmt,
                      scaler=_scaler(scalers, "weight"), stats=stats, name=name, role="weight")


def quant_output_grad(y: torch.Tensor, recipe: str | FP8Recipe = "deepseek-gemm", *, stats: FP8Stats | None = None,
                      name: str = "", scalers: dict | None = None) -> torch.Tensor:
    """Mark a GEMM output so its incoming gradient is quantized per the recipe."""
    r = get_recipe(recipe)
    return quant_grad(y, r.grad_fmt, r.grad_gran, r.block_size, r.overflow, r.scale_fmt,
                      scaler=_scaler(scalers, "grad"), stats=stats, name=name)


def quantize_spec(x: torch.Tensor, spec: QuantSpec, overflow: str = "saturate", scaler: DelayedScaler | None = None,
                  stats: FP8Stats | None = None, name: str = "", role: str = "act"):
    """Quantize ``x`` per ``spec`` -> (x_hat, q, scale): x_hat = dequantize(q, scale) in x's dtype. "tile_t"
    (block_size x 1, along the rows) quantizes x^T in 1 x block_size tiles; its q and scale are of x^T."""
    current = scaler is None
    t = spec.granularity == "tile_t"
    g = "tile" if t else spec.granularity
    src = x.transpose(-2, -1) if t else x
    s = None if current else scaler.scale_for(src)
    q, s = quantize(src, spec.fmt, g, spec.block_size, overflow, spec.scale_fmt, s)
    x_hat = dequantize(q, s, g, spec.block_size).to(x.dtype)
    if stats is not None:  # current scaling cannot overflow (s >= amax/max), so skip that count
        stats.record(name, role, src, q, s, spec.fmt, spec.granularity, spec.block_size,
                     overflow=0 if current else None, x_hat=x_hat)
    return (x_hat.transpose(-2, -1) if t else x_hat), q, s
