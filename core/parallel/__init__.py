"""Data and expert parallelism for `core.model.DeepSeekV3` on torch.distributed (gloo on CPU, NCCL on CUDA).

mesh.py             --dp/--ep rules, process group, the 2-D DeviceMesh ("dp_mod_ep", "ep") and its flattened "dp"
expert_parallel.py  routed experts split over "ep"; all-to-all dispatch/combine with autograd; byte counters
fsdp.py             `parallelize` (EP + FSDP2 fully_shard), global loads, global grad norm, full state dict
"""
from core.parallel.expert_parallel import AllToAll, CommStats, apply_expert_parallel
from core.parallel.fsdp import all_mean, clip_grad_norm_, full_state_dict, global_loads, parallelize
from core.parallel.mesh import (Meshes, ParallelError, ParallelPlan, build_meshes, init_distributed,
                                validate_plan, world_from_env)

__all__ = ["AllToAll", "CommStats", "apply_expert_parallel", "all_mean", "clip_grad_norm_", "full_state_dict",
           "global_loads", "parallelize", "Meshes", "ParallelError", "ParallelPlan", "build_meshes",
           "init_distributed", "validate_plan", "world_from_env"]
