"""Browser end-to-end test of the training lab: a short run in Debian's Chromium, the loss curve growing while it
runs, screenshots before / during / after into artifacts/screenshots/, and the lessons page opening a dashboard.

On the session's live server and Chromium, shared with tests/test_e2e_browser.py (the `server` and `browser` fixtures,
tests/e2e_helpers.py): skipped locally without Chromium, FAILS when the CI variable is set.

`EVA_E2E_DEFAULT_RUN=1` adds the done-when measurement: the lab's *default* run (`APP_DEFAULT.steps`) in the live app —
seconds from the click to the first point on the curve and to the end of the run (printed; ≤ 1 s and ≤ 30 s are
the targets on 2 cores).
"""
from __future__ import annotations

import os
import time

import pytest
from apptest_helpers import HANG_S
from e2e_helpers import LOAD_TIMEOUT_MS, SHOTS, full_screenshot, wait_ready

from app.lab.charts import TRAIN_SERIES
from core.train import APP_DEFAULT

EXC = "[data-testid='stException']"
STEPS = 50  # a Steps option of the lab
# Points of the lab's loss curve: the Vega-Lite chart whose title says the loss falls; the train-loss series (one
# point per recorded step) as Vega drew it: its SVG renderer keeps each mark's scene item, with the item's datum and
# the line's items, on the element (`__data__`).
_POINTS_JS = """() => {
  for (const c of document.querySelectorAll('[data-testid="stVegaLiteChart"]')) {
    const title = [...c.querySelectorAll('g.role-title text')].map(t => t.textContent).join(' ');
    if (!title.includes('loss falls')) continue;
    for (const p of c.querySelectorAll('g.mark-line path')) {
      const item = p.__data__;
      if (item && item.datum && item.datum.series === '%s') return item.mark.items.length;
    }
  }
  return 0;
}""" % TRAIN_SERIES


def _points(page) -> int:
    return int(page.evaluate(_POINTS_JS))


def _start(page) -> float:
    page.get_by_role("button", name="Start training").click()
    return time.perf_counter()


