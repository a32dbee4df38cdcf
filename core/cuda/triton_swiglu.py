"""Fused SwiGLU of the routed experts on CUDA (Triton): one kernel forward, one backward.

The routed experts compute h = silu(gate) * up * w between their two grouped GEMMs (core.moe.Experts; w is each
slot's routing weight [S, 1], applied before the down projection), where gate | up are the two halves of one
[S, 2I] GEMM output. That code runs eager even under core.compile (every shape in the dispatch depends on the
routing), and in eager torch it is about ten elementwise kernels over strided halves of [S, 2I] (strided operands
take torch's generic, non-vectorised elementwise kernel). Here

    swiglu_packed(gate_up [S, 2I], w [S, 1] | None) -> h [S, I]
    backward: (d gate | d up) [S, 2I] in one buffer (the GEMM's gradient layout), d w [S, 1]

each read every operand once. Arithmetic is fp32 with one rounding to the output dtype (the eager chain rounds to
bf16 after every product, so results differ from it by bf16 rounding, not more; tests bound both against fp32).
silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))), as torch's silu_backward.

This module imports triton; core.layers imports it only when a CUDA tensor arrives (`core.layers.swiglu_packed`),
and `EVA_CUDA_TRITON=0` keeps the eager path (as for core.cuda.triton_quant). The kernels also run under
TRITON_INTERPRET=1 on CPU tensors (the CPU tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from core.cuda.kernels import on_device, use_torch_ptxas

use_torch_ptxas()  # this module's kernels are built by the ptxas inductor would pick (core.cuda.kernels)

__all__ = ["swiglu_packed"]

BLOCK_S = 16    # rows a program
BLOCK_I = 128   # columns a loop step (a program walks whole rows: the backward's d w sums a row)


@triton.jit
def _fwd_kernel(gu_ptr, w_ptr, h_ptr, S, I: tl.constexpr, stride_gu, stride_h, HAS_W: tl.constexpr, BS: tl.constexpr,
                BI: tl.constexpr):
    rs = tl.program_id(0).to(tl.int64) * BS + tl.arange(0, BS)
    row = rs < S
    if HAS_W:
        w = tl.load(w_ptr + rs, mask=row, other=0.0).to(tl.float32)
    for i0 in tl.static_range(0, I, BI):  # I is a constexpr (one expert width per model): unrolled
        ri = i0 + tl.arange(0, BI)
        m = row[:, None] & (ri[None, :] < I)
        g = tl.load(gu_ptr + rs[:, None] * stride_gu + ri[None, :], mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + rs[:, None] * stride_gu + I + ri[None, :], mask=m, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        if HAS_W:
            h = h * w[:, None]
        tl.store(h_ptr + rs[:, None] * stride_h + ri[None, :], h.to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(gu_ptr, w_ptr, dh_ptr, d_ptr, dw_ptr, S, I: tl.constexpr, stride_gu, stride_dh, stride_d, HAS_W: tl.constexpr,
                NEED_DW: tl.constexpr, BS: tl.constexpr, BI: tl.constexpr):
    rs = tl.program_id(0).to(tl.int64) * BS + tl.arange(0, BS)
    row = rs < S
    if HAS_W:
        w = tl.load(w_ptr + rs, mask=row, other=0.0).to(tl.float32)
    acc = tl.zeros([BS], dtype=tl.float32)
    for i0 in tl.static_range(0, I, BI):  # I is a constexpr (one expert width per model): unrolled
        ri = i0 + tl.arange(0, BI)
        m = row[:, None] & (ri[None, :] < I)
        g = tl.load(gu_ptr + rs[:, None] * stride_gu + ri[None, :], mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + rs[:, None] * stride_gu + I + ri[None, :], mask=m, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + rs[:, None] * stride_dh + ri[None, :], mask=m, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        s = g * sig
        if HAS_W:
            if NEED_DW:
                acc += tl.sum(s * u * dh, axis=1)
            dh = dh * w[:, None]
        du = dh * s
        dg = dh * u * (sig * (1.0 + g * (1.0 - sig)))
        dst = d_ptr + rs[:, None] * stride_d + ri[None, :]
        tl.store(dst, dg.to(d_ptr.dtype.element_ty), mask=m)
        tl.store(dst + I, du.to(d_ptr.dtype.element_ty), mask=m)
    if NEED_DW:
        tl.store(dw_ptr + rs, acc.to(dw_ptr.dtype.element_ty), mask=row)


def _rows(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up with unit stride along its last dim (the kernels' layout; a GEMM output already has it)."""
    return gate_up if gate_up.stride(-1) == 1 else gate_up.contiguous()


def swiglu_forward(gate_up: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """h [S, I] = silu(gate) * up (* weight [S, 1]) from gate_up [S, 2I] (gate first)."""
    gu = _rows(gate_up)
    s, i = gu.shape[0], gu.shape[1] // 2
    h = torch.empty((s, i), dtype=gu.dtype, device=gu.device)
    if s and i:
        w = weight.reshape(-1).contiguous() if weight is not None else gu
        with on_device(gu):
            _fwd_kernel[(triton.cdiv(s, BLOCK_S),)](gu, w, h, s, i, gu.stride(0), h.stride(0),
                                                   HAS_W=weight is not None, BS=BLOCK_S, BI=BLOCK_I, num_warps=4)
    return h


def swiglu_backward(gate_up: torch.Tensor, weight: torch.Tensor | None, dh: torch.Tensor, need_dw: bool):
    """(d gate_up [S, 2I], d weight [S, 1] or None) of `swiglu_forward` for the output gradient dh [S, I]."""
    gu, dh = _rows(gate_up), _rows(dh)
    s, i = gu.shape[0], gu.shape[1] // 2
    d = torch.empty_like(gu)
    dw = torch.empty_like(weight) if (weight is not None and need_dw) else None
    if s and i:
        w = weight.reshape(-1).contiguous() if weight is not None else gu
        with on_device(gu):
            _bwd_kernel[(triton.cdiv(s, BLOCK_S),)](gu, w, dh, d, dw if dw is not None else d, s, i, gu.stride(0),
                                                   dh.stride(0), d.stride(0), HAS_W=weight is not None,
                                                   NEED_DW=dw is not None, BS=BLOCK_S, BI=BLOCK_I, num_warps=4)
    elif dw is not None:
        dw.zero_()
    return d, dw


class _FusedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(gate_up, weight)
        return swiglu_forward(gate_up, weight)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate_up, weight = ctx.saved_tensors
        return swiglu_backward(gate_up, weight, dh, ctx.needs_input_grad[1])


def swiglu_packed(gate_up: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """`core.layers.swiglu_packed` in two fused kernels: gate_up [S, 2I] (2-D), weight [S, 1] or None -> [S, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or (weight is not None and weight.numel() != gate_up.shape[0]):
        raise ValueError(f"swiglu_packed: gate_up must be [S, 2I] and weight [S, 1], got {tuple(gate_up.shape)} and "
                         f"{None if weight is None else tuple(weight.shape)}")
    if torch.is_grad_enabled() and (gate_up.requires_grad or (weight is not None and weight.requires_grad)):
        return _FusedSwiGLU.apply(gate_up, weight)
    return swiglu_forward(gate_up, weight)
