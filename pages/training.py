"""Training lab: train a mini DeepSeek-V3 live (one run at a time per server), watch loss / MaxVio / expert load /
router biases grow, then compare the runs of this session. The lab's logic lives in app/lab/."""
import streamlit as st

from app import gpu_view, shell, sidebar, texts, ui
from app.lab import knobs, session, views
from app.lab import manager as runs
from app.compute.common import config_json

shell.require()  # run inside the entry point (see app/shell.py)

sh = sidebar.shared()
if session.lesson_view() and not sh.lesson:  # lesson mode turned off: the student's own knobs come back
    session.leave_lesson_view()
knob_values = views.knob_panel()
st.sidebar.caption(f"This server: at most {knobs.MAX_STEPS} steps, {knobs.MAX_TOKENS:,} tokens and "
                   f"{knobs.MAX_SECONDS:.0f} s per run, one run at a time; a run stops when its browser tab has been "
                   f"gone for {runs.STALE_AFTER_S:.0f} s. The lab always trains the `mini` model; the seed is the "
                   "sidebar's.")

ui.page_header(texts.TRAIN_TITLE, texts.TRAIN_SUB, sh, model_label="mini with the knobs in the sidebar")
# (the explanation comes after the runs: Start and the live curves stay at the top, also in lesson mode)

session.collect()
mgr = session.manager()
linked = session.open_linked_runs()  # ?runs=<id>...: a link's (or a reload's) finished runs, from the store
session.sync_url()
try:
    mcfg, cfg = knobs.lab_config(knob_values, sh.seed)
    cfg_error = None
except knobs.LabConfigError as e:
    mcfg = cfg = None
    cfg_error = e
if mcfg is not None:  # the sidebar's parameter count describes the model the lab trains, not the preset
    sidebar.summary(config_json(mcfg), "The lab's mini model")
session.prewarm()
stats = mgr.store.stats()
st.sidebar.caption(f"This server has trained {mgr.jobs} run(s) since it started"
                   + (f"; its run store keeps {stats['runs'] - stats['partial']} finished run(s) for links and repeats"
                      + (f" and {stats['partial']} partial run(s) (cut by Stop or the time cap) for their links."
                         if stats["partial"] else ".") if stats else
                      "; it has no run store (see the note on the page)."))

run = session.current()
own_active = run is not None and run.active
other = mgr.busy()
other = other if other is not None and other is not run else None

# ---------------------------------------------------------------- controls
with st.container(horizontal=True, vertical_alignment="center", gap="small"):
    st.button("Start training", type="primary", icon=":material/play_arrow:", key="tr_start",
              disabled=cfg_error is not None or own_active, on_click=session.on_start)
    if cfg is not None:
        tok = cfg.steps * cfg.batch_size * cfg.seq_len
        est = knobs.estimate_seconds(cfg, mgr)
        st.caption(f"{cfg.steps} steps × {cfg.batch_size} × {cfg.seq_len} tokens = {tok:,} tokens · "
                   f"seed {sh.seed} · {knobs.estimate_text(cfg, mgr)}"
                   + (f" — longer than the {knobs.MAX_SECONDS:.0f} s cap: it will stop early"
                      if est > knobs.MAX_SECONDS else "")
                   + ("" if mgr.worker_ready() or own_active else
                      " · the training process is still loading PyTorch (first use of this server)"))
if cfg_error is not None:
    ui.knob_error(cfg_error.knob, cfg_error.rule)
notice = session.pop_notice()
if notice:
    st.info(notice, icon=":material/info:")
if session.lesson_view():
    with st.container(horizontal=True, vertical_alignment="center"):
        st.info(f"**Lesson step view** ({session.lesson_view()}): the sidebar shows this step's knobs. Your own lab "
                "knobs are kept and come back when you leave the lesson.", icon=":material/school:")
        st.button("Back to my own knobs", icon=":material/undo:", key="tr_own_knobs",
                  on_click=session.leave_lesson_view)
if not mgr.store.available:
    st.caption(f":material/warning: The run store is unavailable ({mgr.store.reason}): runs train as usual, but "
               "finished runs are not kept for links, reloads or other users.")
if linked:
    for msg in linked["bad"]:
        st.error(msg, icon=":material/link_off:")
    if linked["missing"]:
        st.warning(f"**This link names {len(linked['missing'])} run(s) this server has not stored** "
                   f"({', '.join(linked['missing'])}: evicted from the store, or trained by another version of the "
                   "engine). The link's knobs are in the sidebar: press **Start training** to train it here — the "
                   "same knobs and seed draw the same curves (to the last step, for a run that was cut short).",
                   icon=":material/link_off:")
    if linked["opened"]:
        st.success(f"**Opened {len(linked['opened'])} stored run(s) from the link** — their results are below; "
                   "nothing was trained.", icon=":material/link:")
