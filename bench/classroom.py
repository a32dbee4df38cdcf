"""Classroom load test (issue 17): thirty students press Start in the training lab within a few seconds.

    python bench/classroom.py [--client ws|apptest] [--sessions 30] [--within 10] [--scenario one|five|both]
                              [--query 'tr_steps=25'] [--json out.json]

Scenarios
  one   every session opens the lab with the knobs of one lesson step ("Train the default mini DeepSeek-V3") and
        presses Start at a random moment within `--within` seconds: the first trains, the others join that run
        (or open it from the store once it has finished). Target: every session sees the results, time from its
        Start to its results p95 <= one default run + 5 s.
  five  the sessions are spread over five knob sets (default, balancing none, MHA, BF16, no MTP): one trains, the
        same knobs join it, other knobs find the server busy and press "Queue my run" (a full queue: they try again
        after a poll). Target: every session completes, and every session that waited in the queue saw its
        position.

Clients
  ws (default)  a live `streamlit run` server (tests/live_server.py, an empty run store in a temporary
        `EVA_DATA_DIR` per scenario) and one websocket session per student, all asyncio tasks of THIS process
        (bench/ws_client.py: a browser tab without rendering). A tab asks for the page's run, clicks Start by its
        widget id, and then does what the browser does: the lab's live fragment reruns at the interval the server
        asked for (`auto_rerun`: 1 s for the owner's and a joiner's view, 2 s for a watcher's), and the run's end
        (`st.rerun(scope="app")`) arrives as a full run. So the server does a real classroom's work, and this
        process, like the students' laptops, is not the server. Before the students, one tab opens the lab and
        waits until the training worker has loaded PyTorch (a server that has been up for a while).
        Results are seen when the page shows the "Results" and "Compare runs" headers and the loss-curve figure.
  apptest  AppTest sessions in threads of this process, which plays the server (as `bench/load_test.py --client
        apptest`; the training runs in the lab's worker process). A session polls its page every `--poll` seconds,
        and each poll re-runs the WHOLE lab script in this process's one GIL: with 30 sessions that harness work,
        not the app, dominates the time to results.

Reported: sessions, training jobs the server ran, outcomes of Start, time to results (p50 / p95 / max) against the
measured duration of one run of the scenario, sessions that saw their queue position, errors; server and worker
RSS peaks (sampled every 0.25 s), and with `ws` the CPU seconds of the server, the worker and this client. Kept
out of bench/load_test.py, which is already long; it reuses its memory readers.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("EVA_DATA_DIR", tempfile.mkdtemp(prefix="eva-classroom-"))

from load_test import Sampler, cpu_seconds, descendants, pct, read_status, read_tree  # noqa: E402

# Failures of AppTest itself when many instances run in threads of one process (its runtime singleton and its
# patched config are process-wide), not of the app.
HARNESS = ("Runtime hasn't been created", "maximum recursion depth exceeded")
FIVE = ({}, {"tr_bal": "none"}, {"tr_attn": "MHA"}, {"tr_prec": "BF16"}, {"tr_mtp": "false"})


@dataclass
class Student:
    query: dict
    outcome: str = ""
    t_start: float | None = None
    t_results: float | None = None
    positions: list = field(default_factory=list)   # queue texts this session saw
    waited: bool = False                            # its run was queued (own or joined) at some poll
    run_status: str = ""                            # status of the run whose results it saw
    run_s: float | None = None                      # how long that run trained
    errors: list = field(default_factory=list)      # the app's exceptions, sessions without results
    harness: list = field(default_factory=list)     # AppTest failures in threads (not the app's)
    points: int = 0                                 # points of the loss curve it saw with the results (ws)
    runs: tuple = (0, 0, 0)                         # script runs for it (ws): full, fragment, fragment ended early


def open_lab(s: Student, args):
    """A session on the lab with its knobs. AppTests in threads sometimes lose a script run to a race in
    Streamlit's test runtime ("Runtime hasn't been created"): retry, and count it as the harness's."""
    from streamlit.testing.v1 import AppTest
    for _ in range(3):
        try:
            at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=args.timeout)
            at.query_params.update(s.query)
            at.switch_page("pages/training.py").run()
            at.button(key="tr_start")
            return at
        except Exception as e:
            s.harness.append(f"open: {type(e).__name__}: {str(e)[:120]}")
    return None


