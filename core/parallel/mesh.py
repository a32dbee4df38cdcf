"""Process groups and the 2-D DeviceMesh for data + expert parallelism, and the `--dp/--ep` rules.

Layout (as torchtitan's `ParallelDims`: expert parallelism borrows from the data-parallel ranks):
    world = D ranks, every rank a slice of the global batch (data parallel over all D);
    mesh ("dp_mod_ep", "ep") of shape (D // E, E): rank r sits at (r // E, r % E);
    "ep"        groups of E consecutive ranks that split the routed experts between them;
    "dp_mod_ep" the D // E ranks holding the SAME experts, over which FSDP shards those experts;
    "dp"        the flattened mesh (all D ranks), over which FSDP shards every other parameter.
Consecutive ranks share an EP group, so with torchrun's contiguous rank numbering an EP group stays inside a node
whenever E divides the GPUs per node (the cheap NVLink side of V3's dispatch, report §3.2.2).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["ParallelError", "ParallelPlan", "validate_plan", "world_from_env", "init_distributed",
           "build_meshes", "Meshes", "backend_for"]


class ParallelError(ValueError):
    """An impossible --dp/--ep/--batch-size combination; the message starts with the flag's name."""

    def __init__(self, flag: str, rule: str):
        self.flag = flag
        super().__init__(f"{flag}: {rule}")


@dataclass(frozen=True)
class ParallelPlan:
    """dp = D data-parallel ranks (= world size), ep = E expert-parallel ranks (E divides D)."""

    dp: int = 1
    ep: int = 1

    @property
    def enabled(self) -> bool:
        return self.dp > 1


def world_from_env() -> tuple[int, int]:
    """(world size, rank) as torchrun exports them; (1, 0) outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def validate_plan(plan: ParallelPlan, world_size: int, n_routed_experts: int, batch_size: int,
                  precision: str = "fp32") -> None:
    """Raise ParallelError naming the flag for every combination that cannot run.

    Pure (no communication), so every rank reaches the same verdict from the same command line and stops
    before the first collective: no rank is left waiting for the others.
    """
    d, e = plan.dp, plan.ep
    for flag, v in (("--dp", d), ("--ep", e)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ParallelError(flag, f"must be an integer >= 1, got {v!r}")
    if d != world_size:
        how = (f"launch {d} processes (torchrun --nproc-per-node {d} -m core.train ...)" if world_size == 1
               else f"this job has {world_size} processes")
        raise ParallelError("--dp", f"must equal the world size ({world_size}), got {d}: {how}")
    if d % e:
        raise ParallelError("--ep", f"must divide --dp ({d}): expert parallelism borrows data-parallel ranks, got {e}")
    if e > 1:
        if n_routed_experts == 0:
            raise ParallelError("--ep", "the model has no routed experts (n_routed_experts = 0); use --ep 1")
        if n_routed_experts % e:
            raise ParallelError("--ep", f"must divide the routed expert count n_routed_experts ({n_routed_experts}), "
                                        f"got {e}")
    if batch_size % d:
        raise ParallelError("--batch-size", f"must be divisible by --dp ({d}) so every rank gets the same number "
                                            f"of sequences, got {batch_size}")
    if d > 1 and precision != "fp32":
        # bf16/FP8 would need FSDP2 mixed precision that keeps the routers in fp32: not built yet.
        raise ParallelError("--precision", f"distributed training supports fp32 only for now, got {precision!r}")


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU ones."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device_type: str = "cpu") -> torch.device:
    """Join the torchrun job (env:// rendezvous) with the backend of `device_type`; returns this rank's device."""
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device))
    return device


@dataclass
class Meshes:
    """The meshes of one plan (see the module docstring). `ranks_per_node` = torchrun's LOCAL_WORLD_SIZE."""

    plan: ParallelPlan
    world: object  # DeviceMesh ("dp_mod_ep", "ep")
    dp: object     # DeviceMesh, flattened: all D ranks
    ep: object     # DeviceMesh ("ep",)
    dp_mod_ep: object  # DeviceMesh ("dp_mod_ep",)
    rank: int
    ranks_per_node: int


def build_meshes(plan: ParallelPlan, device_type: str = "cpu") -> Meshes:
    """init_device_mesh over the running job (call after `init_distributed`)."""
    from torch.distributed.device_mesh import init_device_mesh
    world = init_device_mesh(device_type, (plan.dp // plan.ep, plan.ep), mesh_dim_names=("dp_mod_ep", "ep"))
    dp = world._flatten("dp")  # torchtitan's way to get the combined data-parallel dim
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(plan.dp)))
    return Meshes(plan=plan, world=world, dp=dp, ep=world["ep"], dp_mod_ep=world["dp_mod_ep"],
                  rank=dist.get_rank(), ranks_per_node=per_node)
