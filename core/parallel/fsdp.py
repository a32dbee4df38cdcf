"""`parallelize(model, meshes)`: expert parallelism, then FSDP2 `fully_shard`, applied to a built DeepSeekV3.

Kept apart from the model, as torchtitan's `parallelize_deepseekv3` is: the model class runs unchanged on one
process; this module only rewires an instance. Also the collectives the training step needs on top of FSDP:
global expert loads, the global gradient norm, and a full (unsharded) state dict for `save_hf`.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from core.moe import MoE
from core.parallel.expert_parallel import CommStats, apply_expert_parallel, is_expert_parallel
from core.parallel.mesh import Meshes

__all__ = ["parallelize", "global_loads", "clip_grad_norm_", "full_state_dict", "all_mean"]


def parallelize(model: nn.Module, meshes: Meshes) -> CommStats:
    """Split every MoE layer's routed experts over the "ep" mesh (when E > 1), then shard with FSDP2.

    FSDP units (torchtitan's choice): each decoder block (also the MTP modules' blocks), its routed experts as a
    separate unit on the "dp_mod_ep" mesh (they are already split over "ep"), and the root (embedding, final norm, head)
    on the flattened "dp" mesh. Expert gradients are divided by D, the number of ranks whose losses they sum
    (FSDP would divide by D // E: each rank's experts already collect E ranks' tokens).
    Returns the `CommStats` the expert exchanges count into.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    plan = meshes.plan
    stats = CommStats(rank=meshes.rank, ranks_per_node=meshes.ranks_per_node)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if plan.ep > 1:
        for moe in moes:
            apply_expert_parallel(moe.experts, meshes.ep.get_group(), stats)
            fully_shard(moe.experts, mesh=meshes.dp_mod_ep)
            moe.experts.set_gradient_divide_factor(float(plan.dp))
            if meshes.dp_mod_ep.size() > 1:
                # a custom divide factor makes FSDP reduce with PREMUL_SUM, which gloo lacks: SUM, then divide
                # locally. Not on a 1-rank mesh: there torch 2.13 FSDP2 divides by the factor twice.
                moe.experts.set_force_sum_reduction_for_comms(True)
    # MTP: only the decoder block is a unit; its norms/projection stay with the root because the model calls
    # `shared_head_norm` outside MTPModule.forward (FSDP gathers a unit's parameters around its forward only)
    blocks = list(model.model.layers) + [m.block for m in model.mtp]
    for block in blocks:
        fully_shard(block, mesh=meshes.dp)
    fully_shard(model, mesh=meshes.dp)
    # the trainer calls compute_loss, not forward: FSDP must gather the root's parameters around it too
    register_fsdp_forward_method(model, "compute_loss")
    return stats


def all_mean(values: list[float], device: torch.device | str = "cpu", group=None) -> list[float]:
    """The mean over ranks of each value (one all_reduce for the list; `device` = where the backend reduces)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return (t / dist.get_world_size(group)).tolist()


def global_loads(loads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-layer expert loads c_i summed over all ranks (the global batch's counts), one all_reduce."""
    if not loads:
        return []
    flat = torch.stack([c.to(torch.int64) for c in loads])
    dist.all_reduce(flat)
    return list(flat.unbind(0))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> float:
    """Global gradient norm over every rank's shard (plain-tensor arithmetic), then torch's clipping rule.

    Each parameter element lives on exactly one rank (FSDP shards over "dp", experts over "dp_mod_ep" x "ep"),
    so the sum over ranks of local squared norms is the squared norm of the full gradient.
    clip_coef = max_norm / (norm + 1e-6), clamped to 1 (`torch.nn.utils.clip_grad_norm_`).
    """
    grads = [_local(p.grad) for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for g in grads:
        sq += g.float().pow(2).sum()
    dist.all_reduce(sq)
    norm = float(sq.sqrt())
    if math.isfinite(norm) and math.isfinite(max_norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return norm


def full_state_dict(model: nn.Module, meshes: Meshes) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict (CPU tensors) on rank 0, None elsewhere; every rank must call it.

    Non-expert tensors come from `get_model_state_dict(full_state_dict=True, cpu_offload=True)` (FSDP
    all-gathers); expert tensors are first gathered over "dp_mod_ep" (`full_tensor`), then their E slices are
    all-gathered over "ep" and concatenated in rank order (rank j holds experts j*N/E ...).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ep_group = meshes.ep.get_group()
    for name, mod in model.named_modules():
        if not is_expert_parallel(mod):
            continue
        for pname in ("gate_up_proj", "down_proj"):
            p = getattr(mod, pname)
            part = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().contiguous()
            parts = [torch.empty_like(part) for _ in range(mod.ep_size)]
            dist.all_gather(parts, part, group=ep_group)
            if meshes.rank == 0:
                sd[f"{name}.{pname}" if name else pname] = torch.cat(parts).cpu()
    return sd if meshes.rank == 0 else None
