"""Cached computations behind the pages: knob values in, DataFrames / plain dicts out (all numbers from `core`).

Every function is wrapped in a bounded ``st.cache_data`` (returns a copy per call, shared by all sessions whose
inputs are equal). Configs travel as their normalized JSON string (``Shared.cfg_json``) so the cache key is
cheap and exact. Functions that build torch modules keep the modules local (nothing mutable is shared), and run
under ``app.memory.heavy`` (at most two at a time per server; the heaps are trimmed afterwards).
"""
from __future__ import annotations

import json
import os

import pandas as pd
import streamlit as st

from app import memory
from core import calc
from core.config import ModelConfig

BYTES_PER_ELEMENT = {"bf16": 2, "fp8": 1, "fp32": 4}


def cfg_of(cfg_json: str) -> ModelConfig:
    return ModelConfig.from_hf(json.loads(cfg_json))


def apply_overrides(cfg_json: str, overrides: dict) -> str:
    """The config with `overrides` applied (validated: raises core.config.ConfigError), as JSON."""
    cfg = cfg_of(cfg_json)
    if overrides:
        cfg = cfg.replace(**overrides)
    return json.dumps(cfg.to_hf(), sort_keys=True)


# ====================================================================== Overview
COMPONENT_LABELS = {
    "embedding": "Embedding", "attention": "Attention (MLA)", "dense_ffn": "Dense FFN",
    "shared_experts": "Shared experts", "routed_experts": "Routed experts", "router": "Router",
    "norms": "Norms", "head": "Output head", "mtp": "MTP module",
}


@st.cache_data(max_entries=64, show_spinner=False)
def overview(cfg_json: str, context: int, kv_dtype: str) -> dict:
    """Everything the Overview shows for one config: parameter table, memory, FLOPs and KV-cache numbers."""
    cfg = cfg_of(cfg_json)
    c = calc.param_counts(cfg)
    rows = calc.param_table(cfg)
    params = pd.DataFrame(rows)
    params["label"] = params["component"].map(COMPONENT_LABELS)
    if cfg.attention_type != "mla":
        params.loc[params["component"] == "attention", "label"] = f"Attention ({cfg.attention_type.upper()})"
    mtp = pd.DataFrame([{"component": "mtp", "total": c["mtp"], "activated": 0,
                         "formula": r"D\,[2d + 2d^2 + \text{block} + d]", "label": COMPONENT_LABELS["mtp"]}])
    params = pd.concat([params, mtp], ignore_index=True)
    params["share_of_total"] = params["total"] / max(c["total"], 1)
    bpe = BYTES_PER_ELEMENT[kv_dtype]
    fl = calc.flops_per_token(cfg, context)
    kv_kind = "mla" if cfg.attention_type == "mla" else cfg.attention_type
    mem = pd.DataFrame([
        {"item": "Weights, BF16", "bytes": calc.weight_bytes(cfg, "bf16"), "kind": "bf16"},
        {"item": "Weights, FP8 (+ scales)", "bytes": calc.weight_bytes(cfg, "fp8"), "kind": "fp8"},
        {"item": f"KV cache, {kv_kind.upper()}, 1 × {context:,} tokens", "bytes":
            calc.kv_cache_bytes(cfg, kv_kind, context, 1, bpe), "kind": "MLA" if kv_kind == "mla" else kv_kind.upper()},
        {"item": f"KV cache if MHA, 1 × {context:,} tokens", "bytes":
            calc.kv_cache_bytes(cfg, "mha", context, 1, bpe), "kind": "MHA"},
    ])
    ctxs = sorted({2**i for i in range(7, 21)} | {context})
    flops = pd.DataFrame([{"context": t, **calc.flops_per_token(cfg, t)} for t in ctxs])
    return {
        "counts": c, "params": params, "memory": mem, "flops": flops, "flops_at_context": fl,
        "kv_elements_per_token": calc.kv_elements_per_token(cfg, kv_kind),
        "kv_bytes_per_token": calc.kv_cache_bytes(cfg, kv_kind, 1, 1, bpe),
        "kv_kind": kv_kind,
        "weights_bf16": calc.weight_bytes(cfg, "bf16"), "weights_fp8": calc.weight_bytes(cfg, "fp8"),
        "weights_fp8_with_mtp": calc.weight_bytes(cfg, "fp8", include_mtp=True),
    }