def _wait_points(page, n: int, timeout_s: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if _points(page) >= n:
            return time.perf_counter()
        page.wait_for_timeout(50)
    raise AssertionError(f"the loss curve did not reach {n} points in {timeout_s} s (has {_points(page)})")


def _wait_results(page, timeout_s: float) -> float:
    page.get_by_role("heading", name="Compare runs").wait_for(timeout=timeout_s * 1000)
    return time.perf_counter()


def test_short_run_curve_grows_in_chromium(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server + f"/training?tr_steps={STEPS}&tr_batch=4&tr_seq=32")
    wait_ready(page)
    assert page.locator(EXC).count() == 0
    full_screenshot(page, SHOTS / "training-0-before.png", 1400)
    t_click = _start(page)
    t_first = _wait_points(page, 1, HANG_S)
    n1 = _points(page)
    _wait_points(page, min(n1 + 10, STEPS), HANG_S)
    page.screenshot(path=str(SHOTS / "training-1-during.png"))
    progress = page.locator("[data-testid='stProgress']").first.inner_text()
    stop_buttons = page.locator(".st-key-tr_stop button").count()  # (the toolbar's "Stop" is Streamlit's own)
    n2 = _points(page)
    assert n2 > n1 or n1 == STEPS, "the curve grows while the run is going"
    if n2 < STEPS:  # still running (a fast machine may already be done)
        assert stop_buttons == 1
        assert "tokens/s" in progress and "left" in progress, progress
    _wait_results(page, HANG_S)
    wait_ready(page)
    assert _points(page) == STEPS
    assert page.locator(EXC).count() == 0
    assert page.get_by_text("MTP draft acceptance").count() >= 1
    full_screenshot(page, SHOTS / "training-2-after.png", 1400)
    print(f"\nshort run ({STEPS} × 4 × 32): first point {t_first - t_click:.2f} s after the click")
    page.close()


def test_lesson_button_opens_dashboard_with_knobs(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    # visit the dashboard first and move a knob: the lesson must open it with the step's own knobs only
    page.goto(server + "/overview?ov_ctx=4K")
    wait_ready(page)
    page.goto(server + "/lessons?ls_sec=Scale+and+deployment&ls_step=4")
    wait_ready(page)
    page.get_by_role("button", name="Open Overview with these knobs").click()
    # the Overview is the default page: its URL is "/" (or /overview)
    page.wait_for_function("() => !location.pathname.endsWith('/lessons')", timeout=LOAD_TIMEOUT_MS)
    wait_ready(page)
    assert page.locator(EXC).count() == 0
    assert page.get_by_role("heading", name="Overview — how big is DeepSeek-V3, really?").count() == 1
    for part in ("model=deepseek-v2", "lesson=true"):  # shared sidebar knobs, set in this session
        assert part in page.url, page.url
    assert "ov_ctx" not in page.url, "the step leaves the context at its default, not the earlier 4K"
    assert page.locator(".st-key-lesson input").is_checked()
    sidebar = page.get_by_test_id("stSidebar")
    back = sidebar.get_by_text("Back to the lesson", exact=True)
    assert back.count() == 1
    assert sidebar.get_by_text("Scale and deployment, step 4: DeepSeek-V2 for comparison").count() == 1
    back.click()
    page.wait_for_function("() => location.pathname.endsWith('/lessons')", timeout=LOAD_TIMEOUT_MS)
    wait_ready(page)
    assert page.get_by_role("heading", name="4. DeepSeek-V2 for comparison").count() == 1
    page.close()


@pytest.mark.skipif(not os.environ.get("EVA_E2E_DEFAULT_RUN"), reason="set EVA_E2E_DEFAULT_RUN=1 to measure")
def test_default_run_timing(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    t0 = time.perf_counter()
    while True:  # a user reads the page first: measure with the worker process loaded (cold start: see below)
        page.goto(server + "/training")
        wait_ready(page)
        if page.get_by_text("still loading PyTorch").count() == 0 or time.perf_counter() - t0 > 120:
            break
        page.wait_for_timeout(1000)
    t_click = _start(page)
    t_first = _wait_points(page, 1, 30)
    _wait_points(page, APP_DEFAULT.steps, 400)
    t_last = time.perf_counter()
    _wait_results(page, 60)
    t_results = time.perf_counter()
    load = os.getloadavg()
    d = APP_DEFAULT
    print(f"\ndefault lab run ({d.steps} × {d.batch_size} × {d.seq_len}): first point {t_first - t_click:.2f} s, last point "
          f"{t_last - t_click:.1f} s, results shown {t_results - t_click:.1f} s after the click; "
          f"load average {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} cores")
    full_screenshot(page, SHOTS / "training-default-after.png", 1400)
    page.close()


def _trained(page) -> int:
    """The number of runs the server says it has trained (the lab's sidebar caption)."""
    import re
    text = page.get_by_test_id("stSidebar").get_by_text("This server has trained").first.inner_text()
    return int(re.search(r"has trained (\d+) run", text).group(1))


def test_share_link_opens_stored_results_in_a_fresh_browser_without_training(server, browser):
    """Issue 17: finish a run, copy its share link, open it in a fresh browser context: the loss curve and the
    results show, and the server submits no training job (its count of trained runs stays the same). The time to
    results is printed (target: within 3 s), not asserted."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server + "/training?tr_steps=25&tr_batch=4&tr_seq=32&tr_lr=0.01")  # knobs no other test trains
    wait_ready(page)
    _start(page)
    _wait_results(page, 180)
    wait_ready(page)
    page.get_by_text("Links to this run").click()
    link = page.get_by_test_id("stCode").filter(has_text="runs=").first.inner_text().strip()
    assert link.startswith("http") and "tr_steps=25" in link, link
    trained = _trained(page)
    assert trained >= 1
    page.close()

    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})  # a colleague: no cookies, no session
    fresh = ctx.new_page()
    t0 = time.perf_counter()
    fresh.goto(link)
    _wait_results(fresh, 60)
    _wait_points(fresh, 25, 60)
    t_results = time.perf_counter() - t0
    wait_ready(fresh, charts=False)  # (no plotly chart yet: the router charts render on demand)
    assert fresh.locator(EXC).count() == 0
    assert fresh.get_by_text("Stored run").count() >= 1
    assert fresh.get_by_text("MTP draft acceptance").count() >= 1
    assert fresh.locator(".st-key-tr_stop button").count() == 0, "no run is training for this tab"
    assert _trained(fresh) == trained, "opening the link submitted no training job"
    full_screenshot(fresh, SHOTS / "training-3-stored-link.png", 1400)
    # the router charts: one click away, drawn then (MaxVio, the two step heatmaps, the domain matrix)
    t1 = time.perf_counter()
    fresh.get_by_text("Router charts").click()
    fresh.wait_for_function("() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= 4 * 3",
                            timeout=LOAD_TIMEOUT_MS)
    t_router = time.perf_counter() - t1
    wait_ready(fresh)
    assert fresh.locator(EXC).count() == 0
    assert fresh.get_by_text("MaxVio goes from").count() >= 1
    full_screenshot(fresh, SHOTS / "training-4-stored-link-router.png", 1400)
    load = os.getloadavg()
    print(f"\nshare link in a fresh context: loss curve and results shown {t_results:.2f} s after goto; router charts "
          f"{t_router:.2f} s after opening them; load average {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} cores")
    ctx.close()
