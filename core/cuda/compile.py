"""torch.compile for the engine's training blocks on CUDA: attention, dense/shared MLPs and the block norms.

In eager mode a 920M-parameter step spends most of its kernel time outside GEMMs (issue #14's profile: softmax,
elementwise kernels, dtype copies); the compiler fuses the elementwise chains of these blocks (RMSNorm, RoPE,
SwiGLU, the q/k concatenations) into a few kernels each, forward and backward. The MoE dispatch (argsort, bincount,
grouped GEMM with data-dependent offsets) stays eager. Attention is compiled only on its training path (no KV
cache, no returned probabilities); decoding runs the module as written.

Opt-in (EVA_CUDA_COMPILE_BLOCKS=1): measured on an H200 (torch 2.11, docs/performance.md) the compiled blocks made
the 920M step ~8% and the 100M step ~30% SLOWER than eager with torch's fused RMSNorm and SDPA kernels (inductor
cannot generate code for the complex multiply of the interleaved RoPE and falls back around it, splitting the
graphs), so the engine runs eager by default. Every compiled forward falls back to the module's own forward for the
rest of the process if compilation fails (the error is kept in `compile_errors()`).
"""
from __future__ import annotations

import os

import torch
from torch import nn

_ERRORS: dict[str, str] = {}


def enabled() -> bool:
    return os.environ.get("EVA_CUDA_COMPILE_BLOCKS", "0") == "1"


def compile_errors() -> dict[str, str]:
    return dict(_ERRORS)


def _guarded(module: nn.Module, key: str, use_compiled) -> None:
    """Replace module.forward (an instance attribute: parameters and state_dict names are untouched) by the
    compiled forward where `use_compiled(*args, **kwargs)` holds, the original forward elsewhere."""
    orig = module.forward
    compiled = torch.compile(orig)

    def forward(*args, **kwargs):
        if key not in _ERRORS and use_compiled(*args, **kwargs):
            try:
                return compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a compiler failure falls back to eager, not a failed run
                _ERRORS[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return orig(*args, **kwargs)

    module.forward = forward


def compile_blocks(model: nn.Module) -> dict:
    """Compile, in place, the attention modules (training path), the MLPs and the decoder blocks' norms of a
    `core.model.DeepSeekV3` that lives on CUDA. Returns {"compiled": count, "enabled": bool}."""
    from core.attention import MLA, GroupedQueryAttention
    from core.layers import MLP, RMSNorm

    if not enabled():
        return {"compiled": 0, "enabled": False}
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, (MLA, GroupedQueryAttention)):
            _guarded(m, "attention", lambda x, start_pos=0, cache=None, return_attn=False:
                     cache is None and not return_attn and torch.is_grad_enabled())
        elif isinstance(m, MLP) or (isinstance(m, RMSNorm) and name.rsplit(".", 1)[-1] in (
                "input_layernorm", "post_attention_layernorm", "norm")):
            _guarded(m, type(m).__name__, lambda x: torch.is_grad_enabled())
        else:
            continue
        n += 1
    return {"compiled": n, "enabled": True}
