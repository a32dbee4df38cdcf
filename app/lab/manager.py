"""The training lab's server-wide run manager: `LabRun` (one run's knobs, configs, records and results), the run
statuses, and `RunManager` (at most one active run per server, a short queue, the worker process and the threads
that read its events and watch heartbeats and the time cap). No widgets and no Streamlit session state; the one
`st.cache_resource` accessor that makes the manager a per-server singleton is `app.lab.session.manager`.

Hosted-server manners (a classroom shares one small server):

* **one run at a time per server** — a second user who presses Start is refused politely, sees the running run's
  progress, can watch it live (read-only) or queue their run (it starts by itself when the server is free; the
  page shows its position and an estimated wait);
* **a run is trained once** — runs are keyed by what decides their numbers (`app.lab.store.run_id`): a Start on
  the knobs of the run that is training (or queued) joins it as a viewer instead of queueing a copy, and a
  finished run goes to the run store (app/lab/store.py), from which any later Start or link opens it at once; a run
  cut by Stop or the time cap goes there too, as a partial run under its own id, which only its links open;
* **the run trains in a worker process** (app/lab/worker.py, one core, started when the lab page is first opened),
  so it never competes with the server's page reruns for the GIL; its records stream back into a bounded list
  that the page polls with `st.fragment(run_every=...)`;
* **caps** — steps, tokens per run (steps × batch × sequence length), wall time (`TrainConfig.max_time_s`), and a
  hard kill of the worker if a run overstays the cap by a minute;
* **runs stop when their sessions go away** — every viewer's browser polls the run and every poll refreshes the
  run's heartbeat; the monitor thread stops the run when the heartbeat is older than `STALE_AFTER_S`, or sooner
  when Streamlit reports every viewer's session disconnected. A viewer's Stop only stops the run when no other
  viewer is left (one student cannot stop the class's run).

After training, the worker samples text (with MTP draft acceptance) and measures the domain × expert matrix, so
the page only draws.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from app.lab.knobs import MAX_SECONDS, MAX_STEPS, estimate_seconds, model_seconds, run_label
from app.lab.store import PARTIAL, partial_id

STALE_AFTER_S = float(os.environ.get("EVA_LAB_STALE_S", 20))            # owner not seen for this long -> stop
MAX_QUEUE = 5
RECENT = 16   # finished runs the manager keeps in memory by key (serves repeats while the store write is pending
              # or when the store is unavailable)

# ====================================================================== runs and the manager
ACTIVE = ("queued", "starting", "running", "finishing")
STATUS_TEXT = {
    "queued": "queued", "starting": "starting", "running": "running", "finishing": "sampling text and measuring experts",
    "done": "finished", "stopped": "stopped", "time limit": "stopped at the time cap", "diverged": "diverged",
    "abandoned": "stopped (its browser tab went away)", "error": "failed",
}


@dataclass(eq=False)
class LabRun:
    """One lab run: knobs, configs, the records written by the worker, and what was measured after training."""
    owner: str                      # the owner's lab session key (session_state uuid)
    number: int                     # 1, 2, ... within the owner's session
    knobs: dict
    model_cfg: Any
    train_cfg: Any
    prompt: str = ""                # the sample prompt (see `sample_prompt`)
    session_id: str | None = None   # Streamlit runtime session id (to notice a closed tab), if known
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    records: list = field(default_factory=list)
    status: str = "queued"
    message: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    heartbeat: float = field(default_factory=time.monotonic)
    stop_event: threading.Event = field(default_factory=threading.Event)
    after: dict = field(default_factory=dict)   # {"sample": ..., "domains": ...}
    n_params: dict = field(default_factory=dict)
    seq: int = 0                                # job number in the worker process
    abandoned: bool = False                     # stopped because its browser session went away
    spec: dict | None = None                    # app.lab.store.run_spec: what decides its numbers
    key: str | None = None                      # app.lab.store.run_id of that spec (None: not keyed)
    partial_id: str | None = None               # a run cut by Stop / the time cap: its own id in the store
    stored: bool = False                        # opened from the run store (or the manager's memory): not trained
    saved: bool | None = None                   # written to the run store after training (None: not attempted)
    viewers: set = field(default_factory=set)   # lab session keys following this run (the owner included)
    session_ids: set = field(default_factory=set)  # their Streamlit runtime session ids, where known

    def __post_init__(self):
        self.viewers.add(self.owner)
        if self.session_id:
            self.session_ids.add(self.session_id)

    @property
    def label(self) -> str:
        return run_label(self.knobs, self.number)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def link_id(self) -> str | None:
        """The id a link to this run carries: the key of a finished run, the partial id of a cut one, else None."""
        if self.partial_id:
            return self.partial_id
        return self.key if self.key and self.status == "done" else None

    def cut_text(self) -> str | None:
        """How a partial run ended ("stopped at step 80 of 150 by the time cap"), None for any other run."""
        if not self.partial_id:
            return None
        step = self.records[-1]["step"] if self.records else 0
        how = "by the time cap" if self.status == "time limit" else "with its Stop button"
        return f"stopped at step {step} of {self.total_steps} {how}"

    @property
    def total_steps(self) -> int:
        return self.train_cfg.steps

    def touch(self) -> None:
        self.heartbeat = time.monotonic()

    def snapshot(self) -> list[dict]:
        return list(self.records)

    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    def progress(self) -> dict:
        recs = self.records
        step = recs[-1]["step"] if recs else 0
        tps = [r["tokens_per_s"] for r in recs[-10:] if r.get("tokens_per_s")]
        speed = sum(tps) / len(tps) if tps else None
        el = self.elapsed()
        left = None
        if len(recs) >= 2:  # recent step time (the first step also paid for building the model)
            a, b = recs[-min(len(recs), 11)], recs[-1]
            if b.get("elapsed_s") is not None and a.get("elapsed_s") is not None and b["step"] > a["step"]:
                per_step = (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
                left = min(per_step * (self.total_steps - step), max(0.0, MAX_SECONDS - el))
        return {"step": step, "total": self.total_steps, "tokens_per_s": speed, "elapsed": el, "left": left}


def _session_connected(session_id: str | None) -> bool | None:
    """True/False when Streamlit's runtime can tell whether that browser session is still connected, else None."""
    if not session_id:
        return None
    try:
        from streamlit.runtime import Runtime
        if not Runtime.exists():
            return None
        return Runtime.instance().is_active_session(session_id)  # documented thread-safe
    except Exception:  # pragma: no cover - internal API moved
        return None