# ====================================================================== MLA & KV cache
KV_KINDS = [("MHA", "mha"), ("GQA", "gqa"), ("MQA", "mqa"), ("MLA (naive)", "mla_naive"), ("MLA", "mla")]
MLA_FIELD_LABELS = {
    "kv_lora_rank": "KV latent dim d_c", "qk_rope_head_dim": "RoPE key dim d_h^R",
    "num_attention_heads": "Heads n_h", "v_head_dim": "Head dim d_h", "qk_nope_head_dim": "Non-RoPE key dim",
    "q_lora_rank": "Query latent dim d'_c", "num_hidden_layers": "Layers L", "num_kv_heads": "GQA groups n_g",
    "num_key_value_heads": "GQA groups n_g",
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


_TORCH_READY = False


def torch_setup():
    """Import torch for the app: one intra-op thread per script run, and torch's own fp32 GEMMs.

    Each session's script runs in its own thread; with torch's default (one OpenMP thread per core) concurrent
    runs oversubscribe a 2-core server and small ops slow down 10-100x. One thread per run measured 20-200x
    faster under load here, and equal when idle at these sizes.

    fp32 GEMMs stay on torch's library (MKL) in the server unless `EVA_FP32_GEMM` is set: the pages multiply
    tensors whose shapes follow the knobs, and oneDNN (core.gemm's faster fp32 choice) JIT-compiles and caches a
    kernel per shape at ~0.5 MB each, up to its 1024-entry cache (~500 MB on a 0.7-2.7 GB host). The training
    worker keeps core.gemm's choice: its shapes are few (padded expert segments; ~150 kernels, ~75 MB, for the
    default run) and training is where the GEMMs dominate."""
    global _TORCH_READY
    import torch
    if not _TORCH_READY:
        torch.set_num_threads(1)
        from core import gemm
        if gemm.ENV_VAR not in os.environ:
            gemm.set_fp32_backend("torch")
        _TORCH_READY = True
    return torch


def _torch_dtype(name: str):
    torch = torch_setup()
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}[name]


