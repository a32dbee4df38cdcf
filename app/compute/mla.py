"""MLA & KV cache dashboard: cache size per attention kind (closed form) and a measured run of the real
`core.attention.MLA` module, scaled down to CPU size (prefill + decode, latency, attention map, rank truncation)."""
from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from app import memory
from app.compute.common import BYTES_PER_ELEMENT, apply_overrides, cfg_of, torch_dtype, torch_setup
from core import calc

KV_KINDS = [("MHA", "mha"), ("GQA", "gqa"), ("MQA", "mqa"), ("MLA (naive)", "mla_naive"), ("MLA", "mla")]
MLA_FIELD_LABELS = {
    "kv_lora_rank": "KV latent dim $d_c$", "qk_rope_head_dim": "RoPE key dim $d_h^R$",
    "num_attention_heads": "Heads $n_h$", "v_head_dim": "Head dim $d_h$", "qk_nope_head_dim": "Non-RoPE key dim",
    "q_lora_rank": "Query latent dim $d'_c$", "num_hidden_layers": "Layers $L$", "num_kv_heads": "GQA groups $n_g$",
    "num_key_value_heads": "GQA groups $n_g$",
}


def mla_arch(cfg_json: str, **arch) -> str:
    """The model with the MLA page's architecture knobs applied (validated; raises ConfigError)."""
    return apply_overrides(cfg_json, arch)


def check_groups(cfg_json: str, groups: int) -> None:
    """GQA needs n_g to divide n_h: raises ConfigError naming the knob."""
    calc.kv_elements_per_token(cfg_of(cfg_json), "gqa", groups)


@st.cache_data(max_entries=64, show_spinner=False)
def kv_vs_context(cfg_json: str, context: int, batch: int, dtype: str, groups: int) -> pd.DataFrame:
    """KV-cache bytes of the whole model for each attention kind at contexts 512 .. max(context, 1M)."""
    cfg = cfg_of(cfg_json)
    bpe = BYTES_PER_ELEMENT[dtype]
    ctxs = sorted({2**i for i in range(9, 21)} | {context})
    rows = []
    for name, kind in KV_KINDS:
        per = calc.kv_elements_per_token(cfg, kind, groups if kind == "gqa" else None)
        for t in ctxs:
            rows.append({"kind": name, "context_tokens": t, "batch": batch, "elements_per_token": per,
                         "bytes": calc.kv_cache_bytes(cfg, kind, t, batch, bpe,
                                                      groups if kind == "gqa" else None)})
    return pd.DataFrame(rows)


@st.cache_data(max_entries=64, show_spinner=False)
def max_context_table(cfg_json: str, memory_gib: float, batch: int, dtype: str, weights_dtype: str,
                      groups: int) -> dict:
    """Longest context per attention kind whose cache fits `memory_gib` after the weights."""
    cfg = cfg_of(cfg_json)
    mem = memory_gib * 2**30
    bpe = BYTES_PER_ELEMENT[dtype]
    w = calc.weight_bytes(cfg, weights_dtype)
    rows = [{"kind": name, "max_context_tokens": calc.max_context(cfg, kind, mem, batch, bpe, weights_dtype,
                                                                  groups if kind == "gqa" else None),
             "bytes_per_token": calc.kv_cache_bytes(cfg, kind, 1, batch, bpe, groups if kind == "gqa" else None)}
            for name, kind in KV_KINDS]
    return {"table": pd.DataFrame(rows), "weights_bytes": w, "free_bytes": max(0.0, mem - w),
            "memory_bytes": mem, "max_position_embeddings": cfg.max_position_embeddings}


# ---------------------------------------------------------------------- measured run (real core.attention)
MEASURE_HIDDEN = 256
MEASURE_MAX_HEADS = 8
MEASURE_DIM_DIV = 8
# Hosted-mode cap on the measured module: each scaled dim is at most what the page's largest knob option gives
# (d_c 4096, d'_c 3072, head dims 256, ÷ 8). An uploaded config.json may carry any size up to 2**31 - 1; without
# this cap its own value (added to the knob's options) would build a module of hundreds of GB.
MEASURE_MAX_DIMS = {"kv_lora_rank": 512, "q_lora_rank": 384, "qk_rope_head_dim": 32, "qk_nope_head_dim": 32,
                    "v_head_dim": 32}


