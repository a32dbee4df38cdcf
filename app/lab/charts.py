"""Pure chart builders for the training lab (and the masterclass notebook): step records or the tables of
app/lab/records.py in, plotly Figure out. No Streamlit, no torch; the builders follow `app.charts` conventions (title
says what to notice, subtitle gives the numbers, axes carry units, colours from `app.palette`).
"""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from app import palette
from app.charts.layout import LEGEND_ROW_PX, NARROW_PX, SUB_PX_PER_CHAR, TITLE_PX_PER_CHAR, hline, layout, wrap
from app.charts.moe import bias_heatmap, expert_load_heatmap, maxvio_lines  # noqa: F401 (the MoE page's builders)
from app.charts.overview import component_bars
from app.lab.records import UNIFORM_LOSS, ema, final_losses, maxvio_smooth, records_frame

# ====================================================================== previews
def lab_params(params: pd.DataFrame, counts: dict) -> go.Figure:
    """The lab model's parameters (millions): all of them vs the ones a token activates, by component."""
    total, act = counts["total"], counts["activated"]
    fig = component_bars(params, counts, ["activated", "total"], 1e6, lambda v: f"{v / 1e6:.2f}M")
    if counts.get("moe_layers"):
        title = f"A token runs through {100 * act / max(total, 1):.0f}% of the {total / 1e6:.1f}M weights"
        sub = "routed experts (purple) hold most weights; each token uses only its top-k of them"
    else:
        title, sub = f"Dense: every one of the {total / 1e6:.1f}M weights runs for every token", None
    fig.update_xaxes(ticksuffix="M")  # millions of parameters (no axis title: the legend sits right below)
    return layout(fig, title, sub, None, None, height=330, width_chars=46)


def lr_schedule(df: pd.DataFrame, warmup: int) -> go.Figure:
    """The learning rate of every step: linear warm-up, then cosine decay."""
    fig = go.Figure(go.Scatter(x=df["step"], y=df["lr"], mode="lines", name="learning rate",
                               line=dict(color=palette.LOSS["train"], width=3),
                               hovertemplate="step %{x}: lr %{y:.2e}<extra></extra>"))
    peak = float(df["lr"].max()) if len(df) else 0.0
    fig.add_vline(x=warmup, line_dash="dot", line_color=palette.OKABE_ITO["grey"])
    title = f"Warm up for {warmup} steps to {peak:.0e}, then decay along a cosine to 0"
    sub = f"{len(df)} optimizer steps (AdamW, gradient clipping at 1.0); the dotted line ends the warm-up"
    return layout(fig, title, sub, "Step", "Learning rate", height=300, legend=False, width_chars=46)


# ====================================================================== live charts
# The loss curve is a Vega-Lite chart (altair), the lab's other charts plotly: it is the chart a share link must show
# first, and a page's first plotly chart costs a fresh browser the 4.7 MB plotly bundle plus its parse before anything
# draws (~2 s after the page text on two cores, against ~0.5 s for a Vega-Lite chart; docs/performance.md).
TRAIN_SERIES = "train loss (each batch)"  # the raw per-step curve: one point per recorded step
AVG_SERIES, MTP_SERIES, VAL_SERIES = "train loss (moving average)", "MTP loss (λ-weighted, avg)", "validation loss"
LOSS_SERIES = {  # series name -> (colour, line width, opacity, dash); the order is the legend's
    TRAIN_SERIES: (palette.LOSS["train"], 1, 0.35, [1, 0]),
    AVG_SERIES: (palette.LOSS["train"], 3, 1.0, [1, 0]),
    MTP_SERIES: (palette.LOSS["mtp"], 2, 1.0, [2, 3]),
    VAL_SERIES: (palette.LOSS["val"], 2, 1.0, [1, 0]),
}


