"""Overview dashboard charts: parameters by component (total vs activated), memory, FLOPs vs context, expert-parallel
cross-node traffic vs the node limit."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from app import palette
from app.charts.layout import layout, percent
from core.units import byte_unit, tokens
from core.units import human_bytes, human_count


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
            customdata=[[value_text(v), percent(v, max(d, 1))] for v, d in zip(vals, (act, total))],
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
    title = (f"Only {percent(act, max(total, 1)):.1f}% of the weights run per token"
             if counts.get("moe_layers") else "A dense model: every weight runs for every token")
    sub = (f"{human_count(total)} total vs {human_count(act)} activated; routed experts hold {100 * share:.0f}% "
           f"of all weights, but each token uses only its top-k of them") if counts.get("moe_layers") else \
        f"{human_count(total)} parameters"
    return layout(fig, title, sub, "Parameters (billions)", None, height=330)


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
    title = f"FP8 weights need {percent(fp8, bf16):.0f}% of BF16's memory"
    sub = (f"the KV cache of one long sequence is {percent(kv, mha):.1f}% of what MHA would need"
           if mha and kv != mha else "KV cache shown for one sequence")
    fig.update_yaxes(autorange="reversed")
    return layout(fig, title, sub, f"Memory ({unit})", None, height=330, legend=False, width_chars=85)


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
    return layout(fig, title, sub, "Context length (tokens, log scale)", "Forward FLOPs per token (GFLOP, log)",
                   width_chars=85)


def a2a_vs_node_limit(by_limit: pd.DataFrame, node_limit: int | None, nodes: int) -> go.Figure:
    """Cross-node all-to-all bytes per token per MoE layer (dispatch + combine, forward) against the node limit M:
    one copy per remote node as V3 dispatches (expected under uniform routing), its bound min(K, M) copies, and
    a plain per-slot exchange (one copy per expert on another node, independent of M)."""
    lim = by_limit[by_limit["limited"]]
    unit, div = byte_unit(float(by_limit[["inter_node_max", "inter_node_per_slot"]].to_numpy().max()))
    fig = go.Figure()
    series = (("inter_node_per_slot", "Per slot: one copy per expert on another node", palette.OKABE_ITO["grey"],
               "dot"),
              ("inter_node_max", "Bound: one copy to each of min(K, M) nodes", palette.OKABE_ITO["vermillion"], "dash"),
              ("inter_node_dedup", "One copy per remote node (V3), expected", palette.OKABE_ITO["blue"], "solid"))
    for col, name, color, dash in series:
        fig.add_scatter(x=lim["node_limit"], y=lim[col] / div, name=name, mode="lines+markers",
                        line=dict(color=color, dash=dash, width=3 if dash == "solid" else 2),
                        hovertemplate="M = %{x} nodes: %{y:,.2f} " + unit + "<extra></extra>")
    free = by_limit[~by_limit["limited"]].iloc[0]
    if nodes <= 1:  # one node: nothing crosses a node boundary, whatever M is
        title = "On one node no token crosses a node boundary: node-limited routing has nothing to cut"
        sub = "all expert-parallel traffic stays inside the node (NVLink); add nodes to see the limit's effect"
    elif node_limit is not None and node_limit in set(lim["node_limit"]):
        row = lim[lim["node_limit"] == node_limit].iloc[0]
        fig.add_vline(x=node_limit, line_dash="dot", line_color=palette.OKABE_ITO["grey"])
        title = (f"Limiting each token to {node_limit} of {nodes} nodes cuts its cross-node traffic to "
                 f"{percent(row['inter_node_dedup'], free['inter_node_dedup']):.0f}% of unlimited routing")
        sub = (f"{human_bytes(row['inter_node_dedup'])} vs {human_bytes(free['inter_node_dedup'])} per token per MoE "
               f"layer (expected, {row['remote_nodes']:.2f} vs {free['remote_nodes']:.2f} remote nodes); a per-slot "
               f"exchange would send {human_bytes(free['inter_node_per_slot'])}")
    else:
        title = f"Without a node limit a token reaches {free['remote_nodes']:.2f} remote nodes on average"
        sub = (f"{human_bytes(free['inter_node_dedup'])} per token per MoE layer with one copy per node; "
               f"{human_bytes(free['inter_node_per_slot'])} with one copy per slot")
    fig.update_xaxes(dtick=1)
    return layout(fig, title, sub, "Node limit M (nodes a token may use)",
                  f"Cross-node bytes per token per MoE layer ({unit})", width_chars=85)
