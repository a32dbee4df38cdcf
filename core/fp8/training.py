"""FP8 training primitives: per-step statistics (``FP8Stats``), fake-quantization autograd functions
(straight-through forward quantization, quantized gradients), the FP8 GEMM with explicit Fprop / Dgrad / Wgrad
operands (``fp8_gemm_train``), ``fp8_linear``, ``FP8Ops`` for the MoE experts (GEMMs, SwiGLU cache, combine),
``FP8Linear`` and ``convert_to_fp8``. The recipes themselves are data in core/fp8/recipe.py.

Implements V3 report §3.3.1 "Mixed Precision Framework" (Fig. 6: Fprop, Dgrad and Wgrad take FP8
operands; embedding, output head, MoE gating and norms stay in high precision) with the §3.3.2
scaling and the §3.3.3 storage/communication rules; App. B.2 is why gradients use 1x128 tiles. GEMMs are
emulated (quantize -> dequantize -> fp32/bf16 matmul), so this runs on a CPU.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Sequence

import torch
import torch.nn as nn

from core.fp8.formats import _check_overflow, get_format
from core.fp8.matmul import limited_block_gemm
from core.fp8.recipe import FP8Recipe, QuantSpec, get_recipe, operand_specs, swiglu_cache_spec
from core.fp8.scaling import DelayedScaler, _check_gran, dequantize, overflow_count, quantize
from core.gemm import Linear, linear
from core.layers import swiglu

__all__ = [
    "FP8Stats", "fake_quant", "quant_grad", "quant_act", "quant_weight", "quant_output_grad", "make_scalers",
    "quantize_spec", "fp8_gemm_train", "fp8_linear", "FP8Ops", "FP8Linear", "DEFAULT_SKIP", "site_of",
    "convert_to_fp8", "get_fp8_stats",
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


def _segments(t: torch.Tensor, sizes: list[int] | None) -> list[torch.Tensor]:
    return [t] if sizes is None else list(t.split(sizes))


class _FP8Gemm(torch.autograd.Function):
    """y = x @ W^T with FP8 operands in all three GEMMs, each quantized per ``operand_specs`` (V3 report Fig. 6):
    Fprop x·W^T, Dgrad dX = dY·W, Wgrad dW = dY^T·x. x [S, K]; W [N, K], or [E, N, K] with x's rows sorted into
    E contiguous segments (``sizes``; the expert layout). In Wgrad, x is re-quantized from its stored FP8 copy
    (or recomputed by ``plan.x_recompute``), and with 128x1 tiles each group stays inside one expert's segment
    (DeepGEMM's contiguous layout aligns segments to the block)."""

    @staticmethod
    def forward(ctx, x, w, plan):
        sp, o = plan.specs, plan.ops
        xq, x_q, x_s = quantize_spec(x, sp["x"], o.recipe.overflow, plan.scaler("act", x), o.stats, plan.name, "act")
        wq, w_q, w_s = quantize_spec(w, sp["w"], o.recipe.overflow, plan.scaler("weight", w), o.stats, plan.name,
                                     "weight")
        if o.recipe.accumulation == "limited":  # Fprop on the ~14-bit accumulator with promotion (§3.3.2)
            r = o.recipe
            acc = lambda a_q, a_s, b_q, b_s: limited_block_gemm(  # noqa: E731
                a_q, a_s, b_q, b_s, r.block_size, r.acc_mantissa_bits, r.promote_every).to(x.dtype)
            if plan.sizes is None:
                y = acc(x_q, x_s, w_q, w_s)
            else:
                parts = [acc(a, s_, w_q[e], w_s[e]) for e, (a, s_) in
                         enumerate(zip(x_q.split(plan.sizes), x_s.split(plan.sizes))) if plan.sizes[e]]
                y = torch.cat(parts) if parts else x.new_zeros(0, w.shape[-2])
        else:
            y = plan.mm(xq, wq)
        ctx.plan = plan
        ctx.save_for_backward(xq, wq)
        return y

    @staticmethod
    def backward(ctx, g):
        plan = ctx.plan
        sp, o = plan.specs, plan.ops
        xq, wq = ctx.saved_tensors
        g = g.contiguous()
        gd, _, _ = quantize_spec(g, sp["dy"], o.recipe.overflow, plan.scaler("grad", g), o.stats, plan.name, "grad")
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = plan.mm(gd, wq.transpose(-2, -1).contiguous())  # Dgrad: W reused (square blocks)
        if ctx.needs_input_grad[1]:
            x_src = plan.x_recompute() if plan.x_recompute is not None else xq
            retile_x = sp["x_wgrad"] != sp["x"] or plan.x_recompute is not None
            retile_g = sp["dy_wgrad"] != sp["dy"]
            dws = []
            for xs, gs, gds in zip(_segments(x_src, plan.sizes), _segments(g, plan.sizes), _segments(gd, plan.sizes)):
                if not xs.shape[0]:
                    dws.append(wq.new_zeros(wq.shape[-2:]))
                    continue
                quant = lambda t, k, role: quantize_spec(  # noqa: E731
                    t, sp[k], o.recipe.overflow, None, o.stats, plan.name, role)[0]
                xw = quant(xs, "x_wgrad", "act_wgrad") if retile_x else xs
                gw = quant(gs, "dy_wgrad", "grad_wgrad") if retile_g else gds
                dws.append(gw.transpose(0, 1) @ xw)
            dw = dws[0] if plan.sizes is None else torch.stack(dws)
        return dx, dw, None


class _GemmPlan:
    """What one FP8 GEMM call needs besides its tensors (kept on the autograd context)."""

    def __init__(self, ops: "FP8Ops", site: str, mm, sizes, x_recompute, scalers):
        self.ops, self.specs, self.mm, self.sizes = ops, operand_specs(ops.recipe, site), mm, sizes
        self.x_recompute, self._scalers = x_recompute, scalers
        # the two expert GEMMs share one FP8Ops: their stats go under "<name>.up" / "<name>.down"
        self.name = f"{ops.name}.{site[len('expert_'):]}" if site.startswith("expert_") else ops.name

    def scaler(self, role: str, t: torch.Tensor) -> DelayedScaler | None:
        return self._scalers(role, t) if self._scalers is not None else None


def _plain_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return linear(a, w)


def fp8_gemm_train(x: torch.Tensor, w: torch.Tensor, ops: "FP8Ops", site: str = "linear", mm=None,
                   sizes: list[int] | None = None, x_recompute=None) -> torch.Tensor:
    """x [S, K] @ W^T with all three GEMMs in FP8 per ``ops.recipe`` at ``site`` (see ``_FP8Gemm``).
    ``mm(a, w)``: the high-precision GEMM of the dequantized operands (default core.gemm.linear; the experts pass
    their grouped GEMM and ``sizes``). ``x_recompute()``: x for Wgrad (the SwiGLU recompute)."""
    plan = _GemmPlan(ops, site, mm or _plain_mm, sizes, x_recompute, ops.scaler_for)
    return _FP8Gemm.apply(x, w, plan)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               recipe: str | FP8Recipe = "deepseek-gemm", *, stats: FP8Stats | None = None, name: str = "",
               scalers: dict | None = None, site: str = "linear") -> torch.Tensor:
    """y = x·W^T (+ b) with FP8 operands in Fprop, Dgrad and Wgrad (V3 report §3.3.1, Fig. 6) per the recipe's
    ``operand_specs`` at ``site`` ("attn_out" for the Linear after attention); accumulation and outputs stay
    fp32/bf16 (or the recipe's limited accumulator in Fprop). The bias (DeepSeek has none) is added in high
    precision. Delayed recipes need ``scalers`` (see ``make_scalers``). x: [..., K] -> [..., N]."""
    r = get_recipe(recipe)
    if r.scaling == "delayed" and scalers is None:
        raise ValueError(f"scalers: recipe {r.name!r} uses delayed scaling; pass scalers=make_scalers(recipe)")
    ops = FP8Ops(r, stats, name)
    ops.scaler_for = (lambda role, t: scalers.get(role)) if scalers is not None else None
    y = fp8_gemm_train(x.reshape(-1, x.shape[-1]), weight, ops, site).reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


