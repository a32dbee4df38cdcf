"""Lessons: the masterclass in six guided sections. Each step explains one idea with its math, opens a dashboard
with the knobs that show it, and says what to notice. `?ls_sec=&ls_step=` make any step a shareable link."""
from urllib.parse import urlencode, urljoin

import streamlit as st

from app import lessons as ls
from app import shell, sidebar, state, texts, ui

shell.require()  # run inside the entry point (see app/shell.py)

go = st.session_state.pop("_ls_go", None)
if go is not None:  # set by the "Open" button's callback (shared knobs already applied there)
    st.switch_page(go[0], query_params=go[1])

sh = sidebar.shared()
ls.restore_position()  # back from a dashboard: the lesson continues where it was
sb = st.sidebar
sb.subheader("Lesson")
sec_id = state.radio("Section", "ls_sec", ls.SECTION_IDS, ls.SECTION_IDS[0], horizontal=False, container=sb,
                     help="The six sections of the masterclass, in order.",
                     on_change=lambda: st.session_state.update(ls_step=1))
sec = ls.section(sec_id)
n_steps = len(sec.steps)
n = state.select_slider("Step", "ls_step", list(range(1, n_steps + 1)), 1, container=sb)
step = sec.steps[n - 1]
si = ls.SECTION_IDS.index(sec_id)


def _goto(section_id: str, number: int) -> None:
    st.session_state["ls_sec"] = section_id
    st.session_state["ls_step"] = number


def _open(step: ls.Step) -> None:
    """Apply the step's shared (sidebar) knobs to this session, reset the page's other knobs to their defaults (a
    knob set by an earlier step must not carry over), then navigate with the page knobs in the URL."""
    ls.remember_position(sec_id, n)
    if step.page == "pages/training.py":  # the lab keeps the student's own knobs and shows the step's view
        from app.lab import session as lab_session
        lab_session.enter_lesson_view(step.knobs, f"{sec_id}, step {n}: {step.title}")
    for k in ("model", "seed", "lesson"):
        if k in step.knobs:
            st.session_state[k] = step.knobs[k]
    for k in ls.page_knob_keys(step.page, list(st.session_state)):
        if k not in step.knobs:
            del st.session_state[k]
    st.session_state.pop(ui.SCROLLED, None)  # scroll to the step's chart again, even if opened before
    st.session_state["_ls_go"] = (step.page, {k: v for k, v in ls.link_params(sec, n).items()
                                              if k not in ("model", "seed", "lesson")})


st.title(texts.LESSONS_TITLE)
st.caption(f"{texts.LESSONS_SUB}  ·  section {si + 1} of {len(ls.SECTIONS)}, step {n} of {n_steps}")
st.header(sec.title, divider="gray")
st.markdown(f"_{sec.summary}_")
st.markdown(" → ".join(f"**{i + 1}\\. {s.title}**" if i == n - 1 else f"{i + 1}\\. {s.title}"
                       for i, s in enumerate(sec.steps)))  # "1\." : not a Markdown list

with st.container(border=True):
    st.subheader(f"{n}. {step.title}")
    st.markdown(step.body)
    for eq in step.latex:
        st.latex(eq)
    page_title = ls.PAGE_TITLES[step.page]
    rel = f"{ls.PAGE_URLS[step.page]}?{urlencode(ls.link_params(sec, n))}"
    with st.container(horizontal=True, vertical_alignment="center"):
        st.button(f"Open {page_title} with these knobs", type="primary", icon=":material/open_in_browser:",
                  key="ls_open", on_click=_open, args=(step,))
        st.link_button("Open in a new tab", rel, icon=":material/open_in_new:", type="tertiary")
    shown = [f"{ls.knob_label(k)} = **{ls.url_value(k, v)}**" for k, v in step.knobs.items() if k != "lesson"]
    st.caption("Sets " + (", ".join(shown) if shown else "nothing beyond the defaults")
               + " (and lesson mode on); every other knob at its default.")
    st.info(f"**What to notice.** {step.notice}", icon=":material/visibility:")

    with st.container(horizontal=True, vertical_alignment="center"):
        if n > 1:
            st.button("Previous step", icon=":material/arrow_back:", key="ls_prev", on_click=_goto,
                      args=(sec_id, n - 1))
        elif si > 0:
            prev = ls.SECTIONS[si - 1]
            st.button(f"Previous section: {prev.id}", icon=":material/arrow_back:", key="ls_prev",
                      on_click=_goto, args=(prev.id, len(prev.steps)))
        if n < n_steps:
            st.button("Next step", icon=":material/arrow_forward:", key="ls_next", on_click=_goto,
                      args=(sec_id, n + 1))
        elif si + 1 < len(ls.SECTIONS):
            nxt = ls.SECTIONS[si + 1]
            st.button(f"Next section: {nxt.id}", icon=":material/arrow_forward:", key="ls_next",
                      on_click=_goto, args=(nxt.id, 1))

st.subheader("Preview")
st.caption("The dashboard's key chart with this step's knobs (every other knob at its default). Open the dashboard "
           "for the full picture and to move the knobs yourself.")
for i, (fig, df, name) in enumerate(ls.previews(step, sh.seed)):
    narrow = name in ("attention heatmap", "lab model parameters", "learning rate schedule")
    with st.container(width=680 if narrow else "stretch"):
        ui.chart(fig, df, name, key=f"ls_prev_{i}")

base = st.context.url
share = urljoin(base, "lessons") + "?" + urlencode(ls.step_query(sec, n)) if base else \
    "lessons?" + urlencode(ls.step_query(sec, n))
with st.expander("Share this step", icon=":material/share:"):
    st.markdown("Send this link: it opens the lessons page at this step (the address bar holds the same).")
    st.code(share, language=None)
    dash = urljoin(base, rel) if base else rel
    st.markdown(f"Or link straight to the dashboard view of this step:")
    st.code(dash, language=None)

ls.remember_position(sec_id, n)