def scaled_down(cfg_json: str) -> str:
    """A one-layer CPU-sized copy of the page's attention: at most 8 heads, every head/latent dim / 8 (capped at
    `MEASURE_MAX_DIMS`), hidden 256.

    Keeps MLA's structure (query compression if any, decoupled RoPE, latent cache); plain RoPE (no YaRN) so
    positions up to 4096 are all in range.
    """
    from core.config import PRESETS

    cfg = cfg_of(cfg_json)
    div = MEASURE_DIM_DIV
    cap = MEASURE_MAX_DIMS
    even = lambda v: max(2, (v // 2) * 2)  # noqa: E731
    small = PRESETS["mini"].replace(
        hidden_size=MEASURE_HIDDEN, num_hidden_layers=1, first_k_dense_replace=1,
        num_attention_heads=min(cfg.num_attention_heads, MEASURE_MAX_HEADS),
        num_key_value_heads=min(cfg.num_attention_heads, MEASURE_MAX_HEADS),
        kv_lora_rank=max(4, min(cfg.kv_lora_rank // div, cap["kv_lora_rank"])),
        qk_rope_head_dim=even(min(cfg.qk_rope_head_dim // div, cap["qk_rope_head_dim"])),
        qk_nope_head_dim=max(2, min(cfg.qk_nope_head_dim // div, cap["qk_nope_head_dim"])),
        v_head_dim=even(min(cfg.v_head_dim // div, cap["v_head_dim"])),
        q_lora_rank=None if cfg.q_lora_rank is None else max(4, min(cfg.q_lora_rank // div, cap["q_lora_rank"])),
        max_position_embeddings=4096, rope_scaling=None)
    return json.dumps(small.to_hf(), sort_keys=True)



def _modules(small_json: str, seed: int):
    """The real MLA module and an MHA baseline of the same size, seeded (fresh objects: nothing is shared)."""
    torch = torch_setup()

    from core.attention import MLA, GroupedQueryAttention

    from core.rng import seeded

    small = cfg_of(small_json)
    with seeded(seed):  # (the global generator, which other sessions' threads also seed)
        mla = MLA(small).eval()
    with seeded(seed + 1):
        mha = GroupedQueryAttention(small.replace(attention_type="mha")).eval()
    return small, mla, mha


def _inputs(small, seed: int, batch: int, seq: int):
    import torch
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randn(batch, seq, small.hidden_size, generator=g)


@st.cache_data(max_entries=32, show_spinner="Running the real MLA module (prefill + decode)…")
@memory.heavy
def measured_caches(small_json: str, seed: int, cache_dtype: str, prefill: int = 32, decode: int = 8,
                    batch: int = 2) -> dict:
    """Prefill + decode with each cache kind; the cache tensors' measured bytes vs the formula, and the outputs
    of the absorbed vs naive MLA paths (fp32 caches, so the comparison isolates the math).

    Kinds: the absorbed MLA cache, the naive (decompressed) MLA cache, and an MHA baseline of the same size."""
    import torch

    from core.attention import cache_bytes_formula, make_cache

    small, mla, mha = _modules(small_json, seed)
    x = _inputs(small, seed, batch, prefill + decode)
    dt = torch_dtype(cache_dtype)
    rows, outs = [], {}
    cfg_mha = small.replace(attention_type="mha")
    runs = [("absorbed", mla, small, "MLA", dt), ("naive", mla, small, "MLA (naive)", dt),
            ("mha", mha, cfg_mha, "MHA", dt), ("absorbed", mla, small, None, torch.float32),
            ("naive", mla, small, None, torch.float32)]
    with torch.inference_mode():
        full = mla(x)  # training path (no cache, SDPA): the reference output
        for kind, module, cfg_k, label, d in runs:
            cache = make_cache(cfg_k, kind, batch=batch, dtype=d)
            ys = [module(x[:, :prefill], start_pos=0, cache=cache)]
            for t in range(prefill, prefill + decode):
                ys.append(module(x[:, t:t + 1], start_pos=t, cache=cache))
            if label is None:
                outs[kind] = torch.cat(ys, dim=1)
                continue
            tensors = cache.tensors()
            bpe = cache.bytes_per_element
            rows.append({
                "kind": label, "cache_class": type(cache).__name__,
                "tensors": ", ".join(f"{n} {list(t.shape)}" for n, t in tensors.items()),
                "dtype": str(d).replace("torch.", ""), "tokens": cache.seq_len, "batch": batch,
                "measured_bytes": cache.nbytes(),
                "formula_bytes": cache_bytes_formula(cfg_k, kind, cache.seq_len, batch, bpe),
                "elements_per_token": cache.nbytes() // (batch * cache.seq_len * bpe),
            })
    df = pd.DataFrame(rows)
    df["match"] = df["measured_bytes"] == df["formula_bytes"]
    a, n = outs["absorbed"], outs["naive"]
    return {
        "bytes": df, "small": json.loads(small_json),
        "max_abs_diff_absorbed_vs_naive": (a - n).abs().max().item(),
        "max_abs_diff_absorbed_vs_full": (a - full).abs().max().item(),
        "max_abs_diff_naive_vs_full": (n - full).abs().max().item(),
        "output_scale": full.abs().max().item(), "prefill": prefill, "decode": decode,
    }


@st.cache_data(max_entries=16, show_spinner="Timing decode steps of the real MLA module…")
@memory.heavy
def measured_latency(small_json: str, seed: int, contexts: tuple = (128, 256, 512, 1024), rounds: int = 7,
                     steps: int = 3, cache_dtype: str = "fp32") -> pd.DataFrame:
    """Wall-clock time of one decode step (batch 1) at each context for the absorbed and the naive cache.

    One cache per (path, context c), prefilled to c tokens (chunks of 256). Then `rounds` sweeps over every
    context and both paths, `steps` timed decode steps at position c each time (each rewrites position c: every
    step attends over c + 1 tokens). Spreading a point's rounds over the whole measurement means a burst of load
    from another process spoils a few samples of every point, not all samples of one; the best time is the figure,
    the median shows the spread. Only the displayed timing depends on these measurements.
    """
    import time

    import torch

    from core.attention import make_cache

    small, mla, _ = _modules(small_json, seed)
    contexts = sorted(contexts)
    x = _inputs(small, seed, 1, contexts[-1] + 1)
    paths = (("absorbed", "MLA"), ("naive", "MLA (naive)"))
    caches, times = {}, {}
    with torch.inference_mode():
        for kind, label in paths:
            for c in contexts:
                cache = make_cache(small, kind, batch=1, max_len=c + 1, dtype=torch_dtype(cache_dtype))
                for s in range(0, c, 256):  # prefill up to c tokens, in chunks of 256
                    mla(x[:, s:min(s + 256, c)], start_pos=s, cache=cache)
                mla(x[:, c:c + 1], start_pos=c, cache=cache)  # warm-up (first-call overheads)
                caches[label, c], times[label, c] = cache, []
        for _ in range(rounds):
            for c in contexts:
                for _, label in paths:
                    for _ in range(steps):
                        t0 = time.perf_counter()
                        mla(x[:, c:c + 1], start_pos=c, cache=caches[label, c])
                        times[label, c].append(time.perf_counter() - t0)
    rows = []
    for _, label in paths:
        for c in contexts:
            t = sorted(times[label, c])
            rows.append({"kind": label, "context_tokens": c, "ms_per_token": 1e3 * t[len(t) // 2],
                         "ms_min": 1e3 * t[0], "repeats": len(t), "cache_bytes_fp32": caches[label, c].nbytes()})
    return pd.DataFrame(rows)


@st.cache_data(max_entries=32, show_spinner=False)
@memory.heavy
def attention_map(small_json: str, seed: int, tokens: int = 48) -> dict:
    """Causal attention probabilities [H, T, T] of the real MLA module on a repeating token pattern."""
    import torch

    from core.probes import attention_probs

    small, mla, _ = _modules(small_json, seed)
    g = torch.Generator().manual_seed(seed + 11)
    vocab = torch.randn(12, small.hidden_size, generator=g)
    ids = torch.arange(tokens) % 12
    x = vocab[ids][None]
    p = attention_probs(mla, x)[0]  # [H, T, T]
    q, k = torch.tril_indices(tokens, tokens)
    rows = [pd.DataFrame({"head": hh, "query_position": q.numpy(), "key_position": k.numpy(),
                          "token_id_query": ids[q].numpy(), "token_id_key": ids[k].numpy(),
                          "probability": p[hh, q, k].numpy()}) for hh in range(p.shape[0])]
    return {"probs": p.numpy(), "ids": ids.tolist(), "table": pd.concat(rows, ignore_index=True)}


@st.cache_data(max_entries=32, show_spinner=False)
@memory.heavy
def rank_truncation(small_json: str, seed: int) -> pd.DataFrame:
    """Relative error of the best rank-r approximation of the per-head K/V the cache would hold: MLA vs MHA."""
    from core.probes import kv_rank_truncation_error

    small, mla, mha = _modules(small_json, seed)
    rows = []
    for label, module in (("MLA", mla), ("MHA", mha)):
        r = kv_rank_truncation_error(module, batch=2, seq_len=192, seed=seed, bytes_per_element=2)
        for rank, err, b, full in zip(r["rank"], r["rel_error"], r["bytes_per_token"], r["full_bytes_per_token"]):
            rows.append({"kind": label, "rank": rank, "rel_error": err, "bytes_per_token_per_layer": b,
                         "full_bytes_per_token_per_layer": full})
    return pd.DataFrame(rows)
