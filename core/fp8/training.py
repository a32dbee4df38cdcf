"""FP8 training primitives: recipes (``FP8Recipe``/``RECIPES``), per-step statistics (``FP8Stats``),
fake-quantization autograd functions (straight-through forward quantization, quantized gradients),
``fp8_linear``, ``FP8Ops`` for non-Linear GEMMs (MoE experts), ``FP8Linear`` and ``convert_to_fp8``.

Implements V3 report §3.3.1 "Mixed Precision Framework" (Fig. 6: Fprop, Dgrad and Wgrad take FP8
operands; embedding, output head, MoE gating and norms stay in high precision) with the §3.3.2
scaling; App. B.2 is why gradients use 1x128 tiles. GEMMs are emulated (quantize -> dequantize ->
fp32/bf16 matmul through core.gemm), so this runs on a CPU.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from core.fp8.formats import _check_overflow, get_format
from core.fp8.scaling import AmaxHistory, DelayedScaler, _check_gran, dequantize, overflow_count, quantize
from core.gemm import Linear, linear

__all__ = [
    "FP8Recipe", "RECIPES", "get_recipe", "FP8Stats", "fake_quant", "quant_grad", "quant_act",
    "quant_weight", "quant_output_grad", "make_scalers", "fp8_linear", "FP8Ops", "FP8Linear", "DEFAULT_SKIP",
    "convert_to_fp8", "get_fp8_stats",
]


@dataclass(frozen=True)
class FP8Recipe:
    """Which format, granularity and scaling each operand of a Linear GEMM uses in FP8 training.

    act_*: the Linear input x (Fprop/Wgrad operand); weight_*: W; grad_*: dL/dy (Dgrad/Wgrad operand).
    scaling: "current" (amax of the tensor being cast, a.k.a. online/dynamic) or "delayed" (amax history
    of previous steps; ``history_len``, ``amax_algo`` "max"|"most_recent").
    """

    name: str = "deepseek"
    act_fmt: str = "e4m3"
    weight_fmt: str = "e4m3"
    grad_fmt: str = "e4m3"
    act_gran: str = "tile"
    weight_gran: str = "block"
    grad_gran: str = "tile"
    scaling: str = "current"
    history_len: int = 16
    amax_algo: str = "max"
    block_size: int = 128
    scale_fmt: str | None = None
    overflow: str = "saturate"
    description: str = ""

    def __post_init__(self):
        for f_ in ("act_fmt", "weight_fmt", "grad_fmt"):
            get_format(getattr(self, f_), allow_bf16=False)
        for g_ in ("act_gran", "weight_gran", "grad_gran"):
            _check_gran(getattr(self, g_), self.block_size)
        if self.scaling not in ("current", "delayed"):
            raise ValueError(f"scaling: expected 'current' or 'delayed', got {self.scaling!r}")
        AmaxHistory(self.history_len, self.amax_algo)  # validates both
        _check_overflow(self.overflow)
        if self.scale_fmt not in (None, "ue8m0"):
            raise ValueError(f"scale_fmt: expected None or 'ue8m0', got {self.scale_fmt!r}")


RECIPES: dict[str, FP8Recipe] = {
    # DeepSeek-V3 report §3.3: E4M3 on all tensors, 1x128 activation tiles, 128x128 weight blocks,
    # 1x128 gradient tiles (block-wise activation-gradient quantization diverged, App. B.2), online scales.
    "deepseek": FP8Recipe(
        "deepseek", description="DeepSeek-V3: E4M3 everywhere; act 1x128, weight 128x128, grad 1x128; current scaling"),
    # TE Float8CurrentScaling(fp8_format=HYBRID): per-tensor current scaling, E4M3 forward, E5M2 gradients.
    "tensor-current": FP8Recipe(
        "tensor-current", grad_fmt="e5m2", act_gran="tensor", weight_gran="tensor", grad_gran="tensor",
        description="TE Float8CurrentScaling (HYBRID): per-tensor current scaling, E4M3 fwd / E5M2 grads"),
    # TE DelayedScaling(fp8_format=HYBRID, amax_compute_algo="max"), with a short history of 16:
    # TE's default 1024 favours stability, a 16-32 window adapts faster (TransformerEngine issue #1169).
    "tensor-delayed": FP8Recipe(
        "tensor-delayed", grad_fmt="e5m2", act_gran="tensor", weight_gran="tensor", grad_gran="tensor",
        scaling="delayed", history_len=16, amax_algo="max",
        description="TE DelayedScaling (HYBRID): per-tensor, amax history 16, algo max, E4M3 fwd / E5M2 grads"),
    # DeepSeek's fine-grained scaling with the classic HYBRID formats.
    "hybrid": FP8Recipe(
        "hybrid", grad_fmt="e5m2",
        description="Fine-grained like DeepSeek (1x128 / 128x128 / 1x128) but E5M2 gradients"),
    # Extra contrasts: TE MXFP8BlockScaling (E4M3, 1x32, E8M0 scales) and torchao "rowwise"
    # (E4M3, per-row scales rounded to powers of two).
    "mxfp8": FP8Recipe(
        "mxfp8", act_gran="mx", weight_gran="mx", grad_gran="mx",
        description="MXFP8 (TE MXFP8BlockScaling): E4M3, 1x32 blocks with E8M0 scales"),
    "rowwise": FP8Recipe(
        "rowwise", act_gran="row", weight_gran="row", grad_gran="row", scale_fmt="ue8m0",
        description="torchao rowwise: E4M3, one power-of-two scale per row"),
}


def get_recipe(recipe: str | FP8Recipe) -> FP8Recipe:
    if isinstance(recipe, FP8Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"recipe: unknown recipe {recipe!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[recipe]


class FP8Stats:
    """Per-step FP8 statistics collector shared by FP8Linear modules (read and reset by the trainer).

    ``record`` is called for every quantized operand; entries are keyed "<module name>.<role>" with role
    act / weight / grad. ``snapshot()`` returns {"tensors": {key: {...}}, "overflow_count",
    "flushed_to_zero_count", "numel", "flushed_to_zero_fraction", "amax_max", "scale_min", "scale_max"}.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._entries: dict[str, dict] = {}

    def record(self, name: str, role: str, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
               fmt: str, granularity: str, block_size: int = 128, overflow: int | None = None) -> None:
        """Add one quantization of ``x`` (-> ``q`` with ``scale``). ``overflow``: the overflow count if the
        caller knows it (0 for current scaling, by construction); computed from x and scale otherwise."""
        if not self.enabled:
            return
        with torch.no_grad():
            xd = x.detach()
            amax = float(xd.abs().amax())
            ovf = overflow_count(xd, scale, fmt, granularity, block_size) if overflow is None else int(overflow)
            flushed = int(((q == 0) & (xd != 0)).sum())
            s_min, s_max = float(scale.min()), float(scale.max())
        key = f"{name}.{role}" if name else role
        e = self._entries.get(key)
        if e is None:
            e = self._entries[key] = {"calls": 0, "numel": 0, "amax": 0.0, "last_amax": 0.0, "overflow_count": 0,
                                      "flushed_to_zero_count": 0, "scale_min": math.inf, "scale_max": 0.0,
                                      "fmt": fmt, "granularity": granularity}
        e["calls"] += 1
        e["numel"] += xd.numel()
        e["amax"] = max(e["amax"], amax)
        e["last_amax"] = amax
        e["overflow_count"] += ovf
        e["flushed_to_zero_count"] += flushed
        e["scale_min"] = min(e["scale_min"], s_min)
        e["scale_max"] = max(e["scale_max"], s_max)

    def snapshot(self) -> dict:
        tensors = {k: dict(v) for k, v in self._entries.items()}
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


