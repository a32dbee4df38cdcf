"""FP8 training: the FP8 GEMM with explicit Fprop / Dgrad / Wgrad operands (``fp8_gemm_train``), ``fp8_linear``, ``FP8Ops`` for the MoE experts (GEMMs, SwiGLU cache, combine),
``FP8Linear`` and ``convert_to_fp8``. The recipes are data in core/fp8/recipe.py; quantizing one tensor and the
statistics are in core/fp8/quant.py.

Implements V3 report §3.3.1 "Mixed Precision Framework" (Fig. 6: Fprop, Dgrad and Wgrad take FP8
operands; embedding, output head, MoE gating and norms stay in high precision) with the §3.3.2
scaling and the §3.3.3 storage/communication rules; App. B.2 is why gradients use 1x128 tiles. GEMMs are
emulated (quantize -> dequantize -> fp32/bf16 matmul), so this runs on a CPU.
"""

from __future__ import annotations

import fnmatch
from typing import Sequence

import torch
import torch.nn as nn

from core.fp8.matmul import limited_block_gemm
from core.fp8.quant import FP8Stats, make_scalers, quant_act, quant_output_grad, quant_weight, quantize_spec
from core.fp8.recipe import FP8Recipe, get_recipe, operand_specs, swiglu_cache_spec
from core.fp8.scaling import DelayedScaler
from core.gemm import Linear, linear
from core.layers import swiglu, swiglu_packed

__all__ = [
    "fp8_gemm_train", "fp8_linear", "FP8Ops", "FP8Linear", "DEFAULT_SKIP", "site_of",
    "convert_to_fp8", "get_fp8_stats",
]


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
            return swiglu_packed(gu, weight), None
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
