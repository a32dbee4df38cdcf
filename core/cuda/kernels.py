"""The switch and the lazy loader of core.cuda's Triton kernels, one place for all users: the fused FP8 quantizers
(core.cuda.triton_quant, called by core.cuda.fp8_linear), the routed experts' SwiGLU (core.cuda.triton_swiglu,
called by core.layers) and the one-pass AdamW (core.cuda.triton_adamw, called by core.optim).

`EVA_CUDA_TRITON=0` keeps every caller on its eager / compiled path; it is read at every call, so a benchmark can
time both paths in one process. A `Kernels` imports its module on the first call (callers ask only for CUDA
tensors); a failed import or kernel build switches it off for the rest of the process and keeps the reason for the
benchmark records (`status`). Importing this module needs no triton.

One compiler for every process: Triton turns its PTX into machine code with the ptxas named by TRITON_PTXAS_PATH,
else its own bundled one. torch's inductor points TRITON_PTXAS_PATH at the ptxas torch ships (torch/bin/ptxas) on
its first compile, so the same kernel was built by a different ptxas depending on whether a torch.compile ran first
in the process, and built wrong by one of them (triton_quant.FUSED_TRANSPOSE_DTYPES). Each kernel module calls
`use_torch_ptxas` when imported, before any of its kernels is built: the choice inductor makes, made first.
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

__all__ = ["ENV_VAR", "enabled", "why", "use_torch_ptxas", "on_device", "Kernels"]

ENV_VAR = "EVA_CUDA_TRITON"


def enabled() -> bool:
    """False when EVA_CUDA_TRITON=0."""
    return os.environ.get(ENV_VAR, "1") != "0"


def why(e: Exception) -> str:
    """A failure in one line, for status records."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def use_torch_ptxas() -> str | None:
    """Point TRITON_PTXAS_PATH at torch's own ptxas (torch/bin/ptxas, what inductor sets on its first compile) when
    it is unset and that file exists; returns the path Triton will use from here on (None: Triton's bundled one).
    Mirrors torch._inductor.runtime.compile_tasks._set_triton_ptxas_path (private, so not called)."""
    if os.environ.get("TRITON_PTXAS_PATH") is None:
        ptxas = os.path.join(os.path.dirname(torch.__file__), "bin", "ptxas")
        if os.path.isfile(ptxas) and os.access(ptxas, os.X_OK):
            os.environ["TRITON_PTXAS_PATH"] = ptxas
    return os.environ.get("TRITON_PTXAS_PATH")


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
        self.ptxas: str | None = None

    def load(self):
        """The module when its kernels may run, else None."""
        if not enabled() or self.error is not None:
            return None
        if self.module is None:
            try:
                self.module = importlib.import_module(self.name)  # calls use_torch_ptxas()
                self.ptxas = os.environ.get("TRITON_PTXAS_PATH")
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
        return {"enabled": enabled(), "ran": sorted(self.ran), "error": self.error, "ptxas": self.ptxas}
