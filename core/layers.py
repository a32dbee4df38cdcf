"""Small building blocks shared by attention, MoE and the model: RMSNorm, the token embedding and the SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cuda.kernels import Kernels
from .gemm import Linear


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with fp32 statistics and a hand-written backward, for training: autograd through `F.rms_norm` runs
    a chain of elementwise ops on CPU (the fused `_fused_rms_norm_backward` has no CPU kernel); speed-ups in
    docs/performance.md.

    Forward (transformers' semantics): x_hat = x * rstd in fp32, rstd = (mean(x^2) + eps)^-1/2, rounded to x's
    dtype; y = weight * x_hat.
    Backward (fp32 inside): gw = g * weight; dx = rstd * (gw - x_hat * mean(gw * x_hat)); dweight = sum(g * x_hat).
    p = g * x_hat serves both reductions: dweight = column sums of p, mean(gw * x_hat) = (p @ weight) / dim (a
    matrix-vector product instead of another elementwise pass); dx is built in place in gw's buffer.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        x_hat = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x_hat, weight, rstd)
        return weight * x_hat

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_hat, weight, rstd = ctx.saved_tensors
        gf, xh, wf = g.float(), x_hat.float(), weight.float()
        p = (gf * xh).flatten(0, -2)  # [N, dim]
        dweight = p.sum(0)
        mean_gw_xh = torch.mv(p, wf).view(rstd.shape).div_(wf.numel())  # [..., 1]
        dx = (gf * wf).addcmul_(xh, mean_gw_xh, value=-1).mul_(rstd)
        return dx.to(x_hat.dtype), dweight.to(weight.dtype), None


class RMSNorm(nn.Module):
    """RMSNorm (eps 1e-6 in DeepSeek-V3), computed in fp32 like transformers' DeepseekV3RMSNorm.

    y = weight * x / sqrt(mean(x^2) + eps);  x: [..., dim] -> [..., dim] (input dtype).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def init_weights(self, std: float | None = None) -> None:
        """weight = 1 (`std` unused: the norm's scale starts at identity, as in transformers)."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # torch's fused CUDA kernel, forward and backward (fp32 statistics inside)
            return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)
        if x.dtype == torch.float32 and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # inference: one fused kernel
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class Embedding(nn.Embedding):
    """`nn.Embedding` (same parameters and state_dict) with the model's init: weight [V, H] ~ N(0, std)."""

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, 0.0, std)


def _swiglu_forward(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    h = F.silu(gate).mul_(up)  # one new buffer, the products in place
    return h.mul_(weight) if weight is not None else h


def _swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None,
                     need_dw: bool, dg: torch.Tensor | None = None, du: torch.Tensor | None = None):
    """(d gate, d up, d weight) of h = silu(gate) * up (* weight), silu recomputed; `dg` / `du`: buffers (e.g. the
    two halves of one [S, 2I] gradient) to write the first two into instead of new tensors."""
    s = F.silu(gate)
    dw = None
    if weight is not None:
        if need_dw:
            dw = (s * up).mul_(dh).sum_to_size(weight.shape)
        dh = dh * weight  # a fresh tensor: safe to reuse in place below
        du = torch.mul(dh, s, out=du) if du is not None else dh * s
        dgate_in = dh.mul_(up)
    else:
        du = torch.mul(dh, s, out=du) if du is not None else dh * s
        dgate_in = dh * up
    if dg is not None:
        return torch.ops.aten.silu_backward.grad_input(dgate_in, gate, grad_input=dg), du, dw
    return torch.ops.aten.silu_backward(dgate_in, gate), du, dw


class _SwiGLU(torch.autograd.Function):
    """h = silu(gate) * up (* weight), with a hand-written backward that reuses its buffers instead of autograd's
    per-op temporaries; bit-identical to autograd (the same products in the same order)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(gate, up, weight)
        return _swiglu_forward(gate, up, weight)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        return _swiglu_backward(dh, gate, up, weight, ctx.needs_input_grad[2])


class _PackedSwiGLU(torch.autograd.Function):
    """`_SwiGLU` on one [..., 2I] tensor holding gate | up (an expert GEMM's output): its gradient is written into
    one [..., 2I] buffer, where separate gate / up gradients would be concatenated by the chunk's backward."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(gate_up, weight)
        return _swiglu_forward(*gate_up.chunk(2, dim=-1), weight)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate_up, weight = ctx.saved_tensors
        d = torch.empty_like(gate_up)
        dg, du = d.chunk(2, dim=-1)
        _, _, dw = _swiglu_backward(dh, *gate_up.chunk(2, dim=-1), weight, ctx.needs_input_grad[1], dg, du)
        return d, dw


def _grad_needed(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def swiglu(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up, times `weight` (broadcast, e.g. routing weights [S, 1]) if given. gate, up: [..., I]."""
    if _grad_needed(gate, up, weight):
        return _SwiGLU.apply(gate, up, weight)
    return _swiglu_forward(gate, up, weight)


_FUSED_SWIGLU = Kernels("core.cuda.triton_swiglu")  # imported on the first CUDA call only


def fused_swiglu_status() -> dict:
    """Whether the fused CUDA SwiGLU ran in this process, and why it is off if it is (for benchmark records)."""
    return _FUSED_SWIGLU.status()


def swiglu_packed(gate_up: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """`swiglu` of the two halves of gate_up [..., 2I] (gate first, as the experts' `gate_up_proj` rows) -> [..., I].
    On CUDA (2-D gate_up, the routed experts' [S, 2I]) one fused Triton kernel each way (core.cuda.triton_swiglu)."""
    if gate_up.is_cuda and gate_up.dim() == 2:
        out = _FUSED_SWIGLU.call("swiglu_packed", gate_up, weight)  # None: switched off or failed (reason kept)
        if out is not None:
            return out
    if _grad_needed(gate_up, weight):
        return _PackedSwiGLU.apply(gate_up, weight)
    return _swiglu_forward(*gate_up.chunk(2, dim=-1), weight)


class MLP(nn.Module):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x)) (official w2(silu(w1 x) * w3 x)).

    Used for the dense layers (intermediate_size) and for the fused shared experts
    (n_shared_experts * moe_intermediate_size). x: [..., hidden] -> [..., hidden].
    """

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
