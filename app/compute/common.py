"""Pieces every dashboard's computations share: the config as a cache key, validated overrides, torch set up
for the server, and the dtype names of the knobs."""
from __future__ import annotations

import json
import os

from core.config import ModelConfig

BYTES_PER_ELEMENT = {"bf16": 2, "fp8": 1, "fp32": 4}


def cfg_of(cfg_json: str) -> ModelConfig:
    return ModelConfig.from_hf(json.loads(cfg_json))


def apply_overrides(cfg_json: str, overrides: dict) -> str:
    """The config with `overrides` applied (validated: raises core.config.ConfigError), as JSON."""
    cfg = cfg_of(cfg_json)
    if overrides:
        cfg = cfg.replace(**overrides)
    return json.dumps(cfg.to_hf(), sort_keys=True)



_TORCH_READY = False


def torch_setup():
    """Import torch for the app: one intra-op thread per script run, and torch's own fp32 GEMMs.

    Each session's script runs in its own thread; with torch's default (one OpenMP thread per core) concurrent
    runs oversubscribe a 2-core server and small ops slow down 10-100x. One thread per run measured 20-200x
    faster under load here, and equal when idle at these sizes.

    fp32 GEMMs stay on torch's library (MKL) in the server unless `EVA_FP32_GEMM` is set: the pages multiply
    tensors whose shapes follow the knobs, and oneDNN (core.gemm's faster fp32 choice) JIT-compiles and caches a
    kernel per shape at ~0.5 MB each, up to its 1024-entry cache (~500 MB on a 0.7-2.7 GB host). The training
    worker keeps core.gemm's choice: its shapes are few (padded expert segments; ~150 kernels, ~75 MB, for the
    default run) and training is where the GEMMs dominate."""
    global _TORCH_READY
    import torch
    if not _TORCH_READY:
        torch.set_num_threads(1)
        from core import gemm
        if gemm.ENV_VAR not in os.environ:
            gemm.set_fp32_backend("torch")
        _TORCH_READY = True
    return torch


def torch_dtype(name: str):
    """The torch dtype of a knob's dtype name (bf16, fp32, fp8 = E4M3)."""
    torch = torch_setup()
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}[name]