def quant_act(x: torch.Tensor, recipe: str | FP8Recipe = "deepseek", *, stats: FP8Stats | None = None,
              name: str = "", scalers: dict | None = None) -> torch.Tensor:
    """Fake-quantize a GEMM input activation per the recipe (STE backward)."""
    r = get_recipe(recipe)
    return fake_quant(x, r.act_fmt, r.act_gran, r.block_size, r.overflow, r.scale_fmt,
                      scaler=_scaler(scalers, "act"), stats=stats, name=name, role="act")


def quant_weight(w: torch.Tensor, recipe: str | FP8Recipe = "deepseek", *, stats: FP8Stats | None = None,
                 name: str = "", scalers: dict | None = None) -> torch.Tensor:
    """Fake-quantize a weight [out, in] or expert weights [E, out, in] per the recipe (STE backward)."""
    r = get_recipe(recipe)
    return fake_quant(w, r.weight_fmt, r.weight_gran, r.block_size, r.overflow, r.scale_fmt,
                      scaler=_scaler(scalers, "weight"), stats=stats, name=name, role="weight")


def quant_output_grad(y: torch.Tensor, recipe: str | FP8Recipe = "deepseek", *, stats: FP8Stats | None = None,
                      name: str = "", scalers: dict | None = None) -> torch.Tensor:
    """Mark a GEMM output so its incoming gradient is quantized per the recipe."""
    r = get_recipe(recipe)
    return quant_grad(y, r.grad_fmt, r.grad_gran, r.block_size, r.overflow, r.scale_fmt,
                      scaler=_scaler(scalers, "grad"), stats=stats, name=name)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               recipe: str | FP8Recipe = "deepseek", *, stats: FP8Stats | None = None, name: str = "",
               scalers: dict | None = None) -> torch.Tensor:
    """y = quant_grad(F.linear(fake_quant(x), fake_quant(w)) + b): Fprop, Dgrad and Wgrad all see FP8
    operands (V3 report §3.3.1, Fig. 6); accumulation and outputs stay fp32/bf16. The bias (DeepSeek has
    none) is added in high precision. Delayed recipes need ``scalers`` (see ``make_scalers``).
    For expert weights [E, out, in] use ``quant_act``/``quant_weight``/``quant_output_grad`` around the
    grouped matmul. Emulation note: each operand is quantized once; DeepSeek re-tiles dY and X for Wgrad
    (1x128 -> 128x1), which this emulation does not model."""
    r = get_recipe(recipe)
    if r.scaling == "delayed" and scalers is None:
        raise ValueError(f"scalers: recipe {r.name!r} uses delayed scaling; pass scalers=make_scalers(recipe)")
    xq = quant_act(x, r, stats=stats, name=name, scalers=scalers)
    wq = quant_weight(weight, r, stats=stats, name=name, scalers=scalers)
    y = linear(xq, wq, bias)
    return quant_output_grad(y, r, stats=stats, name=name, scalers=scalers)


