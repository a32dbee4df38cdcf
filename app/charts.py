"""Pure chart builders: DataFrame in, plotly Figure out (no Streamlit, no torch, no math beyond unit scaling).

Conventions (DESIGN.md): the title says what to notice (the subtitle gives the numbers), axes carry units,
hover shows values, colours come from `app.palette` (same colour for the same thing on every page),
heatmaps use viridis / cividis.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from app import palette
from core.published import FP8_ACCUM_ERROR, FP8_ACCUM_ERROR_K, H800_FP8_ACCUM_BITS
from core.units import byte_unit, human_bytes, human_count, tokens

FONT = dict(family="sans-serif", size=13)


def sci(v: float) -> str:
    """10000.0 -> '1e4' (compact powers of ten for titles)."""
    m, e = f"{v:.0e}".split("e")
    return f"{m}e{int(e)}"


def wrap(text: str, width: int) -> str:
    """Break `text` into lines of at most ~`width` characters (plotly titles do not wrap by themselves)."""
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    if cur:
        lines.append(cur)
    return "<br>".join(lines)


def _layout(fig: go.Figure, title: str, subtitle: str | None, x: str | None, y: str | None, *,
            height: int = 420, legend: bool = True, width_chars: int = 85) -> go.Figure:
    """Title (what to notice) + subtitle (the numbers), axis titles with units, legend under the x axis.

    Plotly does not wrap text, so title and subtitle are broken into lines for a chart about `width_chars`
    title characters wide (a half-width column: ~55, full width: ~90).
    """
    t = wrap(title, width_chars)
    sub = wrap(subtitle or "", int(width_chars * 1.45))
    n_title, n_sub = t.count("<br>") + 1, (sub.count("<br>") + 1 if subtitle else 0)
    top = 24 + 21 * n_title + 16 * n_sub + 12
    bottom = 10
    plot_h = height - 60
    fig.update_layout(
        title=dict(text=t, subtitle=dict(text=sub), x=0, xanchor="left", xref="container", yref="container",
                   y=1 - 10 / (plot_h + top + bottom), yanchor="top", font=dict(size=16), pad=dict(l=10)),
        xaxis_title=x, yaxis_title=y, height=plot_h + top + bottom, font=FONT,
        margin=dict(l=10, r=10, t=top, b=bottom),
        legend=dict(orientation="h", yanchor="top", y=-(62 if x else 30) / plot_h, xanchor="left", x=0,
                    title=None),
        showlegend=legend, hoverlabel=dict(namelength=-1),
        # No plotly template: Streamlit's chart theme styles the figure in the browser, and a template-free
        # figure is 4x cheaper to copy out of the cache.
        template="none",
    )
    return fig


def _vline(fig: go.Figure, x: float, text: str | None = None, *, log: bool = False, color: str | None = None,
           dash: str = "dot", side: str = "right", row=None, col=None) -> None:
    """A vertical marker line with a label at the top of the plot. Plotly misplaces the built-in
    `annotation_text` of vlines on log axes, so the label is a separate annotation in axis coordinates
    (log10 of the value on a log axis)."""
    color = color or palette.OKABE_ITO["grey"]
    fig.add_vline(x=x, line_dash=dash, line_color=color)
    if text:
        fig.add_annotation(x=float(np.log10(x)) if log else x, y=1, yref="paper", yanchor="top", text=text,
                           showarrow=False, xanchor="left" if side == "right" else "right",
                           xshift=4 if side == "right" else -4, font=dict(size=11, color=color))


def _hline(fig: go.Figure, y: float, text: str | None = None, *, log: bool = False, color: str | None = None,
           dash: str = "dash", side: str = "left") -> None:
    """A horizontal marker line with a label just above it (log-axis safe, see `_vline`)."""
    color = color or palette.OKABE_ITO["black"]
    fig.add_hline(y=y, line_dash=dash, line_color=color)
    if text:
        fig.add_annotation(x=0 if side == "left" else 1, xref="paper", y=float(np.log10(y)) if log else y,
                           yanchor="bottom", xanchor=side, text=text, showarrow=False,
                           font=dict(size=11, color=color), bgcolor="rgba(255,255,255,0.7)")


def _percent(part, whole) -> float:
    """100 · part / whole in float arithmetic (numpy int64 counts near 1e17 overflow when multiplied by 100)."""
    return 100.0 * float(part) / float(whole)


# ====================================================================== Overview
def component_bars(params: pd.DataFrame, counts: dict, rows: list[str], scale: float, value_text) -> go.Figure:
    """Two stacked horizontal bars, `rows` = [activated label, total label], one segment per component (MTP
    excluded, empty components left out); x = parameters / `scale`; the hover shows `value_text(v)` and the
    segment's share of its bar."""
    fig = go.Figure()
    total, act = counts["total"], counts["activated"]
    for _, r in params[params["component"] != "mtp"].iterrows():
        vals = [r["activated"], r["total"]]
        if not any(vals):
            continue
        fig.add_bar(
            y=rows, x=[v / scale for v in vals], name=r["label"], orientation="h",
            marker_color=palette.COMPONENTS[r["component"]],
            customdata=[[value_text(v), _percent(v, max(d, 1))] for v, d in zip(vals, (act, total))],
            hovertemplate="%{fullData.name}: %{customdata[0]} (%{customdata[1]:.1f}% of the bar)<extra></extra>",
        )
    fig.update_layout(barmode="stack")
    return fig


