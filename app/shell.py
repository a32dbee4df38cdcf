"""Make sure every page runs inside the entry point (navigation, shared sidebar, URL notes).

Streamlit 1.67 still honours the legacy `pages/` folder: while no session of the server has called
`st.navigation` yet, `PagesManager.uses_pages_directory` is True and a request for `/mla` runs `pages/mla.py`
*directly*, without `streamlit_app.py` — no shared sidebar, no URL notes (streamlit/runtime/scriptrunner/
script_runner.py `_mpa_v1`). That happens for the first visitor of a freshly started server who opens a shared
link to a page, and in every `AppTest` run after a page switch (AppTest resets the flag per run).

Fix, with public API only: the entry point runs the page inside `entered()`; a page calls `require()` first. If
the page was started without the entry point, `require()` calls `st.navigation` (which switches the legacy
mode off for the whole server) and `st.rerun()`s: the rerun goes through the entry point, on the same page
and with the same URL parameters (no widget has been created yet, so URL-bound knobs still seed from the link).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import streamlit as st

_local = threading.local()


@contextmanager
def entered():
    """Mark the current script run as running inside the entry point."""
    prev = getattr(_local, "active", False)
    _local.active = True
    try:
        yield
    finally:
        _local.active = prev


def navigation():
    from app.pages import PAGES
    return st.navigation([st.Page(p.path, title=p.title, icon=p.icon, url_path=p.url_path, default=p.default)
                          for p in PAGES])


def require() -> None:
    """Call first in every page script: rerun through the entry point if it was bypassed."""
    if getattr(_local, "active", False):
        return
    navigation()  # public st.navigation: turns off the legacy pages/ folder mode for the server
    st.rerun()
