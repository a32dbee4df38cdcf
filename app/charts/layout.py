"""Shared chart layout: title and subtitle that wrap, axis titles, legend placement, marker lines with labels that
sit right on log axes, safe percentages, expert-axis ticks. Every builder in `app.charts` and `app.lab.charts`
finishes its figure with `layout`."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from app import palette

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


def layout(fig: go.Figure, title: str, subtitle: str | None, x: str | None, y: str | None, *,
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


def vline(fig: go.Figure, x: float, text: str | None = None, *, log: bool = False, color: str | None = None,
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


def hline(fig: go.Figure, y: float, text: str | None = None, *, log: bool = False, color: str | None = None,
           dash: str = "dash", side: str = "left") -> None:
    """A horizontal marker line with a label just above it (log-axis safe, see `vline`)."""
    color = color or palette.OKABE_ITO["black"]
    fig.add_hline(y=y, line_dash=dash, line_color=color)
    if text:
        fig.add_annotation(x=0 if side == "left" else 1, xref="paper", y=float(np.log10(y)) if log else y,
                           yanchor="bottom", xanchor=side, text=text, showarrow=False,
                           font=dict(size=11, color=color), bgcolor="rgba(255,255,255,0.7)")


def percent(part, whole) -> float:
    """100 · part / whole in float arithmetic (numpy int64 counts near 1e17 overflow when multiplied by 100)."""
    return 100.0 * float(part) / float(whole)



def expert_ticks(n: int) -> dict:
    """Ticks for an axis of `n` routed experts: at most ~16 labels."""
    step = max(1, n // 16)
    return dict(tickmode="array", tickvals=list(range(0, n, step)))