def params_breakdown(params: pd.DataFrame, counts: dict) -> go.Figure:
    """Stacked bars: all parameters vs the ones a token activates, split by component."""
    total, act = counts["total"], counts["activated"]
    fig = component_bars(params, counts, ["Activated per token", "Total (main model)"], 1e9, human_count)
    routed = params.loc[params["component"] == "routed_experts"].iloc[0]
    share = routed["total"] / max(total, 1)
    title = (f"Only {_percent(act, max(total, 1)):.1f}% of the weights run per token"
             if counts.get("moe_layers") else "A dense model: every weight runs for every token")
    sub = (f"{human_count(total)} total vs {human_count(act)} activated; routed experts hold {100 * share:.0f}% "
           f"of all weights, but each token uses only its top-k of them") if counts.get("moe_layers") else \
        f"{human_count(total)} parameters"
    return _layout(fig, title, sub, "Parameters (billions)", None, height=330)


def memory_bars(mem: pd.DataFrame) -> go.Figure:
    unit, div = byte_unit(mem["bytes"].max())
    colors = [palette.FORMATS.get(k, palette.ATTENTION.get(k, palette.OKABE_ITO["grey"])) for k in mem["kind"]]
    fig = go.Figure(go.Bar(
        x=mem["bytes"] / div, y=mem["item"], orientation="h", marker_color=colors,
        text=[human_bytes(b) for b in mem["bytes"]], textposition="auto",
        hovertemplate="%{y}: %{x:,.3f} " + unit + "<extra></extra>"))
    # Floats: the column is int64 (or uint64 / Python ints) and an uploaded config can make the bytes ~1e17, where
    # the int64 product 100 * fp8 wraps around (hidden_size 2**31-1 read "4%" instead of 50%).
    bf16, fp8, kv, mha = (float(b) for b in mem["bytes"].iloc[:4])
    title = f"FP8 weights need {_percent(fp8, bf16):.0f}% of BF16's memory"
    sub = (f"the KV cache of one long sequence is {_percent(kv, mha):.1f}% of what MHA would need"
           if mha and kv != mha else "KV cache shown for one sequence")
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, sub, f"Memory ({unit})", None, height=330, legend=False, width_chars=85)


