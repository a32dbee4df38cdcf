"""Rendering helpers shared by the pages: headline numbers with their formula, charts with a CSV download,
the explanation expander, lesson notes and readable errors for impossible knob combinations."""
from __future__ import annotations

import re
from collections.abc import Callable

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.config import ConfigError


# The figure cache holds pickled plotly figures shared by every session. Most are 2–60 KB (a view is 2–7 charts, so
# 256 entries keep ~40 recent views of a classroom), but a 512-expert × 240-step heatmap is 0.66 MB: by count alone
# the worst case was 256 × 0.66 MB = 168 MB. The byte budget caps it at FIGURE_CACHE_BYTES (>= 48 of the largest
# figures, all 256 typical ones); least recently used figures go first.
FIGURE_CACHE_ENTRIES = 256
FIGURE_CACHE_BYTES = 32 * 2**20


@st.cache_data(max_entries=FIGURE_CACHE_ENTRIES, max_size=FIGURE_CACHE_BYTES, show_spinner=False)
def _cached_figure(name: str, _builder: Callable[..., go.Figure], *args, **kwargs) -> go.Figure:
    # `name` (module.qualname) is the builder's part of the key; `_builder` itself is not hashed (leading "_").
    return _builder(*args, **kwargs)


def fig(builder: Callable[..., go.Figure], *args, **kwargs) -> go.Figure:
    """`builder(*args, **kwargs)` (a pure builder of `app.charts`), cached: plotly figure construction costs
    ~15 ms per chart, a cached copy ~5 ms.

    Arguments must be hashable by st.cache_data (DataFrames, numbers, strings, arrays)."""
    return _cached_figure(f"{builder.__module__}.{builder.__qualname__}", builder, *args, **kwargs)


def page_header(title: str, subtitle: str, shared) -> None:
    st.title(title)
    st.caption(f"{subtitle}  ·  model: **{shared.label}**  ·  seed {shared.seed}")


def explanation(title: str, body_md: str, latex: list[str] | tuple[str, ...] = (), *, lesson: bool = False,
                key: str | None = None) -> None:
    """The 'how it works' expander: prose (Markdown, may contain $...$) and display equations."""
    with st.expander(title, expanded=lesson, icon=":material/functions:"):
        st.markdown(body_md)
        for eq in latex:
            st.latex(eq)


CARD_WIDTH = 300  # px: 3 cards per row at 1400 px, 2 at 700 px (the row wraps; see cards())


def cards():
    """A row of headline cards that wraps onto more rows on narrow screens: `with ui.cards(): ...`."""
    return st.container(horizontal=True, gap="small")


def number_with_formula(label: str, value: str, formula: str, *, paper: str | None = None,
                        help: str | None = None, detail: str | None = None, width: int | str = CARD_WIDTH,
                        paper_label: str = "Paper") -> None:
    """A headline number with its formula (and the published figure) right beside it, as one card."""
    with st.container(border=True, width=width):
        st.metric(label, value, help=help)
        st.latex(formula)
        bits = []
        if paper:
            bits.append(f"{paper_label}: **{paper}**")
        if detail:
            bits.append(detail)
        if bits:
            st.caption("  ·  ".join(bits))


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:60] or "data"


def chart(fig: go.Figure, df: pd.DataFrame | None, name: str, *, key: str, notice: str | None = None,
          lesson: bool = False, caption: str | None = None) -> None:
    """A plotly chart, an optional caption, the 'what to notice' note (lesson mode) and the CSV of its data."""
    st.plotly_chart(fig, key=f"chart_{key}", config={"displaylogo": False})
    if caption:
        st.caption(caption)
    if lesson and notice:
        st.info(notice, icon=":material/visibility:")
    if df is not None:
        # Deferred: the CSV is only generated when the button is clicked (keeps reruns fast).
        rows = f"{len(df):,} row" + ("" if len(df) == 1 else "s")
        st.download_button(f"Download the data (CSV, {rows})", lambda: df.to_csv(index=False).encode(),
                           file_name=f"eva-{_slug(name)}.csv", mime="text/csv", key=f"csv_{key}",
                           on_click="ignore", icon=":material/download:", type="tertiary")


def config_error(e: ConfigError, labels: dict[str, str] | None = None, where: str = "") -> None:
    """st.error naming the knob (its label, and the config field) and the rule it breaks."""
    labels = labels or {}
    knob = labels.get(e.field)
    who = f"**{knob}** (`{e.field}`)" if knob else f"`{e.field}`"
    st.error(f"{where}{who}: {e.rule}. Change that knob to a compatible value.", icon=":material/block:")


def knob_error(knob: str, rule: str) -> None:
    st.error(f"**{knob}**: {rule}", icon=":material/block:")


def lesson_note(text: str, lesson: bool) -> None:
    if lesson:
        st.info(text, icon=":material/school:")