def _stale(run: LabRun) -> bool:
    """Nobody follows `run` any more: no viewer polled it for STALE_AFTER_S, or (sooner) Streamlit says every
    viewer's session is disconnected."""
    age = time.monotonic() - run.heartbeat
    if age > STALE_AFTER_S:
        return True
    ids = list(run.session_ids)
    return age > 3.0 and bool(ids) and all(_session_connected(s) is False for s in ids)


class RunManager:
    """Server-wide: at most one active run, a short queue, and the worker process that trains (see
    app/lab/worker.py). Thread-safe: one lock around the state; a receiver thread turns the worker's events
    into `LabRun` state and enforces stop / heartbeat / wall-time caps."""

    HARD_LIMIT_S = 60.0   # a run still going this long after the time cap is killed with its worker process

    def __init__(self, store=None):
        self.lock = threading.Lock()
        self.active: LabRun | None = None
        self.queue: list[LabRun] = []
        self.completed = 0
        self.speed_ratio: float | None = None  # measured / predicted run time on this server (for estimates)
        self._proc = None
        self._seq = 0
        self._ready = threading.Event()
        self._closed = False
        self._store = store
        self._recent: OrderedDict[str, LabRun] = OrderedDict()  # key -> finished "done" run (newest last)

    @property
    def store(self):
        """The run store (app/lab/store.py), opened on first use; `store.available` / `store.reason` say whether
        it works. A store that cannot be opened never raises: the lab trains as without one."""
        if self._store is None:
            from app.lab.store import RunStore
            self._store = RunStore()
        return self._store

    # -- the worker process
    def ensure_worker(self) -> None:
        """Start the worker process (and its reader / monitor threads) if it is not running. Called when the lab
        page is opened, so the process has imported torch by the time someone presses Start."""
        with self.lock:
            self._ensure_worker_locked()

    def _ensure_worker_locked(self) -> None:
        if self._closed or (self._proc is not None and self._proc.poll() is None):
            return
        import subprocess
        import sys
        from pathlib import Path
        root = str(Path(__file__).resolve().parents[2])  # the repository root (app/lab/manager.py)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
            [root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        proc = subprocess.Popen([sys.executable, "-m", "app.lab.worker"], cwd=root, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._proc = proc
        self._ready.clear()
        threading.Thread(target=self._read, args=(proc,), name="eva-train-reader", daemon=True).start()
        threading.Thread(target=self._monitor, args=(proc,), name="eva-train-monitor", daemon=True).start()

    def _send(self, **cmd) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.stdin.write(json.dumps(cmd) + "\n")
            proc.stdin.flush()
        except (OSError, ValueError):  # the worker died; the monitor reports it
            pass

    def close(self) -> None:
        """Stop the worker process (cache eviction / shutdown)."""
        with self.lock:
            self._closed = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()
                proc.wait(3)
            except Exception:
                pass
            if proc.poll() is None:
                proc.kill()

    @property
    def jobs(self) -> int:
        """Training jobs this manager has sent to a worker since the server started."""
        return self._seq

    # -- requests from pages
    def finished_run(self, key: str | None):
        """The finished run with this key (what a Start on its knobs shows): a `LabRun` from the manager's memory or
        a `StoredRun` from the store, else None — never a partial run. Never raises (a broken store reads as
        empty)."""
        run = self.open_run(key)
        return run if run is not None and run.status == "done" else None  # a partial run's status never is

    def open_run(self, rid: str | None):
        """The run a link names: finished (its key) or partial (its partial id), from memory or the store."""
        if not rid:
            return None
        with self.lock:
            mem = self._recent.get(rid)
            if mem is not None:
                self._recent.move_to_end(rid)
                return mem
        return self.store.get(rid)

    def _join_locked(self, run: LabRun) -> tuple[LabRun, int] | None:
        """If a run with `run.key` is training or queued, add `run`'s session as a viewer of it and return
        (that run, its queue position or 0); else None. The caller holds the lock."""
        if not run.key:
            return None
        for pos, other in enumerate([self.active] + self.queue):
            if other is not None and other.key == run.key and other.active:
                other.viewers.add(run.owner)
                if run.session_id:
                    other.session_ids.add(run.session_id)
                other.touch()
                return other, pos
        return None

    def start_or_join(self, run: LabRun, queue: bool = False) -> tuple[str, int, LabRun]:
        """`join`, else the same knobs' run finished a moment ago ("stored"), else `request` — under one lock, so
        that Starts of the same knobs arriving together (a classroom) never train the run twice.
        Returns (outcome, queue position or 0, the run this session follows)."""
        with self.lock:
            joined = self._join_locked(run)
            if joined is not None:
                return "joined", joined[1], joined[0]
            done = self._recent.get(run.key) if run.key else None
            if done is not None and done.status == "done":
                return "stored", 0, done
            outcome, pos = self._request_locked(run, queue)
            return outcome, pos, run

    def leave(self, run: LabRun, viewer: str, session_id: str | None = None) -> bool:
        """`viewer` stops following `run`. Returns True when it was the last viewer (the caller then cancels the
        run), False when others still follow it (it goes on for them)."""
        with self.lock:
            run.viewers.discard(viewer)
            if session_id:
                run.session_ids.discard(session_id)
            return not run.viewers

    def wait_estimate(self, run: LabRun) -> float | None:
        """Seconds until queued `run` starts: what the active run has left plus the estimates of the runs queued
        before it (this server's calibrated speed); None when it is not queued."""
        with self.lock:
            if run not in self.queue:
                return None
            ahead = self.queue[:self.queue.index(run)]
            active = self.active
        left = 0.0
        if active is not None:
            p = active.progress()
            left = p["left"] if p["left"] is not None else max(0.0, estimate_seconds(active.train_cfg, self)
                                                                    - p["elapsed"])
        return left + sum(estimate_seconds(r.train_cfg, self) for r in ahead)

    def request(self, run: LabRun, queue: bool = False) -> tuple[str, int]:
        """Start `run` now if the server is free: ("started", 0); otherwise ("queued", position) when `queue`,
        ("busy", 0) when not, or ("full", 0) when the queue is full. (The session asks `start_or_join`, which joins
        a run with the same key first, under the same lock.)"""
        with self.lock:
            return self._request_locked(run, queue)

    def _request_locked(self, run: LabRun, queue: bool) -> tuple[str, int]:
        self._drop_stale_queue()
        if self.active is None and not self.queue:
            self._start(run)
            return "started", 0
        if not queue:
            return "busy", 0
        if run in self.queue:
            return "queued", self.queue.index(run) + 1
        if len(self.queue) >= MAX_QUEUE:
            return "full", 0
        run.status = "queued"
        self.queue.append(run)
        return "queued", len(self.queue)

    def position(self, run: LabRun) -> int:
        with self.lock:
            return self.queue.index(run) + 1 if run in self.queue else 0

    def cancel(self, run: LabRun) -> None:
        """Stop a running run, or take a queued one out of the queue."""
        with self.lock:
            if run in self.queue:
                self.queue.remove(run)
                run.status, run.message = "stopped", "Taken out of the queue."
                run.finished = time.time()
                return
            run.stop_event.set()
            if self.active is run:
                self._send(cmd="stop", seq=run.seq, after=True)

    def busy(self) -> LabRun | None:
        return self.active

    def worker_ready(self) -> bool:
        """Has the worker process finished loading (torch, the default dataset)?"""
        return self._ready.is_set()

    # -- internals (called with the lock held)
    def _drop_stale_queue(self) -> None:
        for r in list(self.queue):
            if _stale(r):
                self.queue.remove(r)
                r.status, r.message = "abandoned", "Left the queue: its browser tab went away."
                r.finished = time.time()

    def _start(self, run: LabRun) -> None:
        self._ensure_worker_locked()
        self._seq += 1
        run.seq = self._seq
        self.active = run
        run.status = "starting"
        run.started = time.time()
        run.touch()
        self._send(cmd="run", seq=run.seq, id=run.id, model=run.model_cfg.to_hf(), train=run.train_cfg.to_dict(),
                   prompt=run.prompt)

    def _finish(self, run: LabRun, status: str, message: str | None, after: dict | None) -> None:
        """The run is over: publish its final state and free the server in one step (no window in which the run
        looks finished but the server is still busy), then start the next queued run whose owner is still here."""
        with self.lock:
            if run.finished is not None:  # already reported (e.g. the worker died right after its last event)
                return
            if run.abandoned:
                status = "abandoned"
                message = (f"Stopped at step {run.records[-1]['step'] if run.records else 0}: nobody was watching "
                           f"(the browser tab closed or stayed away for {STALE_AFTER_S:.0f} s).")
            keep = run.key is not None and (status == "done" or status in PARTIAL and bool(run.records))
            if keep and status != "done":  # cut by Stop or the time cap: a partial run under an id of its own (set
                run.partial_id = partial_id(run.key)  # before the status, which tabs read without the lock)
            run.after = after or {}
            run.message = message
            run.finished = time.time()
            run.status = status
            if self.active is run:
                self.active = None
            self.completed += 1
            if keep:  # in memory at once: a Start (or a link) in the next instant finds it before the store has it
                self._recent[run.link_id] = run
                self._recent.move_to_end(run.link_id)
                while len(self._recent) > RECENT:
                    self._recent.popitem(last=False)
            if status in ("done", "time limit") and len(run.records) >= 10:  # recalibrate the estimates
                done = run.records[-1]["step"] / run.total_steps
                v = run.records[-1]["elapsed_s"] / max(model_seconds(run.train_cfg) * done, 1e-9)
                if math.isfinite(v) and v > 0:
                    self.speed_ratio = v if self.speed_ratio is None else 0.5 * (self.speed_ratio + v)
            self._drop_stale_queue()
            if self.active is None and self.queue:
                self._start(self.queue.pop(0))
        if keep:
            self._save(run)

    def _save(self, run: LabRun) -> None:
        """Write a finished or partial run to the store (outside the manager's lock: a busy file may wait for its
        timeout)."""
        from app.lab.store import StoredRun, engine_version
        st = self.store
        if not st.available:
            run.saved = False
            return
        run.saved = st.put(StoredRun(
            id=run.link_id, spec=run.spec, knobs=dict(run.knobs), records=list(run.records), after=run.after,
            n_params=run.n_params, status=run.status, message=run.message, started=run.started or 0.0,
            finished=run.finished or 0.0, engine=engine_version(), full_id=run.key if run.partial_id else None))

    def _read(self, proc) -> None:
        """Reader thread: the worker's events (JSON lines) -> run state."""
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("ev")
            if kind == "ready":
                self._ready.set()
                continue
            if kind == "idle":
                self._retire_idle(proc)
                continue
            run = self.active
            if run is None or ev.get("id") != run.id:
                continue
            if kind == "record":
                if run.status == "starting":
                    run.status = "running"
                if len(run.records) < MAX_STEPS + 1:
                    run.records.append(ev["rec"])
            elif kind == "finishing":
                run.status = "finishing"
            elif kind == "end":
                self._finish(run, ev.get("status", "error"), ev.get("message"), ev.get("after"))

    def _retire_idle(self, proc) -> None:
        """The worker has had no job for a while: let it exit (closing its stdin) unless a run or a queue needs it.
        Frees the worker's memory (~300 MB, torch) on a server nobody trains on; the next Start starts a new one."""
        with self.lock:
            if self._proc is not proc or self.active is not None or self.queue:
                return
            proc.eva_retired = True
            self._proc = None
            self._ready.clear()
        try:
            proc.stdin.close()
        except (OSError, ValueError):
            pass

    def _monitor(self, proc) -> None:
        """Monitor thread: Stop, the owner's heartbeat and the hard wall-time cap; reports a dead worker."""
        while proc.poll() is None:
            time.sleep(0.2)
            run = self.active
            if run is None or run.status not in ("starting", "running"):
                continue
            if not run.stop_event.is_set() and _stale(run):
                run.abandoned = True
                run.stop_event.set()
                self._send(cmd="stop", seq=run.seq, after=False)
            if run.started and time.time() - run.started > MAX_SECONDS + self.HARD_LIMIT_S:
                proc.kill()  # a run that ignores the caps: kill the worker; the next request starts a new one
        with self.lock:
            if self._proc is proc:
                self._proc = None
        if getattr(proc, "eva_retired", False):  # exited because it was idle: no run was on it
            return
        run = self.active
        if run is not None and run.active and run.status != "queued":
            self._finish(run, "error", "The training process stopped unexpectedly (out of memory, or killed after "
                                       "exceeding the time cap). Try a smaller run.", None)
