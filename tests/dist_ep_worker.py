"""Worker for tests/test_distributed.py (run under torchrun, gloo): one MoE layer with its experts split over the
ranks against the same layer on one process, and the bytes the exchanges sent against core.comm's count.

Usage: torchrun --nproc-per-node E tests/dist_ep_worker.py OUT.json  (rank 0 writes OUT.json)
"""
import json
import sys

import torch
import torch.distributed as dist

from core.comm import exchange_bytes, token_bytes
from core.config import get_preset
from core.moe import MoE
from core.parallel import CommStats, apply_expert_parallel


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    ref = MoE(cfg)
    moe = MoE(cfg)
    moe.load_state_dict(ref.state_dict())
    with torch.no_grad():  # a non-zero bias so selection and gate values differ, as after training
        ref.gate.e_score_correction_bias.normal_(0, 0.05)
        moe.gate.e_score_correction_bias.copy_(ref.gate.e_score_correction_bias)
    batch = 2 * world
    x = torch.randn(batch, 5, cfg.hidden_size)
    g = torch.randn(batch, 5, cfg.hidden_size)
    xr = x.clone().requires_grad_(True)
    out_ref = ref(xr)
    (out_ref * g).sum().backward()
    yr = out_ref.detach()

    stats = CommStats(rank=rank, ranks_per_node=1)  # every rank its own "node": all traffic is inter-node
    apply_expert_parallel(moe.experts, dist.group.WORLD, stats)
    rows = slice(rank * 2, rank * 2 + 2)
    xl = x[rows].clone().requires_grad_(True)
    y = moe(xl)
    fwd = (stats.dispatch_bytes, stats.combine_bytes, stats.inter_node_bytes)
    (y * g[rows]).sum().backward()
    router_grad = moe.gate.weight.grad.clone()
    dist.all_reduce(router_grad)
    local = cfg.n_routed_experts // world
    experts = slice(rank * local, (rank + 1) * local)
    diffs = {
        "output": (y - yr[rows]).abs().max().item(),
        "input_grad": (xl.grad - xr.grad[rows]).abs().max().item(),
        "gate_up_grad": (moe.experts.gate_up_proj.grad - ref.experts.gate_up_proj.grad[experts]).abs().max().item(),
        "down_grad": (moe.experts.down_proj.grad - ref.experts.down_proj.grad[experts]).abs().max().item(),
        "router_grad": (router_grad - ref.gate.weight.grad).abs().max().item(),
    }
    measured = torch.tensor([fwd[0] + fwd[1], stats.backward_bytes, fwd[2], stats.inter_node_bytes],
                            dtype=torch.int64)
    dist.all_reduce(measured)
    indices = [None] * world
    dist.all_gather_object(indices, moe.last_routing.indices)
    row = token_bytes(cfg.hidden_size, "fp32")  # the exchange sends the fp32 hidden states both ways
    predicted = exchange_bytes(indices, cfg.n_routed_experts, world, 1, row, row)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"diffs": diffs, "forward_bytes": int(measured[0]), "backward_bytes": int(measured[1]),
                       "forward_inter_node": int(measured[2]), "predicted": predicted}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
