"""MoE routing charts: domain × expert loads, expert loads against capacity, token × expert gates, group use;
and the step charts the MoE page and the training lab share (expert load and router bias over steps, MaxVio
curves)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from app import palette
from app.charts.layout import expert_ticks, hline, layout


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
    fig.update_xaxes(**expert_ticks(n))
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
    return layout(fig, title, sub, None, None, height=120 + 150 * len(rows), legend=False, width_chars=85)


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
    hline(fig, mean, f"balanced c̄ = {mean:,.0f}", log=True, color=palette.BALANCED_LINE)
    hline(fig, mb["capacity"], f"capacity at CF {capacity_factor:g} = {mb['capacity']:,}", log=True,
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
    fig.update_xaxes(**expert_ticks(n))
    fig.update_yaxes(type="log", tickvals=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000])
    return layout(fig, title, sub, "Routed expert", "Token slots routed to the expert (log scale)", height=380,
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
    fig.update_xaxes(**expert_ticks(n))
    return layout(fig, title, sub, "Routed expert", None, height=620, legend=False, width_chars=85)


def group_usage(usage: list[float], topk_group: int) -> go.Figure:
    g = len(usage)
    fig = go.Figure(go.Bar(x=[f"group {i}" for i in range(g)], y=usage, marker_color=palette.BALANCING["aux_free"],
                           hovertemplate="%{x}: used by %{y:.0%} of the tokens<extra></extra>"))
    hline(fig, topk_group / g, f"balanced {topk_group}/{g}", color=palette.BALANCED_LINE)
    title = f"Group use ranges from {min(usage):.0%} to {max(usage):.0%} of the tokens"
    fig.update_yaxes(tickformat=".0%")
    return layout(fig, title, "each token may use its top groups only (routed to at most that many nodes)",
                   None, "Share of tokens", height=300, legend=False, width_chars=85)


# ---------------------------------------------------------------------- over steps (MoE page and training lab)
def maxvio_lines(lines: list[dict], title: str, sub: str, *, total_steps: int | None = None, log: bool = False,
                 height: int = 360, width_chars: int = 85) -> go.Figure:
    """MaxVio per step, one line per entry of `lines` (dicts: name, x, y, color; optional width, dash, opacity):
    the MoE page's four strategies, the lab's MoE layers and mean, the lab's runs side by side.

    `total_steps` fixes the x axis at 0..total_steps (a live run grows left to right); `log` puts MaxVio on a log
    axis (the strategies span 0.01..100), otherwise the axis starts at 0 (= perfectly balanced)."""
    fig = go.Figure()
    for ln in lines:
        fig.add_scatter(x=ln["x"], y=ln["y"], name=ln["name"], mode="lines", opacity=ln.get("opacity"),
                        line=dict(color=ln["color"], width=ln.get("width", 2), dash=ln.get("dash", "solid")),
                        hovertemplate=ln["name"] + ": step %{x}: MaxVio %{y:.2f}<extra></extra>")
    if total_steps is not None:
        fig.update_xaxes(range=[0, max(total_steps, 1) * 1.02])
    if log:
        fig.update_yaxes(type="log", tickvals=[0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200])
    else:
        fig.update_yaxes(rangemode="tozero")
    return layout(fig, title, sub, "Step (batch)", "MaxVio (log scale)" if log else "MaxVio", height=height,
                  width_chars=width_chars)


def maxvio_over_steps(df: pd.DataFrame) -> go.Figure:
    """MaxVio per batch of the bias-controller simulation, one line per balancing strategy."""
    lines, tail = [], {}
    for s in ("none", "aux_loss", "aux_free", "both"):
        d = df[df["strategy"] == s]
        tail[s] = d["max_vio"].iloc[-max(1, len(d) // 10):].mean()
        lines.append(dict(name=d["label"].iloc[0], x=d["step"], y=d["max_vio"], color=palette.BALANCING[s],
                          width=3 if s == "aux_free" else 2, dash="dot" if s == "both" else "solid"))
    title = (f"The aux-loss-free bias brings MaxVio from {df[df['strategy'] == 'none']['max_vio'].iloc[0]:.1f} "
             f"to {tail['aux_free']:.2f}; the aux loss alone reaches {tail['aux_loss']:.2f}")
    sub = ("MaxVio_batch = max load / mean load − 1 per batch of 256 tokens (last 10% averaged in the title; small "
           "batches keep a noise floor). Paper (LFB Table 2, 1B model): aux loss 0.72 vs loss-free 0.04 MaxVio_global")
    return maxvio_lines(lines, title, sub, log=True, height=420)


def step_heatmap(z: np.ndarray, steps, title: str, sub: str, zlabel: str, colorscale: str, value_hover: str, *,
                 center: bool = False, total_steps: int | None = None, height: int = 360,
                 width_chars: int = 46) -> go.Figure:
    """A [steps, experts] matrix as a heatmap, steps left to right (like the MaxVio curve), experts upwards.

    Colours: ±(99.5th percentile of |z|) when `center` (signed values: router biases), else 0 to
    max(2, 99.5th percentile) so that a fair share (1) never sits at the top of the scale. `steps` labels the
    rows of `z` (None: 0, 1, …); `total_steps` fixes the x axis at steps 1..total_steps (a live run fills it in);
    `value_hover` is the hover text of a cell's value (plotly template, e.g. "%{z:.2f}× fair share")."""
    z = np.asarray(z, dtype=float)
    zt = z.T if z.size else np.zeros((1, 1))
    if center:
        zmax = float(np.nanquantile(np.abs(zt), 0.995)) or 1.0
        zmin = -zmax
    else:
        zmin, zmax = 0.0, max(2.0, float(np.nanquantile(zt, 0.995)))
    x = (list(range(len(z))) if steps is None else list(steps)) if z.size else [0]
    fig = go.Figure(go.Heatmap(z=zt, x=x, y=list(range(zt.shape[0])), colorscale=colorscale, zmin=zmin, zmax=zmax,
                               colorbar=dict(title=zlabel, thickness=12),
                               hovertemplate="step %{x}, expert %{y}: " + value_hover + "<extra></extra>"))
    if total_steps is not None:
        fig.update_xaxes(range=[0.5, max(total_steps, 1) + 0.5])
    fig.update_yaxes(**expert_ticks(zt.shape[0]))
    return layout(fig, title, sub, "Step (batch)", "Routed expert", height=height, legend=False,
                  width_chars=width_chars)


