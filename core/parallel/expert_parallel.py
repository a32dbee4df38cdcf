"""Expert parallelism applied to an existing `core.moe.Experts` module (torchtitan's `ExpertParallel` style).

The model code is not changed: `apply_expert_parallel(experts, ep_group, ...)` keeps only this rank's
N_r / E experts in the module's parameters and wraps its forward with two hooks,
    pre-hook  (dispatch): sort the token slots by expert, exchange the per-expert slot counts, then send every
              slot's hidden state and gate value to the rank holding its expert (`all_to_all_single`);
              the module then runs its usual grouped GEMMs on the slots it received (local expert ids);
    hook      (combine):  send each expert output back to the rank its token came from (the reverse
              all-to-all) and sum the K slots of every token in the order a single process sums them.
Both exchanges are `AllToAll.apply`, an autograd Function whose backward is the opposite all-to-all, so the
gradients of the hidden states, the gate values (the router) and the expert weights flow as on one process.

Gradient scale: each expert's gradient on its rank sums the contributions of all E ranks' local losses, so the
caller divides it by D (the data-parallel degree), not by D // E (FSDP's mesh for experts); see
`core.parallel.fsdp.apply_fsdp`.

Traffic: `CommStats` counts, per step, the bytes each exchange sends to OTHER ranks (the slice a rank keeps for
itself never leaves it), split into activations (what `core.comm` predicts) and routing metadata (per-expert
counts and gate values), forward and backward, and the share that crosses nodes (rank // ranks_per_node).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from core import moe

__all__ = ["AllToAll", "CommStats", "apply_expert_parallel", "is_expert_parallel"]


@dataclass
class CommStats:
    """Bytes sent to other ranks by this rank's expert exchanges since the last `reset` (plain ints)."""

    rank: int = 0
    ranks_per_node: int = 1
    dispatch_bytes: int = 0      # forward: hidden states to the experts' ranks
    combine_bytes: int = 0       # forward: expert outputs back
    backward_bytes: int = 0      # backward: the two gradient exchanges (mirror of the forward)
    inter_node_bytes: int = 0    # all of the above that crossed a node boundary
    meta_bytes: int = 0          # per-expert counts and gate values (not activations)
    tokens: int = 0              # tokens dispatched by this rank (summed over MoE layers)

    def reset(self) -> None:
        self.dispatch_bytes = self.combine_bytes = self.backward_bytes = 0
        self.inter_node_bytes = self.meta_bytes = self.tokens = 0

    @property
    def activation_bytes(self) -> int:
        return self.dispatch_bytes + self.combine_bytes + self.backward_bytes

    def add(self, kind: str, splits: list[int], row_bytes: int, group_ranks: list[int]) -> None:
        """Count one all_to_all_single that sends splits[j] rows of `row_bytes` to group member j."""
        total = inter = 0
        node = self.rank // self.ranks_per_node
        for dst, n in zip(group_ranks, splits):
            if dst == self.rank:
                continue
            total += n * row_bytes
            if dst // self.ranks_per_node != node:
                inter += n * row_bytes
        setattr(self, kind, getattr(self, kind) + total)
        if kind != "meta_bytes":
            self.inter_node_bytes += inter


