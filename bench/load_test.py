"""Load test: N concurrent sessions (browser contexts or AppTest threads) on a live-like Eva server (issue 7, item 5).

    python bench/load_test.py --sessions 10 --seconds 60 [--json out.json]

What it does
  1. starts `python -m streamlit run streamlit_app.py` on 127.0.0.1 (a free port, headless, no file watcher,
     `--server.disconnectedSessionTTL` short so "memory after the sessions close" is observable in bounded time);
  2. warm-up: one browser session opens every page once (imports torch, fills the caches) and closes; the
     server's RSS after it settles is the *baseline*;
  3. load: N Playwright browser contexts in ONE Debian Chromium (executable_path; never `playwright install`)
     each click through every page of the sidebar navigation in a random order, change two visible knobs of the
     page (a slider nudged with the arrow keys, or another radio option), and repeat until the time is up. Session 0
     starts one training run when the training lab page exists (one run at a time per server: the others see the
     lab busy and may watch it);
  4. closes every context, waits for the server to drop the sessions, and samples the RSS again.

Reported (one table; `--json` writes the same numbers):
  errors         exception elements (`stException`), page crashes, JS page errors and navigations that never
                 reached the idle state — must be 0
  page latency   click on a navigation link -> the full script run it started has finished (Streamlit's own
                 `script_finished` websocket message, read with Playwright's websocket events and the ForwardMsg
                 protobuf: exact even when a run is too short for the frontend to ever render "running") and the
                 app is idle (`[data-testid='stApp'][data-test-script-state='notRunning']`); p50 / p95 / max
  knob latency   the same for a knob change
  server RSS     at start, baseline after warm-up, peak under load (sampled every 0.25 s, and VmHWM), after the
                 sessions closed; server CPU seconds (utime + stime) during the load
  children       the server's child processes (the training lab's worker): their RSS, and server + children PSS
                 (baseline / peak sampled every second / after) — a hosted container's memory limit counts every
                 process, the torch libraries both map only once
Memory is read from /proc/<pid>/status and smaps_rollup (psutil is not a dependency of this project).

Two clients, because neither alone answers everything on a 2-core machine:
  --client browser (default) — Playwright contexts against the live server: the real thing end to end (websocket
      sessions, the session manager and its cleanup after the tabs close, fragments polled by the browser, the
      frontend raising exception elements). The price: N Chromium tabs rendering plotly charts share the two cores
      with the server, so at N = 30 the *client* saturates the machine and the server idles (its CPU share is
      reported); the latencies then describe this test box, not the hosted server, where the browsers run on the
      students' laptops.
  --client apptest — N AppTest sessions in threads of one process, which plays the server: Streamlit runs every
      session's script in a thread of one process with shared caches and one GIL, so this is the server's compute
      contention without a browser on the same cores. It leaves out websockets, serialization and cleanup of
      disconnected sessions (memory "after" then only shows what caches and live objects keep).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the app (apptest client) and tests.live_server
from tests.live_server import LiveServer  # noqa: E402

CHROMIUM_ARGS = ["--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-renderer-backgrounding", "--disable-background-timer-throttling",
                 "--disable-backgrounding-occluded-windows"]
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


class Wire:
    """Counts the app's script runs of one browser page from Streamlit's own websocket messages (ForwardMsg):
    `new_session` opens a full script run, `script_finished` with FINISHED_SUCCESSFULLY / COMPILE_ERROR closes it
    (fragment runs and runs interrupted by a newer rerun are told apart by their status). Exact even when a run is
    so short that the frontend never renders the 'running' state."""

    def __init__(self):
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
        self._msg = ForwardMsg
        self.started = 0
        self.finished = 0

    def attach(self, page) -> None:
        page.on("websocket", lambda ws: ws.on("framereceived", self._frame))

    def _frame(self, payload) -> None:
        if not isinstance(payload, (bytes, bytearray)):
            return
        m = self._msg()
        try:
            m.ParseFromString(bytes(payload))
        except Exception:
            return
        kind = m.WhichOneof("type")
        if kind == "new_session":
            self.started += 1
        elif kind == "script_finished" and m.script_finished in (0, 1):  # full run done (not fragment / early)
            self.finished += 1


# Visible, enabled knobs in the sidebar a user would nudge: slider thumbs and radio options.
KNOBS_JS = """() => {
  const sb = document.querySelector("[data-testid='stSidebar']");
  if (!sb) return [];
  const vis = el => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const out = [];
  sb.querySelectorAll("[data-testid='stSlider'] [role='slider']").forEach((el, i) => {
    if (vis(el) && el.getAttribute('aria-disabled') !== 'true' && !el.disabled) out.push(['slider', i]);
  });
  sb.querySelectorAll("[data-testid='stRadio'] label").forEach((el, i) => {
    const input = el.querySelector('input');
    if (vis(el) && input && !input.checked && !input.disabled) out.push(['radio', i]);
  });
  return out;
}"""


# ---------------------------------------------------------------------------------------------- server
def read_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in bytes from /proc/<pid>/status."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (the training lab's worker process), from /proc/<pid>/task/*/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(c) for c in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def read_pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages split between the processes that map them), or 0."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def read_tree(pid: int) -> dict[str, int]:
    """Memory of the server *and* its child processes (a hosted container's limit counts all of them):
    server_rss, children_rss (sum of VmRSS), children (count) and total_pss (server + children, PSS: the torch
    libraries both processes map are counted once, as in the container's accounting)."""
    kids = descendants(pid)
    return {"server_rss": read_status(pid).get("VmRSS", 0), "children": len(kids),
            "children_rss": sum(read_status(k).get("VmRSS", 0) for k in kids),
            "total_pss": read_pss(pid) + sum(read_pss(k) for k in kids)}


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


class Sampler(threading.Thread):
    """Samples the server's RSS every `period` seconds; `.peak` is the largest sample. `.tree_peak` holds the
    largest children RSS and server + children PSS seen (sampled every `tree_every`-th time: PSS reads cost more)."""

    def __init__(self, pid: int, period: float = 0.25, tree_every: int = 4):
        super().__init__(daemon=True)
        self.pid, self.period, self.peak, self.samples = pid, period, 0, 0
        self.tree_every = tree_every
        self.tree_peak = {"children_rss": 0, "total_pss": 0}
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            rss = read_status(self.pid).get("VmRSS", 0)
            self.peak = max(self.peak, rss)
            if self.samples % self.tree_every == 0:
                tree = read_tree(self.pid)
                for k in self.tree_peak:
                    self.tree_peak[k] = max(self.tree_peak[k], tree[k])
            self.samples += 1
            self._halt.wait(self.period)

    def stop(self):
        self._halt.set()
        self.join(5)


# ---------------------------------------------------------------------------------------------- sessions
@dataclass
class Stats:
    nav_ms: list = field(default_factory=list)
    knob_ms: list = field(default_factory=list)
    first_ms: list = field(default_factory=list)  # opening the app (new session: page load + first run)
    errors: list = field(default_factory=list)
    visits: int = 0
    knob_changes: int = 0
    knob_noops: int = 0
    training_started: bool = False
    notes: list = field(default_factory=list)   # harness events that are not app errors


async def settle(page, timeout_ms: int) -> None:
    await page.wait_for_selector(IDLE, timeout=timeout_ms)


async def timed(page, wire: Wire, action, timeout_ms: int, must_run: bool = True) -> float | None:
    """Run `action` and wait until the full script run it triggers has finished (Streamlit's `script_finished`
    message) and the app shows idle; ms from the action, or None when no run started within 4 s (must_run=False)."""
    n_start, n_done = wire.started, wire.finished
    t0 = time.perf_counter()
    await action()
    limit = t0 + timeout_ms / 1000
    while wire.finished <= n_done:
        now = time.perf_counter()
        if not must_run and wire.started <= n_start and now - t0 > 4.0:
            return None
        if now > limit:
            path = await page.evaluate("() => location.pathname")
            raise RuntimeError(f"no finished script run within {timeout_ms / 1000:.0f} s (runs started "
                               f"{wire.started - n_start}, finished {wire.finished - n_done}; at {path})")
        await asyncio.sleep(0.02)
    ms = 1e3 * (time.perf_counter() - t0)
    try:
        await page.wait_for_selector(IDLE, timeout=timeout_ms)
    except Exception as e:  # the run finished on the server but the app never showed idle: a failed load
        raise RuntimeError(f"the app did not become idle after its run: {str(e)[:80]}") from None
    return ms


async def check_page(page, where: str, st: Stats) -> None:
    n = await page.locator("[data-testid='stException']").count()
    if n:
        txt = (await page.locator("[data-testid='stException']").first.inner_text())[:300]
        st.errors.append(f"{where}: {n} exception element(s): {txt}")


try:
    from playwright.async_api import TimeoutError as PlaywrightTimeout
except ImportError:  # pragma: no cover - reported in main()
    PlaywrightTimeout = TimeoutError


async def nudge_knob(page, wire: Wire, rng: random.Random, st: Stats, where: str, timeout_ms: int) -> None:
    cands = await page.evaluate(KNOBS_JS)
    if not cands:
        return
    kind, i = rng.choice(cands)
    if kind == "slider":
        thumb = page.locator("[data-testid='stSidebar'] [data-testid='stSlider'] [role='slider']").nth(i)
        key = rng.choice(["ArrowRight", "ArrowLeft"])

        async def act():
            await thumb.focus()
            await page.keyboard.press(key)
    else:
        label = page.locator("[data-testid='stSidebar'] [data-testid='stRadio'] label").nth(i)

        async def act():
            await label.click(timeout=10_000)
    try:
        ms = await timed(page, wire, act, timeout_ms, must_run=False)
    except PlaywrightTimeout as e:  # the browser could not perform the click (covered, scrolled away): no app error
        st.knob_noops += 1
        st.notes.append(f"{where}: {kind} click not performed: {str(e).splitlines()[0][:120]}")
        return
    if ms is None:  # e.g. a slider already at its end: no rerun
        st.knob_noops += 1
        return
    st.knob_changes += 1
    st.knob_ms.append(ms)
    await check_page(page, f"{where} after a {kind} change", st)


async def session(idx: int, browser, base: str, links: list[str], deadline: float, rng: random.Random,
                  st: Stats, train: bool, train_query: str, timeout_ms: int, start_delay: float,
                  no_charts: bool = False, min_navigations: int = 0) -> None:
    await asyncio.sleep(start_delay)
    ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
    if no_charts:  # the server still builds and sends every figure; this tab just does not draw it
        await ctx.route("**/PlotlyChart.*.js", lambda route: route.abort())
    page = await ctx.new_page()
    wire = Wire()
    wire.attach(page)
    page.on("pageerror", lambda e: st.errors.append(f"session {idx}: JS error {str(e)[:200]}"))
    page.on("crash", lambda p: st.errors.append(f"session {idx}: page crashed"))
    try:
        try:
            st.first_ms.append(await timed(page, wire, lambda: page.goto(base + "/", timeout=timeout_ms), timeout_ms))
        except Exception as e:
            st.errors.append(f"session {idx}: first load failed: {type(e).__name__}: {str(e)[:200]}")
            return
        await check_page(page, f"session {idx} first load", st)
        trained = False

        def more() -> bool:  # until the deadline, and (however slow the machine) until min_navigations succeeded
            return time.time() < deadline or (len(st.nav_ms) < min_navigations and not st.errors)

        while more():
            order = links[:]
            rng.shuffle(order)
            if train and not trained:  # the training session starts its run first, then clicks around
                order.sort(key=lambda h: not urlparse(h).path.rstrip("/").endswith("/training"))
            for href in order:
                if not more():
                    break
                path = urlparse(href).path or "/"
                where = f"session {idx} {path}"
                if await page.evaluate("() => location.pathname") == path:
                    continue  # already there: clicking the current page's link starts no run
                link = page.locator(f"[data-testid='stSidebarNav'] a[href='{href}']")
                try:
                    if await link.count() == 0:
                        st.errors.append(f"{where}: navigation link missing")
                        continue
                    ms = await timed(page, wire, lambda: link.first.click(timeout=timeout_ms), timeout_ms)
                except PlaywrightTimeout as e:  # the tab could not even perform the click (client starved of CPU)
                    st.notes.append(f"{where}: navigation click not performed: {str(e).splitlines()[0][:120]}")
                    continue
                except Exception as e:
                    st.errors.append(f"{where}: navigation did not finish: {type(e).__name__}: {str(e)[:160]}")
                    continue
                st.visits += 1
                st.nav_ms.append(ms)
                await check_page(page, where, st)
                if train and not trained and path.rstrip("/").endswith("/training"):
                    trained = True
                    try:
                        if train_query:  # smaller run (CI): set the lab's knobs through the URL, then start
                            await timed(page, wire, lambda: page.goto(href + "?" + train_query, timeout=timeout_ms),
                                        timeout_ms)
                        btn = page.locator(".st-key-tr_start button")
                        await btn.wait_for(state="visible", timeout=timeout_ms)
                        if await btn.is_enabled():
                            await timed(page, wire, lambda: btn.click(), timeout_ms)
                            st.training_started = True
                            await check_page(page, f"{where} after Start training", st)
                        else:
                            st.notes.append(f"{where}: Start training was disabled (another run active?)")
                    except Exception as e:
                        st.errors.append(f"{where}: starting the training run failed: {str(e)[:160]}")
                for _ in range(2):
                    if time.time() >= deadline:
                        break
                    try:
                        await nudge_knob(page, wire, rng, st, where, timeout_ms)
                    except Exception as e:
                        st.errors.append(f"{where}: knob change did not finish: {type(e).__name__}: "
                                         f"{str(e)[:160]}")
    finally:
        await ctx.close()


async def discover_links(browser, base: str, timeout_ms: int) -> list[str]:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await ctx.new_page()
    await page.goto(base + "/", timeout=timeout_ms)
    await settle(page, timeout_ms)
    links = await page.eval_on_selector_all("[data-testid='stSidebarNav'] a",
                                            "els => [...new Set(els.map(e => e.getAttribute('href')))]")
    await ctx.close()
    return links


async def warm_up(browser, base: str, links: list[str], timeout_ms: int) -> list[str]:
    """One session opens every page once (cold imports and caches are not what the load measures)."""
    errors = []
    ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await ctx.new_page()
    wire = Wire()
    wire.attach(page)
    await timed(page, wire, lambda: page.goto(base + "/", timeout=timeout_ms), timeout_ms)
    for href in links:
        if await page.evaluate("() => location.pathname") == (urlparse(href).path or "/"):
            continue
        link = page.locator(f"[data-testid='stSidebarNav'] a[href='{href}']").first
        try:
            await timed(page, wire, lambda: link.click(), timeout_ms)
        except Exception as e:
            errors.append(f"warm-up {href}: {type(e).__name__}: {str(e)[:160]}")
        if await page.locator("[data-testid='stException']").count():
            errors.append(f"warm-up {href}: exception element")
    await ctx.close()
    return errors


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def main_async(args) -> dict:
    from playwright.async_api import async_playwright

    chrome = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chrome:
        raise SystemExit("Debian's chromium is required (apt-get install -y chromium); never `playwright install`")
    out_dir = ROOT / "artifacts"
    out_dir.mkdir(exist_ok=True)
    with LiveServer(log_path=out_dir / f"load-test-server-{args.sessions}.log",
                    flags=["--server.disconnectedSessionTTL", str(int(args.session_ttl))]) as server:
        timeout_ms = int(args.timeout * 1000)
        res: dict = {"sessions": args.sessions, "seconds": args.seconds, "loadavg_start": os.getloadavg(),
                     "cpus": os.cpu_count(), "client": "browser" + (" (charts not drawn)" if args.no_charts else "")}
        sampler = None
        try:
            res["rss_start"] = read_status(server.pid).get("VmRSS", 0)
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=chrome, args=CHROMIUM_ARGS)
                links = await discover_links(browser, server.base, timeout_ms)
                res["pages"] = [urlparse(h).path or "/" for h in links]
                res["warmup_errors"] = await warm_up(browser, server.base, links, timeout_ms)
                await asyncio.sleep(args.session_ttl + 5)
                res["rss_baseline"] = read_status(server.pid).get("VmRSS", 0)
                res["tree_baseline"] = read_tree(server.pid)
                train = any(urlparse(h).path.rstrip("/").endswith("/training") for h in links) and not args.no_train
                stats = [Stats() for _ in range(args.sessions)]
                sampler = Sampler(server.pid)
                sampler.start()
                cpu0, t0 = cpu_seconds(server.pid), time.time()
                deadline = t0 + args.seconds
                rng = random.Random(args.seed)
                tasks = [session(i, browser, server.base, links, deadline, random.Random(rng.random()), stats[i],
                                 train and i == 0, args.train_query, timeout_ms,
                                 start_delay=rng.uniform(0, args.ramp), no_charts=args.no_charts,
                                 min_navigations=args.min_navigations)
                         for i in range(args.sessions)]
                try:
                    await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.seconds + args.timeout + 60)
                except asyncio.TimeoutError:
                    stats[0].errors.append("the load did not finish within its time bound")
                res["wall_s"] = time.time() - t0
                res["server_cpu_s"] = cpu_seconds(server.pid) - cpu0
                await browser.close()
            sampler.stop()
            status = read_status(server.pid)
            res["rss_peak"] = max(sampler.peak, status.get("VmHWM", 0) if args.count_hwm else sampler.peak)
            res["rss_hwm"] = status.get("VmHWM", 0)
            res["rss_end_of_load"] = status.get("VmRSS", 0)
            res["tree_peak"] = dict(sampler.tree_peak)
            await asyncio.sleep(args.session_ttl + args.settle)
            res["rss_after"] = read_status(server.pid).get("VmRSS", 0)
            res["tree_after"] = read_tree(server.pid)
            res["server_alive"] = server.proc.poll() is None
        finally:
            if sampler is not None:
                sampler.stop()
    nav = [x for s in stats for x in s.nav_ms]
    knob = [x for s in stats for x in s.knob_ms]
    errors = res["warmup_errors"] + [e for s in stats for e in s.errors]
    if not res.get("server_alive", False):
        errors.append("the server process died")
    res.update(
        errors=len(errors), error_list=errors[:50], visits=sum(s.visits for s in stats), navigations=len(nav),
        knob_changes=len(knob), knob_noops=sum(s.knob_noops for s in stats),
        training_started=any(s.training_started for s in stats),
        nav_p50_ms=pct(nav, 0.5), nav_p95_ms=pct(nav, 0.95), nav_max_ms=max(nav) if nav else float("nan"),
        knob_p50_ms=pct(knob, 0.5), knob_p95_ms=pct(knob, 0.95),
        first_p50_ms=pct([x for s in stats for x in s.first_ms], 0.5),
        first_p95_ms=pct([x for s in stats for x in s.first_ms], 0.95),
        first_loads=sum(len(s.first_ms) for s in stats),
        visits_per_session=[s.visits for s in stats], notes=[n for s in stats for n in s.notes][:30],
        loadavg_end=os.getloadavg(),
        session_ttl_s=args.session_ttl)
    return res