def loss_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The loss curve's data in long form: one row per (step, series) with `loss`; the series of LOSS_SERIES."""
    if not len(df):
        return pd.DataFrame({"step": pd.Series(dtype=int), "series": pd.Series(dtype=str),
                             "loss": pd.Series(dtype=float)})
    lm = df["lm_loss"].where(df["lm_loss"].notna(), df["loss"])
    parts = [pd.DataFrame({"step": df["step"], "series": TRAIN_SERIES, "loss": lm}),
             pd.DataFrame({"step": df["step"], "series": AVG_SERIES, "loss": ema(lm.tolist())})]
    if "mtp_loss" in df and df["mtp_loss"].notna().any():
        parts.append(pd.DataFrame({"step": df["step"], "series": MTP_SERIES, "loss": ema(df["mtp_loss"].tolist())}))
    v = df[df["val_loss"].notna()] if "val_loss" in df else df.iloc[:0]
    if len(v):
        parts.append(pd.DataFrame({"step": v["step"], "series": VAL_SERIES, "loss": v["val_loss"]}))
    out = pd.concat(parts, ignore_index=True)
    return out[out["loss"].notna()].astype({"step": int, "loss": float})


def loss_curve(df: pd.DataFrame, total_steps: int, label: str = "") -> alt.LayerChart:
    """Training (LM) loss per step, its moving average, validation loss and the MTP loss, on a fixed x range so
    the curve grows left to right while the run is going. A Vega-Lite chart (see LOSS_SERIES above)."""
    long = loss_frame(df)
    lm = long[long["series"] == TRAIN_SERIES]["loss"]
    if len(lm):
        first = float(lm.iloc[0])
        now = float(long[long["series"] == AVG_SERIES]["loss"].iloc[-1])
        step = int(df["step"].iloc[-1])
        val = long[long["series"] == VAL_SERIES]
        title = (f"{label + ': ' if label else ''}The loss falls from {first:.2f} to {now:.2f} in "
                 f"{step} of {total_steps} steps")
        sub = ("train = next-byte cross-entropy of each batch (moving average bold); "
               + (f"validation {val['loss'].iloc[-1]:.3f} at step {int(val['step'].iloc[-1])}" if len(val)
                  else "validation every few steps on held-out text"))
    else:
        title, sub = "Waiting for the first step: the loss curve draws here", "nats per byte; lower is better"
    ymax = max(UNIFORM_LOSS + 0.3, float(lm.max()) * 1.03 if len(lm) else 0)
    names = [n for n in LOSS_SERIES if n in set(long["series"])] or [TRAIN_SERIES, AVG_SERIES]
    colour, width, opacity, dash = zip(*(LOSS_SERIES[n] for n in names))
    legend = alt.Legend(orient="bottom", direction="horizontal", columns=2, title=None, labelLimit=220,
                        symbolType="stroke", labelFontSize=12)
    series = dict(field="series", type="nominal", sort=names)
    base = alt.Chart(long).encode(
        x=alt.X("step:Q", title="Step", scale=alt.Scale(domain=[0, max(total_steps, 1) * 1.02], nice=False)),
        y=alt.Y("loss:Q", title="Loss (nats per byte)", scale=alt.Scale(domain=[0, ymax], nice=False)),
        color=alt.Color(**series, scale=alt.Scale(domain=names, range=list(colour)), legend=legend),
        tooltip=[alt.Tooltip("series:N", title="curve"), alt.Tooltip("step:Q", title="step"),
                 alt.Tooltip("loss:Q", title="loss", format=".3f")])
    # ordinal scales: each series gets its own width and opacity (a nominal field would interpolate between them)
    lines = base.mark_line(clip=True).encode(
        strokeWidth=alt.StrokeWidth(**series, scale=alt.Scale(type="ordinal", domain=names, range=list(width)),
                                    legend=legend),
        opacity=alt.Opacity(**series, scale=alt.Scale(type="ordinal", domain=names, range=list(opacity)),
                            legend=legend),
        strokeDash=alt.StrokeDash(**series, scale=alt.Scale(domain=names, range=list(dash)), legend=legend))
    # hover targets: every point of every curve (a line answers the pointer only on its stroke); the validation
    # points are drawn, as markers on its line
    hover = base.mark_point(filled=True, size=60, clip=True).encode(
        opacity=alt.condition(alt.datum.series == VAL_SERIES, alt.value(1.0), alt.value(0.0)))
    guess = pd.DataFrame({"loss": [UNIFORM_LOSS], "text": [f"uniform guess ln 256 = {UNIFORM_LOSS:.2f}"]})
    grey = palette.OKABE_ITO["grey"]
    rule = alt.Chart(guess).mark_rule(color=grey, strokeDash=[6, 4]).encode(y="loss:Q")
    note = alt.Chart(guess).mark_text(align="left", baseline="bottom", dx=4, dy=-2, color=grey, fontSize=11).encode(
        y="loss:Q", x=alt.value(0), text="text:N")
    # titles wrapped and the height counted as app/charts/layout.py does for the plotly charts beside it: the same
    # 340 px of plot, and the whole chart (title, axes, legend) as tall as theirs
    t = wrap(title, int(NARROW_PX / TITLE_PX_PER_CHAR)).split("<br>")
    s = wrap(sub, int(NARROW_PX / SUB_PX_PER_CHAR)).split("<br>")
    rows = (len(names) + 1) // 2
    height = 340 + (24 + 21 * len(t) + 16 * len(s) + 12) + (10 + 52 + LEGEND_ROW_PX * rows)
    return alt.layer(rule, note, lines, hover).properties(
        height=height, autosize=alt.AutoSizeParams(type="fit", contains="padding"),
        title=alt.TitleParams(t, subtitle=s, anchor="start", fontSize=16, subtitleFontSize=12, subtitlePadding=6,
                              subtitleColor=palette.OKABE_ITO["grey"], offset=12))