def lesson_query() -> dict:
    from app import lessons as ls
    step = ls.section("Putting it together").steps[0]
    return {k: str(v) for k, v in ls.url_params(step).items()}


def rerun(s: Student, at, el=None) -> bool:
    """One script run (after `el`'s click when given); False when the harness lost it (see `open_lab`)."""
    try:
        (el or at).run()
        return True
    except Exception as e:
        s.harness.append(f"run: {type(e).__name__}: {str(e)[:120]}")
        return False


def student(s: Student, delay: float, args) -> None:
    time.sleep(delay)
    at = open_lab(s, args)
    if at is None:
        s.errors.append("the lab did not open (harness)")
        return
    try:
        s.t_start = time.perf_counter()
        for _ in range(3):
            if rerun(s, at, at.button(key="tr_start").click()) and "_tr_outcome" in at.session_state:
                break
        s.outcome = at.session_state["_tr_outcome"]
        deadline = s.t_start + args.limit
        while time.perf_counter() < deadline:
            if s.outcome in ("busy", "full"):
                rerun(s, at, at.button(key="tr_queue").click())
                s.outcome = at.session_state["_tr_outcome"]
                if s.outcome in ("busy", "full"):
                    time.sleep(args.poll)
                    rerun(s, at)
                    continue
            for e in at.exception:  # AppTest's config mock stacks up across threads: the harness's, not the app's
                harness = any(h in e.value for h in HARNESS)
                (s.harness if harness else s.errors).append(e.value[:200])
            queued = [i.value for i in at.info if "in the queue" in i.value]
            if queued:
                s.waited = True
                s.positions.append(queued[0][:80])
            cur = at.session_state["_tr_run"] if "_tr_run" in at.session_state else None
            if cur is not None and cur.status == "queued":
                s.waited = True
            hist = at.session_state["_tr_history"] if "_tr_history" in at.session_state else []
            if hist and any(h.value == "Compare runs" for h in at.header):
                s.t_results = time.perf_counter()
                s.run_status, s.run_s = ("stored" if hist[-1].stored else hist[-1].status), hist[-1].elapsed()
                return
            time.sleep(args.poll)
            rerun(s, at)
        s.errors.append(f"no results within {args.limit:.0f} s (outcome {s.outcome})")
    except Exception as e:  # the harness, or the app
        s.errors.append(f"{type(e).__name__}: {str(e)[:200]}")


def scenario(name: str, queries: list[dict], args) -> dict:
    from app.lab import session as lab_session
    from app.lab.store import RunStore
    mgr = lab_session.manager()
    mgr._store = RunStore(tempfile.mkdtemp(prefix=f"eva-classroom-{name}-"))
    mgr._recent.clear()
    mgr.ensure_worker()  # a server starts it when the first student opens the lab
    while not mgr.worker_ready():
        time.sleep(0.1)
    jobs0 = mgr.jobs
    rng = random.Random(args.seed)
    students = [Student(q) for q in queries]
    me = os.getpid()
    sampler = Sampler(me)
    sampler.start()
    t0 = time.time()
    threads = [threading.Thread(target=student, args=(s, rng.uniform(0, args.within), args), daemon=True)
               for s in students]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.limit + args.within + args.timeout)
    sampler.stop()
    out = summary(name, students, time.time() - t0, mgr.jobs - jobs0, sampler, read_tree(me))
    out["client"] = "apptest"
    return out


