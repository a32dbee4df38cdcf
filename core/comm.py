"""Communication of expert parallelism: all-to-all bytes per token per MoE layer, for any config and layout.

DeepSeek-V3 trains with its routed experts spread over EP ranks on several nodes (report §3.2: EP64 over 8
nodes). Every token's hidden state is *dispatched* to the ranks that hold its K_r experts and the expert
outputs are *combined* back. The report sends the dispatch in FP8 (1x128 tiles with a power-of-2 scale) and the
combine in BF16 (§3.3.3), and bounds the cross-node (InfiniBand) traffic with node-limited routing: each token
goes to at most M = 4 nodes (§2.1.2; the group top-k with `n_group` = nodes and `topk_group` = M), and crosses
IB once per target node before NVLink forwards it to the GPUs there (§3.2.1).

Two ways to count, both per token per MoE layer for ONE direction pair (dispatch + combine) of the forward pass;
the backward pass sends the same volume again (the gradients of both exchanges):
  per slot      one copy per (token, expert) slot whose expert lives on another rank; what a plain
                `all_to_all_single` exchange sends (torchtitan, `core.parallel`). Expected copies off the rank:
                K (1 - 1/EP); off the node: K (1 - 1/nodes) (the same with or without node limiting, by symmetry).
  deduplicated  one copy per distinct remote node (V3's IB dispatch) or remote rank that the token needs.
Expected values assume uniform routing: a token picks M of the nodes (node limiting) or all of them, then K_r
distinct experts uniformly among those nodes' experts. Measured routing is counted exactly by `exchange_bytes`.
Shapes: H = hidden_size, N = n_routed_experts, K = num_experts_per_tok.
"""
from __future__ import annotations

import math

import torch

__all__ = ["WIRE_DTYPES", "token_bytes", "hit_probability", "a2a_volume", "exchange_bytes", "CommError"]

#: bytes per element on the wire
WIRE_DTYPES = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}
#: FP8 dispatch: one scale per 1x128 tile of a token (V3 §3.3.1), sent as an fp32 number (4 bytes), as the
#: official inference kernel `act_quant` produces them.
FP8_TILE, FP8_SCALE_BYTES = 128, 4


class CommError(ValueError):
    """An impossible layout; the message starts with the knob's name."""

    def __init__(self, knob: str, rule: str):
        self.knob = knob
        super().__init__(f"{knob}: {rule}")


def token_bytes(hidden_size: int, dtype: str) -> int:
    """Bytes of one token's hidden state on the wire: H elements (+ ceil(H/128) fp32 scales for fp8)."""
    if dtype not in WIRE_DTYPES:
        raise CommError("dtype", f"must be one of {sorted(WIRE_DTYPES)}, got {dtype!r}")
    b = hidden_size * WIRE_DTYPES[dtype]
    if dtype == "fp8":
        b += math.ceil(hidden_size / FP8_TILE) * FP8_SCALE_BYTES
    return b


def hit_probability(pool: int, unit: int, k: int) -> float:
    """P(at least one of k experts drawn uniformly without replacement from `pool` lies in a set of `unit`)
    = 1 - C(pool - unit, k) / C(pool, k)."""
    if k > pool - unit:
        return 1.0
    return 1.0 - math.comb(pool - unit, k) / math.comb(pool, k)


def _check(n: int, k: int, ep: int, nodes: int, node_limit: int | None) -> None:
    def integer(name, v, lo=1):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise CommError(name, f"must be an integer >= {lo}, got {v!r}")
    integer("ep", ep)
    integer("nodes", nodes)
    if n < 1:
        raise CommError("n_routed_experts", "the model has no routed experts: there is nothing to exchange")
    if n % ep:
        raise CommError("ep", f"must divide n_routed_experts ({n}), got {ep}")
    if ep % nodes:
        raise CommError("nodes", f"must divide ep ({ep}): every node holds the same number of ranks, got {nodes}")
    if node_limit is not None:
        integer("node_limit", node_limit)
        if node_limit > nodes:
            raise CommError("node_limit", f"must be <= nodes ({nodes}), got {node_limit}")
        if k > node_limit * n // nodes:
            raise CommError("node_limit", f"{node_limit} nodes hold {node_limit * n // nodes} experts, fewer than "
                                          f"num_experts_per_tok ({k})")


