"""torch.compile of the decoder blocks' training forward, on CPU (inductor's C++ backend) and on CUDA (Triton).

In eager mode most of a step outside the GEMMs is elementwise glue (RMSNorm, RoPE, q/k concatenations, SwiGLU,
the router's sigmoid / top-k / renormalisation, residual adds, dtype copies; issue #14's GPU profile). Compiling a
whole `DecoderLayer` lets inductor fuse that glue forward and backward. What keeps the graphs whole:

* RoPE runs in real arithmetic under compile (`core.rope.apply_rotary_interleaved` / `RotaryEmbedding.forward`
  switch on `torch.compiler.is_compiling()`): inductor has no code generation for the complex multiply of the eager
  path, which split the graphs of the earlier per-module compile (docs/performance.md, GPU section);
* the expert loads are a fixed-shape scatter-add (`core.moe.expert_loads`), not `bincount`;
* the routed experts' dispatch (argsort, padded segments, grouped GEMM, `index_add` combine: every shape in it
  depends on the routing) is isolated DELIBERATELY: `Experts.forward` runs eager under `torch.compiler.disable`.
  A MoE block is therefore three graphs (attention + norms + router | expert loads + shared experts | the final
  residual add) around one eager island; a dense block is one graph. `graph_breaks` checks exactly that (tests).
  Because the expert GEMMs stay eager, the grouped GEMM's offsets are never traced (torch.compile of
  `torch._grouped_mm` needs segment offsets aligned to 16 bytes, which the eager island does not have to meet).

Only the training path is compiled: no KV cache and gradients enabled (`use_compiled`). Evaluation, sampling and
decoding run the blocks as written. Shapes are static (`dynamic=False`): a training run has two sequence lengths
(T for the main blocks, T - k for MTP depth k), one graph each. If compiling fails, that block kind falls back to
eager for the rest of the process and the error is kept (`compile_errors`); a run's records carry
`block_status` (how many training forwards ran compiled).

Switches: `TrainConfig.compile` / `--compile` (CPU or CUDA); `EVA_CUDA_COMPILE_BLOCKS=1` still compiles every
CUDA run (the GPU benchmark's `--compiled-blocks`). On CPU inductor needs a C++ compiler (`cpp_compiler`).
"""
from __future__ import annotations

import os
import shutil

import torch
from torch import nn

__all__ = ["ENV_VAR", "cuda_opt_in", "cpp_compiler", "compile_blocks", "block_status", "compile_errors",
           "graph_breaks"]

ENV_VAR = "EVA_CUDA_COMPILE_BLOCKS"
_ERRORS: dict[str, str] = {}


def cuda_opt_in() -> bool:
    """True when EVA_CUDA_COMPILE_BLOCKS=1 (every CUDA training run compiles its blocks)."""
    return os.environ.get(ENV_VAR, "0") == "1"


def cpp_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would call (`$CXX`, else g++ / c++ / clang++ on PATH), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compile_errors() -> dict[str, str]:
    """Block kinds whose compilation failed in this process -> the error (those blocks run eager)."""
    return dict(_ERRORS)


def block_status(model: nn.Module) -> dict | None:
    """What ran compiled in `model`: None if no block is compiled, else {"blocks": compiled decoder blocks,
    "compiled_calls": training forwards that ran compiled, "eager_calls": training forwards that ran eager because
    compiling that block kind failed, "errors": `compile_errors()`}."""
    wrapped = [m for m in model.modules() if hasattr(m, "_compile_calls")]
    if not wrapped:
        return None
    return {"blocks": len(wrapped), "compiled_calls": sum(m._compile_calls["compiled"] for m in wrapped),
            "eager_calls": sum(m._compile_calls["eager"] for m in wrapped), "errors": compile_errors()}


def _prepare_tracing() -> None:
    """What dynamo must not trace into, done before any block is traced."""
    from core import attention, gemm
    gemm.fp32_backend()  # resolve the GEMM library now: its first call takes a lock, which dynamo cannot trace
    # shapes are static in these graphs, so the SDPA kernel choice is a trace-time constant; marked here rather than
    # where it is defined because the marker imports torch._dynamo (~1.5 s) into every process that imports it
    torch.compiler.assume_constant_result(attention.sdpa_takes_dv)


def use_compiled(x: torch.Tensor, start_pos: int = 0, cache=None) -> bool:
    """A block forward is compiled only on the training path: no cache, gradients on."""
    return cache is None and torch.is_grad_enabled()


def _kind(layer: nn.Module) -> str:
    return f"{type(layer.self_attn).__name__}+{type(layer.mlp).__name__}"


def _isolate_experts(layer: nn.Module) -> None:
    """Run the routed experts (data-dependent shapes) eager, between the block's graphs (see the module doc)."""
    from core.moe import MoE
    experts = layer.mlp.experts if isinstance(layer.mlp, MoE) else None
    if experts is not None and "forward" not in vars(experts):  # an instance attribute: state_dict names untouched
        experts.forward = torch.compiler.disable(experts.forward, reason="MoE dispatch: data-dependent shapes")


def _wrap(layer: nn.Module) -> None:
    """layer.forward -> its compiled forward on the training path, the original elsewhere (or after a failure)."""
    orig = layer.forward
    compiled = torch.compile(orig, dynamic=False)
    key = _kind(layer)

    calls = layer._compile_calls = {"compiled": 0, "eager": 0}

    def forward(x, start_pos=0, cache=None):
        if not use_compiled(x, start_pos, cache):
            return orig(x, start_pos=start_pos, cache=cache)
        if key not in _ERRORS:
            # build the RoPE table eagerly: tracing then sees a cached table, not its (complex) construction
            layer.self_attn.rotary.cos_sin(start_pos, x.shape[1], x.device)
            try:
                out = compiled(x, start_pos, cache)
                calls["compiled"] += 1
                return out
            except Exception as e:  # noqa: BLE001 - a compiler failure falls back to eager, not a failed run
                _ERRORS[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        calls["eager"] += 1
        return orig(x, start_pos=start_pos, cache=cache)

    layer.forward = forward


def compile_blocks(model: nn.Module) -> dict:
    """Compile, in place, the training forward of every decoder block of a `core.model.DeepSeekV3` (main layers
    and MTP blocks), on the device the model lives on. Parameters and state_dict names are untouched.

    Returns {"blocks": number wrapped}. Idempotent (a block already wrapped is skipped)."""
    from core.model import DecoderLayer

    _prepare_tracing()
    n = 0
    for m in model.modules():
        if isinstance(m, DecoderLayer) and not hasattr(m, "_compile_calls"):
            _isolate_experts(m)
            _wrap(m)
            n += 1
    return {"blocks": n}


def graph_breaks(layer: nn.Module, x: torch.Tensor) -> dict:
    """Trace one decoder block's training forward with `torch._dynamo.explain` (no code generation): {"graphs",
    "breaks", "reasons": the break reasons, one line each}. A dense block must give one graph; a MoE block only
    the deliberate break around `Experts.forward` (see the module doc). Isolates the layer's experts, as
    `compile_blocks` does (they then run under `torch.compiler.disable`, eager as before)."""
    _prepare_tracing()
    _isolate_experts(layer)
    layer.self_attn.rotary.cos_sin(0, x.shape[1], x.device)
    ex = torch._dynamo.explain(type(layer).forward.__get__(layer))(x)  # the class's forward, not a wrapper
    return {"graphs": ex.graph_count, "breaks": ex.graph_break_count,
            "reasons": [b.reason.splitlines()[0] + " " + b.reason.split("Explanation:")[-1].splitlines()[0]
                        for b in ex.break_reasons]}
