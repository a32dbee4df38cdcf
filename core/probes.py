"""Probes of the attention layer for the MLA dashboard: attention maps and rank truncation of the cached K/V.

Nothing here is on the model's forward path: these functions look at an `MLA` or `GroupedQueryAttention` module
from the outside (its attention probabilities, the K/V a per-head cache would hold, and how well a rank-r cache
could approximate them). MLA's cache is rank (kv_lora_rank + qk_rope_head_dim) by construction (V2 report §2.1.2).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .attention import MLA, GroupedQueryAttention

__all__ = ["attention_probs", "kv_activations", "rank_truncation_curve", "kv_rank_truncation_error"]


@torch.no_grad()
def attention_probs(module: nn.Module, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """Causal attention probabilities [B, H, T, T] (fp32) of `module` (MLA or baseline) on x [B, T, hidden];
    for the app's heatmap (keep T short: this materializes the T x T map)."""
    _, p = module(x, start_pos=start_pos, return_attn=True)
    return p.float()


@torch.no_grad()
def kv_activations(module: nn.Module, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """What a per-head K/V cache would store, one row per token: [B*T, D].

    MLA: [K (H x (Dn+R)) | V (H x Dv)] decompressed (D = H*(qk_head_dim+v_head_dim), rank <= C + R by
    construction); baseline: [K | V] of the n_g kv heads (D = 2*n_g*d_h).
    """
    b, t, _ = x.shape
    if isinstance(module, MLA):
        freqs = module.rotary(start_pos, t, device=x.device)
        c_kv, k_pe = module._latents(x, freqs)
        k, v = module._expand(c_kv, k_pe)
    elif isinstance(module, GroupedQueryAttention):
        _, k, v = module._qkv(x, start_pos)
    else:
        raise TypeError(f"expected MLA or GroupedQueryAttention, got {type(module).__name__}")
    return torch.cat([k.reshape(b * t, -1), v.reshape(b * t, -1)], dim=-1)


def rank_truncation_curve(m: torch.Tensor, ranks=None) -> tuple[list[int], list[float], torch.Tensor]:
    """Relative Frobenius error of the best rank-r approximation of m [N, D] (Eckart-Young via SVD):
    err(r) = sqrt(sum_{i>r} s_i^2 / sum_i s_i^2). Returns (ranks, errors, singular values)."""
    if m.dim() != 2:
        raise ValueError(f"expected a 2-D matrix [tokens, features], got shape {tuple(m.shape)}")
    s = torch.linalg.svdvals(m.double())
    energy = s.pow(2)
    total = float(energy.sum())
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # tail[i] = sum_{j>=i} s_j^2
    full = min(m.shape)
    if ranks is None:
        ranks = sorted({0, *[min(full, 2 ** i) for i in range(int(math.log2(max(full, 1))) + 1)], full})
    errs = []
    for r in ranks:
        r = int(r)
        if r < 0:
            raise ValueError(f"ranks must be >= 0, got {r}")
        rem = float(tail[r]) if r < full else 0.0
        errs.append(math.sqrt(max(rem, 0.0) / total) if total > 0 else 0.0)
    return [int(r) for r in ranks], errs, s.float()


@torch.no_grad()
def kv_rank_truncation_error(source, ranks=None, *, x: torch.Tensor | None = None, batch: int = 2,
                             seq_len: int = 128, seed: int = 0, bytes_per_element: int = 2) -> dict[str, list]:
    """How rank-r truncation of the cached K/V trades error for memory (MLA dashboard).

    source: an MLA / GroupedQueryAttention module (its K/V activations on `x`, or on a seeded N(0, 1) input
    [batch, seq_len, hidden]) or a 2-D tensor [tokens, features] (e.g. latents c_kv, or kv_b_proj.weight.T).
    The SVD basis is fitted to the same activations (an oracle bound: a deployable low-rank cache would fix the
    basis offline), so a rank-r cache stores r coefficients per token per layer.

    Returns equal-length lists (DataFrame-ready): rank, rel_error (relative Frobenius error of the rank-r
    approximation), bytes_per_token (r * bytes_per_element, per layer), full_bytes_per_token (D * bytes_per_element).
    For MLA, the error reaches ~0 at rank kv_lora_rank + qk_rope_head_dim: its cache IS a rank-(C + R) cache.
    """
    if isinstance(source, torch.Tensor):
        m = source
    else:
        if x is None:
            g = torch.Generator().manual_seed(seed)
            p = next(source.parameters())
            x = torch.randn(batch, seq_len, source.hidden_size, generator=g).to(device=p.device, dtype=p.dtype)
        m = kv_activations(source, x)
        if ranks is None and isinstance(source, MLA):
            # include the rank at which MLA's decompressed K/V become exact
            full = min(m.shape)
            ranks = sorted({0, full, source.kv_lora_rank + source.qk_rope_head_dim,
                            *[min(full, 2 ** i) for i in range(int(math.log2(max(full, 1))) + 1)]})
    rs, errs, _ = rank_truncation_curve(m.float(), ranks)
    d = m.shape[-1]
    return {
        "rank": rs,
        "rel_error": errs,
        "bytes_per_token": [r * bytes_per_element for r in rs],
        "full_bytes_per_token": [d * bytes_per_element] * len(rs),
    }