def flops_vs_context(flops: pd.DataFrame, context: int) -> go.Figure:
    fig = go.Figure()
    x = flops["context"]
    fig.add_scatter(x=x, y=flops["matmul"] / 1e9, name="Weight matmuls (2 × activated params)", mode="lines",
                    line=dict(color=palette.COMPONENTS["routed_experts"], width=3),
                    hovertemplate="context %{x:,} tokens: %{y:,.1f} GFLOP<extra>matmuls</extra>")
    fig.add_scatter(x=x, y=flops["attention"] / 1e9, name="Attention (QKᵀ and PV)", mode="lines",
                    line=dict(color=palette.ATTENTION["MLA"], width=3),
                    hovertemplate="context %{x:,} tokens: %{y:,.1f} GFLOP<extra>attention</extra>")
    fig.add_scatter(x=x, y=flops["forward"] / 1e9, name="Total forward", mode="lines",
                    line=dict(color=palette.OKABE_ITO["black"], width=1.5, dash="dash"),
                    hovertemplate="context %{x:,} tokens: %{y:,.1f} GFLOP<extra>total</extra>")
    row = flops.loc[flops["context"] == context].iloc[0]
    share = row["attention"] / row["forward"]
    cross = flops.loc[flops["attention"] >= flops["matmul"], "context"]
    title = (f"Attention overtakes the weight matmuls beyond ~{tokens(cross.iloc[0])} tokens"
             if len(cross) else "Weight matmuls dominate the FLOPs at every context shown")
    sub = f"at {context:,} tokens attention is {100 * share:.0f}% of {row['forward'] / 1e9:,.1f} GFLOP per token"
    fig.add_vline(x=context, line_dash="dot", line_color=palette.OKABE_ITO["grey"])
    fig.update_xaxes(type="log", dtick=1)
    fig.update_yaxes(type="log", dtick=1)
    return _layout(fig, title, sub, "Context length (tokens, log scale)", "Forward FLOPs per token (GFLOP, log)",
                   width_chars=85)


