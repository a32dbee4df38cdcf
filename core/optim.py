"""AdamW with the moments stored in a lower precision and the parameters (the master weights) in fp32.

V3 report §3.3.3 "Low-Precision Optimizer States": the first and second moments of AdamW are tracked in BF16
"without incurring observable performance degradation", while the master weights and gradients stay FP32.
torch.optim.AdamW keeps its state in the parameter's dtype, hence this small optimizer.
"""
from __future__ import annotations

import torch

__all__ = ["AdamW"]


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (Loshchilov & Hutter; the update of torch.optim.AdamW) whose state
    ``exp_avg`` / ``exp_avg_sq`` is stored in ``moment_dtype`` (e.g. torch.bfloat16).

    Each step computes in fp32: m = b1·m + (1-b1)·g, v = b2·v + (1-b2)·g²,
    p -= lr·(m̂ / (sqrt(v̂) + eps) + wd·p)
    with m̂, v̂ the bias-corrected moments; m and v are read from and rounded back to ``moment_dtype`` (the
    update uses this step's fp32 values, then they are stored rounded). Parameters must be fp32 (the masters).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, moment_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.moment_dtype = moment_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(f"params: the master weights must be fp32, got {p.dtype}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                st["step"] += 1
                g = p.grad.float()
                m = st["exp_avg"].float().mul_(b1).add_(g, alpha=1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                t = st["step"]
                denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                p.mul_(1 - lr * wd)
                p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
        return loss