def summary(name: str, students: list[Student], wall: float, jobs: int, sampler: Sampler, tree_now: dict) -> dict:
    """The scenario's figures (both clients): outcomes, time to results against one run, queue, memory."""
    run_s = sorted({round(s.run_s, 1) for s in students if s.run_s is not None and s.run_status != "stored"})
    times = [s.t_results - s.t_start for s in students if s.t_results is not None]
    return {
        "scenario": name, "sessions": len(students), "wall_s": wall, "jobs": jobs,
        "outcomes": dict(collections.Counter(s.outcome for s in students)),
        "run_statuses": dict(collections.Counter(s.run_status for s in students)),
        "completed": len(times), "results_p50_s": pct(times, 0.5), "results_p95_s": pct(times, 0.95),
        "results_max_s": max(times) if times else float("nan"),
        "one_run_s": max(run_s) if run_s else float("nan"), "runs_s": run_s,
        "waited": sum(s.waited for s in students), "waited_saw_position": sum(s.waited and bool(s.positions)
                                                                              for s in students),
        "errors": [e for s in students for e in s.errors][:20],
        "harness": [h for s in students for h in s.harness][:20],
        "server_rss_peak": sampler.peak, "tree_peak": dict(sampler.tree_peak), "rss_now": tree_now["server_rss"],
        "tree_now": tree_now, "loadavg": os.getloadavg(), "cpus": os.cpu_count(),
    }


# ---------------------------------------------------------------------------------------------- ws client
def page_outcome(texts: list[str]) -> str:
    """What Start did, read from the page as a student reads it (the alerts the lab draws for each outcome of
    app/lab/session.py `start`)."""
    def has(*bits):
        return any(all(b in t for b in bits) for t in texts)
    if has("**Stored run**"):
        return "stored"
    if has("**Joined "):
        return "joined"
    if has("The queue is full"):
        return "full"
    if has("**Your run was not started: the server is busy.**"):
        return "busy"
    if has("**Your run ", "in the queue"):
        return "queued"
    return "started"


def results_seen(tab) -> int | None:
    """Points of the results' loss curve when the page shows the results ("Results" and "Compare runs" headers and
    the finished run's loss-curve chart, the one whose title says the loss falls), else None."""
    from ws_client import series_points

    from app.lab.charts import TRAIN_SERIES
    heads = tab.headings()
    if "Results" not in heads or "Compare runs" not in heads:
        return None
    loss = [c for c in tab.vega_charts() if "loss falls" in " ".join(c[0].get("title", {}).get("text", []))]
    return series_points(loss[0], TRAIN_SERIES) if loss and series_points(loss[0], TRAIN_SERIES) else None


async def ws_student(s: Student, delay: float, base: str, args) -> None:
    import re

    from ws_client import Tab

    def saw(text: str) -> None:  # every alert as it arrives, also those of the live fragment's reruns
        if "in the queue" in text and "#" in text:
            s.waited = True
            s.positions.append(text[:80])

    await asyncio.sleep(delay)
    tab = Tab(base, "training", s.query, on_text=saw)
    try:
        await tab.open(args.timeout)
        s.t_start = time.perf_counter()
        await tab.click("tr_start", args.timeout)
        s.outcome = page_outcome(tab.texts())
        s.waited |= s.outcome == "queued" or any("already queued" in t for t in tab.texts())
        deadline = s.t_start + args.limit
        while time.perf_counter() < deadline:
            if s.outcome in ("busy", "full"):  # press "Queue my run" (or Start, if the other run has just ended)
                try:
                    tab.button("tr_queue")
                    key = "tr_queue"
                except KeyError:
                    key = "tr_start"
                await tab.click(key, args.timeout)
                s.outcome = page_outcome(tab.texts())
                s.waited |= s.outcome == "queued"
                if s.outcome in ("busy", "full"):
                    await asyncio.sleep(args.poll)
                    continue
            pts = results_seen(tab)
            if pts:
                s.t_results, s.points = time.perf_counter(), pts
                texts = tab.texts()
                s.run_status = "stored" if any("**Stored run**" in t for t in texts) else "trained"
                m = [re.search(r"tokens in ([\d.]+) s on one core", t) for t in texts]
                s.run_s = next((float(x.group(1)) for x in m if x), None)
                return
            try:
                await tab.wait_change(min(30.0, max(0.1, deadline - time.perf_counter())))
            except asyncio.TimeoutError:
                pass
            if tab.closed:
                break
        s.errors.append(f"no results within {args.limit:.0f} s (outcome {s.outcome})")
    except Exception as e:
        s.errors.append(f"{type(e).__name__}: {str(e)[:200]}")
    finally:
        s.errors += tab.errors
        s.runs = (tab.full_runs, tab.fragment_runs, tab.interrupted)
        await tab.close()


