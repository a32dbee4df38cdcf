"""DeepSeek-V3 FP8 training GEMMs on the GPU: 1x128 activation tiles, 128x128 weight blocks, E4M3, online scales.

V3 report §3.3 (Fig. 6/7): every Linear runs its three GEMMs in FP8 with fp32 accumulation and bf16/fp32 outputs:
    Fprop  y  = x W^T        A = x  [M, K]   1x128 tiles along K     B = W [N, K]  128x128 blocks
    Dgrad  dx = dy W         A = dy [M, N]   1x128 tiles along N     B = W^T       128x128 blocks (the same
                                                                                   blocks, transposed)
    Wgrad  dW = dy^T x       A = dy^T [N, M] 1x128 tiles along M     B = x^T [K, M] 1x128 tiles along M
The Wgrad operands are re-tiled along the token dim (DeepSeek quantizes them again for the transposed GEMM);
weights use 128x128 blocks precisely so that W^T reuses them. Scales are dequantization scales
s = max(amax, 1e-4) / 448 (official inference/kernel.py `act_quant`), q = cast(clamp(x / s)), as in
`core.fp8.quantize`, which is the reference: on a CPU the quantizers below are bit-identical to it and the GEMM
is a float64 dequantize-and-multiply, so everything but the hardware GEMM is tested without a GPU.

On CUDA the GEMMs go through `torch.nn.functional.scaled_mm` with `ScalingType.BlockWise1x128` /
`BlockWise128x128` (cuBLAS blockwise FP8, Hopper). Each operand is quantized in one pass that writes both
layouts its GEMMs read (x and x^T, dy and dy^T, W and W^T: core.cuda.triton_quant's fused cast-transpose, as
in DeepSeek's and TransformerEngine's FP8 training); without Triton (or with EVA_CUDA_TRITON=0) the quantizers
run under `torch.compile`, once per layout (eager amax/divide/cast costs about as much as the FP8 GEMM itself).
Master weights stay fp32 in the trainer; the weight is quantized from its bf16 working copy every forward.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from core.fp8 import AMAX_FLOOR, DEFAULT_SKIP, FP8Recipe, get_recipe
from core.cuda.kernels import Kernels, why
from core.fp8.training import _skipped
from core.gemm import Linear

__all__ = ["BLOCK", "quant_tile", "quant_block", "quant_tile_both", "quant_block_both", "fp8_gemm", "reference_gemm",
           "fp8_linear", "FP8LinearGPU", "ExpertsFP8", "gpu_recipe_gaps", "gpu_recipe_issues", "convert_model", "compile_status", "scale_layouts"]

BLOCK = 128
_FP8 = torch.float8_e4m3fn
_FMAX = float(torch.finfo(_FP8).max)  # 448


# ---------------------------------------------------------------------------------------------- quantizers
def _ceil(n: int, m: int = BLOCK) -> int:
    return -(-n // m) * m


def _quant_tile_eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any strides) -> q [M, Kp] E4M3 row-major (K zero-padded to Kp = 128 * ceil(K/128)) and
    s [M, Kp/128] fp32 stored outer-dim-major (strides (1, M)), the layout cuBLAS's 1x128 scaling reads."""
    m, k = x.shape
    kp = _ceil(k)
    if kp != k:
        x = F.pad(x, (0, kp - k))
    xg = x.float().reshape(m, kp // BLOCK, BLOCK)
    s = xg.abs().amax(-1).clamp(min=AMAX_FLOOR) / _FMAX
    q = (xg / s.unsqueeze(-1)).clamp(-_FMAX, _FMAX).to(_FP8).reshape(m, kp).contiguous()
    return q, s.t().contiguous().t()


def _quant_block_eager(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> q [Np, Kp] E4M3 (both dims zero-padded to multiples of 128) and s [Np/128, Kp/128] fp32."""
    n, k = w.shape
    np_, kp = _ceil(n), _ceil(k)
    if (np_, kp) != (n, k):
        w = F.pad(w, (0, kp - k, 0, np_ - n))
    wg = w.float().reshape(np_ // BLOCK, BLOCK, kp // BLOCK, BLOCK)
    s = wg.abs().amax(dim=(1, 3)).clamp(min=AMAX_FLOOR) / _FMAX
    q = (wg / s[:, None, :, None]).clamp(-_FMAX, _FMAX).to(_FP8).reshape(np_, kp)
    return q, s


_COMPILED: dict = {}
_COMPILE_ERRORS: dict = {}


def _compiled(fn):
    """`fn` under torch.compile (cached; dynamic shapes so the model's layer widths share one kernel), or `fn`
    itself when EVA_CUDA_COMPILE=0 or compilation failed (the error is kept for `compile_status`)."""
    if os.environ.get("EVA_CUDA_COMPILE", "1") == "0" or fn.__name__ in _COMPILE_ERRORS:
        return fn
    if fn.__name__ not in _COMPILED:
        cfg = torch._dynamo.config  # every layer width (and its transpose) is a specialization: allow them all
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, knob):
                setattr(cfg, knob, max(getattr(cfg, knob), 64))
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn.__name__]


def _run(fn, x):
    if not x.is_cuda:
        return fn(x)  # CPU: eager, bit-identical to core.fp8.quantize
    try:
        return _compiled(fn)(x)
    except Exception as e:  # noqa: BLE001 - a compiler failure must not stop training: fall back to eager
        _COMPILE_ERRORS[fn.__name__] = why(e)
        return fn(x)


def quant_tile(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 tile quantization of a 2-D x [M, K] (DeepSeek activations / gradients): see `_quant_tile_eager`."""
    return _run(_quant_tile_eager, x)


def quant_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 block quantization of a weight [N, K]: see `_quant_block_eager`."""
    return _run(_quant_block_eager, w.detach())  # a Parameter would pin the compiled kernel to its shape


# Fused cast-transpose quantizers (core.cuda.triton_quant): one pass writes an operand's two layouts on CUDA.
_QUANT = Kernels("core.cuda.triton_quant")


def _fused(name: str, x: torch.Tensor, transposed: bool):
    """The fused quantizer `name` on x, or None (CPU tensor, switched off, or failed: the reason is kept)."""
    return _QUANT.call(name, x, transposed) if x.is_cuda else None


def quant_tile_both(x: torch.Tensor, transposed: bool = True) -> tuple[torch.Tensor, ...]:
    """(q, s) = quant_tile(x) for x [M, K] and, when `transposed`, also (qt, st) = quant_tile(x.t()): the 1x128
    tiles of x^T along M (Wgrad's operand). On CUDA one fused Triton pass (core.cuda.triton_quant, bit-identical
    to the eager quantizer); otherwise the two quantizers above (on a CPU, bit-identical to core.fp8)."""
    out = _fused("quant_tile_dual", x, transposed)
    if out is not None:
        return out
    return quant_tile(x) + quant_tile(x.t()) if transposed else quant_tile(x)


def quant_block_both(w: torch.Tensor, transposed: bool = True) -> tuple[torch.Tensor, ...]:
    """(q, s) = quant_block(w) for w [N, K] and, when `transposed`, also W^T's blocks (q.t(), s.t(), contiguous:
    Dgrad's operand). On CUDA one fused Triton pass; otherwise quant_block and two transposed copies."""
    out = _fused("quant_block_dual", w.detach(), transposed)
    if out is not None:
        return out
    q, s = quant_block(w)
    return (q, s, q.t().contiguous(), s.t().contiguous()) if transposed else (q, s)


def compile_status() -> dict:
    """Which quantizers run compiled on CUDA and why any fell back to eager; whether the fused Triton
    quantizers are switched on (EVA_CUDA_TRITON), which of them ran, and why they are off if they are."""
    return {"enabled": os.environ.get("EVA_CUDA_COMPILE", "1") != "0", "compiled": sorted(_COMPILED),
            "errors": dict(_COMPILE_ERRORS),
            "fused": _QUANT.status()}


# ---------------------------------------------------------------------------------------------- GEMMs
def _dequant_tile(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (q.double().reshape(q.shape[0], -1, BLOCK) * s.double().unsqueeze(-1)).reshape(q.shape)


def _dequant_block(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.double() * s.double().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)


def reference_gemm(a_q, a_s, b_q, b_s, b_scaling: str = "block", out_dtype=torch.float32) -> torch.Tensor:
    """C = A B^T from quantized operands, exactly (float64 dequantize and multiply), then rounded to out_dtype.

    a_q [M, K] with 1x128 scales a_s [M, K/128]; b_q [N, K] with 128x128 scales [N/128, K/128] ("block") or
    1x128 scales [N, K/128] ("tile"). K a multiple of 128."""
    b = _dequant_block(b_q, b_s) if b_scaling == "block" else _dequant_tile(b_q, b_s)
    return (_dequant_tile(a_q, a_s) @ b.t()).to(out_dtype)


def _pad_cols(s: torch.Tensor, cols: int) -> torch.Tensor:
    """s [R, C] zero-padded to [R, cols] (a copy; `s` itself when C == cols)."""
    return s if s.shape[1] == cols else F.pad(s, (0, cols - s.shape[1]))


def _outer_major(s: torch.Tensor) -> torch.Tensor:
    """s [R, C] stored with strides (1, R)."""
    return s.t().contiguous().t()


# Candidate layouts of the scale tensors. torch's scaled-mm checks (ATen ScaledBlas.cpp) changed between releases:
# e.g. 128x128 scales of B as [K/128, N/128] column-major in one, with K/128 padded to a multiple of 4 (16-byte
# rows) in another, and 1x128 scales of B as [K/128, N] or [N, K/128]. Each candidate maps (scale of A [M, K/128],
# scale of B as quantized: [N/128, K/128] or [N, K/128]) to the tensors passed to F.scaled_mm.
_A_LAYOUTS = {
    "outer": lambda s: _outer_major(s),
    "outer-pad4": lambda s: _outer_major(_pad_cols(s, _ceil(s.shape[1], 4))),
}
_B_LAYOUTS = {
    "block": {
        "kxn-colmajor": lambda s: s.t(),
        "kxn-colmajor-pad4": lambda s: _pad_cols(s, _ceil(s.shape[1], 4)).t(),
        "kxn-colmajor-stride4": lambda s: _pad_cols(s, _ceil(s.shape[1], 4))[:, : s.shape[1]].t(),
        "kxn-rowmajor": lambda s: s.t().contiguous(),
        "kxn-rowmajor-pad4": lambda s: _pad_cols(s, _ceil(s.shape[1], 4)).t().contiguous(),
    },
    "tile": {
        "nxk-outer": lambda s: _outer_major(s),
        "nxk-rowmajor": lambda s: s.contiguous(),
        "kxn-rowmajor": lambda s: s.t().contiguous(),
        "nxk-outer-pad4": lambda s: _outer_major(_pad_cols(s, _ceil(s.shape[1], 4))),
    },
}
_LAYOUT: dict[str, tuple[str, str]] = {}  # b_scaling -> (A layout, B layout) verified on this GPU


def _scaled_mm(a_q, a_s, b_q, b_s, b_scaling, out_dtype, layout):
    st = F.ScalingType
    a_q, b_q = a_q.contiguous(), b_q.contiguous()  # cuBLASLt multiplies row-major A by column-major B only
    rb = st.BlockWise128x128 if b_scaling == "block" else st.BlockWise1x128
    return F.scaled_mm(a_q, b_q.t(), _A_LAYOUTS[layout[0]](a_s), st.BlockWise1x128,
                       _B_LAYOUTS[b_scaling][layout[1]](b_s), rb, output_dtype=out_dtype)


def _find_layout(b_scaling: str, device) -> tuple[str, str]:
    """The first scale layout whose GEMM on a probe (K/128 = 3, not a multiple of 4) agrees with
    `reference_gemm`: the layout is verified by its numbers, not only accepted by the shape checks."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 384, generator=gen), torch.randn(256, 384, generator=gen)
    aq, as_ = _quant_tile_eager(a)
    bq, bs = _quant_block_eager(b) if b_scaling == "block" else _quant_tile_eager(b)
    ref = reference_gemm(aq, as_, bq, bs, b_scaling, torch.float64)
    tried = []
    for la in _A_LAYOUTS:
        for lb in _B_LAYOUTS[b_scaling]:
            try:
                out = _scaled_mm(aq.to(device), as_.to(device), bq.to(device), bs.to(device), b_scaling,
                                 torch.bfloat16, (la, lb)).double().cpu()
            except (RuntimeError, ValueError) as e:
                tried.append(f"{la}/{lb}: {str(e).splitlines()[0][:160]}")
                continue
            err = float((out - ref).norm() / ref.norm())
            if err < 5e-3:  # bf16 output rounding; a misread scale layout is off by O(1)
                return la, lb
            tried.append(f"{la}/{lb}: wrong numbers (relative error {err:.2e})")
    raise RuntimeError(f"no scale layout of torch {torch.__version__} runs the {b_scaling} FP8 GEMM: "
                       + "; ".join(tried))


def fp8_gemm(a_q, a_s, b_q, b_s, b_scaling: str = "block", out_dtype=torch.bfloat16) -> torch.Tensor:
    """C [M, N] = A [M, K] B [N, K]^T with A in 1x128 tiles and B in 128x128 blocks ("block") or 1x128 tiles
    along K ("tile"). On CUDA one cuBLAS blockwise FP8 GEMM (`F.scaled_mm`); elsewhere `reference_gemm`."""
    if not a_q.is_cuda:
        return reference_gemm(a_q, a_s, b_q, b_s, b_scaling, out_dtype)
    _ensure_layouts(a_q.device)
    if out_dtype == torch.float32 and _FP32_OUT.get(b_scaling) is False:
        return _scaled_mm(a_q, a_s, b_q, b_s, b_scaling, torch.bfloat16, _LAYOUT[b_scaling]).float()
    try:
        out = _scaled_mm(a_q, a_s, b_q, b_s, b_scaling, out_dtype, _LAYOUT[b_scaling])
    except (RuntimeError, ValueError):
        if out_dtype != torch.float32:
            raise
        _FP32_OUT[b_scaling] = False  # this cuBLAS path writes bf16 only
        return fp8_gemm(a_q, a_s, b_q, b_s, b_scaling, out_dtype)
    if out_dtype == torch.float32:
        _FP32_OUT[b_scaling] = True
    return out


_FP32_OUT: dict[str, bool] = {}  # b_scaling -> whether an fp32 output ran (else bf16 output, upcast)


def _ensure_layouts(device) -> None:
    """Find both scale layouts (`_find_layout`) once, before a layer quantizes its first operands: the probes
    allocate, run candidate GEMMs (some refused by cuBLAS) and free, so they run before any real operand exists rather
    than between a layer's quantization and its GEMM, or in the middle of the first backward (the tile layout)."""
    for b_scaling in ("block", "tile"):
        if b_scaling not in _LAYOUT:
            _LAYOUT[b_scaling] = _find_layout(b_scaling, device)


def scale_layouts() -> dict:
    """The scale layouts verified on this process's GPU (empty before the first GPU GEMM)."""
    return {"layouts": {k: "/".join(v) for k, v in _LAYOUT.items()}, "fp32_output": dict(_FP32_OUT)}


# ---------------------------------------------------------------------------------------------- training
def _pad_rows(q: torch.Tensor, s: torch.Tensor, mult: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """q [R, C] FP8 with its scales s [R, C/128] -> rows zero-padded to a multiple of `mult` (scale 1 on the pad).
    cuBLAS's FP8 GEMM needs both dims of its second operand divisible by 16: Wgrad's x^T has K rows (any width)."""
    r = q.shape[0]
    rp = _ceil(r, mult)
    if rp == r:
        return q, s
    qp = torch.zeros((rp, q.shape[1]), dtype=q.dtype, device=q.device)
    qp[:r] = q
    sp = torch.ones((rp, s.shape[1]), dtype=s.dtype, device=s.device)
    sp[:r] = s
    return qp, sp


class _FP8LinearFn(torch.autograd.Function):
    """y = x W^T with Fprop, Dgrad and Wgrad as FP8 GEMMs (module docstring). x [..., K], W [N, K] -> [..., N].

    The forward quantizes x and W once each into both layouts their GEMMs read (`quant_tile_both`,
    `quant_block_both`: one fused pass each on CUDA) and saves only FP8 operands for backward: x^T in 1x128 tiles
    along tokens (Wgrad) and W^T's 128x128 blocks (Dgrad), each only if that gradient is needed; the backward
    quantizes dy once into both layouts. dW is accumulated in fp32 and written in W's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, grad_enabled: bool) -> torch.Tensor:
        k, n = x.shape[-1], weight.shape[0]
        if x.is_cuda:
            _ensure_layouts(x.device)
        x2 = x.reshape(-1, k)
        # forward runs under no_grad, where needs_input_grad still reports requires_grad: the caller's mode decides
        need_dx, need_dw = ctx.needs_input_grad[:2] if grad_enabled else (False, False)
        xq, xs, *xt = quant_tile_both(x2, need_dw)  # x^T [K, Mp]: 1x128 tiles along tokens
        wq, ws, *wt = quant_block_both(weight, need_dx)  # W^T [Kp, Np]: the same blocks, transposed
        y = fp8_gemm(xq, xs, wq, ws, "block", x.dtype)
        ctx.save_for_backward(*xt, *wt)
        ctx.meta = (x.shape, n, k, weight.dtype, need_dx, need_dw)
        return y[:, :n].reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        shape, n, k, w_dtype, need_dx, need_dw = ctx.meta
        saved = ctx.saved_tensors
        xt, wt = (saved[:2], saved[2:]) if need_dw else ((), saved)
        dy2 = dy.reshape(-1, n)
        dx = dw = None
        if need_dx:
            gq, gs, *gt = quant_tile_both(dy2, need_dw)  # dy [M, Np] along N, dy^T [N, Mp] along tokens
            dx = fp8_gemm(gq, gs, *wt, "block", dy.dtype)[:, :k].reshape(shape)
        else:
            gt = quant_tile(dy2.t())
        if need_dw:
            # written in W's dtype by the GEMM's epilogue (fp32 accumulation, one rounding): an fp32 output and a
            # cast would round the same once more slowly (an extra pass over [N, K])
            dw = fp8_gemm(*gt, *_pad_rows(*xt), "tile", w_dtype)[:, :k]
        return dx, dw, None


@torch.compiler.disable  # inside a compiled block (core.compile) it runs as written, between two graphs
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 linear layer (DeepSeek recipe, all three GEMMs in FP8); the bias, if any, is added in x's dtype."""
    y = _FP8LinearFn.apply(x, weight, torch.is_grad_enabled())
    return y if bias is None else y + bias


class FP8LinearGPU(nn.Linear):
    """nn.Linear (same parameters and state_dict) whose GEMMs are real FP8 GEMMs: `fp8_linear`."""

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "FP8LinearGPU":
        new = cls(lin.in_features, lin.out_features, bias=False, device="meta")
        new.weight, new.bias = lin.weight, lin.bias  # share the Parameters (an optimizer built before still works)
        new.train(lin.training)
        return new


#: The recipe switches (core.fp8.FP8Recipe fields) this GPU path implements; any other value runs emulated.
GPU_SWITCHES = {"act_fmt": ("e4m3",), "weight_fmt": ("e4m3",), "grad_fmt": ("e4m3",), "act_gran": ("tile",),
                "weight_gran": ("block",), "grad_gran": ("tile",), "scaling": ("current",), "block_size": (128,),
                "scale_fmt": (None,),
                # the V3 recipe's other switches (core.fp8.SWITCHES) are emulated only; BF16 moments are the
                # optimizer's (core.optim), on any device
                "wgrad_tiling": ("1x128",), "attn_out_fmt": (None,), "attn_out_pow2": (False,),
                "dispatch_pow2": (False,), "swiglu_recompute": (False,), "combine_bf16": (False,),
                "accumulation": ("fp32",)}


def gpu_recipe_gaps(recipe: str | FP8Recipe) -> list[str]:
    """The switches (FP8Recipe fields) of `recipe` the GPU FP8 GEMMs do not implement ([]: it runs there)."""
    r = get_recipe(recipe)
    return [f for f, ok in GPU_SWITCHES.items() if getattr(r, f) not in ok]


def gpu_recipe_issues(recipe: str | FP8Recipe) -> list[str]:
    """Why `recipe` cannot run on the GPU FP8 GEMMs ([] when it can: of core.fp8.RECIPES only "deepseek-gemm")."""
    r = get_recipe(recipe)
    return [f"{f}={getattr(r, f)!r} (GPU path: {GPU_SWITCHES[f]})" for f in gpu_recipe_gaps(r)]


class ExpertsFP8:
    """The `core.moe.Experts.fp8` hook that runs the routed experts' GEMMs in FP8: each expert's segment of the
    sorted token rows through `fp8_linear` with that expert's weight (one FP8 Fprop, Dgrad and Wgrad per expert, as
    the Linear layers). Every segment's 1x128 tiles of x^T and dy^T for Wgrad start at the segment's first row, as
    in DeepSeek's grouped FP8 GEMMs, which align each expert's rows to the GEMM's 128-row blocks (the CPU emulation,
    core.fp8.FP8Ops, tiles the whole sorted operand instead; Fprop and Dgrad tiles are per row and agree).
    The SwiGLU between the GEMMs and the combine stay as in bf16 (the V3 recipe's other switches are emulated only).
    Cost: a few kernel launches per expert and GEMM, so it is host-bound with many small experts."""

    #: the experts pad every segment to a multiple of this many (zero) rows (core.moe.Experts): cuBLAS's blockwise
    #: FP8 GEMM refuses other row counts (CUBLAS_STATUS_NOT_SUPPORTED on an H200 for a segment of arbitrary size)
    granule = 16

    def combine_grad(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def combine(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def swiglu(self, gate_up: torch.Tensor, weights: torch.Tensor):
        from core.layers import swiglu_packed  # (h [S, I], nothing to recompute from)
        return swiglu_packed(gate_up, weights), None

    def gemm(self, a: torch.Tensor, w: torch.Tensor, sizes: list[int], mm=None, name: str = "",
             x_recompute=None) -> torch.Tensor:
        """a [S, K] sorted by expert (segment e has sizes[e] rows), w [E, N, K] -> [S, N]. `mm` (the bf16 grouped
        GEMM) is not used. An expert without tokens gets a zero weight gradient (unbind's backward)."""
        outs = [fp8_linear(a_e, w_e) for a_e, w_e, n in zip(a.split(sizes), w.unbind(0), sizes) if n]
        return torch.cat(outs) if outs else a.new_zeros(0, w.shape[1])


def convert_model(model: nn.Module, recipe: str | FP8Recipe = "deepseek", skip=DEFAULT_SKIP,
                  experts: bool = False) -> dict:
    """Swap every stock Linear not matched by `skip` (core.fp8.DEFAULT_SKIP: embedding, head, router, norms stay
    high precision, V3 §3.3.1) for an FP8LinearGPU, in place. Routed experts (3-D weights) keep their bf16 grouped
    GEMM, or with `experts` run one FP8 GEMM per expert (`ExpertsFP8`). Returns {"linears": converted count,
    "experts": what the routed experts run}.
    ValueError naming the recipe switch when the recipe needs something this path does not implement."""
    issues = gpu_recipe_issues(recipe)
    if issues:
        raise ValueError(f"precision: recipe {get_recipe(recipe).name!r} has no GPU FP8 path: {'; '.join(issues)}")
    stock = (nn.Linear.forward, Linear.forward)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n
               and type(m).forward in stock and not _skipped(n, skip)]
    for name, lin in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, FP8LinearGPU.from_linear(lin))
    if experts:
        from core.moe import Experts
        for m in model.modules():
            if isinstance(m, Experts):
                m.fp8 = ExpertsFP8()
    return {"linears": len(targets), "experts": "FP8, one GEMM per expert" if experts else "bf16 grouped GEMM"}