class _RoundBF16(torch.autograd.Function):
    """BF16 rounding of the forward value (``forward=True``) or of the gradient (``forward=False``); the other
    direction passes unchanged. The MoE combine in BF16 (V3 report §3.3.3)."""

    @staticmethod
    def forward(ctx, t, fwd):
        ctx.fwd = fwd
        return t.to(torch.bfloat16).to(t.dtype) if fwd else t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return (g if ctx.fwd else g.to(torch.bfloat16).to(g.dtype)), None


class _SwiGLUFromCache(torch.autograd.Function):
    """h = SwiGLU(gate, up)·w from the exact gate/up in forward; backward recomputes it from ``cached``, the FP8
    copy of [gate, up] (V3 report §3.3.3: the SwiGLU inputs are cached in FP8 and the output recomputed)."""

    @staticmethod
    def forward(ctx, gu, weight, cached):
        ctx.save_for_backward(cached, weight)
        gate, up = gu.chunk(2, dim=-1)
        return swiglu(gate, up, weight)

    @staticmethod
    def backward(ctx, dh):
        cached, weight = ctx.saved_tensors
        with torch.enable_grad():
            c = cached.detach().requires_grad_(True)
            w = weight.detach().requires_grad_(ctx.needs_input_grad[1])
            h = swiglu(*c.chunk(2, dim=-1), w)
            grads = torch.autograd.grad(h, [c, w] if w.requires_grad else [c], dh)
        return grads[0], (grads[1] if len(grads) > 1 else None), None


