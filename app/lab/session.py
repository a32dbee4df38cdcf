"""The training lab's per-session side: the session-state keys, the manager accessor (`manager`, the one
`st.cache_resource` singleton per server), this session's current run and history, and the callbacks of the
page's buttons (start / queue / stop / leave the queue / train again) and the heartbeat.

A Start first looks for the finished run of these knobs (the manager's memory, then the run store) and shows it at
once — never a partial run (one cut by Stop or the time cap); then for the same run training or queued, which it
joins as a viewer; only then does it ask for a new run.

The tab's history survives a reload through the URL: `?runs=<id>.<id>...` lists the ids of its stored runs, finished
or partial (the same parameter makes a run's share link, see app/lab/views.py), and a fresh session opens them from
the store. Chosen over a session token in the URL with the history kept server-side: the ids are already what a link
needs, they expose nothing a link would not, and the store needs no per-session table to clean up. The price: only
stored runs come back; a failed or abandoned run, or any run on a server without a store, does not.
"""
from __future__ import annotations

import time
import uuid

import streamlit as st

from app.lab.knobs import KNOBS, LabConfigError, defaults, lab_config, sample_prompt
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
_NUMS = "_tr_nums"      # run id -> this session's number for runs it joined (their owner numbered them)
RUNS_PARAM = "runs"     # ?runs=<id>.<id>: the finished runs a link (or this tab's address bar) opens


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


def _copy(run: LabRun, number: int, stored: bool) -> LabRun:
    """This session's own copy of a finished run (another session's, or the manager's memory): its own number and
    id, the same records and results."""
    c = LabRun(owner=session_key(), number=number, knobs=dict(run.knobs), model_cfg=run.model_cfg,
               train_cfg=run.train_cfg, prompt=run.prompt, records=run.records, status=run.status,
               message=run.message, created=run.created, started=run.started, finished=run.finished,
               after=run.after, n_params=run.n_params, spec=run.spec, key=run.key, stored=stored, saved=run.saved,
               partial_id=run.partial_id)
    return c


def _from_store(s, number: int) -> LabRun:
    """A LabRun of a `StoredRun` (finished or partial): the configs rebuilt from its spec (what it trained, whatever
    this server's caps are now)."""
    from core.config import ModelConfig
    from core.train import TrainConfig
    train = {k: v for k, v in s.spec["train"].items() if v is not None}
    mcfg, cfg = ModelConfig.from_hf(s.spec["model"]), TrainConfig(**train)
    return LabRun(owner=session_key(), number=number, knobs={**defaults(), **s.knobs}, model_cfg=mcfg, train_cfg=cfg,
                  prompt=s.spec.get("prompt", ""), records=s.records, status=s.status, message=s.message,
                  started=s.started, finished=s.finished, after=s.after, n_params=s.n_params, spec=s.spec,
                  key=s.full_id or s.id, partial_id=s.id if s.partial else None, stored=True, saved=True)


def _next_number() -> int:
    n = st.session_state.get(_COUNT, 0) + 1
    st.session_state[_COUNT] = n
    return n


def _finished_copy(fin, number: int) -> LabRun:
    return _copy(fin, number, stored=True) if isinstance(fin, LabRun) else _from_store(fin, number)


def collect() -> None:
    """Move this session's finished run into its history (once); a run it joined becomes its own copy there."""
    run = current()
    if run is None or run.active:
        return
    hist = history()
    if run in hist:
        return
    if run.records:
        if run.owner != session_key():
            run = _copy(run, st.session_state.get(_NUMS, {}).get(run.id, run.number), stored=False)
            st.session_state[_CUR] = run
        hist.append(run)
        del hist[:-HISTORY]


def history_ids() -> list[str]:
    """Ids of this tab's runs that a link can open: finished runs (their key) and partial ones (their own id)."""
    return [r.link_id for r in history() if r.link_id]


def sync_url() -> None:
    """Write this tab's finished run ids into the address bar (`?runs=`), so a reload (or a copy of the address)
    opens them again."""
    ids = ".".join(dict.fromkeys(history_ids()))
    if ids:
        if st.query_params.get(RUNS_PARAM) != ids:
            st.query_params[RUNS_PARAM] = ids
    elif RUNS_PARAM in st.query_params:
        del st.query_params[RUNS_PARAM]


_OPENED = "_tr_opened"  # the ?runs= value this session has opened (once per session)
_FROM_URL = "_tr_from_url"  # ids of the LabRuns this session opened from its URL (a share link or a reload)


