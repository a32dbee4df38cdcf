"""App latency benchmark: server-side rerun time after knob changes, first render per page, memory of 5 sessions.

    python bench/app_latency.py [--repeats 1] [--no-memory]

Reruns are driven with Streamlit's AppTest (the same script runner the server uses, in this process): for every
page it opens a fresh session on the page, then changes one knob at a time through a fixed script of values
(each knob to two other values and back to its default) and times each rerun. The first change to a value misses
the caches and computes; going back to the default hits them — the mix a user produces by moving knobs.
AppTest wall time includes ~10-30 ms of test-harness overhead (thread start, element-tree parsing), so the
numbers are an upper bound on the server's script time.

First render: a new session's first run of each page, (a) in a cold process (imports, torch, empty caches — what
the first visitor after a restart waits) and (b) once the server is warm (another session already rendered the
page with default knobs: caches hot).

Memory: a live `streamlit run` server with five Chromium sessions (Debian's chromium via Playwright) that each open
every page; reports the server's RSS before and after. Without chromium, five AppTest sessions in this process.

Prints one table. No pass/fail: targets (issue 5) are median <= 250 ms, p95 <= 500 ms on non-training pages,
first render <= 3 s when warm.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "streamlit_app.py")
sys.path.insert(0, str(ROOT))
from tests.live_server import LiveServer  # noqa: E402

# page -> list of (widget kind, key, values to visit in order; the last one is the default)
SCRIPTS = {
    "pages/overview.py": [
        ("select_slider", "ov_ctx", [8192, 1048576, 131072]),
        ("radio", "ov_kvdt", ["fp8", "fp32", "bf16"]),
        ("number_input", "ov_num_hidden_layers", [30, 90, None]),
        ("number_input", "ov_n_routed_experts", [128, 512, None]),
        ("selectbox", "model", ["deepseek-v2", "mini", "deepseek-v3"]),
    ],
    "pages/mla.py": [
        ("select_slider", "mla_ctx", [32768, 1048576, 131072]),
        ("select_slider", "mla_batch", [8, 64, 1]),
        ("radio", "mla_dtype", ["fp8", "fp32", "bf16"]),
        ("select_slider", "mla_gpus", [16, 4, 8]),
        ("slider", "mla_groups", [16, 4, 8]),
        ("slider", "mla_layers", [30, 90, 61]),
        ("select_slider", "mla_dc", [256, 1024, 512]),
        ("select_slider", "mla_rope", [32, 128, 64]),
        ("slider", "mla_head", [3, 5, 0]),
        ("toggle", "mla_log", [False, True]),
    ],
    "pages/moe.py": [
        ("select_slider", "moe_cf", [2.0, 1.0, 1.25]),
        ("radio", "moe_strategy", ["both", "none", "aux_free"]),
        ("select_slider", "moe_scale", [1.0, 16.0, 2.5]),
        ("slider", "moe_shared", [2, 0, 1]),
        ("select_slider", "moe_alpha", [1e-3, 1e-1, 1e-2]),
        ("slider", "moe_topk", [6, 4, 8]),
        ("select_slider", "moe_gamma", [1e-3, 3e-2, 1e-2]),
        ("select_slider", "moe_experts", [64, 128, 256]),
    ],
    "pages/fp8.py": [
        ("radio", "fp8_fmt", ["e5m2", "bf16", "e4m3"]),
        ("selectbox", "fp8_gran", ["tile", "mx", "tensor"]),
        ("radio", "fp8_over", ["nan", "saturate"]),
        ("selectbox", "fp8_data", ["gaussian", "heavy_tail", "outliers"]),
        ("slider", "fp8_och", [16, 1, 4]),
        ("select_slider", "fp8_osz", [1e5, 1e3, 1e4]),
        ("select_slider", "fp8_hist", [4, 64, 16]),
        ("slider", "fp8_accbits", [10, 16, 13]),
        ("select_slider", "fp8_nc", [32, 512, 128]),
        ("number_input", "fp8_val", [1000.0, 0.001, 3.14159]),
    ],
}


def _apptest():
    from streamlit.testing.v1 import AppTest
    return AppTest


def open_session(page: str):
    at = _apptest().from_file(APP, default_timeout=600)
    at.switch_page(page)
    t0 = time.perf_counter()
    at.run()
    return at, time.perf_counter() - t0


def rerun_times(page: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        at, _ = open_session(page)
        for kind, key, values in SCRIPTS[page]:
            for v in values:
                getattr(at, kind)(key=key).set_value(v)
                t0 = time.perf_counter()
                at.run()
                times.append(time.perf_counter() - t0)
                if at.exception:
                    raise RuntimeError(f"{page} {key}={v}: {at.exception[0].value}")
    return times


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_live_server(n_sessions: int = 5) -> tuple[float, float, str]:
    """RSS of a live server before and after n browser sessions opened every page."""
    chrome = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chrome = None
    if not chrome:
        return memory_apptest(n_sessions)
    idle = "[data-testid='stApp'][data-test-script-state='notRunning']"
    with LiveServer() as server:
        base = server.base
        before = rss_mib(server.pid)
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=chrome, args=["--disable-background-networking",
                                                                "--disable-component-update", "--disable-sync"])
            pages = []
            for _ in range(n_sessions):
                pg = b.new_page()
                for path in ("/", "/mla", "/moe", "/fp8"):
                    pg.goto(base + path)
                    pg.wait_for_selector(idle, timeout=300_000)
                    pg.wait_for_selector(".js-plotly-plot", timeout=60_000)
                pages.append(pg)  # keep the five sessions open
            time.sleep(1)
            after = rss_mib(server.pid)
            b.close()
        return before, after, f"live server, {n_sessions} Chromium sessions × 4 pages"


def memory_apptest(n_sessions: int = 5) -> tuple[float, float, str]:
    before = rss_mib(os.getpid())
    keep = []
    for _ in range(n_sessions):
        for page in SCRIPTS:
            keep.append(open_session(page)[0])
    return before, rss_mib(os.getpid()), f"{n_sessions} AppTest sessions × 4 pages in this process"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1, help="times each page's knob script is replayed")
    ap.add_argument("--no-memory", action="store_true")
    a = ap.parse_args()
    from importlib.metadata import version  # not `import torch`: the cold first render must pay for it

    print(f"# Eva app latency — python {sys.version.split()[0]}, torch {version('torch')}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    cold = {}
    for page in SCRIPTS:  # cold: first session to open this page in this process (imports + empty caches)
        _, cold[page] = open_session(page)
    warm = {page: open_session(page)[1] for page in SCRIPTS}
    rows = []
    for page in SCRIPTS:
        ts = rerun_times(page, a.repeats)
        rows.append((page, len(ts), statistics.median(ts), pct(ts, 0.95), max(ts), cold[page], warm[page]))
    print()
    print(f"{'page':<20} {'reruns':>6} {'median ms':>10} {'p95 ms':>8} {'max ms':>8} {'first cold s':>13} "
          f"{'first warm s':>13}")
    for page, n, med, p95, mx, c, w in rows:
        print(f"{page:<20} {n:>6} {1e3 * med:>10.0f} {1e3 * p95:>8.0f} {1e3 * mx:>8.0f} {c:>13.2f} {w:>13.2f}")
    print("targets: median <= 250 ms, p95 <= 500 ms (non-training pages); first render <= 3 s once warm")
    if not a.no_memory:
        before, after, how = memory_live_server(5)
        print(f"\nmemory ({how}): server RSS {before:.0f} MiB idle -> {after:.0f} MiB "
              f"(+{after - before:.0f} MiB)")


if __name__ == "__main__":
    main()