class FP8Ops:
    """FP8 hook object for GEMMs that are not nn.Linear, e.g. the 3-D expert weights of core.moe.Experts
    (its ``fp8`` attribute): ``quant_act(x)``, ``quant_weight(w)``, ``quant_grad(y)`` apply the recipe to
    x, to w [out, in] or [E, out, in] (blocks per expert) and to the gradient of y.

    Delayed scaling needs one history per operand: scalers are keyed by (role, shape without the token
    dim) — act [S, K] -> (K,), grad [S, N] -> (N,), weight -> its full shape — so the two expert GEMMs
    (gate_up and down) keep separate histories unless their dims coincide (then they share one window,
    which with algo "max" only makes the scale more conservative). Stats are recorded per role under
    ``name`` (both expert GEMMs add to the same "<name>.act" / ".weight" / ".grad" entries).
    """

    def __init__(self, recipe: str | FP8Recipe = "deepseek", stats: FP8Stats | None = None, name: str = ""):
        self.recipe = get_recipe(recipe)
        self.stats = stats
        self.name = name
        self._scalers: dict[tuple, DelayedScaler] = {}

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
                 recipe: str | FP8Recipe = "deepseek", stats: FP8Stats | None = None, name: str = ""):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = get_recipe(recipe)
        self.stats = stats
        self.fp8_name = name
        self.scalers = make_scalers(self.recipe)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: str | FP8Recipe = "deepseek", stats: FP8Stats | None = None,
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
                          scalers=self.scalers)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", recipe={self.recipe.name}"


#: Qualified-name patterns kept in high precision (V3 report §3.3.1: embedding, output head, MoE
#: gating/router, normalization; attention score/softmax operators are not nn.Linear and never
#: converted). Matching: a pattern without "." is fnmatch'ed against each dot-separated component
#: ("gate" matches "layers.3.mlp.gate" but NOT "gate_proj"); a pattern with "." against the full name.
DEFAULT_SKIP: tuple[str, ...] = ("lm_head", "head", "embed*", "gate", "router", "*norm*", "score*")


def _skipped(name: str, patterns: Sequence[str]) -> bool:
    parts = name.split(".") if name else []
    for p in patterns:
        if "." in p:
            if fnmatch.fnmatchcase(name, p):
                return True
        elif any(fnmatch.fnmatchcase(c, p) for c in parts):
            return True
    return False


def convert_to_fp8(model: nn.Module, recipe: str | FP8Recipe = "deepseek", skip: Sequence[str] = DEFAULT_SKIP,
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
