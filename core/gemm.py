"""fp32 GEMMs on CPU: which library multiplies, and the `Linear` / grouped-expert products built on it.

Why this module exists: torch's CPU fp32 `mm`/`addmm`/`_grouped_mm` call MKL's sgemm, and MKL runs its AVX2
kernels on non-Intel CPUs. On an AMD Zen 5 (full-width AVX-512) that is half the machine: a 2048^3 fp32 matmul
reaches ~205 GFLOP/s through MKL and ~440 through oneDNN (which torch also ships, and already uses for bf16).
At this project's mini shapes (K, N = 128..768) oneDNN is 1.6-2.3x faster in fp32; restricted to AVX2
(`ONEDNN_MAX_CPU_ISA=AVX2`) it still matches or beats MKL by 5-15%. Both are IEEE fp32 with fp32
accumulation (no TF32/BF16 shortcuts): results differ from MKL only by summation order (~1e-7 relative).

Backend (`fp32_backend()`), chosen once per process from the environment variable `EVA_FP32_GEMM`:
    "auto" (default): "onednn" on x86-64 when torch has oneDNN, else "torch"
    "onednn":         oneDNN fp32 GEMMs (falls back to "torch" where oneDNN is unavailable)
    "torch":          torch's defaults (MKL on x86-64)
`set_fp32_backend` switches it at run time (benchmarks, tests). Only fp32 CPU tensors outside autocast take
the oneDNN path; everything else (bf16, CUDA, autocast regions, empty inputs) goes to the torch ops unchanged.

oneDNN is reached through `torch.ops.mkldnn._linear_pointwise(X, W, B, "none", [], "")` = X @ W^T + B, the op
torch's own inductor uses for CPU linears. It has no autograd formula, so `linear` and `grouped_linear` are
autograd Functions whose backward GEMMs use the same op:
    dX = dY @ W  = lp(dY, W^T),      dW = dY^T @ X = lp(dY^T, X^T),      dB = sum of dY over rows.
"""
from __future__ import annotations

import os
import platform
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FP32_BACKENDS", "fp32_backend", "set_fp32_backend", "onednn_available", "segment_granule", "linear",
           "grouped_linear", "Linear"]

FP32_BACKENDS = ("auto", "onednn", "torch")
_ENV = "EVA_FP32_GEMM"


def onednn_available() -> bool:
    """True when this torch build exposes oneDNN's fp32 linear on this CPU (x86-64 builds with mkldnn)."""
    machine = platform.machine().lower()
    return (machine in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _resolve(name: str) -> str:
    if name not in FP32_BACKENDS:
        raise ValueError(f"{_ENV} / fp32 GEMM backend must be one of {FP32_BACKENDS}, got {name!r}")
    if name == "torch":
        return "torch"
    return "onednn" if onednn_available() else "torch"


def _from_environment() -> str:
    name = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if name not in FP32_BACKENDS:  # a typo must not stop the app from starting: say so and use the default
        warnings.warn(f"{_ENV}={name!r} is not one of {FP32_BACKENDS}; using 'auto'", stacklevel=2)
        name = "auto"
    return _resolve(name)


_backend = _from_environment()


def fp32_backend() -> str:
    """The library fp32 CPU GEMMs use in this process: "onednn" or "torch"."""
    return _backend


def set_fp32_backend(name: str) -> str:
    """Switch fp32 CPU GEMMs to "auto" / "onednn" / "torch"; returns the previous resolved backend."""
    global _backend
    previous, _backend = _backend, _resolve(name)
    return previous


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_backend == "onednn" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.device.type == "cpu" and weight.device.type == "cpu" and x.dim() >= 2 and x.numel() > 0
            and not torch.is_autocast_enabled("cpu"))


def segment_granule(dtype: torch.dtype, device: torch.device | str) -> int:
    """Row multiple to pad variable-size GEMM segments (the MoE's per-expert token groups) to.

    oneDNN compiles a kernel for every new GEMM shape (~0.3-0.4 ms, several times the multiply itself at these
    sizes) and expert segment sizes change every step, so unpadded segments would pay it on most expert GEMMs.
    Multiples of 32 rows keep the shapes to a few dozen that oneDNN's primitive cache holds. 32 where the GEMM
    runs on oneDNN on CPU (bf16/fp16 always, fp32 on the oneDNN backend); 1 (no padding) elsewhere (MKL and CUDA
    have no per-shape cost).
    """
    if torch.device(device).type != "cpu":
        return 1
    if dtype in (torch.bfloat16, torch.float16) or (dtype == torch.float32 and _backend == "onednn"):
        return 32
    return 1


def _lp(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN x @ w^T (+ b); x [..., K], w [N, K] (any strides) -> [..., N]."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _wgrad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW = dy^T x: dy [M, N], x [M, K] -> [N, K] contiguous.

    The op copies a strided X operand to contiguous (W may have any strides), so the transposed activation it
    copies is the narrower one: dy^T [N, M] when N <= K, else x^T [K, M] (then the small [K, N] result is
    transposed back)."""
    if dy.shape[1] <= x.shape[1]:
        return _lp(dy.t(), x.t())
    return _lp(x.t(), dy.t()).t().contiguous()


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with oneDNN GEMMs forward and backward. x [..., K], W [N, K], b [N] | None -> [..., N]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _lp(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _lp(dy2, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = _wgrad(dy2, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` (y = x W^T + b; x [..., K], W [N, K] -> [..., N]) on the process's fp32 GEMM backend."""
    if _use_onednn(x, weight):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class _OneDNNGroupedLinear(torch.autograd.Function):
    """Per-expert y_e = x_e W_e^T over contiguous row segments, oneDNN GEMMs forward and backward.

    x [S, K] (rows sorted by group), weight [E, N, K], sizes: E ints summing to S -> [S, N].
    Backward: dx_e = dy_e W_e; dW_e = dy_e^T x_e (zeros for an empty group).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.sizes = sizes
        outs = [_lp(x_e, weight[e]) for e, x_e in enumerate(x.split(sizes)) if sizes[e]]
        return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        sizes = ctx.sizes
        dx = dw = None
        pieces = [(e, x_e, dy_e) for e, (x_e, dy_e) in enumerate(zip(x.split(sizes), dy.split(sizes))) if sizes[e]]
        if ctx.needs_input_grad[0]:
            dx = torch.cat([_lp(dy_e, weight[e].t()) for e, _, dy_e in pieces]) if pieces else torch.zeros_like(x)
        if ctx.needs_input_grad[1]:
            dw = torch.zeros_like(weight)
            for e, x_e, dy_e in pieces:
                dw[e] = _wgrad(dy_e, x_e)
        return dx, dw, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM for sorted expert slots: rows of x in segment e (sizes from `counts`) times W_e^T.

    x [S, K], weight [E, N, K], counts [E] int (sum S) -> [S, N]. oneDNN per segment on the fp32 oneDNN backend,
    else `torch._grouped_mm` with int32 end offsets (the caller checks `_grouped_mm`'s alignment rules).
    """
    if _use_onednn(x, weight):
        return _OneDNNGroupedLinear.apply(x, weight, counts.tolist())
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, init and state_dict) whose forward uses `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