class FP8Ops:
    """FP8 hook object for core.moe.Experts (its ``fp8`` attribute) and the engine of FP8Linear.

    New interface (used by Experts when present): ``gemm(x, w, sizes, mm, site, x_recompute)``,
    ``swiglu(gu, weight)`` -> (h, recompute or None), ``combine(out)``, ``combine_grad(x)``. The older
    ``quant_act(x)``, ``quant_weight(w)``, ``quant_grad(y)`` apply the recipe to x, to w [out, in] or
    [E, out, in] (blocks per expert) and to the gradient of y (straight-through).

    Delayed scaling needs one history per operand: scalers are keyed by (role, shape without the token
    dim) — act [S, K] -> (K,), grad [S, N] -> (N,), weight -> its full shape — so the two expert GEMMs
    (gate_up and down) keep separate histories unless their dims coincide (then they share one window,
    which with algo "max" only makes the scale more conservative). Stats are recorded per role under
    ``name`` (both expert GEMMs add to the same "<name>.act" / ".weight" / ".grad" entries).
    """

    def __init__(self, recipe: str | FP8Recipe = "deepseek-gemm", stats: FP8Stats | None = None, name: str = ""):
        self.recipe = get_recipe(recipe)
        self.stats = stats
        self.name = name
        self._scalers: dict[tuple, DelayedScaler] = {}
        self.scaler_for = self._scaler if self.recipe.scaling == "delayed" else None

    def _scaler(self, role: str, t: torch.Tensor) -> DelayedScaler | None:
        r = self.recipe
        if r.scaling != "delayed":
            return None
        key = (role, tuple(t.shape) if role == "weight" else tuple(t.shape[1:]))
        if key not in self._scalers:
            f, g = {"act": (r.act_fmt, r.act_gran), "weight": (r.weight_fmt, r.weight_gran),
                    "grad": (r.grad_fmt, r.grad_gran)}[role]
            self._scalers[key] = DelayedScaler(f, g, r.block_size, r.history_len, r.amax_algo, scale_fmt=r.scale_fmt)
        return self._scalers[key]

    def gemm(self, x: torch.Tensor, w: torch.Tensor, sizes: list[int] | None = None, mm=None, site: str = "linear",
             x_recompute=None) -> torch.Tensor:
        return fp8_gemm_train(x, w, self, site, mm, sizes, x_recompute)

    def swiglu(self, gu: torch.Tensor, weight: torch.Tensor):
        """SwiGLU of the expert GEMM output gu [S, 2I] times the routing weights [S, 1] -> (h [S, I], recompute):
        with ``swiglu_recompute`` gu is cached in FP8 and ``recompute()`` gives h from that cache (for the down
        projection's Wgrad); otherwise recompute is None and autograd keeps gu."""
        spec = swiglu_cache_spec(self.recipe)
        if spec is None:
            return swiglu(*gu.chunk(2, dim=-1), weight), None
        cached = quantize_spec(gu.detach(), spec, self.recipe.overflow, None, self.stats, self.name, "swiglu_cache")[0]
        w = weight.detach()
        return _SwiGLUFromCache.apply(gu, weight, cached), lambda: swiglu(*cached.chunk(2, dim=-1), w)

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        """Expert outputs before they are summed per token: BF16 with ``combine_bf16``."""
        return _RoundBF16.apply(out, True) if self.recipe.combine_bf16 else out

    def combine_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Dispatched expert inputs: their gradient, sent back to the tokens, in BF16 with ``combine_bf16``."""
        return _RoundBF16.apply(x, False) if self.recipe.combine_bf16 else x

    def quant_act(self, x: torch.Tensor) -> torch.Tensor:
        return quant_act(x, self.recipe, stats=self.stats, name=self.name, scalers={"act": self._scaler("act", x)})

    def quant_weight(self, w: torch.Tensor) -> torch.Tensor:
        return quant_weight(w, self.recipe, stats=self.stats, name=self.name,
                            scalers={"weight": self._scaler("weight", w)})

    def quant_grad(self, y: torch.Tensor) -> torch.Tensor:
        return quant_output_grad(y, self.recipe, stats=self.stats, name=self.name,
                                 scalers={"grad": self._scaler("grad", y)})

    def __repr__(self) -> str:
        return f"FP8Ops(recipe={self.recipe.name!r}, name={self.name!r})"


#: Linears whose forward is the plain GEMM (`convert_to_fp8` replaces only these: a subclass with its own
#: forward would lose its behaviour).
_STOCK_FORWARDS = (nn.Linear.forward, Linear.forward)


class FP8Linear(nn.Linear):
    """nn.Linear whose forward and backward GEMMs use FP8 operands (emulated) per an ``FP8Recipe``.

    Same parameters and state_dict as nn.Linear (weights stay fp32/bf16 master copies; delayed-scaling
    amax histories are runtime state, not saved). Optional ``stats`` (FP8Stats) records per-step amax,
    scales, overflows and flushes under ``fp8_name``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 recipe: str | FP8Recipe = "deepseek-gemm", stats: FP8Stats | None = None, name: str = ""):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = get_recipe(recipe)
        self.stats = stats
        self.fp8_name = name
        self.scalers = make_scalers(self.recipe)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: str | FP8Recipe = "deepseek-gemm", stats: FP8Stats | None = None,
                    name: str = "") -> "FP8Linear":
        """Wrap an existing nn.Linear, sharing its Parameter objects (no re-initialisation, and an
        optimizer built before the conversion still points at the same tensors)."""
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta",
                  recipe=recipe, stats=stats, name=name)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.recipe, stats=self.stats, name=self.fp8_name,
                          scalers=self.scalers, site=site_of(self.fp8_name))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", recipe={self.recipe.name}"


