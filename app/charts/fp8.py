"""FP8 lab charts: value histogram over the format's grid, bit layout, granularity sweep, current vs delayed
scaling, GEMM error with and without promotion."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from app import palette
from app.charts.layout import layout, sci, vline
from core.published import FP8_ACCUM_ERROR, FP8_ACCUM_ERROR_K, H800_FP8_ACCUM_BITS


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
        vline(fig, x, label, log=True, side=side)
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
    return layout(fig, title, sub, "|x / s| — magnitude after scaling (log scale)", "Values (count)", height=420,
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
    return layout(fig, title, sub, None, None, height=170 + 60, legend=False, width_chars=85)


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
    return layout(fig, title, sub, "Outlier channel magnitude (× the other values, log scale)",
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
    layout(fig, title, sub, None, None, height=460, width_chars=85)
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
    return layout(fig, title, sub, "Inner dimension K (log scale)", "Max relative error of C = AB (log)",
                   height=420, width_chars=85)


def tensor_sqnr(df: pd.DataFrame, recipe: str) -> go.Figure:
    """Horizontal bars: SQNR of each quantized tensor of one layer under a recipe (exact quantizations drawn at the
    axis end and labelled 'exact')."""
    finite = df["sqnr_db"].replace([np.inf, -np.inf], np.nan)
    top = float(np.nanmax(finite)) + 10 if finite.notna().any() else 60.0
    shown = df["sqnr_db"].where(np.isfinite(df["sqnr_db"]), top)
    labels = [f"{w} · {g} · {t}" for w, g, t in zip(df["where"], df["gemm"], df["tensor"])]
    text = [("exact" if not np.isfinite(v) else f"{v:.1f} dB") + f" · {f}" + (" · 2^k" if p else "")
            for v, f, p in zip(df["sqnr_db"], df["format"], df["pow2_scale"])]
    colors = [palette.FORMATS.get(f.lower(), palette.OKABE_ITO["grey"]) for f in df["format"]]
    fig = go.Figure(go.Bar(x=shown, y=labels, orientation="h", marker_color=colors, text=text, textposition="auto",
                           hovertemplate="%{y}: %{text}<extra></extra>"))
    worst = df.loc[finite.idxmin()] if finite.notna().any() else None
    title = (f"{recipe}: the least precise tensor is {worst['where']} {worst['gemm']} {worst['tensor']} "
             f"({worst['sqnr_db']:.1f} dB)") if worst is not None else f"{recipe}: every quantization exact"
    layout(fig, title, "Each GEMM operand as the recipe quantizes it; Wgrad's re-tiled copies are measured against the "
           "FP8 tensor they are re-quantized from (their extra error)", "SQNR (dB, higher = more precise)", None,
           height=max(360, 26 * len(df)), legend=False)
    fig.update_yaxes(autorange="reversed")
    return fig