# ---------------------------------------------------------------------------------------------- AppTest client
def apptest_load(args) -> dict:
    """`--client apptest`: N AppTest sessions in threads of THIS process, which then plays the server.

    Streamlit's server runs every session's script in a thread of one process, with shared caches and one GIL;
    N AppTest instances in threads reproduce exactly that compute contention, without a browser competing for the
    two cores (with 30 Chromium tabs on a 2-core machine the *client* dominates and the server idles). What it
    leaves out: websockets, protobuf serialization to the browser, fragments polled by a browser. RSS is this
    process's (it holds the same imports, caches and session states a server would)."""
    import gc

    import streamlit.runtime.scriptrunner.script_cache as script_cache
    from streamlit.testing.v1 import AppTest

    # Each AppTest has its own ScriptCache, so N sessions compile the pages concurrently, which trips CPython
    # 3.11.7's "AST constructor recursion depth mismatch" (ast.parse is not thread-safe there). The server has ONE
    # cache that compiles under a lock; do the same here.
    compile_lock = threading.Lock()
    original = script_cache.ScriptCache.get_bytecode

    def locked(self, path):
        with compile_lock:
            return original(self, path)
    script_cache.ScriptCache.get_bytecode = locked

    from app.pages import PAGES
    pages = [p.path for p in PAGES]
    app = str(ROOT / "streamlit_app.py")
    me = os.getpid()
    res: dict = {"sessions": args.sessions, "seconds": args.seconds, "client": "apptest", "cpus": os.cpu_count(),
                 "loadavg_start": os.getloadavg(), "pages": pages, "rss_start": read_status(me).get("VmRSS", 0)}
    warm = AppTest.from_file(app, default_timeout=args.timeout).run()
    errors = [f"warm-up: {e.value[:200]}" for e in warm.exception]
    for p in pages:
        warm.switch_page(p).run()
        errors += [f"warm-up {p}: {e.value[:200]}" for e in warm.exception]
    del warm
    gc.collect()
    res["rss_baseline"] = read_status(me).get("VmRSS", 0)
    res["tree_baseline"] = read_tree(me)
    stats = [Stats() for _ in range(args.sessions)]
    cpu0, t0 = cpu_seconds(me), time.time()
    deadline = t0 + args.seconds
    train = "pages/training.py" in pages and not args.no_train
    kinds = ("select_slider", "slider", "radio")

    def worker(i: int, rng: random.Random):
        st = stats[i]
        time.sleep(rng.uniform(0, args.ramp))
        try:
            at = AppTest.from_file(app, default_timeout=args.timeout)
            t = time.perf_counter()
            at.run()
            st.nav_ms.append(1e3 * (time.perf_counter() - t))
            trained = False
            while time.time() < deadline:
                order = pages[:]
                rng.shuffle(order)
                if train and i == 0 and not trained:
                    order.sort(key=lambda p: p != "pages/training.py")
                for p in order:
                    if time.time() >= deadline:
                        break
                    t = time.perf_counter()
                    try:
                        at.switch_page(p).run()
                    except Exception as e:  # AppTest itself failed (not an exception element of the app)
                        msg = f"session {i} {p}: AppTest failed: {type(e).__name__}: {str(e)[:160]}"
                        (st.errors if "timed out" in str(e) else st.notes).append(msg)
                        at = AppTest.from_file(app, default_timeout=args.timeout)
                        continue
                    st.nav_ms.append(1e3 * (time.perf_counter() - t))
                    st.visits += 1
                    st.errors += [f"session {i} {p}: {e.value[:200]}" for e in at.exception]
                    if train and i == 0 and not trained and p == "pages/training.py":
                        trained = True
                        try:
                            btn = at.button(key="tr_start")
                            if not btn.proto.disabled:
                                btn.click().run()
                                st.training_started = True
                        except KeyError:
                            st.notes.append("no Start training button")
                    for _ in range(2):
                        ws = [w for k in kinds for w in getattr(at, k) if w.key and not w.proto.disabled
                              and w.key not in ("model",)]
                        if not ws:
                            break
                        w = rng.choice(ws)
                        try:
                            if w.type == "slider":
                                lo, hi = w.proto.min, w.proto.max
                                v = w.value
                                step = w.proto.step or 1
                                nv = min(hi, max(lo, v + rng.choice([-1, 1]) * step))
                                w.set_value(type(v)(nv))
                            else:  # select_slider / radio: a neighbouring option, by its real value
                                from streamlit.testing.v1.element_tree import Radio  # noqa: F401
                                md = at.session_state._state._state._new_widget_state.widget_metadata.get(w.id)
                                real = list(getattr(md.deserializer.__self__, "options", w.options))
                                j = real.index(w.value) if w.value in real else 0
                                w.set_value(real[min(len(real) - 1, max(0, j + rng.choice([-1, 1])))])
                        except Exception as e:  # a harness limitation, not an app error
                            st.notes.append(f"session {i}: could not set {w.key}: {e}")
                            continue
                        t = time.perf_counter()
                        try:
                            at.run()
                        except Exception as e:
                            msg = f"session {i} {p} after {w.key}: AppTest failed: {type(e).__name__}: {str(e)[:160]}"
                            (st.errors if "timed out" in str(e) else st.notes).append(msg)
                            break
                        st.knob_ms.append(1e3 * (time.perf_counter() - t))
                        st.knob_changes += 1
                        st.errors += [f"session {i} {p} after {w.key}: {e.value[:200]}" for e in at.exception]
        except Exception as e:  # AppTest internals (state lookups racing its script thread): not the app's
            st.notes.append(f"session {i}: harness stopped: {type(e).__name__}: {str(e)[:200]}")

    rng = random.Random(args.seed)
    sampler = Sampler(me)
    sampler.start()
    threads = [threading.Thread(target=worker, args=(i, random.Random(rng.random())), daemon=True)
               for i in range(args.sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.seconds + args.timeout + 60)
    res["wall_s"] = time.time() - t0
    res["server_cpu_s"] = cpu_seconds(me) - cpu0
    sampler.stop()
    res["rss_peak"] = sampler.peak
    res["rss_hwm"] = read_status(me).get("VmHWM", 0)
    res["tree_peak"] = dict(sampler.tree_peak)
    if train:  # stop the lab's run if it is still going (its owner is gone)
        try:
            from app.lab import session as lab_session
            mgr = lab_session.manager()
            if mgr.busy() is not None:
                mgr.cancel(mgr.busy())
        except Exception:
            pass
    time.sleep(args.settle)
    gc.collect()
    res["rss_after"] = read_status(me).get("VmRSS", 0)
    res["tree_after"] = read_tree(me)
    res["server_alive"] = True
    nav = [x for s in stats for x in s.nav_ms]
    knob = [x for s in stats for x in s.knob_ms]
    errors += [e for s in stats for e in s.errors]
    res.update(errors=len(errors), error_list=errors[:50], visits=sum(s.visits for s in stats), navigations=len(nav),
               knob_changes=len(knob), knob_noops=0, training_started=any(s.training_started for s in stats),
               nav_p50_ms=pct(nav, 0.5), nav_p95_ms=pct(nav, 0.95), nav_max_ms=max(nav) if nav else float("nan"),
               knob_p50_ms=pct(knob, 0.5), knob_p95_ms=pct(knob, 0.95), visits_per_session=[s.visits for s in stats],
               notes=[n for s in stats for n in s.notes][:30], loadavg_end=os.getloadavg(), session_ttl_s=0.0)
    return res


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def report(r: dict) -> str:
    back = r["rss_after"] <= r["rss_baseline"] * 1.10 + 64 * 2**20
    lines = [
        f"Eva load test: {r['sessions']} {'AppTest' if r.get('client') == 'apptest' else r.get('client', 'browser')} "
        f"sessions for "
        f"{r['seconds']:.0f} s "
        f"(pages: {', '.join(r['pages'])}; training run started: {'yes' if r['training_started'] else 'no'})",
        f"  errors                      {r['errors']}",
        f"  page visits / knob changes  {r['navigations']} / {r['knob_changes']} "
        f"({r['knob_noops']} knob presses without a rerun)",
        f"  page latency p50 / p95 / max {r['nav_p50_ms']:,.0f} / {r['nav_p95_ms']:,.0f} / {r['nav_max_ms']:,.0f} ms",
        f"  knob latency p50 / p95      {r['knob_p50_ms']:,.0f} / {r['knob_p95_ms']:,.0f} ms",
        f"  app opened (first run) p50 / p95 {r.get('first_p50_ms', float('nan')):,.0f} / "
        f"{r.get('first_p95_ms', float('nan')):,.0f} ms ({r.get('first_loads', '?')} of {r['sessions']} sessions)",
        f"  server CPU                  {r['server_cpu_s']:.0f} s over {r['wall_s']:.0f} s "
        f"({r['server_cpu_s'] / max(r['wall_s'], 1e-9):.2f} cores on average); machine: {r['cpus']} CPUs, load "
        f"average {r['loadavg_start'][0]:.1f} at start, {r['loadavg_end'][0]:.1f} at the end (browser + other jobs)",
        f"  server RSS start / baseline {mib(r['rss_start'])} / {mib(r['rss_baseline'])} (baseline = after a warm-up "
        "visit of every page)",
        f"  server RSS peak (VmHWM)     {mib(r['rss_peak'])} ({mib(r['rss_hwm'])})",
        f"  server RSS after close      {mib(r['rss_after'])} ({r['session_ttl_s']:.0f} s session TTL + settle): "
        + ("back to baseline (within 10% + 64 MiB)" if back else
           f"{mib(r['rss_after'] - r['rss_baseline'])} above baseline"),
    ]
    if "tree_peak" in r:
        b, pk, a = r["tree_baseline"], r["tree_peak"], r["tree_after"]
        lines += [
            f"  child processes RSS         {mib(b['children_rss'])} / {mib(pk['children_rss'])} / "
            f"{mib(a['children_rss'])} (baseline / peak / after; {a['children']} process(es) after: the training worker)",
            f"  server + children PSS       {mib(b['total_pss'])} / {mib(pk['total_pss'])} / {mib(a['total_pss'])} "
            "(baseline / peak / after: what a container limit counts, shared libraries once)",
        ]
    if r.get("notes"):
        lines.append(f"  harness notes (not app errors): {len(r['notes'])}, e.g. {r['notes'][0]}")
    if r["error_list"]:
        lines.append("  first errors:")
        lines += [f"    - {e}" for e in r["error_list"][:15]]
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--ramp", type=float, default=5.0, help="sessions start at random times within this many s")
    ap.add_argument("--timeout", type=float, default=180.0, help="per navigation / script run, seconds")
    ap.add_argument("--session-ttl", type=float, default=10.0,
                    help="server.disconnectedSessionTTL for this run (Streamlit's default is 120 s)")
    ap.add_argument("--settle", type=float, default=10.0, help="extra wait after the TTL before the last sample")
    ap.add_argument("--no-train", action="store_true", help="do not start a training run")
    ap.add_argument("--train-query", default="", help="URL query for the training run's knobs, e.g. "
                                                      "'tr_steps=25&tr_batch=2&tr_seq=16'")
    ap.add_argument("--count-hwm", action="store_true", help="report VmHWM (includes the warm-up) as the peak")
    ap.add_argument("--min-navigations", type=int, default=0,
                    help="browser client: each session keeps going past --seconds until it has navigated this often "
                         "(a smoke test that must not depend on the machine's speed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chromium", default=None)
    ap.add_argument("--json", default=None, help="also write the results as JSON to this file")
    ap.add_argument("--no-charts", action="store_true",
                    help="browser client: do not load the plotly chart component in the tabs (the server still builds "
                         "and sends every figure) — takes most of the browser's CPU off the shared cores")
    ap.add_argument("--client", choices=["browser", "apptest"], default="browser",
                    help="browser: Playwright contexts against a live server (default); apptest: AppTest sessions "
                         "in threads of this process (server-side contention without a browser on the same cores)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    res = apptest_load(args) if args.client == "apptest" else asyncio.run(main_async(args))
    print(report(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    r = main()
    sys.exit(1 if r["errors"] else 0)
