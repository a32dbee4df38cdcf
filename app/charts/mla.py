"""MLA & KV cache dashboard charts: KV cache vs context per attention kind, longest context that fits, the
measured cache bytes and decode latency, attention map, rank truncation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from app import palette
from app.charts.layout import layout, vline
from core.units import byte_unit, tokens
from core.units import human_bytes


_KV_ORDER = ["MHA", "MLA (naive)", "GQA", "MQA", "MLA"]


def kv_vs_context(df: pd.DataFrame, context: int, batch: int, groups: int, log: bool = True) -> go.Figure:
    """KV-cache memory vs context, one line per attention kind (whole model, all layers)."""
    at = df[df["context_tokens"] == context].set_index("kind")["bytes"]
    unit, div = byte_unit(at.max())
    fig = go.Figure()
    for kind in _KV_ORDER:
        d = df[df["kind"] == kind]
        name = f"GQA ({groups} groups)" if kind == "GQA" else kind
        fig.add_scatter(
            x=d["context_tokens"], y=d["bytes"] / div, name=name, mode="lines+markers",
            line=dict(color=palette.ATTENTION[kind], width=4 if kind == "MLA" else 2,
                      dash="dash" if kind == "MLA (naive)" else "solid"),
            marker=dict(size=5),
            customdata=[[human_bytes(b)] for b in d["bytes"]],
            hovertemplate=name + ": %{customdata[0]} at %{x:,} tokens<extra></extra>")
    red = 1 - at["MLA"] / at["MHA"]
    title = f"MLA caches {100 * red:.1f}% less than MHA at every context length"
    sub = (f"at {tokens(context)} tokens × batch {batch}: MLA {human_bytes(at['MLA'])}, "
           f"MQA {human_bytes(at['MQA'])}, GQA-{groups} {human_bytes(at['GQA'])}, MHA {human_bytes(at['MHA'])}, "
           f"naive MLA cache {human_bytes(at['MLA (naive)'])}")
    fig.add_vline(x=context, line_dash="dot", line_color=palette.OKABE_ITO["grey"])
    ticks = [t for t in sorted(df["context_tokens"].unique()) if np.log2(t) % 2 == 0 or t == context]
    fig.update_xaxes(type="log", tickvals=ticks, ticktext=[tokens(t) for t in ticks])
    if log:
        fig.update_yaxes(type="log", dtick=1)
    return layout(fig, title, sub, "Context length (tokens per sequence, log scale)",
                   f"KV cache, all layers ({unit}{', log scale' if log else ''})", height=460, width_chars=85)


def max_context_bars(table: pd.DataFrame, window: int, memory: str) -> go.Figure:
    """Longest context that fits the memory left after the weights, per attention kind (log scale)."""
    t = table.copy()
    t["kind"] = pd.Categorical(t["kind"], _KV_ORDER, ordered=True)
    t = t.sort_values("kind")
    vals = t["max_context_tokens"].clip(lower=1)
    fig = go.Figure(go.Bar(
        y=t["kind"].astype(str), x=vals, orientation="h",
        marker_color=[palette.ATTENTION[k] for k in t["kind"].astype(str)],
        text=[tokens(v) if v > 0 else "0 (does not fit)" for v in t["max_context_tokens"]], textposition="auto",
        hovertemplate="%{y}: %{x:,} tokens<extra></extra>"))
    vline(fig, window, f"model's window {tokens(window)}", log=True, color=palette.OKABE_ITO["black"], dash="dash")
    best = t.set_index("kind")["max_context_tokens"]
    title = f"With {memory}, MLA fits {tokens(best['MLA'])} tokens, MHA {tokens(best['MHA'])}"
    fig.update_xaxes(type="log", dtick=1)
    return layout(fig, title, "tokens of KV cache that fit next to the weights (all layers, this batch)",
                   "Longest context (tokens, log scale)", None, height=330, legend=False, width_chars=85)


def measured_bytes(df: pd.DataFrame) -> go.Figure:
    """Bytes of the real cache tensors (bars) against the paper formula (markers)."""
    unit, div = byte_unit(df["measured_bytes"].max())
    fig = go.Figure()
    fig.add_bar(x=df["kind"], y=df["measured_bytes"] / div, name="measured (sum of tensor.nbytes)",
                marker_color=[palette.ATTENTION[k] for k in df["kind"]],
                customdata=df[["tensors", "dtype"]].values,
                hovertemplate="%{x}: %{y:,.2f} " + unit + "<br>%{customdata[0]} (%{customdata[1]})<extra></extra>")
    fig.add_scatter(x=df["kind"], y=df["formula_bytes"] / div, name="paper formula", mode="markers",
                    marker=dict(symbol="line-ew-open", size=40, color="black", line=dict(width=3, color="black")),
                    hovertemplate="%{x} formula: %{y:,.2f} " + unit + "<extra></extra>")
    ok = bool(df["match"].all())
    title = ("Every cache tensor's measured size equals the formula" if ok
             else "Measured cache bytes differ from the formula for " + ", ".join(df.loc[~df["match"], "kind"]))
    n = int(df["tokens"].iloc[0])
    sub = f"one layer, batch {int(df['batch'].iloc[0])}, {n} tokens after prefill + decode"
    return layout(fig, title, sub, None, f"Cache bytes ({unit})", height=360, width_chars=85)


def decode_latency(df: pd.DataFrame) -> go.Figure:
    """Decode time per token vs context for the absorbed and the naive MLA cache (best of N runs)."""
    fig = go.Figure()
    for kind in ("MLA (naive)", "MLA"):
        d = df[df["kind"] == kind]
        fig.add_scatter(x=d["context_tokens"], y=d["ms_min"], name=f"{kind} cache", mode="lines+markers",
                        line=dict(color=palette.ATTENTION[kind], width=3,
                                  dash="dash" if kind == "MLA (naive)" else "solid"),
                        customdata=[[human_bytes(b), m] for b, m in zip(d["cache_bytes_fp32"], d["ms_per_token"])],
                        hovertemplate=kind + ": best %{y:.3f} ms, median %{customdata[1]:.3f} ms at %{x:,} tokens "
                                             "(cache %{customdata[0]})<extra></extra>")
    last = df["context_tokens"].max()
    a = df[(df["kind"] == "MLA") & (df["context_tokens"] == last)].iloc[0]
    n = df[(df["kind"] == "MLA (naive)") & (df["context_tokens"] == last)].iloc[0]
    ratio = a["ms_min"] / n["ms_min"]
    mem = n["cache_bytes_fp32"] / a["cache_bytes_fp32"]
    title = (f"The absorbed path reads a {mem:.1f}× smaller cache; here it takes {ratio:.2f}× the naive time "
             f"per token")
    sub = (f"at {tokens(last)} tokens: {a['ms_min']:.2f} ms vs {n['ms_min']:.2f} ms (best of the runs, this CPU). "
           "Absorption trades memory traffic for extra multiply-adds: it wins where bandwidth is the bottleneck")
    ticks = sorted(df["context_tokens"].unique())
    fig.update_xaxes(type="log", tickvals=ticks, ticktext=[tokens(t) for t in ticks])
    fig.update_yaxes(rangemode="tozero")
    return layout(fig, title, sub, "Context (cached tokens, log scale)", "Decode latency (ms per token)",
                   height=360, width_chars=85)


def attention_heatmap(probs: np.ndarray, head: int, ids: list[int], relative: bool = True) -> go.Figure:
    """Causal attention map of one head: probabilities, or probabilities × (number of visible keys)."""
    t = probs.shape[-1]
    z = probs.copy()
    if relative:
        z = z * np.arange(1, t + 1)[:, None]  # 1 = the uniform weight 1/(i+1) of row i
    z[np.triu_indices(t, 1)] = np.nan  # masked (future) positions: blank, not "zero probability"
    hi = float(np.nanquantile(z, 0.995))
    fig = go.Figure(go.Heatmap(
        z=z, colorscale=palette.HEATMAP, zmin=0, zmax=hi,
        colorbar=dict(title="× uniform" if relative else "p", thickness=12),
        customdata=probs, hovertemplate="query %{y} → key %{x}: p = %{customdata:.3f}"
                                        + (" (%{z:.2f}× uniform)" if relative else "") + "<extra></extra>"))
    same = [(i, j) for i in range(t) for j in range(i) if ids[i] == ids[j]]
    period = next((k for k in range(1, t) if ids[k] == ids[0] and ids[k:] == ids[:t - k]), None)
    if relative:
        rel = probs * np.arange(1, t + 1)[:, None]
        lo, hi = float(rel[np.tril_indices(t)].min()), float(rel[np.tril_indices(t)].max())

        def lag_corr(lag):
            rows = [np.corrcoef(rel[i, :i + 1 - lag], rel[i, lag:i + 1])[0, 1] for i in range(2 * lag, t)]
            return float(np.nanmean(rows)) if rows else float("nan")

        title = f"Head {head}: at random init every weight stays within {lo:.1f}–{hi:.1f}× uniform"
        sub = ("colour = probability × number of visible keys (1 = uniform); the blank triangle is the causal mask. "
               + (f"The tokens repeat every {period} positions, so keys {period} apart get almost the same weight "
                  f"(correlation {lag_corr(period):.2f} along a row, vs {lag_corr(max(1, period // 2 - 1)):.2f} for "
                  f"keys {max(1, period // 2 - 1)} apart)" if period and 2 * period < t else ""))
    else:
        title = f"Head {head}: causal — each token attends only to itself and earlier tokens"
        mean_same = float(np.mean([probs[i, j] for i, j in same])) if same else 0.0
        sub = (f"random-initialized weights are nearly uniform: row i spreads ~1/(i+1) over its keys; "
               f"mean weight on an earlier copy of the same token {mean_same:.3f}")
    fig.update_yaxes(autorange="reversed")
    return layout(fig, title, sub, "Key position (token)", "Query position (token)", height=440, legend=False,
                   width_chars=85)


def rank_truncation(df: pd.DataFrame, exact_rank: int) -> go.Figure:
    fig = go.Figure()
    for kind in ("MHA", "MLA"):
        d = df[df["kind"] == kind]
        fig.add_scatter(x=d["rank"], y=d["rel_error"], name=f"{kind} per-head K/V", mode="lines+markers",
                        line=dict(color=palette.ATTENTION[kind], width=3),
                        customdata=d[["bytes_per_token_per_layer"]].values,
                        hovertemplate=kind + ": rank %{x} → error %{y:.2%} (%{customdata[0]} B/token/layer in BF16)"
                                             "<extra></extra>")
    vline(fig, exact_rank, f"d_c + d_h^R = {exact_rank}", color=palette.ATTENTION["MLA"])
    mla = df[df["kind"] == "MLA"]
    mha = df[df["kind"] == "MHA"]
    at = mha.loc[(mha["rank"] - exact_rank).abs().idxmin()]
    title = f"MLA's K/V are exactly rank {exact_rank}: truncating to r ≥ {exact_rank} loses nothing"
    sub = (f"MHA's K/V of the same size keep {at['rel_error']:.0%} error at rank {int(at['rank'])}; "
           f"MLA's error is {mla.loc[mla['rank'] >= exact_rank, 'rel_error'].max():.0e} there")
    fig.update_yaxes(tickformat=".0%")
    return layout(fig, title, sub, "Rank r kept per token (numbers cached per token per layer)",
                   "Relative error ‖KV − KVᵣ‖ / ‖KV‖", height=400, width_chars=85)
