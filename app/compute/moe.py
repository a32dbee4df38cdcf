"""MoE routing dashboard: a real `core.moe.Router` on the multi-domain token stream (loads, groups, gate
values) and the bias-controller simulation of the four balancing strategies."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app import memory
from app.compute.common import apply_overrides, cfg_of, torch_setup

MOE_HIDDEN = 64
MOE_BATCH = 2048
MOE_FIELD_LABELS = {
    "n_routed_experts": "Routed experts $N_r$", "n_shared_experts": "Shared experts $N_s$",
    "num_experts_per_tok": "Experts per token $K_r$", "n_group": "Expert groups", "topk_group": "Groups per token",
    "scoring_func": "Scoring", "routed_scaling_factor": "Route scale",
}
STRATEGY_LABELS = {"none": "no balancing", "aux_loss": "aux loss (α)", "aux_free": "aux-loss-free bias (γ)",
                   "both": "bias + aux loss"}


def moe_arch(cfg_json: str, **knobs) -> str:
    """The model with the MoE page's knobs applied (validated: raises ConfigError naming the field)."""
    return apply_overrides(cfg_json, knobs)


ROUTING_FIELDS = ("n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "scoring_func",
                  "topk_method", "norm_topk_prob")
MOE_WARMUP_TOKENS = 512


def routing_key(cfg_json: str) -> tuple:
    """Only the fields that change which experts a token picks (the cache key of `moe_routing`)."""
    cfg = cfg_of(cfg_json)
    return tuple((k, getattr(cfg, k)) for k in ROUTING_FIELDS)


@st.cache_data(max_entries=16, show_spinner=False)
def _domain_stream(seed: int, n_tokens: int) -> tuple:
    from core import data
    tokens, domains = data.synthetic_stream(n_tokens, seed=seed)
    return tokens.numpy(), domains.numpy()


def _router_setup(key: tuple, seed: int, skew: float):
    """A real `core.moe.Router` at hidden size 64 with the page's routing knobs, and hidden states for the
    byte-level multi-domain token stream of `core.data` (arithmetic, brackets, copy, sorted): a seeded random
    embedding of each token + half the mean of the previous three (context) + a shared direction of strength
    `skew`, which makes every token prefer the same experts at first, like the common component of real hidden
    states. Router weight ~ N(0, 1/hidden) so logits are O(1), as in a trained model; route scale 1 (the page
    rescales the gate values, which never changes the choice)."""
    import math

    from core import data
    from core.config import PRESETS
    from core.moe import Router
    from core.rng import seeded

    torch = torch_setup()
    cfg = PRESETS["tiny"].replace(hidden_size=MOE_HIDDEN, routed_scaling_factor=1.0, **dict(key))
    with seeded(seed), torch.no_grad():  # (the global generator, which other sessions' threads also seed)
        router = Router(cfg).eval()
        router.weight.normal_(0.0, 1.0 / math.sqrt(MOE_HIDDEN))
    g = torch.Generator().manual_seed(seed + 3)
    emb = torch.nn.functional.normalize(torch.randn(data.VOCAB_SIZE, MOE_HIDDEN, generator=g), dim=-1)
    emb = emb * math.sqrt(MOE_HIDDEN)
    common = torch.nn.functional.normalize(torch.randn(MOE_HIDDEN, generator=g), dim=0) * math.sqrt(MOE_HIDDEN)
    tok_np, dom_np = _domain_stream(seed, MOE_BATCH + 64 * MOE_WARMUP_TOKENS)
    tokens, domains = torch.from_numpy(tok_np), torch.from_numpy(dom_np)
    e = emb[tokens]
    ctx = torch.zeros_like(e)  # a little context: the previous three tokens (hidden states depend on context)
    for k in (1, 2, 3):
        ctx[k:] += e[:-k] / 3
    hidden = e + 0.5 * ctx + skew * common
    return cfg, router, tokens, domains, hidden


def _domain_table(cfg, out, domains) -> pd.DataFrame:
    from core import data
    from core.moe import expert_loads

    E = cfg.n_routed_experts
    rows = []
    for d, name in enumerate(data.DOMAINS):
        c = expert_loads(out.indices[domains == d], E).double()
        rel = c / max(float(c.sum()) / E, 1e-9)
        rows += [{"domain": name, "expert": e, "slots": int(c[e]), "relative_load": float(rel[e])} for e in range(E)]
    return pd.DataFrame(rows)


