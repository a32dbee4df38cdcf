"""URL-bound knobs: every control is keyed and bound to the query string, so a copied link reproduces the view.

Streamlit (>= 1.55) syncs a widget created with ``key=... , bind="query-params"`` with ``?key=value``:
the URL seeds the widget on first load, the default value is dropped from the URL, and an invalid value is
silently ignored and removed (1.67: `SessionState._seed_widget_from_url`). This module adds what Streamlit
does not do:

* a visible note when a URL value was rejected (the knob falls back to its default; the note says which knob,
  which value and what is shown instead) — collected here and shown at the top of the page;
* knobs whose default follows the sidebar's model (e.g. the latent dim defaults to the preset's
  ``kv_lora_rank``): when the model changes the knob is reset to the new model's value, so the URL (which omits
  defaults) stays a faithful description of what is on screen;
* knobs whose range or options depend on another knob or on the model (the MLA heatmap's head on the heads, a
  lesson's step on its section, the preset list on an upload, ...): every widget here goes through `_fit`, which
  clamps (numbers) or resets (other options) a carried value — from session state or a stale ``?key=`` — that the
  current range no longer holds, with the same visible note. Streamlit would raise instead
  (``StreamlitValueAboveMaxError``), or keep an out-of-range value that raises at the next interaction.

Knob keys are short, stable identifiers: they are the query-parameter names of the shareable link.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import streamlit as st

_NOTES = "_eva_url_notes"        # key -> (message, value shown) ; shown until that knob changes
_BASES = "_eva_knob_bases"       # key -> (model id the knob's default was taken from, that default)

_run = threading.local()  # per script run (each session's script runs in its own thread): slot + placeholders


# ---------------------------------------------------------------- notes
def note_slot() -> None:
    """Create the container (top of the main area) where URL fallback notes are written, and show the notes
    kept from earlier runs whose knob still holds the fallback value. Call once per run, in the entry point
    before ``pg.run()``.

    Notes are written as soon as they arise (not at the end of the run), so a page that stops early with
    ``st.stop()`` after an impossible combination still shows them."""
    _run.slot = st.container()
    _run.shown = {}
    notes = _notes()
    for key in list(notes):
        # A knob the user changed since, or one that is not on this page (another page's knob): forget the note.
        if key not in st.session_state or st.session_state[key] != notes[key][1]:
            del notes[key]
        else:
            _show(key, notes[key][0])


def _notes() -> dict:
    return st.session_state.setdefault(_NOTES, {})


def _show(key: str, message: str) -> None:
    slot = getattr(_run, "slot", None)
    if slot is None:
        return
    ph = _run.shown.get(key)
    if ph is None:
        ph = _run.shown[key] = slot.empty()
    ph.warning(message, icon=":material/link_off:")


def add_note(key: str, message: str, shown_value: Any) -> None:
    """Record and show a note for knob `key`; it stays (across reruns) until the knob leaves `shown_value`."""
    _notes()[key] = (message, shown_value)
    _show(key, message)


def drop_note(key: str) -> None:
    _notes().pop(key, None)
    ph = getattr(_run, "shown", {}).pop(key, None)
    if ph is not None:
        ph.empty()


def flush_notes() -> None:
    """End of run (called from a ``finally``, possibly after ``st.stop()``): forget this run's slot. Writes no
    element, so it is safe after a stop."""
    _run.slot = None
    _run.shown = {}


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


def _prepare(key: str, default: Any, follow: str | None, label: str = "",
             fmt: Callable[[Any], str] = str) -> tuple[bool, str | None]:
    """Reset a model-following knob when the model changed (with a note when the user had moved it off the previous
    model's value: their choice is dropped); report (first render?, raw URL value)."""
    bases = st.session_state.setdefault(_BASES, {})
    if follow is not None:
        base, old_default = bases.get(key, (None, None))
        if key in st.session_state and base not in (None, follow):
            old = st.session_state[key]
            st.session_state[key] = default
            _forget_seed(key)
            drop_note(key)
            if old != old_default and old != default:
                add_note(key, f"**{label}** was **{fmt(old)}**; the model changed, so it shows the new model's "
                              f"value (**{fmt(default)}**).", default)
        bases[key] = (follow, default)
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
    add_note(key, _fallback_msg(label, raw, shown, invalid_hint), value)


_MAX_SHOWN = 40  # characters of a rejected URL value quoted in the note (a link may carry kilobytes)


def _fallback_msg(label: str, raw: str, shown: str, invalid_hint: str | None) -> str:
    r = raw if len(raw) <= _MAX_SHOWN else raw[:_MAX_SHOWN] + f"… ({len(raw):,} characters)"
    r = r.replace("`", "'")
    quoted = f"`{r}`" if r.strip() else "an empty value"
    return (f"The link set **{label}** to {quoted}, which is not a valid value here"
            f"{' (' + invalid_hint + ')' if invalid_hint else ''}; showing the default (**{shown}**) instead.")


def _forget_url_value(key: str) -> None:
    """Remove ``?key=`` from the URL *and* from the values Streamlit seeds widgets with on this load."""
    if key in st.query_params:
        del st.query_params[key]
    _forget_seed(key)


def _forget_seed(key: str) -> None:
    """Remove ``?key=`` from the values Streamlit seeds widgets with on this run (the URL itself follows the widget).

    Deleting from ``st.query_params`` alone is not enough (and is refused once the widget is bound): a widget seeds
    from the query string the run started with (1.67: ``QueryParams._initial_query_params``), which has no public
    setter. The private access is guarded: if a later Streamlit renames it, this degrades to nothing
    (tests/test_fuzz_app.py and tests/test_knob_ranges.py would notice)."""
    try:
        from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx
        ctx = get_script_run_ctx()
        if ctx is not None:
            with ctx.session_state.query_params() as qp:
                qp._initial_query_params.pop(key, None)
    except Exception:  # pragma: no cover - internal layout changed
        pass


def _non_finite(raw: str) -> bool:
    try:
        return not math.isfinite(float(raw))
    except (TypeError, ValueError, OverflowError):
        return False


# ---------------------------------------------------------------- ranges that move
def _nearest(options: Sequence, value: Any, default: Any) -> Any:
    """The option a value that left the options becomes: the nearest one when both are numbers, else the default."""
    nums = [o for o in options if isinstance(o, (int, float)) and not isinstance(o, bool)]
    if nums and len(nums) == len(options) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return min(nums, key=lambda o: (abs(o - value), o))
    return default


def _fit(key: str, label: str, allowed: Callable[[Any], bool], repair: Callable[[Any], Any], rule: str,
         fmt: Callable[[Any], str] = str) -> None:
    """Before a knob is drawn: if the value it carries (session state, or a stale ``?key=``) is outside the range
    the other knobs give it now, replace it by `repair(value)` and say so in a note (kept until the knob moves)."""
    if key not in st.session_state:
        return
    old = st.session_state[key]
    try:
        ok = allowed(old)
    except TypeError:  # e.g. a number compared with a string a link carried
        ok = False
    if ok:
        return
    new = repair(old)
    st.session_state[key] = new
    _forget_seed(key)  # else a rerun whose URL still holds the old value would seed the widget with it
    shown = "empty" if old is None else fmt(old) if not isinstance(old, (list, tuple)) else str(old)
    add_note(key, f"**{label}** was **{shown}**, which the current settings no longer allow ({rule}); "
                  f"showing **{'empty' if new is None else fmt(new)}** instead.", new)


def _in_range(lo, hi) -> Callable[[Any], bool]:
    def ok(v) -> bool:
        if v is None:
            return True
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        return (lo is None or v >= lo) and (hi is None or v <= hi)
    return ok


def _clamp(lo, hi, default) -> Callable[[Any], Any]:
    def fix(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return default
        return max(lo, v) if hi is None else min(hi, v) if lo is None else min(hi, max(lo, v))
    return fix


def _fit_options(key: str, label: str, options: list, default: Any, fmt: Callable[[Any], str]) -> None:
    shown = ", ".join(fmt(o) for o in options[:8]) + ("…" if len(options) > 8 else "")
    _fit(key, label, lambda v: v in options, lambda v: _nearest(options, v, default), f"choose one of {shown}", fmt)


# ---------------------------------------------------------------- knobs
def _where(container):
    return container if container is not None else st


def slider(label: str, key: str, min_value, max_value, default, *, step=None, follow: str | None = None,
           help: str | None = None, container=None, fmt: Callable[[Any], str] = str, **kw):
    """``st.slider`` bound to ``?key=``."""
    first, raw = _prepare(key, default, follow, label, fmt)
    _fit(key, label, _in_range(min_value, max_value), _clamp(min_value, max_value, default),
         f"allowed {min_value}…{max_value}", fmt)
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
    first, raw = _prepare(key, default, follow, label, fmt)
    _fit_options(key, label, options, default, fmt)
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
    first, raw = _prepare(key, default, follow, label, fmt)
    _fit_options(key, label, options, default, fmt)
    v = _where(container).selectbox(label, options=options, index=options.index(default), format_func=fmt,
                                    key=key, bind="query-params", help=help, **kw)
    _after(key, label, raw, v, fmt, invalid_hint or ("choose one of " + ", ".join(fmt(o) for o in options)))
    return v


def radio(label: str, key: str, options: Sequence, default, *, fmt: Callable[[Any], str] = str,
          help: str | None = None, container=None, horizontal: bool = True, follow: str | None = None, **kw):
    """``st.radio`` bound to ``?key=``."""
    options = list(options)
    first, raw = _prepare(key, default, follow, label, fmt)
    _fit_options(key, label, options, default, fmt)
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
    first, raw = _prepare(key, default, follow, label, fmt)
    if min_value is not None or max_value is not None:
        _fit(key, label, _in_range(min_value, max_value), _clamp(min_value, max_value, default),
             f"allowed {min_value if min_value is not None else '−∞'}…{max_value if max_value is not None else '∞'}",
             fmt)
    hint = None
    if min_value is not None or max_value is not None:
        # an int input without max_value is capped by Streamlit at JavaScript's largest safe integer, 2**53 - 1
        top = max_value if max_value is not None else ("2⁵³−1" if isinstance(step, int) else "∞")
        hint = f"allowed {min_value if min_value is not None else '−∞'}…{top}"
    if raw is not None and _non_finite(raw):
        # Streamlit 1.67 raises OverflowError seeding an int number_input from ?key=inf / 1e400: drop it first.
        _forget_url_value(key)
        add_note(key, _fallback_msg(label, raw, "empty" if default is None else fmt(default),
                                    "a finite number" + (f"; {hint}" if hint else "")), default)
        raw = None
    v = _where(container).number_input(label, min_value=min_value, max_value=max_value, value=default, step=step,
                                       key=key, bind="query-params", help=help, placeholder=placeholder, **kw)
    _after(key, label, raw, v, fmt, hint)
    return v