class AllToAll(torch.autograd.Function):
    """y = all_to_all_single(x): rows x[sum(in[:j]):sum(in[:j+1])] go to group member j; backward reverses it.

    x [S_in, ...] -> [sum(out_splits), ...]. `stats`/`kind` count the bytes sent (forward under `kind`,
    backward under "backward_bytes").
    """

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, stats, kind):
        ctx.splits, ctx.group, ctx.stats, ctx.kind = (out_splits, in_splits), group, stats, kind
        y = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(y, x.contiguous(), out_splits, in_splits, group=group)
        if stats is not None:
            stats.add(kind, in_splits, x[0:1].numel() * x.element_size(), dist.get_process_group_ranks(group))
        return y

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        g = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(g, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        if ctx.stats is not None:
            kind = "backward_bytes" if ctx.kind != "meta_bytes" else "meta_bytes"
            ctx.stats.add(kind, out_splits, grad[0:1].numel() * grad.element_size(),
                          dist.get_process_group_ranks(ctx.group))
        return g, None, None, None, None, None


def is_expert_parallel(experts: nn.Module) -> bool:
    return getattr(experts, "ep_size", 1) > 1


def apply_expert_parallel(experts: nn.Module, group, stats: CommStats | None = None) -> None:
    """Split `experts` (a `core.moe.Experts`) over the ranks of `group` and route tokens with all-to-all.

    Rank j of the group keeps experts [j * N/E, (j+1) * N/E) (contiguous, as V3 places experts, so a node holds
    whole routing groups). Every rank must hold the same full weights when this is called (same seed).
    """
    ep = dist.get_world_size(group)
    j = dist.get_group_rank(group, dist.get_rank())
    n = experts.num_experts
    if n % ep:
        raise ValueError(f"--ep: {ep} ranks cannot split {n} experts evenly")
    local = n // ep
    with torch.no_grad():
        experts.gate_up_proj = nn.Parameter(experts.gate_up_proj[j * local:(j + 1) * local].clone())
        experts.down_proj = nn.Parameter(experts.down_proj[j * local:(j + 1) * local].clone())
    experts.num_experts = local
    experts.global_num_experts, experts.ep_size, experts.ep_rank = n, ep, j
    experts._ep_ctx = None

    def dispatch(module, args, kwargs):
        hidden, idx, weights = _unpack(args, kwargs)
        n_tokens, top_k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # slots by global expert = by destination rank (contiguous)
        tok = torch.div(order, top_k, rounding_mode="floor")
        counts = torch.bincount(flat, minlength=n)  # [N] slots this rank sends to each expert
        recv_counts = torch.empty_like(counts)  # [E * local]: from source s, for my local expert i
        dist.all_to_all_single(recv_counts, counts, group=group)
        if stats is not None:
            stats.add("meta_bytes", [local] * ep, local * counts.element_size(), dist.get_process_group_ranks(group))
            stats.tokens += n_tokens
        in_splits = counts.view(ep, local).sum(1).tolist()
        out_splits = recv_counts.view(ep, local).sum(1).tolist()
        pos = moe.slot_positions(order, flat.numel(), top_k)
        x_recv = AllToAll.apply(moe.dispatch(hidden, tok, pos), out_splits, in_splits, group, stats, "dispatch_bytes")
        w_recv = AllToAll.apply(weights.reshape(-1).index_select(0, order), out_splits, in_splits, group, stats,
                                "meta_bytes")
        # received rows: source-rank-major, each source's rows sorted by local expert -> one local id per row;
        # Experts.forward sorts them again (stably) by expert, so within an expert the global token order holds.
        local_ids = torch.repeat_interleave(torch.arange(local, device=idx.device).repeat(ep), recv_counts)
        module._ep_ctx = (tok, pos, in_splits, out_splits, hidden.dtype)
        return (x_recv, local_ids.unsqueeze(-1), w_recv.unsqueeze(-1)), {}

    def combine(module, args, kwargs, out):
        tok, pos, in_splits, out_splits, dtype = module._ep_ctx
        module._ep_ctx = None
        back = AllToAll.apply(out, in_splits, out_splits, group, stats, "combine_bytes")  # [S, H] in `order`
        # rows sorted by global expert: core.moe's combine sums a token's K slots in that order, as one process does
        return moe.combine(back, tok, pos).to(dtype)

    experts.register_forward_pre_hook(dispatch, with_kwargs=True)
    experts.register_forward_hook(combine, with_kwargs=True)


def _unpack(args, kwargs):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args) + [kwargs[k] for k in names[len(args):]]
    return vals[0], vals[1], vals[2]