def _modules(small_json: str, seed: int):
    """The real MLA module and an MHA baseline of the same size, seeded (fresh objects: nothing is shared)."""
    torch = torch_setup()

    from core.attention import MLA, GroupedQueryAttention

    small = cfg_of(small_json)
    torch.manual_seed(seed)
    mla = MLA(small).eval()
    torch.manual_seed(seed + 1)
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
    dt = _torch_dtype(cache_dtype)
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
def measured_latency(small_json: str, seed: int, contexts: tuple = (128, 256, 512, 1024), repeats: int = 5,
                     cache_dtype: str = "fp32") -> pd.DataFrame:
    """Wall-clock time of one decode step (batch 1) at each context for the absorbed and the naive cache.

    For each context c (ascending): prefill the cache up to c tokens (chunks of 256), then time a decode step at
    position c (best and median of `repeats` after a warm-up; each repeat rewrites position c, so every step attends over c + 1 tokens).
    """
    import time

    import torch

    from core.attention import make_cache

    small, mla, _ = _modules(small_json, seed)
    contexts = sorted(contexts)
    top = contexts[-1]
    x = _inputs(small, seed, 1, top + 1)
    rows = []
    with torch.inference_mode():
        for kind, label in (("absorbed", "MLA"), ("naive", "MLA (naive)")):
            cache = make_cache(small, kind, batch=1, max_len=top + 1, dtype=_torch_dtype(cache_dtype))
            for c in contexts:
                for s in range(cache.seq_len, c, 256):  # prefill up to c tokens, in chunks of 256
                    mla(x[:, s:min(s + 256, c)], start_pos=s, cache=cache)
                mla(x[:, c:c + 1], start_pos=c, cache=cache)  # warm-up (first-call overheads)
                times = []
                for _ in range(repeats):  # each step writes position c again (the cache rewinds to c + 1)
                    t0 = time.perf_counter()
                    mla(x[:, c:c + 1], start_pos=c, cache=cache)
                    times.append(time.perf_counter() - t0)
                times.sort()
                rows.append({"kind": label, "context_tokens": c, "ms_per_token": 1e3 * times[len(times) // 2],
                             "ms_min": 1e3 * times[0], "cache_bytes_fp32": cache.nbytes()})
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


# ====================================================================== FP8 lab
FP8_SHAPE = (512, 512)
GRAN_LABELS = {"tensor": "per tensor", "row": "per row", "tile": "1×128 tile", "block": "128×128 block",
               "mx": "MX 1×32 (E8M0)"}
FMT_LABELS = {"e4m3": "E4M3", "e5m2": "E5M2", "bf16": "BF16"}
DATA_LABELS = {"gaussian": "Gaussian N(0,1)", "heavy_tail": "Heavy tail (Student-t, 3 dof)",
               "outliers": "Outlier channels"}


def _test_tensor(kind: str, seed: int, out_ch: int, out_scale: float, shape=FP8_SHAPE):
    from core import fp8
    torch_setup()
    return fp8.make_test_tensor(kind, shape, seed=seed, outlier_channels=out_ch, outlier_scale=out_scale)


def _hist(values, edges) -> list[int]:
    import numpy as np
    return np.histogram(values, bins=edges)[0].tolist()


@st.cache_data(max_entries=64, show_spinner=False)
@memory.heavy
def fp8_quantize(fmt: str, gran: str, overflow: str, kind: str, out_ch: int, out_scale: float, seed: int) -> dict:
    """Quantize one test tensor; error figures and the histogram of the scaled values over the format's grid."""
    import numpy as np

    from core import fp8

    torch = torch_setup()
    x, mask = _test_tensor(kind, seed, out_ch, out_scale)
    r = fp8.quantize_and_measure(x, fmt, gran, overflow=overflow, outlier_mask=mask if mask.any() else None)
    spec = fp8.get_format(fmt)
    # x / s per element: dequantize a tensor of ones (in the storage dtype) to broadcast each group's scale.
    s_full = fp8.dequantize(torch.ones_like(x).to(r["q"].dtype), r["scale"], gran)
    scaled = (x / s_full).abs().flatten().numpy().astype(np.float64)
    stored = r["q"].float().abs().flatten().numpy().astype(np.float64)
    lo_exp = int(np.floor(np.log2(spec.min_subnormal))) - 4
    hi_exp = int(np.ceil(np.log2(spec.max))) + 3
    if fmt == "bf16":
        nz = scaled[scaled > 0]
        lo_exp = int(np.floor(np.log2(nz.min()))) - 1 if nz.size else -24
        hi_exp = int(np.ceil(np.log2(max(nz.max(), 1.0)))) + 1 if nz.size else 24
    edges = 2.0 ** np.arange(lo_exp, hi_exp + 0.25, 0.25)
    hist = pd.DataFrame({"bin_low": edges[:-1], "bin_high": edges[1:],
                         "count_scaled_input": _hist(scaled, edges), "count_stored_fp8": _hist(stored, edges)})
    grid = fp8.representable_values(fmt)
    grid = grid[grid > 0].numpy().tolist() if fmt != "bf16" else []
    metrics = {k: v for k, v in r.items() if k not in ("q", "scale", "x_hat")}
    metrics.update(
        zero_inputs=int((scaled == 0).sum()), zero_stored=int((stored == 0).sum()), numel=int(scaled.size),
        below_min_subnormal=int(((scaled > 0) & (scaled < spec.min_subnormal / 2)).sum()),
        subnormal_range=int(((scaled >= spec.min_subnormal / 2) & (scaled < spec.min_normal)).sum()),
        max=spec.max, min_normal=spec.min_normal, min_subnormal=spec.min_subnormal, has_outliers=bool(mask.any()),
        scale_min=float(r["scale"].min()), scale_max=float(r["scale"].max()), n_scales=int(r["scale"].numel()),
        levels_used=int(np.unique(stored[stored > 0]).size), levels_total=len(grid) if grid else None)
    return {"metrics": metrics, "hist": hist, "grid": grid}


@st.cache_data(max_entries=32, show_spinner=False)
@memory.heavy
def fp8_granularity_sweep(fmt: str, out_ch: int, seed: int,
                          sizes: tuple = (1.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6)) -> pd.DataFrame:
    """SQNR of the non-outlier values for every granularity as the outlier channels grow (256×512 tensors)."""
    from core import fp8

    rows = []
    for size in sizes:
        x, mask = _test_tensor("outliers", seed, out_ch, size, shape=(256, 512))
        for g in fp8.GRANULARITIES:
            r = fp8.quantize_and_measure(x, fmt, g, outlier_mask=mask)
            rows.append({"granularity": g, "label": GRAN_LABELS[g], "outlier_size": size,
                         "sqnr_db_non_outlier": r["sqnr_db_non_outlier"], "sqnr_db_all": r["sqnr_db"],
                         "flushed_fraction_non_outlier": r["flushed_to_zero_fraction_non_outlier"],
                         "n_scales": r["n_scales"]})
    return pd.DataFrame(rows)


def _amplitude(step: int) -> float:
    """Activation scale over the simulated steps: flat, a steady rise, a one-step spike, then flat again."""
    if step < 12:
        return 1.0
    if step < 28:
        return 1.25 ** (step - 11)
    if step == 34:
        return 1.25 ** 16 * 8.0
    return 1.25 ** 16


@st.cache_data(max_entries=32, show_spinner=False)
@memory.heavy
def fp8_delayed_scaling(fmt: str, gran: str, overflow: str, kind: str, out_ch: int, out_scale: float,
                        history_len: int, algo: str, seed: int, steps: int = 44) -> pd.DataFrame:
    """Current vs delayed (amax-history) scaling over a sequence of steps whose magnitude rises and spikes
    (a fresh 64×256 tensor of the chosen data per step)."""
    from core import fp8

    torch_setup()
    scaler = fp8.DelayedScaler(fmt, gran, history_len=history_len, algo=algo)
    rows = []
    for t in range(steps):
        x, mask = _test_tensor(kind, seed + 1000 + t, out_ch, out_scale, shape=(64, 256))
        x = x * _amplitude(t)
        m = mask if mask.any() else None
        for name in ("current", "delayed"):
            if name == "current":
                q, s = fp8.quantize(x, fmt, gran, overflow=overflow)
            else:
                q, s = scaler.quantize(x, overflow=overflow)
            e = fp8.error_metrics(x, fp8.dequantize(q, s, gran), m, scale=s, fmt=fmt, granularity=gran)
            rows.append({"step": t, "scaling": name, "amax": float(x.abs().max()), "amplitude": _amplitude(t),
                         "sqnr_db": e["sqnr_db_non_outlier"] if m is not None else e["sqnr_db"],
                         "overflow_count": e["overflow_count"], "nonfinite_count": e["nonfinite_count"],
                         "flushed_to_zero_count": e["flushed_to_zero_count"]})
    return pd.DataFrame(rows)


@st.cache_data(max_entries=32, show_spinner=False)
@memory.heavy
def fp8_gemm_curves(acc_bits: int, promote_every: int, fmt: str, seed: int) -> pd.DataFrame:
    """Relative GEMM error vs K with a limited-precision accumulator, with and without promotion to FP32."""
    from core import fp8

    torch_setup()
    c = fp8.accumulation_error_curve(Ks=(128, 256, 512, 1024, 2048, 4096, 8192), M=32, N=32,
                                     acc_mantissa_bits=acc_bits, promote_every=promote_every,
                                     fmt=None if fmt == "bf16" else fmt, seed=seed)
    rows = []
    for i, k in enumerate(c["K"]):
        rows.append({"K": k, "accumulation": f"promotion every {promote_every}",
                     "max_rel_error": c["max_rel_promotion"][i], "fro_rel_error": c["fro_rel_promotion"][i]})
        rows.append({"K": k, "accumulation": "no promotion",
                     "max_rel_error": c["max_rel_no_promotion"][i], "fro_rel_error": c["fro_rel_no_promotion"][i]})
    return pd.DataFrame(rows)


@st.cache_data(max_entries=32, show_spinner=False)
@memory.heavy
def fp8_gemm_on_data(fmt: str, kind: str, out_ch: int, out_scale: float, seed: int) -> dict:
    """DeepSeek's FP8 GEMM (1×128 activation tiles, 128×128 weight blocks, FP32 per-block accumulation) on the
    chosen data as activations and Gaussian weights, against the FP32 product (DeepGEMM's calc_diff)."""
    from core import fp8

    torch = torch_setup()
    a, _ = _test_tensor(kind, seed, out_ch, out_scale, shape=(256, 512))
    g = torch.Generator().manual_seed(seed + 5)
    w = torch.randn(384, 512, generator=g) * 0.02
    ref = a @ w.T
    y = fp8.fp8_gemm(a, w, fmt=fmt)
    return {"calc_diff": fp8.calc_diff(y, ref),
            "rel_error": float((y - ref).norm() / ref.norm()), "shape": "A [256, 512] × Wᵀ [512, 384]"}


def fp8_bit_layout(value: float, fmt: str, overflow: str) -> tuple[dict, pd.DataFrame]:
    """`core.fp8.bit_layout` of `value` (rounded to `fmt`, no scaling) and the same as a one-row table."""
    from core import fp8
    torch_setup()
    b = fp8.bit_layout(value, fmt, overflow)
    return b, pd.DataFrame([b])


# ====================================================================== MoE routing
MOE_HIDDEN = 64
MOE_BATCH = 2048
MOE_FIELD_LABELS = {
    "n_routed_experts": "Routed experts N_r", "n_shared_experts": "Shared experts N_s",
    "num_experts_per_tok": "Experts per token K_r", "n_group": "Expert groups", "topk_group": "Groups per token",
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

    torch = torch_setup()
    cfg = PRESETS["tiny"].replace(hidden_size=MOE_HIDDEN, routed_scaling_factor=1.0, **dict(key))
    torch.manual_seed(seed)
    router = Router(cfg).eval()
    with torch.no_grad():
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