def maxvio_curve(df: pd.DataFrame, total_steps: int) -> go.Figure:
    """MaxVio (busiest expert's load over the mean, minus 1) per step: mean over MoE layers and each layer."""
    cols = sorted([c for c in df.columns if c.startswith("max_vio_moe")], key=lambda c: int(c[11:]))
    lines = [dict(name=f"MoE layer {i + 1}", x=df["step"], y=df[c], width=1, opacity=0.5,
                  color=palette.RUNS[(i + 2) % len(palette.RUNS)]) for i, c in enumerate(cols)]
    if len(df) and df["max_vio"].notna().any():
        smooth = maxvio_smooth(df["max_vio"].tolist())
        lines.append(dict(name="mean (moving avg)", x=df["step"], y=smooth, width=3, color=palette.OKABE_ITO["black"]))
        first, last = float(df["max_vio"].iloc[0]), float(smooth[-1])
        title = f"MaxVio goes from {first:.2f} to {last:.2f}: " + (
            "the load evens out" if last < first * 0.7 else "the load stays uneven" if last > first * 0.9
            else "the load evens out a little")
        sub = "MaxVio = max_i load_i / mean load − 1 per batch (0 = perfectly balanced)"
    elif len(df):
        title, sub = "No routed experts: nothing to balance", "this run uses a dense FFN"
    else:
        title, sub = "Waiting for the first step: MaxVio draws here", "0 = every expert gets the same load"
    return maxvio_lines(lines, title, sub, total_steps=total_steps, width_chars=46)


# ====================================================================== after the run
def overlay_runs(runs: list[tuple[str, list[dict]]], metric: str = "val") -> go.Figure:
    """Loss curves of several runs on one chart (smoothed train loss, validation markers) and the final-loss
    delta of the last run against the first in the title."""
    fig = go.Figure()
    finals = []
    max_step = 1
    for i, (label, recs) in enumerate(runs):
        color = palette.RUNS[i % len(palette.RUNS)]
        df = records_frame(recs)
        if not len(df):
            continue
        max_step = max(max_step, int(df["step"].max()))
        lm = df["lm_loss"].where(df["lm_loss"].notna(), df["loss"])
        fig.add_scatter(x=df["step"], y=ema(lm.tolist()), mode="lines", name=f"{label} · train (avg)",
                        line=dict(color=color, width=2.5), legendgroup=label,
                        hovertemplate=f"{label}: " + "step %{x}, train %{y:.3f}<extra></extra>")
        v = df[df["val_loss"].notna()]
        if len(v):
            fig.add_scatter(x=v["step"], y=v["val_loss"], mode="lines+markers", name=f"{label} · validation",
                            line=dict(color=color, width=1.5, dash="dot"), marker=dict(size=7, symbol="diamond"),
                            legendgroup=label, hovertemplate=f"{label}: " + "step %{x}, val %{y:.3f}<extra></extra>")
        finals.append((label, final_losses(recs)))
    if len(finals) >= 2:
        (la, fa), (lb, fb) = finals[0], finals[-1]
        key = "val" if metric == "val" and fa["val"] is not None and fb["val"] is not None else "train"
        d = fb[key] - fa[key]
        word = "below" if d < 0 else "above"
        title = f"{lb} ends {abs(d):.3f} nats/byte {word} {la} ({'validation' if key == 'val' else 'train'} loss)"
        sub = "; ".join(f"{lbl}: train {f['train']:.3f}" + (f", val {f['val']:.3f}" if f["val"] is not None else "")
                        for lbl, f in finals)
    elif finals:
        f = finals[0][1]
        title = f"{finals[0][0]} ends at {f['train']:.3f} train" + (f", {f['val']:.3f} validation" if f["val"] else "")
        sub = "pick two or more runs to compare them"
    else:
        title, sub = "No finished runs yet", "run the lab, change one knob, run again — then compare here"
    hline(fig, UNIFORM_LOSS, "uniform guess", color=palette.OKABE_ITO["grey"])
    fig.update_xaxes(range=[0, max_step * 1.02])
    fig.update_yaxes(rangemode="tozero")
    return layout(fig, title, sub, "Step", "Loss (nats per byte)", height=440, width_chars=85)



