"""Bias-controller simulation for the MoE dashboard: a lone V3 router stepped over skewed token batches.

Compares no balancing, the sequence-wise auxiliary loss (V3 report eqs. 17-20), the aux-loss-free bias update
(V3 report §2.1.2; LFB paper arXiv 2408.15664, Algorithm 1) and both, by MaxVio per step. Only the router is
simulated (no experts, no language-model loss), so it shows balance, not quality.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from core.config import get_preset
from core.moe import Router, expert_loads, sequence_balance_loss, update_bias

__all__ = ["BiasSimResult", "simulate_bias_controller", "SIM_STRATEGIES"]


SIM_STRATEGIES = ("none", "aux_loss", "aux_free", "both")


@dataclass
class BiasSimResult:
    """One strategy of `simulate_bias_controller` (S steps, E experts).

    loads [S, E] int64 counts per step; biases [S, E] the bias used to route step s (before its update);
    max_vio [S] MaxVio_batch per step; aux_loss [S] sequence-wise balance loss (eq. 17) per step.
    """

    strategy: str
    loads: torch.Tensor
    biases: torch.Tensor
    max_vio: torch.Tensor
    aux_loss: torch.Tensor


def _sim_token_stream(gen, steps, tokens, hidden, n_domains, skew, zipf, stream):
    """Token batches from a skewed mixture of 'domains': x = skew * m(t) + c_d + noise, d ~ Zipf(zipf).

    A shared mean direction m (strength `skew`) favours the same few experts for every token and a Zipf domain
    mix overloads the experts preferred by the common domains, so routing starts imbalanced.
    stream: "fixed" (one batch reused every step), "resample" (i.i.d. batches), "drift" (i.i.d. batches whose
    mean direction rotates from m0 to an orthogonal m1 over the run and whose domain popularity reverses).
    """
    centers = torch.randn(n_domains, hidden, generator=gen)
    m0 = F.normalize(torch.randn(hidden, generator=gen), dim=0) * math.sqrt(hidden)
    m1 = torch.randn(hidden, generator=gen)
    m1 = m1 - (m1 @ m0) / (m0 @ m0) * m0
    m1 = F.normalize(m1, dim=0) * math.sqrt(hidden)
    pop = 1.0 / torch.arange(1, n_domains + 1, dtype=torch.float32) ** zipf

    def batch(step):
        frac = step / max(1, steps - 1) if stream == "drift" else 0.0
        m = math.cos(frac * math.pi / 2) * m0 + math.sin(frac * math.pi / 2) * m1
        probs = (1 - frac) * pop + frac * pop.flip(0)
        d = torch.multinomial(probs, tokens, replacement=True, generator=gen)
        return skew * m + centers[d] + torch.randn(tokens, hidden, generator=gen)

    if stream == "fixed":
        x = batch(0)
        return [x] * steps
    return [batch(s) for s in range(steps)]


def simulate_bias_controller(
    strategies: str | Iterable[str] = SIM_STRATEGIES,
    *,
    n_experts: int = 16,
    top_k: int = 4,
    n_group: int = 1,
    topk_group: int = 1,
    scoring_func: str = "sigmoid",
    hidden_size: int = 32,
    tokens: int = 512,
    seq_len: int | None = None,
    steps: int = 200,
    gamma: float = 1e-2,
    alpha: float = 1e-2,
    lr: float = 1.0,
    skew: float = 1.0,
    zipf: float = 1.0,
    n_domains: int = 8,
    stream: str = "resample",
    init_std: float | None = None,
    seed: int = 0,
) -> dict[str, BiasSimResult]:
    """Step a V3 router over `steps` token batches under each balancing strategy; for the MoE page's MaxVio plot.

    Strategies (same data, same initial router weight for all, derived from `seed`):
      "none"      bias frozen at 0, weight frozen.
      "aux_loss"  after routing step s, one SGD step (learning rate `lr`) on the router weight only, on
                  alpha * sequence_balance_loss (V3 eqs. 17-20; sequences of `seq_len` tokens, default the batch).
      "aux_free"  after routing step s, `update_bias(router, loads_s, gamma)` (LFB Alg. 1, V3 §2.1.2).
      "both"      both updates.
    No language-model loss is simulated, so the plot shows balance only, not the quality cost of the aux loss
    gradient (V3 §4.5, LFB Fig. 2). Note gamma * steps bounds how far a bias can move: the paper's 1e-3 works over
    thousands of steps; the default 1e-2 shows convergence within ~100 steps on this toy.

    Tokens come from `_sim_token_stream` (skewed mixture of domains; `stream` "fixed" | "resample" | "drift").
    Router weight ~ N(0, init_std) with init_std default 1/sqrt(hidden_size) so logits are O(1).
    Returns {strategy: BiasSimResult}. Deterministic for a given seed (run time: docs/performance.md).
    """
    if isinstance(strategies, str):
        strategies = [strategies]
    strategies = list(strategies)
    for s in strategies:
        if s not in SIM_STRATEGIES:
            raise ValueError(f"unknown strategy {s!r}; choose from {SIM_STRATEGIES}")
    if stream not in ("fixed", "resample", "drift"):
        raise ValueError(f"stream must be 'fixed', 'resample' or 'drift', got {stream!r}")
    seq_len = tokens if seq_len is None else seq_len
    if seq_len <= 0 or tokens % seq_len:
        raise ValueError(f"seq_len ({seq_len}) must divide tokens ({tokens})")
    cfg = get_preset("tiny").replace(
        hidden_size=hidden_size, n_routed_experts=n_experts, num_experts_per_tok=top_k, n_group=n_group,
        topk_group=topk_group, scoring_func=scoring_func, topk_method="noaux_tc",
        norm_topk_prob=scoring_func == "sigmoid", routed_scaling_factor=1.0)
    # Tiny ops: one intra-op thread avoids OpenMP barrier stalls when other work shares the cores
    # (docs/performance.md). The setting is per calling thread and restored afterwards.
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(seed)
        std = init_std if init_std is not None else 1.0 / math.sqrt(hidden_size)
        w0 = torch.randn(n_experts, hidden_size, generator=gen) * std
        batches = _sim_token_stream(gen, steps, tokens, hidden_size, n_domains, skew, zipf, stream)
        return _run_sim(strategies, cfg, w0, batches, steps, n_experts, top_k, seq_len, gamma, alpha, lr)
    finally:
        torch.set_num_threads(prev_threads)


def _run_sim(strategies, cfg, w0, batches, steps, n_experts, top_k, seq_len, gamma, alpha, lr):
    results: dict[str, BiasSimResult] = {}
    for strategy in strategies:
        router = Router(cfg)
        with torch.no_grad():
            router.weight.copy_(w0)
        use_aux = strategy in ("aux_loss", "both")
        use_bias = strategy in ("aux_free", "both")
        loads = torch.zeros(steps, n_experts, dtype=torch.int64)
        biases = torch.zeros(steps, n_experts)
        aux = torch.zeros(steps)
        for step, x in enumerate(batches):
            biases[step] = router.e_score_correction_bias
            with torch.set_grad_enabled(use_aux):
                r = router(x)
                c = expert_loads(r.indices, n_experts)
                loss = sequence_balance_loss(r.scores, n_experts, top_k, seq_len)
            loads[step] = c
            aux[step] = loss.detach()
            if use_aux:
                (g,) = torch.autograd.grad(alpha * loss, router.weight)
                with torch.no_grad():
                    router.weight.sub_(lr * g)
            if use_bias:
                update_bias(router, c, gamma)
        lf = loads.double()
        max_vio = (lf.max(dim=1).values / lf.mean(dim=1) - 1.0).float()
        results[strategy] = BiasSimResult(strategy, loads, biases, max_vio, aux)
    return results