def a2a_volume(cfg, ep: int, nodes: int = 1, node_limit: int | None = None, dispatch: str = "fp8",
               combine: str = "bf16") -> dict:
    """Expected all-to-all traffic per token per MoE layer (forward: dispatch + combine) under uniform routing.

    cfg: a ModelConfig (hidden_size, n_routed_experts, num_experts_per_tok). ep ranks over `nodes` nodes,
    experts placed contiguously (rank j holds N/ep of them). node_limit = M or None. Returns a dict:
      dispatch_token_bytes, combine_token_bytes   one token copy each way (token_bytes)
      slots_off_rank, slots_off_node              expected per-slot copies leaving the rank / the node
      bytes_off_rank                              per-slot exchange (core.parallel / torchtitan): copies x both ways
      bytes_inter_node_per_slot                   the part of it that crosses nodes
      remote_nodes_expected, remote_ranks_expected  distinct remote nodes / ranks a token needs
      bytes_inter_node_dedup                      one copy per remote node (V3's IB dispatch), both ways
      nodes_per_token_max, bytes_inter_node_max   the bound node limiting guarantees: min(K, M or nodes) nodes
    """
    n, k, h = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    _check(n, k, ep, nodes, node_limit)
    d, c = token_bytes(h, dispatch), token_bytes(h, combine)
    per_node, per_rank = n // nodes, n // ep
    m = nodes if node_limit is None else node_limit
    pool = m * per_node  # experts a token may use
    chosen = m / nodes  # P(a given node is among the token's M nodes)
    p_node = chosen * hit_probability(pool, per_node, k)
    p_rank = chosen * hit_probability(pool, per_rank, k)
    slots_rank, slots_node = k * (1 - 1 / ep), k * (1 - 1 / nodes)
    remote_nodes = (nodes - 1) * p_node
    max_nodes = min(k, m)
    return {
        "dispatch_token_bytes": d, "combine_token_bytes": c,
        "slots_off_rank": slots_rank, "slots_off_node": slots_node,
        "bytes_off_rank": slots_rank * (d + c), "bytes_inter_node_per_slot": slots_node * (d + c),
        "remote_nodes_expected": remote_nodes, "remote_ranks_expected": (ep - 1) * p_rank,
        "bytes_inter_node_dedup": remote_nodes * (d + c),
        "nodes_per_token_max": max_nodes, "bytes_inter_node_max": max_nodes * (d + c),
    }


def exchange_bytes(indices_per_rank: list[torch.Tensor], n_experts: int, ep: int, ranks_per_node: int,
                   dispatch_token_bytes: int, combine_token_bytes: int) -> dict:
    """Exact forward traffic of one MoE layer for measured routing, summed over all source ranks.

    indices_per_rank[r]: [T_r, K] expert ids chosen by the tokens of EP rank r (rank j holds experts
    [j*N/ep, (j+1)*N/ep)). Returns {"off_rank", "inter_node"} bytes of the per-slot exchange (dispatch + combine)
    and {"off_rank_dedup", "inter_node_dedup"} for one copy per distinct remote rank / node per token.
    """
    per_rank = n_experts // ep
    both = dispatch_token_bytes + combine_token_bytes
    out = dict(off_rank=0, inter_node=0, off_rank_dedup=0, inter_node_dedup=0)
    for src, idx in enumerate(indices_per_rank):
        dst = idx.reshape(idx.shape[0], -1) // per_rank  # [T, K] destination rank of each slot
        dst_node, src_node = dst // ranks_per_node, src // ranks_per_node
        out["off_rank"] += int((dst != src).sum()) * both
        out["inter_node"] += int((dst_node != src_node).sum()) * both
        hit = torch.zeros(dst.shape[0], ep, dtype=torch.bool)
        hit.scatter_(1, dst, True)  # [T, ep] ranks each token needs
        hit[:, src] = False
        node_hit = hit.view(dst.shape[0], ep // ranks_per_node, ranks_per_node).any(-1)
        node_hit[:, src_node] = False
        out["off_rank_dedup"] += int(hit.sum()) * both
        out["inter_node_dedup"] += int(node_hit.sum()) * both
    return out
