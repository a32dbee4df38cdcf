"""AdamW with fp32 master weights for low-precision parameters and moments stored in a chosen precision.

V3 report §3.3.3 "Low-Precision Optimizer States": the first and second moments of AdamW are tracked in BF16
"without incurring observable performance degradation", while the master weights and gradients stay FP32. The same
section keeps FP32 master weights behind BF16/FP8 compute. torch.optim.AdamW keeps its state in the parameter's dtype
and updates the parameter itself, hence this small optimizer: it serves bf16 training (bf16 working weights, fp32
masters in its state) and the FP8 recipes with BF16 moments (fp32 parameters, no separate master).
"""
from __future__ import annotations

import math

import torch

from .cuda.kernels import Kernels

__all__ = ["AdamW", "fused_adamw_status"]

_FUSED = Kernels("core.cuda.triton_adamw")  # one-pass update on CUDA; imported on the first CUDA step only


def fused_adamw_status() -> dict:
    """Whether the Triton update ran in this process, and why not where it is off (benchmark records)."""
    return _FUSED.status()


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (Loshchilov & Hutter; the update of torch's fused AdamW), state in
    ``moment_dtype`` and fp32 master weights for parameters that are not fp32.

    Per parameter and step, in fp32 (g = grad · scale, scale from `clip_grad_norm_`, else 1):
        w ← w·(1 − lr·wd);  m ← b1·m + (1−b1)·g;  v ← b2·v + (1−b2)·g²;
        w ← w − lr/(1−b1ᵗ) · m / (√v / √(1−b2ᵗ) + eps)
    where w is the fp32 parameter, or the fp32 master ``state["master"]`` of a bf16/fp16 parameter, which then gets
    round(w). m and v are stored rounded to ``moment_dtype`` (the update uses this step's fp32 values). Gradients
    are read in the parameter's dtype and widened exactly. On CUDA one Triton kernel does the whole update of a
    parameter (core.cuda.triton_adamw); elsewhere, or with EVA_CUDA_TRITON=0, the same arithmetic in torch ops.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, moment_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.moment_dtype = moment_dtype
        self._scale: torch.Tensor | None = None
        for group in self.param_groups:
            for p in group["params"]:
                if not p.dtype.is_floating_point:
                    raise ValueError(f"params: AdamW updates floating-point parameters, got {p.dtype}")

    def _state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = 0
            # the exact widening of the initial low-precision weights (what the first step starts from)
            st["master"] = p.detach().float() if p.dtype != torch.float32 else None
            st["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.contiguous_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.contiguous_format)
        return st

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's loader, then the masters and moments as saved: torch casts floating-point state to its
        parameter's dtype, which would round fp32 masters to bf16."""
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, saved in state_dict["state"].items():
            st = self.state[params[int(i)]]
            for k in ("master", "exp_avg", "exp_avg_sq"):
                if torch.is_tensor(saved.get(k)):
                    st[k] = saved[k].to(params[int(i)].device, copy=True)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """The global L2 norm of the gradients (fp32 arithmetic; returned before clipping) and torch's clipping
        rule, coef = min(1, max_norm / (norm + 1e-6)), applied by the next `step` as it reads each gradient
        instead of a pass that rescales them (`torch.nn.utils.clip_grad_norm_` gives the same numbers)."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            self._scale = None
            return 0.0
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in grads:
            by_device.setdefault(t.device, []).append(t)
        first = grads[0].device
        norms = [n.to(first) for ts in by_device.values() for n in torch._foreach_norm(ts, 2, dtype=torch.float32)]
        total = torch.linalg.vector_norm(torch.stack(norms))
        self._scale = torch.clamp(max_norm / (total + 1e-6), max=1.0) if math.isfinite(max_norm) else None
        return float(total)

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
                st = self._state(p)
                st["step"] += 1
                scale = self._scale.to(p.device) if self._scale is not None else None
                if not self._fused(p, st, scale, lr, b1, b2, eps, wd):
                    self._update(p, st, scale, lr, b1, b2, eps, wd)
        self._scale = None
        return loss

    @staticmethod
    def _fused(p, st, scale, lr, b1, b2, eps, wd) -> bool:
        """The Triton update for plain contiguous CUDA tensors (not DTensor shards); False: use `_update`."""
        g = p.grad
        if not (p.is_cuda and type(p.data) is torch.Tensor and p.is_contiguous() and g.is_contiguous()):
            return False
        return _FUSED.call("adamw_step", p.data, g, st["master"], st["exp_avg"], st["exp_avg_sq"], scale, lr=lr,
                           beta1=b1, beta2=b2, eps=eps, weight_decay=wd, step=st["step"]) is not None

    @staticmethod
    def _update(p, st, scale, lr, b1, b2, eps, wd) -> None:
        t = st["step"]
        w = st["master"] if st["master"] is not None else p
        g = p.grad.float()
        if scale is not None:
            g = g * scale
        w.mul_(1 - lr * wd)
        m = st["exp_avg"].float().mul_(b1).add_(g, alpha=1 - b1)
        v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
        st["exp_avg"].copy_(m)
        st["exp_avg_sq"].copy_(v)
        denom = v.sqrt().div_(math.sqrt(1 - b2 ** t)).add_(eps)  # v may be the stored state itself (fp32)
        w.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
        if w is not p:
            p.copy_(w)
