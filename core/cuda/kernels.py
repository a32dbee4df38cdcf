"""The switch and the lazy loader of core.cuda's Triton kernels, one place for all users: the fused FP8 quantizers
(core.cuda.triton_quant, called by core.cuda.fp8_linear), the routed experts' SwiGLU (core.cuda.triton_swiglu,
called by core.layers) and the one-pass AdamW (core.cuda.triton_adamw, called by core.optim).

`EVA_CUDA_TRITON=0` keeps every caller on its eager / compiled path; it is read at every call, so a benchmark can
time both paths in one process. A `Kernels` imports its module on the first call (callers ask only for CUDA
tensors); a failed import or kernel build switches it off for the rest of the process and keeps the reason for the
benchmark records (`status`). Importing this module needs no triton.
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

__all__ = ["ENV_VAR", "enabled", "why", "on_device", "Kernels"]

ENV_VAR = "EVA_CUDA_TRITON"


def enabled() -> bool:
    """False when EVA_CUDA_TRITON=0."""
    return os.environ.get(ENV_VAR, "1") != "0"


def why(e: Exception) -> str:
    """A failure in one line, for status records."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def on_device(t: torch.Tensor):
    """The context a Triton launch on `t` runs in: t's CUDA device (a launch goes to the current device, which need
    not be t's), or none for a CPU tensor (TRITON_INTERPRET=1)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class Kernels:
    """One Triton kernel module, imported when first needed: `call(fn, ...)` runs module.fn or returns None
    (switched off, triton missing, or an earlier failure), `status()` says which functions ran and why it is off."""

    def __init__(self, module: str):
        self.name = module
        self.module = None
        self.error: str | None = None
        self.ran: set[str] = set()

    def load(self):
        """The module when its kernels may run, else None."""
        if not enabled() or self.error is not None:
            return None
        if self.module is None:
            try:
                self.module = importlib.import_module(self.name)
            except Exception as e:  # noqa: BLE001 - no (working) triton: the callers' other paths still run
                self.error = f"import: {why(e)}"
                return None
        return self.module

    def call(self, fn: str, *args, **kwargs):
        """module.fn(*args, **kwargs), or None where the kernels are off or fail (a kernel that fails to build
        must not stop training: the caller falls back, the reason is kept)."""
        mod = self.load()
        if mod is None:
            return None
        try:
            out = getattr(mod, fn)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self.error = f"{fn}: {why(e)}"
            return None
        self.ran.add(fn)
        return out

    def status(self) -> dict:
        return {"enabled": enabled(), "ran": sorted(self.ran), "error": self.error}
