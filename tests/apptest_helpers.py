"""Opening the app in AppTest the way a browser does: through the entry point (st.navigation), at a page, with
URL parameters. Shared by the AppTest modules (every one imports this module, which also makes a fresh AppTest's first
run cheap: see `_scan_component_packages_once`)."""
from __future__ import annotations

import functools
import os
from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
# Seconds any single wait in the tests may take before it counts as a hang: AppTest runs, polls for a condition, worker
# processes, subprocesses, browser waits. Generous on purpose: no test may depend on how fast a loaded machine is
# (2 cores shared with other processes); a wait ends as soon as its condition holds, so this never slows a pass.
HANG_S = float(os.environ.get("EVA_TEST_HANG_S", 600))
APP = str(ROOT / "streamlit_app.py")  # Streamlit 1.67 resolves relative page paths against this file


def _scan_component_packages_once() -> None:
    """The first run of every new AppTest scans the metadata of every installed distribution for Streamlit component
    manifests (streamlit/testing/v1/app_test.py `_run` -> BidiComponentManager.discover_and_register_components ->
    components/v2/manifest_scanner.py `scan_component_manifests`): ~0.5 s with this machine's ~780 distributions,
    most of what opening a page in a fresh session costs, and the suite opens hundreds. The installed packages do not
    change during a test session: scan once and give every AppTest the same (read-only) list. A Streamlit without
    this private function (requirements.txt pins 1.67.0) keeps its own scan: slower tests, same results."""
    try:
        from streamlit.components.v2 import manifest_scanner
        scan = manifest_scanner.scan_component_manifests
    except (ImportError, AttributeError):
        return
    if getattr(scan, "eva_once", False):
        return
    first = functools.cache(scan)

    @functools.wraps(scan)
    def once(max_workers: int | None = None):
        return list(first())  # (the worker count only changes how fast the same list is found)

    once.eva_once = True
    manifest_scanner.scan_component_manifests = once


_scan_component_packages_once()


def open_page(page: str, query: dict | None = None, timeout: float = HANG_S) -> AppTest:
    """A fresh session opening `page` directly (like pasting its URL) with `query` as the URL's parameters.

    The page's url_path equals its file stem, so AppTest can route to it before the first run."""
    at = AppTest.from_file(APP, default_timeout=timeout)
    if query:
        at.query_params.update(query)
    at.switch_page(page)
    return at.run()


WIDGET_KINDS = ("select_slider", "slider", "radio", "selectbox", "number_input", "toggle")


def widget(at: AppTest, key: str, kinds: tuple[str, ...] = WIDGET_KINDS):
    """The knob with `key`, whatever its widget kind."""
    for kind in kinds:
        try:
            return getattr(at, kind)(key=key)
        except KeyError:
            continue
    raise KeyError(key)
