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


# Plotly draws titles and legends at fixed pixel sizes and never wraps them. The narrowest layout the app
# supports is an 800 px window with Streamlit's 300 px sidebar: a plot about NARROW_PX wide. Titles are wrapped
# for that width (a wider window shows the same lines with room to spare), and the legend's rows are counted
# for it, so the bottom margin always holds the legend below the x-axis title instead of over it.
NARROW_PX = 440
TITLE_PX_PER_CHAR = 9.0      # 16 px bold sans-serif, average glyph
SUB_PX_PER_CHAR = 6.6        # the subtitle's 12-13 px regular
LEGEND_PX_PER_CHAR = 6.8     # 13 px legend text
LEGEND_ITEM_PX = 40          # symbol + gaps per legend item
LEGEND_ROW_PX = 21


def _legend_rows(fig: go.Figure) -> int:
    names = [t.name for t in fig.data if t.name and t.showlegend is not False]
    rows, used = (1 if names else 0), 0.0
    for name in names:
        w = LEGEND_ITEM_PX + LEGEND_PX_PER_CHAR * len(str(name))
        if used and used + w > NARROW_PX:
            rows, used = rows + 1, 0.0
        used += w
    return rows


def layout(fig: go.Figure, title: str, subtitle: str | None, x: str | None, y: str | None, *,
           height: int = 420, legend: bool = True, width_chars: int = 85) -> go.Figure:
    """Title (what to notice) + subtitle (the numbers), axis titles with units, legend under the x axis.

    Plotly does not wrap text, so title and subtitle are broken into lines for a chart about `width_chars`
    title characters wide (a half-width column: ~46), and never wider than fits at NARROW_PX.
    """
    title_chars = min(width_chars, int(NARROW_PX / TITLE_PX_PER_CHAR))
    sub_chars = min(int(width_chars * 1.45), int(NARROW_PX / SUB_PX_PER_CHAR))
    t = wrap(title, title_chars)
    sub = wrap(subtitle or "", sub_chars)
    n_title, n_sub = t.count("<br>") + 1, (sub.count("<br>") + 1 if subtitle else 0)
    top = 24 + 21 * n_title + 16 * n_sub + 12
    rows = _legend_rows(fig) if legend else 0
    axis = 52 if x else 26                      # tick labels (+ the x-axis title)
    bottom = 10 + (axis + LEGEND_ROW_PX * rows if rows else 0)
    plot_h = height - 60
    fig.update_layout(
        title=dict(text=t, subtitle=dict(text=sub), x=0, xanchor="left", xref="container", yref="container",
                   y=1 - 10 / (plot_h + top + bottom), yanchor="top", font=dict(size=16), pad=dict(l=10)),
        xaxis_title=x, yaxis_title=y, height=plot_h + top + bottom, font=FONT,
        margin=dict(l=10, r=10, t=top, b=bottom),
        # anchored to the figure's bottom edge (container), inside the margin reserved for its rows
        legend=dict(orientation="h", yref="container", yanchor="bottom", y=0, xanchor="left", x=0, title=None),
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