async def warm_lab(base: str, query: dict, timeout: float) -> str:
    """One tab opens the lab (which starts the training worker) and reloads it every second until the worker has
    loaded PyTorch; returns the sidebar's line on this server's runs."""
    from ws_client import Tab
    tab = Tab(base, "training", query)
    await tab.open(timeout)
    end = time.monotonic() + timeout
    while any("still loading PyTorch" in t for t in tab.texts()) and time.monotonic() < end:
        await asyncio.sleep(1.0)
        n = tab.full_runs
        await tab.rerun()
        await tab.wait_full(n, timeout)
    line = next((t for t in tab.texts() if t.startswith("This server has trained")), "")
    await tab.close()
    return line


def ws_scenario(name: str, queries: list[dict], args) -> dict:
    import re

    from tests.live_server import LiveServer
    data = tempfile.mkdtemp(prefix=f"eva-classroom-{name}-")
    log = ROOT / "artifacts" / f"classroom-{name}-server.log"
    students = [Student(q) for q in queries]
    rng = random.Random(args.seed)
    delays = [rng.uniform(0, args.within) for _ in students]
    with LiveServer(log_path=log, env={"EVA_DATA_DIR": data}) as server:
        asyncio.run(warm_lab(server.base, queries[0], args.timeout))
        sampler = Sampler(server.pid)
        sampler.start()
        kids = descendants(server.pid)
        cpu0 = {"server": cpu_seconds(server.pid), "worker": sum(cpu_seconds(k) for k in kids),
                "client": cpu_seconds(os.getpid())}
        t0 = time.time()

        async def everyone():
            await asyncio.gather(*(ws_student(s, d, server.base, args) for s, d in zip(students, delays)))
        asyncio.run(everyone())
        wall = time.time() - t0
        cpu = {"server": cpu_seconds(server.pid) - cpu0["server"],
               "worker": sum(cpu_seconds(k) for k in descendants(server.pid)) - cpu0["worker"],
               "client": cpu_seconds(os.getpid()) - cpu0["client"]}
        sampler.stop()
        tree_now = read_tree(server.pid)
        line = asyncio.run(warm_lab(server.base, queries[0], args.timeout))
        alive = server.alive
    jobs = re.search(r"trained (\d+) run", line)
    out = summary(name, students, wall, int(jobs.group(1)) if jobs else -1, sampler, tree_now)
    out.update(client="ws", cpu_s=cpu, server_alive=alive, server_log=str(log),
               points=sorted({s.points for s in students if s.points}),
               script_runs={k: sum(s.runs[i] for s in students) for i, k in enumerate(("full", "fragment", "early"))})
    if not alive:
        out["errors"].append("the server process died")
    return out