def open_linked_runs() -> dict | None:
    """A fresh session whose URL has `?runs=`: open those runs (finished or partial) from the store into the history,
    no training.
    Returns {"opened": [LabRun], "missing": [id], "bad": [message], "store": reason or None} the first time,
    None afterwards or without the parameter."""
    from app.lab.store import RunIdError, check_id
    raw = st.query_params.get(RUNS_PARAM)
    if not raw or st.session_state.get(_OPENED) == raw or _HIST in st.session_state and history():
        return None
    st.session_state[_OPENED] = raw
    out = {"opened": [], "missing": [], "bad": [], "store": None}
    mgr = manager()
    hist = history()
    for part in raw.split(".")[:HISTORY]:
        try:
            rid = check_id(part)
        except RunIdError as e:
            out["bad"].append(str(e))
            continue
        fin = mgr.open_run(rid)
        if fin is None:
            out["missing"].append(rid)
            continue
        run = _finished_copy(fin, _next_number())
        hist.append(run)
        out["opened"].append(run)
        st.session_state.setdefault(_FROM_URL, set()).add(run.id)
    if out["opened"]:
        st.session_state[_CUR] = hist[-1]
    if not mgr.store.available:
        out["store"] = mgr.store.reason
    return out


def start(knobs: dict, seed: int, queue: bool = False, again: bool = False) -> tuple[str, int, LabRun | None]:
    """This session's run of the knobs: the finished one at once ("stored", unless `again`), the same run already
    training or queued ("joined", its queue position), or a new run the manager starts ("started") or queues
    ("queued"); "busy" / "full" when it does neither."""
    from app.lab.store import run_id, run_spec
    mcfg, cfg = lab_config(knobs, seed)
    collect()
    mgr = manager()
    prompt = sample_prompt(knobs)
    spec = run_spec(mcfg, cfg, prompt)
    key = run_id(spec)
    n = st.session_state.get(_COUNT, 0) + 1
    if not again:
        fin = mgr.finished_run(key)
        if fin is not None:
            run = _finished_copy(fin, _next_number())
            st.session_state[_CUR] = run
            return "stored", 0, run
    run = LabRun(owner=session_key(), number=n, knobs=dict(knobs), model_cfg=mcfg, train_cfg=cfg,
                 prompt=prompt, session_id=_runtime_session_id(), spec=spec, key=key)
    try:
        from core.calc import param_counts
        run.n_params = param_counts(mcfg)
    except Exception:  # pragma: no cover
        pass
    outcome, pos, other = mgr.start_or_join(run, queue=queue)  # one lock: simultaneous Starts train once
    if outcome == "joined":
        st.session_state.setdefault(_NUMS, {})[other.id] = _next_number()
        st.session_state[_CUR] = other
        return "joined", pos, other
    if outcome == "stored":  # finished between the store lookup above and now
        run = _finished_copy(other, _next_number())
        st.session_state[_CUR] = run
        return "stored", 0, run
    if outcome in ("started", "queued"):
        st.session_state[_COUNT] = n
        st.session_state[_CUR] = run
        return outcome, pos, run
    return outcome, pos, None


_LINK = "_tr_from_link"  # did this session open the lab from a link that set lab knobs?


def from_url(run: LabRun) -> bool:
    """True for a run this session opened from its URL (`?runs=`: a share link or a reload), not one it trained or
    started here."""
    return run.id in st.session_state.get(_FROM_URL, ())


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


def on_train_again(run: LabRun, again: bool = True) -> None:
    """"Train again" on a stored run: train its knobs and seed here (the result replaces the stored one). With
    `again=False`, "Train the full run" on a partial run: a Start on its knobs and seed (the finished run at once
    where the store has it, else it trains; queued when the server is busy)."""
    cur = current()
    if cur is not None and cur.active:
        return
    try:
        outcome, pos, _ = start(run.knobs, run.train_cfg.seed, queue=True, again=again)
    except LabConfigError as e:
        outcome = "invalid"
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
    """Stop this session's run — or, when other tabs follow it too, stop following it (it goes on for them)."""
    run = current()
    if run is None or not run.active:
        return
    mgr = manager()
    if mgr.leave(run, session_key(), _runtime_session_id()):
        mgr.cancel(run)
    else:
        st.session_state[_CUR] = None
        st.session_state[_NOTICE] = (f"You stopped following {run.label}: {len(run.viewers)} other tab(s) follow it, "
                                     "so it goes on for them.")


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


# ====================================================================== lesson steps keep the student's own knobs
_OWN = "_tr_own_knobs"    # the student's lab knobs from before the lesson step view
_LESSON = "_tr_lesson"    # the lesson step whose view the lab shows ("MoE, step 2: ...")


def enter_lesson_view(step_knobs: dict, where: str) -> None:
    """A lesson step opens the lab: keep the student's own knobs (from before the first step they opened), then set
    every lab knob to the step's value or the default (the step shows its own view, not a mix with the student's)."""
    if _LESSON not in st.session_state:
        st.session_state[_OWN] = knobs_from_state()
    st.session_state[_LESSON] = where
    for k, kn in KNOBS.items():
        st.session_state[k] = step_knobs.get(k, kn.default)


def lesson_view() -> str | None:
    """The lesson step whose knobs the lab shows, or None."""
    return st.session_state.get(_LESSON)


def leave_lesson_view() -> None:
    """Leave the lesson step's view: the student's own knobs come back (a callback, or before the knobs are drawn)."""
    own = st.session_state.pop(_OWN, None)
    st.session_state.pop(_LESSON, None)
    for k, v in (own or {}).items():
        st.session_state[k] = v


def pop_notice() -> str | None:
    return st.session_state.pop(_NOTICE, None)
