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
`BlockWise128x128` (cuBLAS blockwise FP8, Hopper), and the quantizers run under `torch.compile` (one fused
kernel per operand: eager amax/divide/cast costs about as much as the FP8 GEMM itself). Master weights stay
fp32 in the trainer; the weight is quantized from its bf16 working copy every forward.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from core.fp8 import AMAX_FLOOR, DEFAULT_SKIP, FP8Recipe, _skipped, get_recipe
from core.gemm import Linear

__all__ = ["BLOCK", "quant_tile", "quant_block", "fp8_gemm", "reference_gemm", "fp8_linear", "FP8LinearGPU",
           "gpu_recipe_issues", "convert_model", "compile_status"]

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
    q = (xg / s.unsqueeze(-1)).clamp(-_FMAX, _FMAX).to(_FP8).reshape(m, kp)
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
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn.__name__]


def _run(fn, x):
    if not x.is_cuda:
        return fn(x)  # CPU: eager, bit-identical to core.fp8.quantize
    try:
        return _compiled(fn)(x)
    except Exception as e:  # noqa: BLE001 - a compiler failure must not stop training: fall back to eager
        _COMPILE_ERRORS[fn.__name__] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return fn(x)


def quant_tile(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 tile quantization of a 2-D x [M, K] (DeepSeek activations / gradients): see `_quant_tile_eager`."""
    return _run(_quant_tile_eager, x)


def quant_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 block quantization of a weight [N, K]: see `_quant_block_eager`."""
    return _run(_quant_block_eager, w)


def compile_status() -> dict:
    """Which quantizers run compiled on CUDA, and why any fell back to eager."""
    return {"enabled": os.environ.get("EVA_CUDA_COMPILE", "1") != "0", "compiled": sorted(_COMPILED),
            "errors": dict(_COMPILE_ERRORS)}


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


_BLOCK_STRIDE_PADDED: bool | None = None  # learnt on the first call whose K/128 is not a multiple of 4


def _block_scale_operand(s: torch.Tensor, padded: bool) -> torch.Tensor:
    """s [N/128, K/128] as cuBLAS wants the 128x128 scales of B: row-major, row stride K/128 or, in torch
    versions that ask for 16-byte aligned strides, K/128 rounded up to a multiple of 4 (the check in torch's
    ScaledBlas.cpp `is_blockwise_128x128_scaling` changed between releases)."""
    nn_, nk = s.shape
    if not padded or nk % 4 == 0:
        return s.contiguous()
    buf = s.new_zeros(nn_, _ceil(nk, 4))
    buf[:, :nk] = s
    return buf[:, :nk]


def fp8_gemm(a_q, a_s, b_q, b_s, b_scaling: str = "block", out_dtype=torch.bfloat16) -> torch.Tensor:
    """C [M, N] = A [M, K] B [N, K]^T with A in 1x128 tiles and B in 128x128 blocks ("block") or 1x128 tiles
    along K ("tile"). On CUDA one cuBLAS blockwise FP8 GEMM (`F.scaled_mm`); elsewhere `reference_gemm`."""
    global _BLOCK_STRIDE_PADDED
    if not a_q.is_cuda:
        return reference_gemm(a_q, a_s, b_q, b_s, b_scaling, out_dtype)
    st = F.ScalingType
    sa = a_s if a_s.stride(0) == 1 else a_s.t().contiguous().t()
    if b_scaling == "tile":
        return F.scaled_mm(a_q, b_q.t(), sa, st.BlockWise1x128, b_s.t().contiguous(), st.BlockWise1x128,
                           output_dtype=out_dtype)
    tries = [True, False] if _BLOCK_STRIDE_PADDED is None else [_BLOCK_STRIDE_PADDED]
    for i, padded in enumerate(tries):
        try:
            out = F.scaled_mm(a_q, b_q.t(), sa, st.BlockWise1x128, _block_scale_operand(b_s, padded).t(),
                              st.BlockWise128x128, output_dtype=out_dtype)
        except (RuntimeError, ValueError):
            if i == len(tries) - 1:
                raise
            continue
        if b_s.shape[1] % 4:
            _BLOCK_STRIDE_PADDED = padded
        return out
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------- training
class _FP8LinearFn(torch.autograd.Function):
    """y = x W^T with Fprop, Dgrad and Wgrad as FP8 GEMMs (module docstring). x [..., K], W [N, K] -> [..., N].

    Saved for backward: x in its own dtype (re-tiled along tokens for Wgrad) and the FP8 weight with its scales
    (transposed once for Dgrad). dW is computed in fp32 and returned in W's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        k, n = x.shape[-1], weight.shape[0]
        x2 = x.reshape(-1, k)
        xq, xs = quant_tile(x2)
        wq, ws = quant_block(weight)
        y = fp8_gemm(xq, xs, wq, ws, "block", x.dtype)
        ctx.save_for_backward(x2, wq, ws)
        ctx.meta = (x.shape, n, k, weight.dtype)
        return y[:, :n].reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, wq, ws = ctx.saved_tensors
        shape, n, k, w_dtype = ctx.meta
        dy2 = dy.reshape(-1, n)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            gq, gs = quant_tile(dy2)  # [M, Np]: N padded like the weight's rows
            dx = fp8_gemm(gq, gs, wq.t().contiguous(), ws.t().contiguous(), "block", dy.dtype)
            dx = dx[:, :k].reshape(shape)
        if ctx.needs_input_grad[1]:
            gtq, gts = quant_tile(dy2.t())  # dy^T [N, Mp]: 1x128 tiles along tokens
            xtq, xts = quant_tile(x2.t())  # x^T  [K, Mp]
            dw = fp8_gemm(gtq, gts, xtq, xts, "tile", torch.float32).to(w_dtype)
        return dx, dw


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 linear layer (DeepSeek recipe, all three GEMMs in FP8); the bias, if any, is added in x's dtype."""
    y = _FP8LinearFn.apply(x, weight)
    return y if bias is None else y + bias


class FP8LinearGPU(nn.Linear):
    """nn.Linear (same parameters and state_dict) whose GEMMs are real FP8 GEMMs: `fp8_linear`."""

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
                "scale_fmt": (None,)}


def gpu_recipe_issues(recipe: str | FP8Recipe) -> list[str]:
    """Why `recipe` cannot run on the GPU FP8 GEMMs ([] when it can: of core.fp8.RECIPES only "deepseek")."""
    r = get_recipe(recipe)
    return [f"{f}={getattr(r, f)!r} (GPU path: {ok})" for f, ok in GPU_SWITCHES.items() if getattr(r, f) not in ok]


def convert_model(model: nn.Module, recipe: str | FP8Recipe = "deepseek", skip=DEFAULT_SKIP) -> dict:
    """Swap every stock Linear not matched by `skip` (core.fp8.DEFAULT_SKIP: embedding, head, router, norms stay
    high precision, V3 §3.3.1) for an FP8LinearGPU, in place. Routed experts (3-D weights, grouped GEMM) keep
    their bf16 grouped GEMM. Returns {"linears": converted count, "experts": "bf16 grouped GEMM"}.
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
    return {"linears": len(targets), "experts": "bf16 grouped GEMM"}