#: Qualified-name patterns kept in high precision (V3 report §3.3.1: embedding, output head, MoE
#: gating/router, normalization; attention score/softmax operators are not nn.Linear and never
#: converted). Matching: a pattern without "." is fnmatch'ed against each dot-separated component
#: ("gate" matches "layers.3.mlp.gate" but NOT "gate_proj"); a pattern with "." against the full name.
DEFAULT_SKIP: tuple[str, ...] = ("lm_head", "head", "embed*", "gate", "router", "*norm*", "score*")


def site_of(name: str) -> str:
    """The recipe site of a Linear by its qualified name: "attn_out" for o_proj (the Linear after attention,
    V3 report §3.3.3), "linear" for every other converted Linear."""
    return "attn_out" if name.rpartition(".")[2] == "o_proj" else "linear"


def _skipped(name: str, patterns: Sequence[str]) -> bool:
    parts = name.split(".") if name else []
    for p in patterns:
        if "." in p:
            if fnmatch.fnmatchcase(name, p):
                return True
        elif any(fnmatch.fnmatchcase(c, p) for c in parts):
            return True
    return False


def convert_to_fp8(model: nn.Module, recipe: str | FP8Recipe = "deepseek-gemm", skip: Sequence[str] = DEFAULT_SKIP,
                   stats: FP8Stats | None = None, hooks: bool = True) -> nn.Module:
    """Put a model's GEMMs in FP8 (emulated), in place.

    - Every nn.Linear (with the stock forward) whose qualified name does not match ``skip`` (see
      DEFAULT_SKIP) becomes an FP8Linear sharing the same Parameter objects (no re-init; an optimizer built
      before still works; state_dict unchanged).
    - ``hooks``: every unskipped submodule with an ``fp8`` attribute set to None (the FP8 hook of
      core.moe.Experts, whose weights are 3-D Parameters, not Linears) gets an ``FP8Ops``.
    Attention projections (q/kv/o) and FFN/expert GEMMs go FP8; embedding, output head, MoE router and
    norms stay high precision, as do the attention score/softmax operators, which are not Linears
    (V3 report §3.3.1). All converted modules share one FP8Stats (created if not given; read it with
    ``get_fp8_stats``). Returns the model (a new FP8Linear if ``model`` itself is an unskipped nn.Linear).
    """
    r = get_recipe(recipe)
    if isinstance(skip, str):
        skip = (skip,)
    stats = stats if stats is not None else FP8Stats()
    if isinstance(model, nn.Linear) and not isinstance(model, FP8Linear) and type(model).forward in _STOCK_FORWARDS:
        return FP8Linear.from_linear(model, r, stats, "")
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, FP8Linear)
               and type(m).forward in _STOCK_FORWARDS and n and not _skipped(n, skip)]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear.from_linear(lin, r, stats, name))
    if hooks:
        for name, m in model.named_modules():
            if not isinstance(m, FP8Linear) and hasattr(m, "fp8") and getattr(m, "fp8") is None \
                    and not _skipped(name, skip):
                m.fp8 = FP8Ops(r, stats, name)
    return model


def get_fp8_stats(model: nn.Module) -> FP8Stats | None:
    """The FP8Stats shared by the model's FP8Linear modules / FP8Ops hooks (None if nothing was converted)."""
    for m in model.modules():
        if isinstance(m, FP8Linear) and m.stats is not None:
            return m.stats
        ops = getattr(m, "fp8", None)
        if isinstance(ops, FP8Ops) and ops.stats is not None:
            return ops.stats
    return None