def report(r: dict) -> str:
    mib = lambda b: f"{(b or 0) / 2**20:,.0f} MiB"  # noqa: E731
    ws = r.get("client") == "ws"
    lines = [
        f"classroom scenario '{r['scenario']}' ({'websocket tabs on a live server' if ws else 'AppTest threads'}): "
        f"{r['sessions']} sessions, {r['jobs']} training job(s), wall {r['wall_s']:.0f} s, load average "
        f"{r['loadavg'][0]:.1f} on {r['cpus']} cores",
        f"  Start outcomes: {r['outcomes']}; the runs they saw: {r['run_statuses']}"
        + (f"; loss-curve points seen: {r['points']}" if ws else ""),
        f"  results seen by {r['completed']}/{r['sessions']}: time from Start p50 {r['results_p50_s']:.1f} s, "
        f"p95 {r['results_p95_s']:.1f} s, max {r['results_max_s']:.1f} s; one run took {r['one_run_s']:.1f} s "
        f"(runs: {r['runs_s']}) -> p95 - (longest run + 5 s) = "
        f"{r['results_p95_s'] - r['one_run_s'] - 5:+.1f} s",
        f"  waited in the queue: {r['waited']}, of whom saw their position: {r['waited_saw_position']}",
        f"  memory peak: server {'' if ws else '(this process) '}RSS {mib(r['server_rss_peak'])}, training worker RSS "
        f"{mib(r['tree_peak']['children_rss'])}, server + worker PSS {mib(r['tree_peak']['total_pss'])}",
    ]
    if ws:
        c = r["cpu_s"]
        lines.append(f"  CPU during the scenario: server {c['server']:.0f} s, training worker {c['worker']:.0f} s, "
                     f"this client (all {r['sessions']} tabs) {c['client']:.0f} s; the server ran "
                     f"{r['script_runs']['full']} full script runs and {r['script_runs']['fragment']} fragment runs "
                     f"for the tabs, and ended {r['script_runs']['early']} fragment runs early for the next one (a live "
                     "view's rerun that outlasts its interval)")
        lines.append(f"  errors: {len(r['errors'])} {r['errors'][:3]}")
    else:
        lines.append(f"  errors: {len(r['errors'])} {r['errors'][:3]}; harness retries (AppTest races, not the app): "
                     f"{len(r['harness'])}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--client", choices=["ws", "apptest"], default="ws",
                    help="ws: websocket tabs (asyncio tasks of this process) on a live server; apptest: AppTest "
                         "sessions in threads of this process, which plays the server")
    ap.add_argument("--sessions", type=int, default=30)
    ap.add_argument("--within", type=float, default=10.0, help="students press Start within this many seconds")
    ap.add_argument("--scenario", choices=["one", "five", "both"], default="both")
    ap.add_argument("--poll", type=float, default=2.0,
                    help="apptest: seconds between a session's page polls; both: wait before pressing Queue again "
                         "after a full queue")
    ap.add_argument("--limit", type=float, default=900.0, help="a session gives up after this many seconds")
    ap.add_argument("--timeout", type=float, default=300.0, help="per script run (and the worker's warm-up), seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--query", default="", help="extra lab knobs for every session (smoke runs), e.g. "
                                                    "'tr_steps=25&tr_batch=4&tr_seq=32'")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.client == "apptest":
        import streamlit.runtime.scriptrunner.script_cache as script_cache
        lock = threading.Lock()
        original = script_cache.ScriptCache.get_bytecode

        def locked(self, path):  # AppTests compile pages concurrently; CPython 3.11's ast.parse is not thread-safe
            with lock:
                return original(self, path)
        script_cache.ScriptCache.get_bytecode = locked
    run = ws_scenario if args.client == "ws" else scenario
    extra = dict(x.split("=", 1) for x in args.query.split("&") if x)
    out = []
    if args.scenario in ("one", "both"):
        q = lesson_query()
        out.append(run("one", [{**q, **extra} for _ in range(args.sessions)], args))
        print(report(out[-1]), flush=True)
    if args.scenario in ("five", "both"):
        out.append(run("five", [{**FIVE[i % 5], **extra} for i in range(args.sessions)], args))
        print(report(out[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    if args.client == "apptest":
        from app.lab import session as lab_session
        lab_session.manager().close()
    return out


if __name__ == "__main__":
    res = main()
    sys.exit(1 if any(r["errors"] or r["completed"] < r["sessions"] for r in res) else 0)
