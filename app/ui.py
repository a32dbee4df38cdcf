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


def page_header(title: str, subtitle: str, shared, model_label: str | None = None) -> None:
    """Title and caption; `model_label` names what the page shows when it is not the sidebar's model as is (custom
    knobs, the lab's mini model)."""
    st.title(title)
    st.caption(f"{subtitle}  ·  model: **{model_label or shared.label}**  ·  seed {shared.seed}")
    target = lesson_target()
    if target is not None and target[3] == "":  # a step about the page as a whole: its note under the title
        _step_note(*target[:3])


# ---------------------------------------------------------------- arriving from a lesson step
def lesson_target():
    """(section, n, step, chart key) when this page was opened from a lesson step's link (`?lstep=`), else None."""
    from app import lessons
    hit = lessons.step_from_param(st.query_params.get(lessons.STEP_PARAM))
    if hit is None:
        return None
    sec, n, step = hit
    return sec, n, step, lessons.TARGETS.get((sec.id, n), "")


SCROLLED = "_eva_lesson_scrolled"  # the ?lstep= value this session has already scrolled to (scroll once)

# Scroll the main area to the anchor, again while the charts above it are still drawing (they push it down), for
# a few seconds or until the user scrolls, clicks or types. scroll-margin keeps it clear of the fixed header.
_SCROLL_JS = """<div id="{id}" style="scroll-margin-top: 4.5rem"></div><script>
(function () {{
  let stop = false, n = 0;
  ["wheel", "touchmove", "keydown", "mousedown"].forEach(
    e => window.addEventListener(e, () => {{ stop = true; }}, {{once: true, capture: true}}));
  function tick() {{
    if (stop || n++ > 40) return;
    const el = document.getElementById("{id}");
    if (el) {{
      const top = el.getBoundingClientRect().top;
      if (top < 40 || top > 110) el.scrollIntoView({{block: "start"}});
    }}
    setTimeout(tick, 200);
  }}
  tick();
}})();
</script>"""


def anchor_id(key: str) -> str:
    return f"eva-chart-{_slug(key)}"


def _step_note(sec, n, step) -> None:
    st.info(f"**Lesson — {sec.id}, step {n}: {step.title}.** What to notice: {step.notice}",
            icon=":material/visibility:")


def lesson_anchor(key: str) -> bool:
    """Before chart `key`: when a lesson step opened this page for this chart, an anchor the page scrolls to (once
    per arrival) and the step's 'what to notice'. Returns whether it did."""
    target = lesson_target()
    if target is None or target[3] != key:
        return False
    from app import lessons
    value = st.query_params.get(lessons.STEP_PARAM)
    if st.session_state.get(SCROLLED) != value:
        st.session_state[SCROLLED] = value
        st.html(_SCROLL_JS.format(id=anchor_id(key)), unsafe_allow_javascript=True)
    else:
        st.html(f'<div id="{anchor_id(key)}"></div>')
    _step_note(*target[:3])
    return True


def explanation(title: str, body_md: str, latex: list[str] | tuple[str, ...] = (), *, lesson: bool = False,
                key: str | None = None) -> None:
    """The 'how it works' expander: prose (Markdown, may contain $...$) and display equations. Open in lesson mode,
    except when a lesson step opened the page for one chart (the formulas would push that chart down)."""
    with st.expander(title, expanded=lesson and lesson_target() is None, icon=":material/functions:"):
        st.markdown(body_md)
        for eq in latex:
            st.latex(eq)


CARD_WIDTH = 300  # px: 3 cards per row at 1400 px, 2 at 700 px (the row wraps; see cards())


def cards():
    """A row of headline cards that wraps onto more rows on narrow screens: `with ui.cards(): ...`."""
    return st.container(horizontal=True, gap="small")


# One-line hovers for the jargon in card titles: a card whose title starts with one of these gets it as help.
JARGON = {
    "MaxVio": "Maximal violation: how far the busiest expert's load exceeds the mean load (0 = perfectly even; "
              "1 = the busiest expert gets twice the mean).",
    "CV of loads": "Coefficient of variation: standard deviation of the experts' loads divided by their mean "
                   "(0 = every expert gets the same number of tokens).",
    "Normalized entropy": "Entropy of the load distribution divided by its maximum, log N_r (1 = perfectly even, "
                          "0 = every token on one expert).",
    "SQNR": "Signal-to-quantization-noise ratio: signal power over rounding-error power, in decibels; every 6 dB "
            "more is one more bit of precision.",
    "Train loss": "Cross-entropy in nats per byte: the average −ln p the model gives the next byte (a uniform guess "
                  "over 256 bytes scores ln 256 ≈ 5.55).",
    "Validation loss": "The same cross-entropy (nats per byte) on held-out text the model never trained on.",
}


def vs(new: float, base: float, what: str) -> str | None:
    """A card delta: '−67% vs d_c = 512' (None when nothing changed or there is no base to compare with)."""
    if not what or base <= 0 or new == base:
        return None
    return f"{100 * (new / base - 1):+.0f}% vs {what}".replace("-", "−", 1)


def jargon_help(label: str) -> str | None:
    return next((h for k, h in JARGON.items() if label.startswith(k)), None)


def number_with_formula(label: str, value: str, formula: str, *, paper: str | None = None,
                        help: str | None = None, detail: str | None = None, width: int | str = CARD_WIDTH,
                        paper_label: str = "Paper", delta: str | None = None, delta_color: str = "off") -> None:
    """A headline number with its formula (and the published figure) right beside it, as one card. `delta` says
    what changed against the model's own value (e.g. "−67% vs d_c = 512"); jargon titles get a hover (JARGON)."""
    with st.container(border=True, width=width):
        st.metric(label, value, delta=delta, delta_color=delta_color, help=help or jargon_help(label))
        st.latex(formula)
        bits = []
        if paper:
            bits.append(f"{paper_label}: **{paper}**")
        if detail:
            bits.append(detail)
        if bits:
            st.caption("  ·  ".join(bits))


def scroll_x(key: str, min_width: int = 640):
    """A container whose content (e.g. a wide Markdown table) keeps `min_width` px and scrolls sideways in a narrow
    window instead of being cut off: `with ui.scroll_x("ov_formulas"): st.markdown(table)`."""
    st.html(f"<style>.st-key-{key} [data-testid='stMarkdownContainer'] {{ overflow-x: auto; }}"
            f".st-key-{key} table {{ min-width: {min_width}px; }}</style>")
    return st.container(key=key)


def domains_caption(seed: int = 0) -> str:
    """The four synthetic token domains, each with a real example and its rule (for charts whose rows are
    domains, and the lab's sampled text)."""
    from core import data
    ex = data.domain_examples(seed)
    return "The four token domains: " + "; ".join(
        f"**{d}** `{ex[d]}` ({data.DOMAIN_RULES[d]})" for d in data.DOMAINS) + "."


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:60] or "data"


def chart(fig: go.Figure, df: pd.DataFrame | None, name: str, *, key: str, notice: str | None = None,
          lesson: bool = False, caption: str | None = None, anchored: bool | None = None) -> None:
    """A plotly chart, an optional caption, the 'what to notice' note (lesson mode) and the CSV of its data. Opened
    from a lesson step about this chart: an anchor the page scrolls to and the step's note just above it."""
    from_step = lesson_anchor(key) if anchored is None else anchored  # (a page may place it above the controls)
    st.plotly_chart(fig, key=f"chart_{key}", config={"displaylogo": False})
    if caption:
        st.caption(caption)
    if lesson and notice and not from_step:
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
