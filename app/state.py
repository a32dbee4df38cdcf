"""URL-bound knobs: every control is keyed and bound to the query string, so a copied link reproduces the view.

Streamlit (>= 1.55) syncs a widget created with ``key=... , bind="query-params"`` with ``?key=value``:
the URL seeds the widget on first load, the default value is dropped from the URL, and an invalid value is
silently ignored and removed (1.67: `SessionState._seed_widget_from_url`). This module adds what Streamlit
does not do:

* a visible note when a URL value was rejected (the knob falls back to its default; the note says which knob,
  which value and what is shown instead) — collected here and shown at the top of the page;
* knobs whose default follows the sidebar's model (e.g. the latent dim defaults to the preset's
  ``kv_lora_rank``): when the model changes the knob is reset to the new model's value, so the URL (which omits
  defaults) stays a faithful description of what is on screen.

Knob keys are short, stable identifiers: they are the query-parameter names of the shareable link.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import streamlit as st

_NOTES = "_eva_url_notes"        # key -> (message, value shown) ; shown until that knob changes
_BASES = "_eva_knob_bases"       # key -> model id the knob's default was taken from

_slot_holder: dict[str, Any] = {}


# ---------------------------------------------------------------- notes
def note_slot() -> None:
    """Create the container (top of the main area) where URL fallback notes are written. Call once per run,
    in the entry point before ``pg.run()``."""
    _slot_holder["slot"] = st.container()


def _notes() -> dict:
    return st.session_state.setdefault(_NOTES, {})


def add_note(key: str, message: str, shown_value: Any) -> None:
    _notes()[key] = (message, shown_value)


def flush_notes() -> None:
    """Write the pending URL notes into the slot. A note disappears once its knob is changed by the user."""
    notes = _notes()
    for key in list(notes):
        if key in st.session_state and st.session_state[key] != notes[key][1]:
            del notes[key]
    slot = _slot_holder.get("slot")
    if not notes or slot is None:
        return
    with slot:
        for key, (msg, _) in notes.items():
            st.warning(msg, icon=":material/link_off:")


# ---------------------------------------------------------------- value matching
def _matches(raw: str, value: Any, fmt: Callable[[Any], str]) -> bool:
    """Did the widget take the URL value `raw`? (False -> Streamlit rejected it and fell back.)"""
    if isinstance(value, bool):
        return raw.strip().lower() == str(value).lower()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            r = float(raw)
        except ValueError:
            return fmt(value) == raw
        return math.isclose(r, float(value), rel_tol=1e-9, abs_tol=1e-12)
    if value is None:
        return raw == ""
    return fmt(value) == raw


def _prepare(key: str, default: Any, follow: str | None) -> tuple[bool, str | None]:
    """Reset a model-following knob when the model changed; report (first render?, raw URL value)."""
    bases = st.session_state.setdefault(_BASES, {})
    if follow is not None:
        if key in st.session_state and bases.get(key) not in (None, follow):
            st.session_state[key] = default
            _notes().pop(key, None)
        bases[key] = follow
    first = key not in st.session_state
    raw = None
    if first and key in st.query_params:
        raw = st.query_params.get(key)
    return first, raw


def _after(key: str, label: str, raw: str | None, value: Any, fmt: Callable[[Any], str],
           invalid_hint: str | None = None) -> None:
    if raw is None or _matches(raw, value, fmt):
        return
    shown = "empty" if value is None else fmt(value)
    msg = (f"The link set **{label}** to `{raw}`, which is not a valid value here"
           f"{' (' + invalid_hint + ')' if invalid_hint else ''}; showing the default (**{shown}**) instead.")
    add_note(key, msg, value)


# ---------------------------------------------------------------- knobs
def _where(container):
    return container if container is not None else st


def slider(label: str, key: str, min_value, max_value, default, *, step=None, follow: str | None = None,
           help: str | None = None, container=None, fmt: Callable[[Any], str] = str, **kw):
    """``st.slider`` bound to ``?key=``."""
    first, raw = _prepare(key, default, follow)
    v = _where(container).slider(label, min_value=min_value, max_value=max_value, value=default, step=step,
                                 key=key, bind="query-params", help=help, **kw)
    _after(key, label, raw, v, str, f"allowed {min_value}…{max_value}")
    return v


def select_slider(label: str, key: str, options: Sequence, default, *, follow: str | None = None,
                  fmt: Callable[[Any], str] = str, help: str | None = None, container=None, **kw):
    """``st.select_slider`` bound to ``?key=`` (the URL holds the option's label ``fmt(option)``)."""
    options = list(options)
    if default not in options:  # a model value outside the option grid: add it, sorted
        options = sorted({*options, default})
    first, raw = _prepare(key, default, follow)
    if key in st.session_state and st.session_state[key] not in options:
        st.session_state[key] = default
    v = _where(container).select_slider(label, options=options, value=default, format_func=fmt, key=key,
                                        bind="query-params", help=help, **kw)
    _after(key, label, raw, v, fmt, "choose one of " + ", ".join(fmt(o) for o in options[:8])
           + ("…" if len(options) > 8 else ""))
    return v


def selectbox(label: str, key: str, options: Sequence, default, *, follow: str | None = None,
              fmt: Callable[[Any], str] = str, help: str | None = None, container=None,
              invalid_hint: str | None = None, **kw):
    """``st.selectbox`` bound to ``?key=`` (the URL holds ``fmt(option)``)."""
    options = list(options)
    first, raw = _prepare(key, default, follow)
    if key in st.session_state and st.session_state[key] not in options:
        st.session_state[key] = default
    v = _where(container).selectbox(label, options=options, index=options.index(default), format_func=fmt,
                                    key=key, bind="query-params", help=help, **kw)
    _after(key, label, raw, v, fmt, invalid_hint or ("choose one of " + ", ".join(fmt(o) for o in options)))
    return v


def radio(label: str, key: str, options: Sequence, default, *, fmt: Callable[[Any], str] = str,
          help: str | None = None, container=None, horizontal: bool = True, follow: str | None = None, **kw):
    """``st.radio`` bound to ``?key=``."""
    options = list(options)
    first, raw = _prepare(key, default, follow)
    v = _where(container).radio(label, options=options, index=options.index(default), format_func=fmt, key=key,
                                bind="query-params", help=help, horizontal=horizontal, **kw)
    _after(key, label, raw, v, fmt, "choose one of " + ", ".join(fmt(o) for o in options))
    return v


def toggle(label: str, key: str, default: bool = False, *, help: str | None = None, container=None, **kw):
    """``st.toggle`` bound to ``?key=true|false``."""
    first, raw = _prepare(key, default, None)
    v = _where(container).toggle(label, value=default, key=key, bind="query-params", help=help, **kw)
    _after(key, label, raw, v, str, "use true or false")
    return v


def number(label: str, key: str, default, *, min_value=None, max_value=None, step=None, follow: str | None = None,
           help: str | None = None, container=None, placeholder: str | None = None, fmt: Callable[[Any], str] = str,
           **kw):
    """``st.number_input`` bound to ``?key=``; ``default=None`` gives an empty box ("use the model's value")."""
    first, raw = _prepare(key, default, follow)
    v = _where(container).number_input(label, min_value=min_value, max_value=max_value, value=default, step=step,
                                       key=key, bind="query-params", help=help, placeholder=placeholder, **kw)
    hint = None
    if min_value is not None or max_value is not None:
        hint = f"allowed {min_value if min_value is not None else '−∞'}…{max_value if max_value is not None else '∞'}"
    _after(key, label, raw, v, fmt, hint)
    return v
