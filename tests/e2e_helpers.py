"""What the browser tests (tests/test_e2e_*.py) share: the live server (one for the session) and Debian's Chromium
(one a module), registered as the `server` and `browser` fixtures in tests/conftest.py; the waits and the screenshots.

Never runs `playwright install`: it launches the system Chromium (`apt-get install -y chromium`). Without Chromium
(or the playwright package) a browser test is skipped locally and FAILS when the CI environment variable is set.

Why one server for the session: starting `streamlit run` and its first, cold page (the torch imports) costs tens of
seconds on a 2-core CI machine, and every browser test opens its own pages and sessions on it anyway.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest
from apptest_helpers import HANG_S
from live_server import LiveServer

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "artifacts" / "screenshots"
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
CHART = ".js-plotly-plot"
CHROMIUM_ARGS = ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOAD_TIMEOUT_MS = int(HANG_S * 1000)  # browser waits end when their condition holds; this catches hangs


def missing(reason: str):
    """Skip for a missing browser dependency locally; fail in CI, where it is required."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


def live_server():
    """Generator behind the `server` fixture: a headless Streamlit server on a free port; yields its base URL."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            live = stack.enter_context(LiveServer(log_path=SHOTS.parent / "e2e-server.log", start_timeout=HANG_S))
        except RuntimeError as e:
            pytest.fail(str(e))
        yield live.base


def chromium():
    """Generator behind the `browser` fixture: Debian's Chromium through Playwright; yields the Browser."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright Python package is not installed")
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chrome:
        missing("Debian's chromium is not installed (apt-get install -y chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chrome, args=CHROMIUM_ARGS)
        yield b
        b.close()


def wait_ready(page, charts: bool = True) -> None:
    page.wait_for_selector(IDLE, timeout=LOAD_TIMEOUT_MS)
    if charts:
        page.wait_for_selector(CHART, timeout=LOAD_TIMEOUT_MS)
    page.wait_for_timeout(500)
    page.wait_for_selector(IDLE, timeout=LOAD_TIMEOUT_MS)


def full_screenshot(page, path: Path, width: int) -> None:
    """Streamlit scrolls an inner container: grow the viewport to the content height for a full picture."""
    h = page.evaluate("() => (document.querySelector('[data-testid=\"stMain\"]') || document.body).scrollHeight")
    page.set_viewport_size({"width": width, "height": max(1000, min(int(h) + 50, 12000))})
    page.wait_for_timeout(400)
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": width, "height": 1000})