# Byte budget: an entry is ~1 MB at the default 256 experts and 2.0 MB at 512 (the token x expert table), so
# max_entries alone allowed 32 x 2.0 = 65 MB; 16 MB keeps 8-16 routings (tests/test_limits.py, worst case).
@st.cache_data(max_entries=32, max_size="16MB", show_spinner="Routing tokens through the real router…")
@memory.heavy
def moe_routing(key: tuple, seed: int, skew: float, gamma: float, steps: int) -> dict:
    """A real router forward on one batch (2,048 tokens) of the multi-domain stream, before and after `steps`
    batches (512 tokens each, never the shown batch) of the aux-loss-free rule `core.moe.update_bias` (step γ)."""
    from core import data
    from core.moe import expert_loads, update_bias

    torch = torch_setup()
    cfg, router, tokens, domains, hidden = _router_setup(key, seed, skew)
    E = cfg.n_routed_experts
    probe = slice(0, MOE_BATCH)
    with torch.no_grad():
        before = router(hidden[probe])
        if router.e_score_correction_bias is not None:
            for s in range(steps):
                lo = MOE_BATCH + MOE_WARMUP_TOKENS * (s % 64)
                o = router(hidden[lo:lo + MOE_WARMUP_TOKENS])
                update_bias(router, expert_loads(o.indices, E), gamma)
        after = router(hidden[probe])
    res = {"loads_before": expert_loads(before.indices, E).tolist(),
           "loads_after": expert_loads(after.indices, E).tolist(),
           "has_bias": router.e_score_correction_bias is not None, "steps": steps, "gamma": gamma,
           "n_experts": E, "top_k": cfg.num_experts_per_tok, "n_group": cfg.n_group,
           "topk_group": cfg.topk_group, "group_limited": router.group_limited,
           "bias_final": (router.e_score_correction_bias.tolist() if router.e_score_correction_bias is not None
                          else None)}
    dom = domains[probe]
    res["domain_before"] = _domain_table(cfg, before, dom)
    res["domain_after"] = _domain_table(cfg, after, dom)
    res["domain_table"] = pd.concat([res["domain_before"].assign(router="fresh"),
                                     res["domain_after"].assign(router=f"after {steps} bias updates")],
                                    ignore_index=True)
    # A 48-token snippet (12 per domain) for the token x expert view: gate weights of the chosen experts (route
    # scale 1) and which groups each token may use.
    pick = sorted(i for d in range(len(data.DOMAINS)) for i in (dom == d).nonzero().flatten()[:12].tolist())
    rows = []
    per_group = E // max(cfg.n_group, 1)
    for r, t in enumerate(pick):
        chosen = dict(zip(after.indices[t].tolist(), after.weights[t].tolist()))
        allowed = after.group_mask[t].tolist() if after.group_mask is not None else [True] * max(cfg.n_group, 1)
        ch = bytes([int(tokens[t])]).decode("latin-1")
        for e in range(E):
            rows.append({"row": r, "position": t, "token": ch, "domain": data.DOMAINS[int(dom[t])],
                         "expert": e, "group": e // per_group, "group_allowed": bool(allowed[e // per_group]),
                         "gate_weight_unscaled": float(chosen.get(e, 0.0))})
    res["token_table"] = pd.DataFrame(rows)
    gm = after.group_mask
    res["group_table"] = (pd.DataFrame({"group": range(gm.shape[1]), "share_of_tokens": gm.double().mean(0).tolist()})
                          if gm is not None else None)
    res["load_table"] = pd.DataFrame({"expert": range(E), "slots_fresh": res["loads_before"],
                                      "slots_after_bias_updates": res["loads_after"]})
    return res


def moe_metrics(loads: list, top_k: int, capacity_factor: float) -> dict:
    """`core.moe.load_metrics` at a capacity factor (cheap; not cached)."""
    from core.moe import load_metrics
    torch_setup()
    m = load_metrics(loads, top_k, capacity_factor)
    m.pop("relative_load", None)
    return m


def scaled_token_table(tt: pd.DataFrame, route_scale: float) -> pd.DataFrame:
    """Gate values times the route scale (the scale multiplies the weights; it never changes the choice)."""
    return tt.assign(gate_weight=tt["gate_weight_unscaled"] * route_scale)


SIM_TOKENS = 256  # tokens per simulated batch (CPU top-k costs ~3 µs per token row at 256 experts)


# Byte budget: 0.2 MB per entry at the defaults, 4.0 MB at 512 experts x 240 steps (16 x 4 = 64 MB by count).
@st.cache_data(max_entries=16, max_size="16MB",
               show_spinner="Stepping the bias controller over batches (4 strategies)…")
@memory.heavy
def moe_simulation(n_experts: int, top_k: int, n_group: int, topk_group: int, scoring: str, gamma: float,
                   alpha: float, steps: int, skew: float, seed: int) -> dict:
    """`core.moe_sim.simulate_bias_controller` for all four strategies, as DataFrames."""
    from core.moe_sim import SIM_STRATEGIES, simulate_bias_controller

    torch_setup()
    r = simulate_bias_controller(SIM_STRATEGIES, n_experts=n_experts, top_k=top_k, n_group=n_group,
                                 topk_group=topk_group, scoring_func=scoring, steps=steps, gamma=gamma, alpha=alpha,
                                 skew=skew, seed=seed, tokens=SIM_TOKENS)
    maxvio = pd.DataFrame([{"strategy": s, "label": STRATEGY_LABELS[s], "step": i, "max_vio": float(v),
                            "aux_loss": float(a)}
                           for s, res in r.items() for i, (v, a) in enumerate(zip(res.max_vio, res.aux_loss))])
    per = {}
    for s, res in r.items():
        loads = res.loads.double()
        rel = loads / loads.sum(1, keepdim=True) * n_experts
        # float32 arrays only: at the largest knobs (512 experts x 240 steps) an entry is ~4 MB instead of the
        # ~24 MB a per-cell DataFrame took (x max_entries=16 on a shared server); tables are built per run
        # by sim_table() for the one strategy shown.
        per[s] = {"relative_load": rel.float().numpy(), "biases": res.biases.float().numpy()}
    return {"max_vio": maxvio, "per_strategy": per}


def sim_table(ps: dict) -> pd.DataFrame:
    """The CSV table behind the load/bias-over-steps heatmaps of one strategy (vectorized; not cached)."""
    import numpy as np
    rel, bias = ps["relative_load"], ps["biases"]
    steps, n = rel.shape
    return pd.DataFrame({"step": np.repeat(np.arange(steps), n), "expert": np.tile(np.arange(n), steps),
                         "relative_load": rel.reshape(-1).astype(np.float64),
                         "bias": bias.reshape(-1).astype(np.float64)})
