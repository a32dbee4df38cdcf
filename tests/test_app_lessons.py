"""AppTest for the lessons page: six sections, every step renders (text, math, preview, what to notice) from its
shareable link, and every step's dashboard link opens the right page with exactly the step's knobs and its note."""
from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from app import lessons as ls
from apptest_helpers import open_page, widget

STEPS = ls.all_steps()


def clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_six_sections_with_steps_on_real_pages():
    assert [s.id for s in ls.SECTIONS] == ["Foundations", "MLA", "MoE", "FP8", "Putting it together",
                                          "Scale and deployment"]
    pages = {p.path for p in __import__("app.pages", fromlist=["PAGES"]).PAGES}
    for sec in ls.SECTIONS:
        assert 3 <= len(sec.steps) <= 6, sec.id
        for step in sec.steps:
            assert step.page in pages and step.page != "pages/lessons.py"
            assert step.title and step.body and step.notice
            assert step.knobs.get("lesson") is True
    assert sum(1 for s in ls.SECTIONS for st in s.steps if st.latex) >= 20, "most steps carry the math"


def test_every_step_renders_from_its_shareable_link():
    for sec, n, step in STEPS:
        at = open_page("pages/lessons.py", ls.step_query(sec, n))
        clean(at)
        assert at.radio(key="ls_sec").value == sec.id
        assert at.select_slider(key="ls_step").value == n
        assert any(step.title in s.value for s in at.subheader), (sec.id, n)
        assert any("What to notice" in i.value for i in at.info)
        assert len(at.latex) >= len(step.latex)
        assert len(at.get("plotly_chart")) == sum(2 if p == "lab" else 1 for p in step.preview), (sec.id, n)
        assert at.button(key="ls_open").proto.label.startswith(f"Open {ls.PAGE_TITLES[step.page]}")


@pytest.mark.parametrize("sec,n,step", STEPS, ids=[f"{s.id}-{n}" for s, n, _ in STEPS])
def test_step_link_opens_dashboard_with_its_knobs(sec, n, step):
    """Open the step's dashboard link (the one the lessons page gives: the step's knobs plus `?lstep=`) in a fresh
    browser tab and compare every knob; a dashboard shows the step's note at the chart it talks about with the
    explanation closed (the training lab has no such note)."""
    at = open_page(step.page, ls.link_params(sec, n))
    clean(at)
    assert not at.warning or all("not a valid value" not in w.value for w in at.warning), [w.value for w in at.warning]
    for key, value in step.knobs.items():
        assert widget(at, key).value == value, (sec.id, n, key)
    if step.page != "pages/training.py":
        assert any(i.value.startswith(f"**Lesson — {sec.id}, step {n}") for i in at.info), (sec.id, n)
        assert not any(e.proto.expanded for e in at.expander if e.label.startswith("How")), "formulas stay closed"


def test_open_button_navigates_in_session_with_shared_knobs():
    # Scale section, step 4: model DeepSeek-V2 on the Overview (a shared sidebar knob) + lesson mode.
    sec = ls.section("Scale and deployment")
    at = open_page("pages/lessons.py", ls.step_query(sec, 4))
    assert at.selectbox(key="model").value == "deepseek-v3"
    at.button(key="ls_open").click().run()
    clean(at)
    assert at.selectbox(key="model").value == "deepseek-v2"
    assert at.toggle(key="lesson").value is True
    assert at.title[0].value.startswith("Overview")
    # a short link back (the sidebar cuts long labels) and the step it returns to, in full, under it
    assert [lnk.proto.label for lnk in at.sidebar.get("page_link")] == ["Back to the lesson"]
    assert any(c.value == "Scale and deployment, step 4: DeepSeek-V2 for comparison" for c in at.sidebar.caption)


def test_next_and_previous_walk_across_sections():
    at = open_page("pages/lessons.py", {"ls_sec": "MLA", "ls_step": "4"})
    at.button(key="ls_next").click().run()
    assert (at.radio(key="ls_sec").value, at.select_slider(key="ls_step").value) == ("MoE", 1)
    at.button(key="ls_prev").click().run()
    assert (at.radio(key="ls_sec").value, at.select_slider(key="ls_step").value) == ("MLA", 4)
    at.radio(key="ls_sec").set_value("FP8").run()
    assert at.select_slider(key="ls_step").value == 1, "a new section starts at its first step"
    clean(at)
