"""One AdamW update with fp32 master weights on CUDA (Triton): a single pass per parameter.

The bf16 training step used to touch every parameter four times after the backward: widen the bf16 gradient into
an fp32 master gradient, scale it for clipping, run torch's fused AdamW over the fp32 masters and moments, round
the masters back into the bf16 parameters (~40 bytes moved a parameter with fp32 moments). Here one kernel reads
the gradient in its own dtype, the master and the moments, and writes the master, the moments and the rounded
working weight (~28 bytes; 20 with BF16 moments, V3 report §3.3.3).

The arithmetic is torch's fused AdamW (aten/src/ATen/native/cuda/fused_adam_utils.cuh, ADAMW mode) in fp32:

    g = grad * scale                     (scale: the clipping coefficient, a device scalar; 1 without clipping)
    w *= 1 - lr * weight_decay             (torch's AdamW; its fused CUDA kernel subtracts lr·wd·w: same to rounding)
    m = b1 * m + (1 - b1) * g ;  v = b2 * v + (1 - b2) * g * g
    w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

with IEEE square root and division (`sqrt_rn`, `div_rn`), then m, v rounded to their storage dtype and the
working weight p = round(w). Called by core.optim.AdamW through core.cuda.kernels (EVA_CUDA_TRITON=0 keeps its
torch path); runs under TRITON_INTERPRET=1 on CPU tensors (the CPU tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from core.cuda.kernels import on_device, use_torch_ptxas

use_torch_ptxas()  # this module's kernels are built by the ptxas inductor would pick (core.cuda.kernels)

__all__ = ["adamw_step"]

BLOCK = 2048    # elements a program: a parameter of a few thousand elements is one or two programs
WARPS = 8


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, w_ptr, m_ptr, v_ptr, scale_ptr, n, decay, step_size, b1, b2, eps, bc2_sqrt,
                  HAS_MASTER: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr)
    if HAS_MASTER:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    else:
        w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = w * decay
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    w = w - step_size * tl.div_rn(m, denom)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    if HAS_MASTER:
        tl.store(w_ptr + offs, w, mask=mask)
    tl.store(p_ptr + offs, w.to(p_ptr.dtype.element_ty), mask=mask)


def adamw_step(p: torch.Tensor, grad: torch.Tensor, master: torch.Tensor | None, exp_avg: torch.Tensor,
               exp_avg_sq: torch.Tensor, scale: torch.Tensor | None, *, lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, step: int) -> torch.Tensor:
    """Update p (any float dtype), master (fp32, same shape, or None when p is the fp32 master itself) and the
    moments in place from grad (p's shape, any float dtype). All contiguous and on one device; scale is a one-element
    fp32 tensor or None. `step` is the 1-based step count after this update (bias corrections). Returns p."""
    tensors = [t for t in (p, grad, master, exp_avg, exp_avg_sq) if t is not None]
    if any(not t.is_contiguous() or t.shape != p.shape for t in tensors):
        raise ValueError("adamw_step: p, grad, master and moments must be contiguous tensors of one shape")
    if master is not None and master.dtype != torch.float32:
        raise ValueError(f"adamw_step: the master weights must be fp32, got {master.dtype}")
    n = p.numel()
    if not n:
        return p
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = (1.0 - beta2 ** step) ** 0.5
    with on_device(p):
        _adamw_kernel[(triton.cdiv(n, BLOCK),)](
            p, grad, master if master is not None else p, exp_avg, exp_avg_sq, scale if scale is not None else p, n,
            1.0 - lr * weight_decay, lr / bc1, beta1, beta2, eps, bc2_sqrt, HAS_MASTER=master is not None,
            HAS_SCALE=scale is not None, BLOCK=BLOCK, num_warps=WARPS)
    return p
