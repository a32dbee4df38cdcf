"""Error of every quantized tensor of a model layer under an FP8 recipe: one forward + backward of a freshly
initialised model on a real batch, with ``FP8Stats`` recording each operand's SQNR (the FP8 lab's per-tensor view
of what a recipe switch buys). Not re-exported by ``core.fp8`` (it imports the model, which core.fp8 must not).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.config import ModelConfig, get_preset
from core.data import get_dataset
from core.fp8.recipe import FP8Recipe, get_recipe, operand_specs, swiglu_cache_spec
from core.fp8.training import convert_to_fp8, get_fp8_stats, site_of
from core.model import DeepSeekV3
from core.rng import seeded

__all__ = ["ROLE_OPERANDS", "tensor_errors"]

#: FP8Stats role -> (operand key of ``operand_specs``, GEMM, tensor) as the recipe table names them.
ROLE_OPERANDS = {"act": ("x", "Fprop", "input x"), "weight": ("w", "Fprop", "weight W"),
                 "grad": ("dy", "Dgrad", "output gradient dY"), "act_wgrad": ("x_wgrad", "Wgrad", "input x"),
                 "grad_wgrad": ("dy_wgrad", "Wgrad", "output gradient dY"),
                 "swiglu_cache": (None, "-", "SwiGLU input (kept for backward)")}


def _site(module: str) -> str:
    if module.endswith("experts.up") or module.endswith("experts"):  # the SwiGLU cache sits after the up GEMM
        return "expert_up"
    if module.endswith("experts.down"):
        return "expert_down"
    return site_of(module)


def tensor_errors(recipe: str | FP8Recipe, model: ModelConfig | str = "mini", layer: int | None = None,
                  batch_size: int = 4, seq_len: int = 64, seed: int = 0, dataset: str = "synthetic") -> list[dict]:
    """One training step's forward + backward (LM cross-entropy) of a fresh ``model`` under ``recipe``; one row per
    quantized tensor of decoder layer ``layer`` (default: the first MoE layer), summed over its modules of the same
    site: {site, gemm, tensor, module, format, granularity, pow2_scale, sqnr_db, flushed_to_zero_fraction}.
    The optimizer step is not taken (the error is that of the tensors, not of the update)."""
    cfg = get_preset(model) if isinstance(model, str) else model
    r = get_recipe(recipe)
    if layer is None:
        layer = next((i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)), 0)
    if not 0 <= layer < cfg.num_hidden_layers:
        raise ValueError(f"layer: expected 0..{cfg.num_hidden_layers - 1}, got {layer!r}")
    with seeded(seed):  # (the global generator: the app calls this from a session's thread)
        net = convert_to_fp8(DeepSeekV3(cfg), r)
    x, y, _ = get_dataset(dataset, seed).batch(batch_size, seq_len, torch.Generator().manual_seed(seed))
    out = net(x)
    logits = out if torch.is_tensor(out) else out.logits
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).backward()
    prefix = f"model.layers.{layer}."
    rows = []
    for key, e in get_fp8_stats(net).snapshot()["tensors"].items():
        module, _, role = key.rpartition(".")
        if not module.startswith(prefix) or role not in ROLE_OPERANDS:
            continue
        site = _site(module)
        operand, gemm, tensor = ROLE_OPERANDS[role]
        spec = swiglu_cache_spec(r) if operand is None else operand_specs(r, site)[operand]
        rows.append({"site": site, "gemm": gemm, "tensor": tensor, "module": module[len(prefix):],
                     "format": spec.fmt.upper(), "granularity": e["granularity"], "pow2_scale": e["scale_pow2"],
                     "sqnr_db": e["sqnr_db"], "flushed_to_zero_fraction": e["flushed_to_zero_count"] / e["numel"]})
    return rows