if session.outcome() == "joined" and own_active:
    st.info(f"**Joined {run.label}:** the same knobs and seed are already "
            f"{'queued' if run.status == 'queued' else 'training'} for another tab, so you follow that run instead "
            f"of training a copy ({len(run.viewers)} tabs follow it).", icon=":material/group:")
if cfg_error is None and session.opened_from_link() and run is None and not session.history() and not linked:
    changed = knobs.knob_summary(knob_values) + ([f"Seed = **{sh.seed}**"] if sh.seed else [])
    st.info(f"**This link set the lab's knobs:** {', '.join(changed) if changed else 'the defaults'} (see the "
            "sidebar). A link carries knobs, not results: press **Start training** to train this run here — on "
            "this server the same knobs and seed draw the same curves as for whoever sent it.", icon=":material/link:")

if other is not None and not own_active:
    p = other.progress()
    refused = session.outcome() == "busy"
    st.warning(("**Your run was not started: the server is busy.** " if refused else "**The server is busy.** ")
               + f"Another user is training ({p['step']}/{p['total']} steps, ~{views.fmt_s(p['left'])} left). "
               "To keep this shared server responsive for everyone it trains one run at a time. Watch that run "
               "live below, or queue yours: it starts by itself as soon as the server is free.",
               icon=":material/hourglass_top:")
    with st.container(horizontal=True, vertical_alignment="center"):
        st.button("Queue my run", icon=":material/queue:", key="tr_queue", disabled=cfg_error is not None,
                  on_click=session.on_start, kwargs={"queue": True})
        watch = st.toggle("Watch it live", value=True, key="tr_watch")
    if session.outcome() == "full":
        st.error(f"The queue is full ({runs.MAX_QUEUE} runs); try again in a minute.", icon=":material/block:")
else:
    watch = False

live_layer = own_active or (other is not None and watch)  # the layer knob goes above the live charts
layer = views.layer_choice(run if own_active else other) if live_layer else None

# ---------------------------------------------------------------- live view (own run)
if own_active:
    session.wait_first_record(run)

    # the tab that started the run refreshes each second; tabs that joined it (a classroom) every two
    @st.fragment(run_every=views.POLL_S if run.owner == session.session_key() else views.WATCH_POLL_S)
    def live(run=run):
        run.touch()
        if run.status == "queued":
            pos = mgr.position(run)
            wait = mgr.wait_estimate(run)
            st.info(f"**Your run {run.label} is #{pos} in the queue.** It starts by itself when the server is free"
                    + (f", in about {views.fmt_s(wait)}." if wait is not None else ".")
                    + " Keep this tab open.", icon=":material/queue:")
            st.button("Leave the queue", key="tr_leave", on_click=session.on_leave_queue)
        else:
            if not run.records and not mgr.worker_ready():
                st.caption("Loading PyTorch in the training process (only the first run after the server starts "
                           "waits for this)…")
            frac, text = views.progress_text(run)
            with st.container(horizontal=True, vertical_alignment="center"):
                st.progress(frac, text=f"**{run.label}** — {runs.STATUS_TEXT.get(run.status, run.status)} · {text}")
                st.button("Stop", icon=":material/stop:", key="tr_stop", disabled=run.status == "finishing",
                          on_click=session.on_stop)
            views.live_charts(run, layer, "live", sh.lesson)
        if not run.active:
            st.rerun(scope="app")

    live()
elif other is not None and watch:
    @st.fragment(run_every=views.WATCH_POLL_S)
    def watching(run=other):
        frac, text = views.progress_text(run)
        st.progress(frac, text=f"Watching another user's run (read-only) — {text}")
        views.live_charts(run, layer, "watch", False)
        if not run.active:
            st.rerun(scope="app")

    watching()

# ---------------------------------------------------------------- after: results, history, overlay
hist = session.history()
if hist and not own_active:
    views.results_section(hist, *([layer] if live_layer else []), lesson=sh.lesson)  # one layer knob per page

ui.explanation("How the lab trains", texts.TRAIN_EXPLAIN, texts.TRAIN_EQUATIONS, lesson=sh.lesson)

# ---------------------------------------------------------------- before: what will train
if cfg is not None and not own_active:
    views.preview_section(mcfg, cfg, expanded=not hist and run is None and other is None, lesson=sh.lesson)

# the engine on a GPU: the measured step against transformers (its chart on request: a page opened from a link
# draws its loss curve first, without loading plotly)
gpu_view.train_section(sh.lesson, chart_on_request=True)