def overlay_maxvio(runs: list[tuple[str, list[dict]]]) -> go.Figure | None:
    """MaxVio (mean over MoE layers, moving average) of several runs on one chart, in the colours of
    `overlay_runs`; None when no run has routed experts. The title compares the last run with the first."""
    fig = go.Figure()
    finals = []
    max_step = 1
    for i, (label, recs) in enumerate(runs):
        df = records_frame(recs)
        if not len(df) or not df["max_vio"].notna().any():
            continue  # a dense run: no router (its colour stays its own, as in the loss overlay)
        mv = df[df["max_vio"].notna()]
        max_step = max(max_step, int(mv["step"].max()))
        smooth = maxvio_smooth(mv["max_vio"].tolist())
        fig.add_scatter(x=mv["step"], y=smooth, mode="lines", name=label, legendgroup=label,
                        line=dict(color=palette.RUNS[i % len(palette.RUNS)], width=2.5),
                        hovertemplate=f"{label}: " + "step %{x}, MaxVio %{y:.2f}<extra></extra>")
        finals.append((label, float(smooth[-1])))
    if not finals:
        return None
    if len(finals) >= 2:
        (la, a), (lb, b) = finals[0], finals[-1]
        title = (f"{lb} ends at MaxVio {b:.2f}, {la} at {a:.2f}: "
                 + ("about as balanced" if abs(b - a) < 0.1 * max(a, b, 1e-9) else
                    "more balanced" if b < a else "less balanced"))
    else:
        title = f"{finals[0][0]} ends at MaxVio {finals[0][1]:.2f}"
    sub = ("moving average of MaxVio = max_i load_i / mean load − 1 per batch, mean over the MoE layers "
           "(0 = perfectly balanced)")
    fig.update_xaxes(range=[0, max_step * 1.02])
    fig.update_yaxes(rangemode="tozero")
    return layout(fig, title, sub, "Step", "MaxVio", height=360, width_chars=85)


def domain_expert_heatmap(relative: np.ndarray, domains: list[str], layer_label: str) -> go.Figure:
    """Where each token domain's routing slots go: [domains, experts] as a multiple of the fair share."""
    rel = np.asarray(relative, dtype=float)
    fig = go.Figure(go.Heatmap(z=rel, x=list(range(rel.shape[1])), y=list(domains), colorscale=palette.HEATMAP,
                               zmin=0, zmax=max(2.0, float(np.nanquantile(rel, 0.99))),
                               colorbar=dict(title="× fair share", thickness=12),
                               hovertemplate="%{y} → expert %{x}: %{z:.2f}× fair share<extra></extra>"))
    top = {d: int(np.argmax(rel[i])) for i, d in enumerate(domains)}
    distinct = len(set(top.values()))
    corr = np.corrcoef(rel) if len(rel) > 1 else np.ones((1, 1))
    r = float(np.nanmean(corr[np.triu_indices(len(rel), 1)])) if len(rel) > 1 else float("nan")
    title = (f"Experts specialise: the {len(domains)} domains' favourite experts are {distinct} different ones"
             if distinct > 1 else "All domains still crowd onto the same expert")
    sub = (f"{layer_label}; rows = token domain of the synthetic data, bright = more than a fair share; "
           f"mean correlation between domain rows r = {r:.2f} (1 = same experts for all)")
    fig.update_xaxes(tickmode="array", tickvals=list(range(0, rel.shape[1], max(1, rel.shape[1] // 16))))
    return layout(fig, title, sub, "Routed expert", None, height=330, legend=False, width_chars=85)