# ====================================================================== MLA & KV cache
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
    return _layout(fig, title, sub, "Context length (tokens per sequence, log scale)",
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
    _vline(fig, window, f"model's window {tokens(window)}", log=True, color=palette.OKABE_ITO["black"], dash="dash")
    best = t.set_index("kind")["max_context_tokens"]
    title = f"With {memory}, MLA fits {tokens(best['MLA'])} tokens, MHA {tokens(best['MHA'])}"
    fig.update_xaxes(type="log", dtick=1)
    return _layout(fig, title, "tokens of KV cache that fit next to the weights (all layers, this batch)",
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
    return _layout(fig, title, sub, None, f"Cache bytes ({unit})", height=360, width_chars=85)


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
    return _layout(fig, title, sub, "Context (cached tokens, log scale)", "Decode latency (ms per token)",
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
    return _layout(fig, title, sub, "Key position (token)", "Query position (token)", height=440, legend=False,
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
    _vline(fig, exact_rank, f"d_c + d_h^R = {exact_rank}", color=palette.ATTENTION["MLA"])
    mla = df[df["kind"] == "MLA"]
    mha = df[df["kind"] == "MHA"]
    at = mha.loc[(mha["rank"] - exact_rank).abs().idxmin()]
    title = f"MLA's K/V are exactly rank {exact_rank}: truncating to r ≥ {exact_rank} loses nothing"
    sub = (f"MHA's K/V of the same size keep {at['rel_error']:.0%} error at rank {int(at['rank'])}; "
           f"MLA's error is {mla.loc[mla['rank'] >= exact_rank, 'rel_error'].max():.0e} there")
    fig.update_yaxes(tickformat=".0%")
    return _layout(fig, title, sub, "Rank r kept per token (numbers cached per token per layer)",
                   "Relative error ‖KV − KVᵣ‖ / ‖KV‖", height=400, width_chars=85)


# ====================================================================== FP8 lab
def _fmt_name(fmt: str) -> str:
    return {"e4m3": "E4M3", "e5m2": "E5M2", "bf16": "BF16"}.get(fmt, fmt)


def fp8_histogram(hist: pd.DataFrame, grid: list[float], m: dict, fmt: str, gran_label: str) -> go.Figure:
    """Histogram of |x / s| (what the format sees) on log-spaced bins, with the format's representable levels."""
    centers = np.sqrt(hist["bin_low"] * hist["bin_high"])
    widths = hist["bin_high"] - hist["bin_low"]
    name = _fmt_name(fmt)
    fig = go.Figure()
    fig.add_bar(x=centers, y=hist["count_scaled_input"], width=widths, name="|x / s| before rounding",
                marker_color=palette.FORMATS.get(fmt, palette.OKABE_ITO["blue"]), opacity=0.75,
                customdata=np.stack([hist["bin_low"], hist["bin_high"]], axis=1),
                hovertemplate="|x/s| in [%{customdata[0]:.3g}, %{customdata[1]:.3g}): %{y:,} values<extra></extra>")
    if grid:
        ymax = max(1, int(hist["count_scaled_input"].max()))
        fig.add_scatter(x=grid, y=[-0.04 * ymax] * len(grid), mode="markers", name=f"{name} representable values",
                        marker=dict(symbol="line-ns-open", size=10, color=palette.OKABE_ITO["black"],
                                    line=dict(width=1, color=palette.OKABE_ITO["black"])),
                        hovertemplate=name + " level %{x:.6g}<extra></extra>")
    lines = [(m["min_subnormal"], "smallest subnormal", "left"), (m["min_normal"], "smallest normal", "right")]
    if fmt != "bf16":
        lines.append((m["max"], f"max {m['max']:g}", "left"))
    for x, label, side in lines:
        _vline(fig, x, label, log=True, side=side)
    flushed = m["flushed_to_zero_fraction"]
    if fmt == "bf16":
        title = "BF16 keeps 8 exponent bits: nothing flushes or overflows, only 8 mantissa bits are lost"
    elif flushed > 0.005:
        title = f"{100 * flushed:.1f}% of the values fall below the smallest {name} subnormal and become 0"
    else:
        title = f"The values use {m['levels_used']} of {name}'s {m['levels_total']} positive levels; almost none flush"
    sub = (f"{gran_label}: {m['n_scales']:,} scale(s) from {m['scale_min']:.3g} to {m['scale_max']:.3g}; "
           f"{m['subnormal_range']:,} values land in the subnormal range (fewer mantissa bits)")
    fig.update_xaxes(type="log", dtick=1, exponentformat="power")
    fig.update_layout(bargap=0)
    return _layout(fig, title, sub, "|x / s| — magnitude after scaling (log scale)", "Values (count)", height=420,
                   width_chars=85)


def bit_layout(b: dict, fmt: str, exp_bits: int, man_bits: int) -> go.Figure:
    """The bits of a number in a format: sign | exponent | mantissa as coloured boxes with the decoded value."""
    bits = b["bits"].replace(" ", "")
    kinds = ["sign"] + ["exponent"] * exp_bits + ["mantissa"] * man_bits
    fig = go.Figure()
    for i, (bit, kind) in enumerate(zip(bits, kinds)):
        fig.add_shape(type="rect", x0=i, x1=i + 0.94, y0=0, y1=1, line=dict(color="white", width=1),
                      fillcolor=palette.BITS[kind], opacity=0.85)
        fig.add_annotation(x=i + 0.47, y=0.5, text=f"<b>{bit}</b>", showarrow=False,
                           font=dict(size=22, color="white"))
    for kind, start, n in (("sign", 0, 1), ("exponent", 1, exp_bits), ("mantissa", 1 + exp_bits, man_bits)):
        fig.add_annotation(x=start + n / 2 - 0.03, y=1.22, text=f"{kind} ({n})", showarrow=False,
                           font=dict(size=12, color=palette.BITS[kind]))
    # invisible trace so the figure has hover/data and a sensible range
    fig.add_scatter(x=[i + 0.47 for i in range(len(bits))], y=[0.5] * len(bits), mode="markers",
                    marker=dict(size=28, opacity=0), showlegend=False,
                    customdata=[[k, i] for i, k in enumerate(kinds)],
                    hovertemplate="bit %{customdata[1]}: %{customdata[0]}<extra></extra>")
    fig.update_xaxes(visible=False, range=[-0.2, len(bits) + 0.1])
    fig.update_yaxes(visible=False, range=[-0.15, 1.45])
    name = _fmt_name(fmt)
    if b["is_nan"]:
        title = f"{b['input']:g} overflows {name} and becomes NaN"
    elif b["is_inf"]:
        title = f"{b['input']:g} overflows {name} and becomes ±inf"
    elif b["is_zero"] and b["input"] != 0:
        title = f"{b['input']:g} is below {name}'s smallest subnormal: it flushes to 0"
    else:
        title = f"{b['input']:g} is stored as {b['value']:.6g} in {name} ({100 * b['rel_error']:.2f}% off)"
    kind = "subnormal" if b["is_subnormal"] else ("zero" if b["is_zero"] else "normal")
    sub = f"code {b['hex']}, {kind}; unbiased exponent {b['unbiased_exponent']}"
    return _layout(fig, title, sub, None, None, height=170 + 60, legend=False, width_chars=85)


def granularity_sweep(df: pd.DataFrame, outlier_size: float, fmt: str, out_ch: int) -> go.Figure:
    fig = go.Figure()
    for g in ("tensor", "row", "block", "tile", "mx"):
        d = df[df["granularity"] == g]
        fig.add_scatter(x=d["outlier_size"], y=d["sqnr_db_non_outlier"], name=d["label"].iloc[0],
                        mode="lines+markers", line=dict(color=palette.GRANULARITY[g], width=3),
                        customdata=d[["flushed_fraction_non_outlier", "n_scales"]].values,
                        hovertemplate=d["label"].iloc[0] + ": %{y:.1f} dB at outliers ×%{x:.0e} (%{customdata[0]:.1%} "
                                      "flushed to zero, %{customdata[1]:,} scales)<extra></extra>")
    fig.add_vline(x=outlier_size, line_dash="dot", line_color=palette.OKABE_ITO["grey"])
    at = df[df["outlier_size"] == df["outlier_size"].max()].set_index("granularity")["sqnr_db_non_outlier"]
    fail = df[(df["granularity"] == "tensor") & (df["sqnr_db_non_outlier"] < df["sqnr_db_non_outlier"].max() - 3)]
    where = f"{sci(fail['outlier_size'].min())}×" if len(fail) else "any size shown"
    best = at.idxmax()
    title = f"Per-tensor scaling loses the ordinary values once outliers reach {where}; finer scales hold up"
    sub = (f"{_fmt_name(fmt)}, 256×512 tensor with {out_ch} outlier column(s); SQNR of the non-outlier values. At ×1e6 the best "
           f"is {df[df['granularity'] == best]['label'].iloc[0]} ({at.max():.1f} dB), per tensor {at['tensor']:.1f} dB")
    fig.update_xaxes(type="log", dtick=1, exponentformat="power")
    return _layout(fig, title, sub, "Outlier channel magnitude (× the other values, log scale)",
                   "SQNR of the non-outlier values (dB)", height=420, width_chars=85)


def delayed_scaling(df: pd.DataFrame, history_len: int, algo: str) -> go.Figure:
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.6, 0.4], vertical_spacing=0.06)
    for name in ("current", "delayed"):
        d = df[df["scaling"] == name]
        fig.add_scatter(x=d["step"], y=d["sqnr_db"], name=f"{name} scaling", mode="lines+markers",
                        line=dict(color=palette.SCALING[name], width=3), legendgroup=name,
                        hovertemplate=f"{name}: step %{{x}}: %{{y:.1f}} dB<extra></extra>", row=1, col=1)
        fig.add_bar(x=d["step"], y=d["overflow_count"], name=f"{name}: overflowed values",
                    marker_color=palette.SCALING[name], legendgroup=name, showlegend=False,
                    hovertemplate=f"{name}: step %{{x}}: %{{y:,}} values beyond the max<extra></extra>", row=2, col=1)
    dl = df[df["scaling"] == "delayed"]
    cur = df[df["scaling"] == "current"]
    n_over = int(dl["overflow_count"].sum())
    worst = dl.loc[dl["sqnr_db"].idxmin()]
    title = (f"Delayed scaling lags the rising amax: {n_over:,} values overflow, current scaling "
             f"{int(cur['overflow_count'].sum()):,}")
    after = dl[(dl["step"] > 34)]
    stuck = int((after["sqnr_db"] < cur[cur["step"] > 34]["sqnr_db"].values - 3).sum())
    sub = (f"amax history of {history_len} steps ({algo}); the magnitude rises 25%/step from step 12 and spikes ×8 "
           f"at step 34. Worst delayed step {int(worst['step'])}: {worst['sqnr_db']:.1f} dB"
           + (f"; after the spike the remembered amax keeps the scale too coarse for {stuck} steps" if stuck else ""))
    fig.update_layout(barmode="group")
    _layout(fig, title, sub, None, None, height=460, width_chars=85)
    fig.update_yaxes(title_text="SQNR (dB)", row=1, col=1)
    fig.update_yaxes(title_text="Overflowed values", row=2, col=1)
    fig.update_xaxes(title_text="Training step", row=2, col=1)
    fig.update_layout(legend=dict(y=-0.16))
    return fig


def gemm_error(df: pd.DataFrame, promote_every: int, acc_bits: int) -> go.Figure:
    fig = go.Figure()
    for acc in (f"promotion every {promote_every}", "no promotion"):
        d = df[df["accumulation"] == acc]
        color = palette.ACCUMULATION["no promotion" if acc == "no promotion" else "promotion every 128"]
        fig.add_scatter(x=d["K"], y=d["max_rel_error"], name=acc, mode="lines+markers",
                        line=dict(color=color, width=3),
                        hovertemplate=acc + ": K=%{x:,}: max relative error %{y:.3%}<extra></extra>")
    fig.add_scatter(x=[FP8_ACCUM_ERROR_K], y=[FP8_ACCUM_ERROR], mode="markers+text",
                    name=f"V3 report: ~{FP8_ACCUM_ERROR:.0%} at K={FP8_ACCUM_ERROR_K} without promotion",
                    marker=dict(symbol="star", size=14, color=palette.OKABE_ITO["black"]),
                    text=[f"paper ≈{FP8_ACCUM_ERROR:.0%}"], textposition="middle left",
                    hovertemplate=f"V3 report §3.3.2: ~{FP8_ACCUM_ERROR:.0%} max relative error at "
                                  f"K={FP8_ACCUM_ERROR_K}<extra></extra>")
    no = df[df["accumulation"] == "no promotion"].set_index("K")["max_rel_error"]
    yes = df[df["accumulation"] != "no promotion"].set_index("K")["max_rel_error"]
    k = FP8_ACCUM_ERROR_K if FP8_ACCUM_ERROR_K in no.index else no.index.max()
    title = (f"Without promotion the error grows with K ({no[k]:.1%} at K={k:,}); promoting every "
             f"{promote_every} keeps it at {yes[k]:.2%}")
    sub = (f"accumulator with {acc_bits} mantissa bits (H800 tensor cores keep ~{H800_FP8_ACCUM_BITS} bits incl. the "
           "implicit one); promotion = add the partial sum into an FP32 register every N_C products")
    fig.update_xaxes(type="log", tickvals=list(no.index), ticktext=[f"{v:,}" for v in no.index])
    fig.update_yaxes(type="log", tickformat=".2~%",
                     tickvals=[1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5])
    return _layout(fig, title, sub, "Inner dimension K (log scale)", "Max relative error of C = AB (log)",
                   height=420, width_chars=85)


# ====================================================================== MoE routing
def _expert_ticks(n: int) -> dict:
    step = max(1, n // 16)
    return dict(tickmode="array", tickvals=list(range(0, n, step)))


def domain_heatmaps(before: pd.DataFrame, after: pd.DataFrame, mb: dict, ma: dict, steps: int, gamma: float,
                    has_bias: bool) -> go.Figure:
    """Relative expert load per token domain (1 = fair share), fresh router vs after the bias controller."""
    from plotly.subplots import make_subplots

    rows = [("fresh router (bias 0)", before)]
    if has_bias:
        rows.append((f"after {steps} aux-loss-free bias updates (γ = {gamma:g})", after))
    fig = make_subplots(rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=[r[0] for r in rows])
    zmax = float(np.nanquantile(np.concatenate([before["relative_load"].values, after["relative_load"].values]),
                                0.995))
    for i, (name, d) in enumerate(rows, start=1):
        piv = d.pivot(index="domain", columns="expert", values="relative_load")
        slots = d.pivot(index="domain", columns="expert", values="slots")
        fig.add_heatmap(z=piv.values, x=list(piv.columns), y=list(piv.index), colorscale=palette.HEATMAP,
                        zmin=0, zmax=max(zmax, 1.0), customdata=slots.values, showscale=i == 1,
                        colorbar=dict(title="× fair share", thickness=12),
                        hovertemplate="%{y} → expert %{x}: %{z:.2f}× fair share (%{customdata} slots)<extra></extra>",
                        row=i, col=1)
    n = int(before["expert"].max()) + 1
    fig.update_xaxes(**_expert_ticks(n))
    fig.update_xaxes(title_text="Routed expert", row=len(rows), col=1)
    def row_corr(d: pd.DataFrame) -> float:
        piv = d.pivot(index="domain", columns="expert", values="relative_load").values
        c = np.corrcoef(piv)
        return float(np.nanmean(c[np.triu_indices(len(piv), 1)])) if len(piv) > 1 else float("nan")

    if has_bias:
        title = (f"The bias controller spreads the load: the busiest expert drops from {mb['max_vio'] + 1:.1f}× to "
                 f"{ma['max_vio'] + 1:.1f}× its fair share")
        sub = (f"dead experts {mb['dead_experts']} → {ma['dead_experts']}. Fresh, all four domains crowd onto the "
               f"same experts (domain rows correlate r = {row_corr(before):.2f}); after, each domain has its own "
               f"favourites (r = {row_corr(after):.2f}) — specialization without an aux loss")
    else:
        title = f"The busiest expert gets {mb['max_vio'] + 1:.1f}× its fair share; {mb['dead_experts']} experts get none"
        sub = "this config has no bias (topk_method without noaux_tc), so there is no aux-loss-free controller"
    return _layout(fig, title, sub, None, None, height=120 + 150 * len(rows), legend=False, width_chars=85)


def expert_load_bars(before: list, after: list, mb: dict, ma: dict, capacity_factor: float,
                     has_bias: bool) -> go.Figure:
    n = len(before)
    mean = sum(before) / max(n, 1)
    fig = go.Figure()
    fig.add_bar(x=list(range(n)), y=before, name="fresh router", marker_color=palette.BALANCING["none"],
                hovertemplate="expert %{x}: %{y:,} token slots (fresh)<extra></extra>")
    if has_bias:
        fig.add_bar(x=list(range(n)), y=after, name="after bias updates", marker_color=palette.BALANCING["aux_free"],
                    hovertemplate="expert %{x}: %{y:,} token slots (after)<extra></extra>")
    _hline(fig, mean, f"balanced c̄ = {mean:,.0f}", log=True, color=palette.BALANCED_LINE)
    _hline(fig, mb["capacity"], f"capacity at CF {capacity_factor:g} = {mb['capacity']:,}", log=True,
           color=palette.HIGHLIGHT, dash="dot", side="right")
    if has_bias:
        title = (f"At capacity factor {capacity_factor:g} a capacity-limited router would drop "
                 f"{mb['dropped_fraction']:.0%} of token slots, {ma['dropped_fraction']:.0%} after balancing")
    else:
        title = (f"At capacity factor {capacity_factor:g} a capacity-limited router would drop "
                 f"{mb['dropped_fraction']:.0%} of token slots")
    sub = "DeepSeek-V3 drops nothing (no capacity limit); Switch/GShard-style routers and V2 would"
    fig.update_layout(barmode="overlay" if has_bias else "group")
    fig.update_traces(opacity=0.8)
    fig.update_xaxes(**_expert_ticks(n))
    fig.update_yaxes(type="log", tickvals=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000])
    return _layout(fig, title, sub, "Routed expert", "Token slots routed to the expert (log scale)", height=380,
                   width_chars=85)


def token_expert_map(tt: pd.DataFrame, top_k: int, topk_group: int, n_group: int, group_limited: bool,
                     route_scale: float = 1.0) -> go.Figure:
    """Gate weights of the experts each token chose; blank cells = experts of groups the token may not use."""
    z = tt.pivot(index="row", columns="expert", values="gate_weight")
    allowed = tt.pivot(index="row", columns="expert", values="group_allowed")
    zz = z.where(allowed.astype(bool))
    labels = tt.drop_duplicates("row").sort_values("row")
    ylab = [f"{r.position}: {r.token!r} ({r.domain})" for r in labels.itertuples()]
    fig = go.Figure(go.Heatmap(
        z=zz.values, x=list(z.columns), y=ylab, colorscale=palette.HEATMAP, zmin=0,
        colorbar=dict(title="gate g", thickness=12),
        hovertemplate="%{y} → expert %{x}: gate %{z:.3f}<extra></extra>"))
    n = z.shape[1]
    per = n // max(n_group, 1)
    if group_limited:
        for g in range(1, n_group):
            fig.add_vline(x=g * per - 0.5, line_color=palette.OKABE_ITO["grey"], line_width=1)
        title = (f"Every token picks {top_k} experts, all inside its {topk_group} best of {n_group} groups "
                 "(blank = masked groups)")
        sub = (f"group score = sum of the group's top-2 biased scores (V3 node-limited routing); colour = gate value "
               f"(unbiased score, normalized, × route scale {route_scale:g})")
    else:
        title = f"Every token picks {top_k} experts (no group limit in this config)"
        sub = f"bright cells are the chosen experts' gate values (× route scale {route_scale:g})"
    fig.update_yaxes(autorange="reversed", tickfont=dict(size=10), dtick=1)
    fig.update_xaxes(**_expert_ticks(n))
    return _layout(fig, title, sub, "Routed expert", None, height=620, legend=False, width_chars=85)


def group_usage(usage: list[float], topk_group: int) -> go.Figure:
    g = len(usage)
    fig = go.Figure(go.Bar(x=[f"group {i}" for i in range(g)], y=usage, marker_color=palette.BALANCING["aux_free"],
                           hovertemplate="%{x}: used by %{y:.0%} of the tokens<extra></extra>"))
    _hline(fig, topk_group / g, f"balanced {topk_group}/{g}", color=palette.BALANCED_LINE)
    title = f"Group use ranges from {min(usage):.0%} to {max(usage):.0%} of the tokens"
    fig.update_yaxes(tickformat=".0%")
    return _layout(fig, title, "each token may use its top groups only (routed to at most that many nodes)",
                   None, "Share of tokens", height=300, legend=False, width_chars=85)


def maxvio_over_steps(df: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    tail = {}
    for s in ("none", "aux_loss", "aux_free", "both"):
        d = df[df["strategy"] == s]
        tail[s] = d["max_vio"].iloc[-max(1, len(d) // 10):].mean()
        fig.add_scatter(x=d["step"], y=d["max_vio"], name=d["label"].iloc[0], mode="lines",
                        line=dict(color=palette.BALANCING[s], width=3 if s == "aux_free" else 2,
                                  dash="dot" if s == "both" else "solid"),
                        hovertemplate=d["label"].iloc[0] + ": step %{x}: MaxVio %{y:.2f}<extra></extra>")
    title = (f"The aux-loss-free bias brings MaxVio from {df[df['strategy'] == 'none']['max_vio'].iloc[0]:.1f} "
             f"to {tail['aux_free']:.2f}; the aux loss alone reaches {tail['aux_loss']:.2f}")
    sub = ("MaxVio_batch = max load / mean load − 1 per batch of 256 tokens (last 10% averaged in the title; small "
           "batches keep a noise floor). Paper (LFB Table 2, 1B model): aux loss 0.72 vs loss-free 0.04 MaxVio_global")
    fig.update_yaxes(type="log", tickvals=[0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200])
    return _layout(fig, title, sub, "Step (batch)", "MaxVio (log scale)", height=420, width_chars=85)


def steps_heatmap(m: np.ndarray, title: str, sub: str, zlabel: str, colorscale: str, center: bool = False) -> go.Figure:
    zmax = float(np.nanquantile(np.abs(m), 0.995)) or 1.0
    fig = go.Figure(go.Heatmap(
        z=m, colorscale=colorscale, zmin=-zmax if center else 0, zmax=zmax,
        colorbar=dict(title=zlabel, thickness=12),
        hovertemplate="step %{y}, expert %{x}: %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(**_expert_ticks(m.shape[1]))
    return _layout(fig, title, sub, "Routed expert", "Step (batch)", height=420, legend=False, width_chars=85)


def load_over_steps(rel: np.ndarray, label: str) -> go.Figure:
    """Relative load (1 = fair share) of every expert at every step of one strategy."""
    first, last = rel[0].max(), rel[-max(1, len(rel) // 10):].max(axis=1).mean()
    title = f"{label}: the busiest expert goes from {first:.1f}× to {last:.1f}× its fair share"
    sub = "each row is one batch; bright columns are overloaded experts"
    return steps_heatmap(rel, title, sub, "× fair share", palette.HEATMAP)


def bias_over_steps(biases: np.ndarray, label: str) -> go.Figure:
    """Bias b_i used to route each step (the aux-loss-free controller's state)."""
    spread = biases[-1].max() - biases[-1].min()
    if np.allclose(biases, 0):
        title = f"{label}: the bias stays 0 (no controller)"
    else:
        title = f"{label}: biases spread over {spread:.2f} — down for busy experts, up for idle ones"
    sub = "b_i ← b_i + γ·sign(c̄ − c_i) after every batch; it changes which experts are picked, never the gate value"
    return steps_heatmap(biases, title, sub, "bias b", palette.HEATMAP_ALT, center=True)
