"""The training lab's per-session side: the session-state keys, the manager accessor (`manager`, the one
`st.cache_resource` singleton per server), this session's current run and history, and the callbacks of the
page's buttons (start / queue / stop / leave the queue) and the heartbeat.
"""
from __future__ import annotations

import time
import uuid

import streamlit as st

from app.lab.knobs import KNOBS, LabConfigError, lab_config, sample_prompt
from app.lab.manager import LabRun, RunManager

HISTORY = 8            # finished runs kept per session


@st.cache_resource(show_spinner=False, on_release=lambda m: m.close())
def manager() -> RunManager:
    """The one RunManager of this server process (shared by every session; its own lock makes it thread-safe)."""
    return RunManager()


# ====================================================================== session helpers
_SID = "_tr_sid"        # this session's lab key
_CUR = "_tr_run"        # this session's current (active or last) LabRun
_HIST = "_tr_history"   # finished LabRuns of this session (newest last)
_COUNT = "_tr_count"
_NOTICE = "_tr_notice"  # a message for the next render (refused start, ...)


def session_key() -> str:
    if _SID not in st.session_state:
        st.session_state[_SID] = uuid.uuid4().hex
    return st.session_state[_SID]


def _runtime_session_id() -> str | None:
    try:
        from streamlit.runtime.scriptrunner import get_script_run_ctx
        ctx = get_script_run_ctx()
        return ctx.session_id if ctx else None
    except Exception:  # pragma: no cover
        return None


def current() -> LabRun | None:
    return st.session_state.get(_CUR)


def history() -> list[LabRun]:
    return st.session_state.setdefault(_HIST, [])


def collect() -> None:
    """Move this session's finished run into its history (once)."""
    run = current()
    if run is None or run.active:
        return
    hist = history()
    if run in hist:
        return
    if run.records:
        hist.append(run)
        del hist[:-HISTORY]


def start(knobs: dict, seed: int, queue: bool = False) -> tuple[str, int, LabRun | None]:
    """Create this session's run from the knobs and ask the manager to start (or queue) it."""
    mcfg, cfg = lab_config(knobs, seed)
    collect()
    n = st.session_state.get(_COUNT, 0) + 1
    run = LabRun(owner=session_key(), number=n, knobs=dict(knobs), model_cfg=mcfg, train_cfg=cfg,
                 prompt=sample_prompt(knobs), session_id=_runtime_session_id())
    try:
        from core.calc import param_counts
        run.n_params = param_counts(mcfg)
    except Exception:  # pragma: no cover
        pass
    outcome, pos = manager().request(run, queue=queue)
    if outcome in ("started", "queued"):
        st.session_state[_COUNT] = n
        st.session_state[_CUR] = run
        return outcome, pos, run
    return outcome, pos, None


_LINK = "_tr_from_link"  # did this session open the lab from a link that set lab knobs?


def opened_from_link() -> bool:
    """True when the lab's first load in this session came with lab knobs in the URL (a shared or lesson link)."""
    if _LINK not in st.session_state:
        st.session_state[_LINK] = any(k in KNOBS for k in st.query_params)
    return st.session_state[_LINK]


def knobs_from_state() -> dict:
    """The lab knobs as the widgets hold them (for callbacks, which run before the page draws the widgets)."""
    return {k: st.session_state.get(k, kn.default) for k, kn in KNOBS.items()}


_OUTCOME = "_tr_outcome"


def on_start(queue: bool = False) -> None:
    """Start (or queue) button callback. Callbacks run once per click, before the script — also when the page's
    first run is restarted through the entry point (app/shell.py)."""
    run = current()
    if run is not None and run.active:
        return
    seed = st.session_state.get("seed", 0)
    try:
        outcome, pos, _ = start(knobs_from_state(), int(seed) if seed is not None else 0, queue=queue)
    except LabConfigError as e:
        outcome, pos = "invalid", 0
        st.session_state[_NOTICE] = str(e)
    st.session_state[_OUTCOME] = outcome


def outcome() -> str | None:
    """The last Start/Queue outcome of this session: started, queued, busy, full or invalid."""
    return st.session_state.get(_OUTCOME)


def on_stop() -> None:
    stop_current()


def on_leave_queue() -> None:
    stop_current()


def stop_current() -> None:
    run = current()
    if run is not None and run.active:
        manager().cancel(run)


def heartbeat() -> LabRun | None:
    """The owner's browser is still here: refresh this session's active run's heartbeat."""
    run = current()
    if run is not None and run.active:
        run.touch()
    return run


def prewarm() -> None:
    """On a real server: start the worker process in the background (it imports torch and builds the default
    dataset), so Start shows its first point quickly. Never blocks the page. Under AppTest (no Streamlit runtime)
    the worker starts with the first run instead, so tests that only render the page do not spawn a process."""
    try:
        from streamlit.runtime import Runtime
        if Runtime.exists():
            manager().ensure_worker()
    except Exception:  # pragma: no cover - a warm-up must never break the page
        pass


def wait_first_record(run: LabRun, timeout: float = 1.0) -> None:
    """Right after Start: let the worker reach its first step (the script sleeps, so the GIL is free) so the first
    render already shows the first point."""
    t0 = time.monotonic()
    while run.active and not run.records and run.status != "queued" and time.monotonic() - t0 < timeout:
        time.sleep(0.02)