def _joined(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def expert_load_heatmap(rel: np.ndarray, steps=None, total_steps: int | None = None, note: str = "", *,
                        label: str = "", height: int = 360, width_chars: int = 46) -> go.Figure:
    """Load of every expert at every step as a multiple of its fair share (1 = balanced): a simulated strategy on
    the MoE page (`label` names it) or a lab run (`note` says which layer); sized for half a page by default."""
    rel = np.asarray(rel, dtype=float)
    if rel.size:
        tail = rel[-max(1, len(rel) // 10):]
        first, last = float(rel[0].max()), float(tail.max(1).mean())
        dead = int((tail.mean(0) < 0.05).sum())
        title = (f"{label}: the" if label else "The") + (f" busiest expert goes from {first:.1f}× to {last:.1f}× "
                                                         "its fair share")
        sub = _joined(note, "each column is one batch, bright rows are overloaded experts",
                      f"{dead} expert(s) idle lately" if dead else "")
    else:
        title, sub = "Waiting for the first step: expert loads draw here", note
    return step_heatmap(rel, steps, title, sub, "× fair share", palette.HEATMAP, "%{z:.2f}× fair share",
                        total_steps=total_steps, height=height, width_chars=width_chars)


def bias_heatmap(bias: np.ndarray, steps=None, total_steps: int | None = None, note: str = "", *, label: str = "",
                 height: int = 360, width_chars: int = 46) -> go.Figure:
    """Router bias b_i of every expert at every step (the aux-loss-free controller's state, V3 report eq. 16's
    b_i): a simulated strategy on the MoE page (`label`) or a lab run (`note`)."""
    bias = np.asarray(bias, dtype=float)
    head = f"{label}: the" if label else "The"
    rule = ("b_i ← b_i + γ·sign(c̄ − c_i) after every batch; it changes which experts are picked, "
            "never the gate value")
    if bias.size and np.abs(bias).max() > 0:
        spread = float(bias[-1].max() - bias[-1].min())
        title = f"{head} biases spread over {spread:.3g}: down for busy experts, up for idle ones"
        sub = _joined(note, rule)
    elif bias.size:
        title, sub = f"{head} biases stay 0: no aux-loss-free controller", note
    else:
        title, sub = "Waiting for the first step: router biases draw here", note
    return step_heatmap(bias, steps, title, sub, "bias b", palette.HEATMAP_ALT, "bias %{z:+.4f}", center=True,
                        total_steps=total_steps, height=height, width_chars=width_chars)
