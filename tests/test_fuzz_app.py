"""Widget and URL fuzzing of every page with AppTest (issue 7, item 2).

Pages come from `app.pages.PAGES` (the list the entry point builds `st.navigation` from), and widgets are discovered
from the AppTest element tree (sidebar + main area), so a new page or a new knob is fuzzed without editing this file.

For every page, three phases:

1. **Extremes, one knob at a time** (from the page's defaults): every slider at its min and max, every
   select_slider at its first and last option, every option of every selectbox / radio / segmented control /
   pills, number inputs at their bounds (an unbounded side gets a huge finite value), toggles and checkboxes
   flipped, multiselects empty and full, text inputs empty / long / unicode. Each change is one rerun; the knob is
   put back in the same rerun as the next change (one rerun per case), or in a rerun of its own when the change
   moved other knobs (the model selector resets the knobs that follow the model).
2. **Random combinations** (a seeded sample of the cartesian product, which explodes): a random preset, then every
   knob at once set to a random one of its fuzz values.
3. **Garbage URL parameters**: for each garbage value (negative, huge, NaN, ±inf, 1e400, text, empty, very long,
   unicode, hex, a comma list, a repeated parameter) a fresh session opens the page with *every* knob bound to the
   URL set to that value (bound keys come from the widgets' `query_param_key`).

Every run must raise no exception; every st.error must be a readable message (no traceback text); a page that
shows fewer charts than with its defaults must say why (st.error / st.warning / st.info); every URL value a knob did
not take must be named in a visible note. The number of fuzz cases is printed at the end of the session.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from apptest_helpers import HANG_S

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "streamlit_app.py")
sys.path.insert(0, str(ROOT))
TIMEOUT = HANG_S  # only catches a hang (apptest_helpers)
SEED = 20261128
COMBOS_PER_PAGE = 10

# Widget kinds the AppTest tree exposes that carry a value a user can change.
KINDS = ("slider", "select_slider", "selectbox", "radio", "segmented_control", "pills", "number_input", "toggle",
         "checkbox", "multiselect", "text_input", "text_area")
OPTION_KINDS = ("selectbox", "radio", "segmented_control", "pills")

GARBAGE = ["-1", "-999999999999", "99999999999999999999999", "1e400", "nan", "NaN", "inf", "-inf", "banana", "",
           "x" * 5000, "日本語🚀\u202e", "0x10", "1,2,3", "  7  ", "<script>alert(1)</script>", "%00", "true"]
REPEATED = ["1", "2"]  # ?key=1&key=2

STATS = {"widget_cases": 0, "combo_cases": 0, "url_cases": 0, "url_key_checks": 0, "reruns": 0,
         "errors_shown": 0, "seconds": 0.0}


@pytest.fixture(autouse=True, scope="module")
def _report(request):
    """Restore torch's thread count (the app sets 1 per run) and print the fuzz-case count at the end."""
    import torch
    n = torch.get_num_threads()
    t0 = time.time()
    yield
    torch.set_num_threads(n)
    STATS["seconds"] = round(time.time() - t0, 1)
    total = STATS["widget_cases"] + STATS["combo_cases"] + STATS["url_cases"]
    line = (f"fuzz cases: {total} (widget extremes {STATS['widget_cases']}, random combinations "
            f"{STATS['combo_cases']}, garbage-URL sessions {STATS['url_cases']} covering {STATS['url_key_checks']} "
            f"key×value checks); {STATS['reruns']} reruns, {STATS['errors_shown']} clear st.error messages, "
            f"{STATS['seconds']} s")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print("\n" + line, flush=True)
    else:  # pragma: no cover
        print(line)


def pages() -> list[str]:
    from app.pages import PAGES
    return [p.path for p in PAGES]


# ---------------------------------------------------------------- discovery
@dataclass
class Knob:
    kind: str
    key: str
    label: str
    default: Any
    values: list = field(default_factory=list)   # fuzz values (real Python values, not labels)
    options: list = field(default_factory=list)  # real option values (option widgets)
    labels: list = field(default_factory=list)   # formatted option labels (what the URL holds)
    url_key: str | None = None
    disabled: bool = False


def _metadata(at: AppTest, wid: str):
    """Streamlit's registered metadata of a widget (for the real option values behind the labels)."""
    try:
        return at.session_state._state._state._new_widget_state.widget_metadata.get(wid)
    except AttributeError:  # pragma: no cover - internal layout changed
        return None


def _real_options(at: AppTest, w) -> list:
    """The Python values behind a widget's formatted option labels (the serde of the registered widget)."""
    md = _metadata(at, w.id)
    serde = getattr(getattr(md, "deserializer", None), "__self__", None)
    opts = getattr(serde, "options", None)
    if opts is not None and len(opts) == len(w.options):
        return list(opts)
    return list(w.options)  # plain string options


def _num(v, like):
    return int(v) if isinstance(like, int) and not isinstance(like, bool) else float(v)


def fuzz_values(at: AppTest, kind: str, w) -> tuple[list, list]:
    """(fuzz values, real options) for one widget."""
    v = w.value
    if kind == "slider":
        lo, hi = w.proto.min, w.proto.max
        like = v[0] if isinstance(v, (list, tuple)) else v
        lo, hi = _num(lo, like), _num(hi, like)
        if isinstance(v, (list, tuple)):
            return [(lo, hi), (lo, lo), (hi, hi)], []
        return [lo, hi], []
    if kind == "select_slider":
        opts = _real_options(at, w)
        if isinstance(v, (list, tuple)):
            return [(opts[0], opts[-1]), (opts[0], opts[0]), (opts[-1], opts[-1])], opts
        return [opts[0], opts[-1]], opts
    if kind in OPTION_KINDS:
        opts = _real_options(at, w)
        if kind == "pills" and isinstance(v, list):  # multi-select pills
            return [[], list(opts)], opts
        return list(opts), opts
    if kind == "multiselect":
        opts = _real_options(at, w)
        n = w.proto.max_selections or len(opts)
        return [[], list(opts[:n])], opts
    if kind == "number_input":
        p = w.proto
        is_int = p.data_type == p.INT if hasattr(p, "INT") else isinstance(p.default, int)
        like = 0 if is_int else 0.0
        big = 2**53 - 1 if is_int else 1e300
        lo = _num(p.min, like) if p.has_min else -big
        hi = _num(p.max, like) if p.has_max else big
        vals = [lo, hi]
        if not p.has_min or not p.has_max:  # also a merely large value: the app's own caps, not the widget's
            vals.append(_num(10**12, like) if not p.has_max else _num(-10**12, like))
        return vals, []
    if kind in ("toggle", "checkbox"):
        return [not v], []
    if kind in ("text_input", "text_area"):
        return ["", "x" * 10_000, "日本語🚀\u202e", "nan"], []
    return [], []


def discover(at: AppTest) -> dict[str, Knob]:
    """Every keyed widget of the current run (sidebar and main area), in tree order; disabled ones are flagged."""
    knobs: dict[str, Knob] = {}
    for kind in KINDS:
        try:
            found = list(getattr(at, kind))
        except Exception:  # a kind this Streamlit's AppTest does not know
            continue
        for w in found:
            if not w.key or w.key in knobs:
                continue
            knobs[w.key] = knob_of(at, kind, w)
    return knobs


def knob_of(at: AppTest, kind: str, w) -> Knob:
    vals, opts = fuzz_values(at, kind, w)
    labels = list(getattr(w, "options", []) or [])
    return Knob(kind, w.key, getattr(w, "label", w.key), w.value, [x for x in vals if not _same(x, w.value)], opts,
                labels, getattr(w.proto, "query_param_key", "") or None, bool(getattr(w.proto, "disabled", False)))


def find(at: AppTest, kind: str, key: str):
    try:
        return getattr(at, kind)(key=key)
    except KeyError:
        return None


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


def values(at: AppTest, knobs: dict[str, Knob]) -> dict[str, Any]:
    out = {}
    for k in knobs.values():
        w = find(at, k.kind, k.key)
        if w is not None:
            out[k.key] = w.value
    return out


# ---------------------------------------------------------------- running and checking
def open_page(page: str, query: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if query:
        for k, v in query.items():
            at.query_params[k] = v
    at.switch_page(page)
    run(at)
    return at


def run(at: AppTest) -> AppTest:
    at.run()
    STATS["reruns"] += 1
    return at


def chart_count(at: AppTest) -> int:
    n = 0
    for c in at.get("plotly_chart"):
        json.loads(c.proto.spec)  # the browser must be able to parse every chart spec
        n += 1
    return n


TRACEBACK_MARKERS = ("Traceback", 'File "', "Error:", "<built-in", "object at 0x")


def check(at: AppTest, what: str, default_charts: int) -> None:
    assert not at.exception, f"{what}: exception {[e.value for e in at.exception]}"
    for e in at.error:
        msg = e.value
        assert msg and len(msg) < 2000, f"{what}: empty or huge st.error"
        assert not any(m in msg for m in TRACEBACK_MARKERS), f"{what}: st.error looks like a traceback: {msg}"
        STATS["errors_shown"] += 1
    n = chart_count(at)
    if n < default_charts:
        explained = list(at.error) + list(at.warning) + list(at.info)
        assert explained, f"{what}: {n} of {default_charts} charts and no st.error/st.warning/st.info saying why"


def set_value(w, value) -> bool:
    """Set a widget as a user would; False (nothing done) if it is disabled in the current state."""
    if getattr(w.proto, "disabled", False):
        return False
    w.set_value(tuple(value) if w.type in ("slider", "select_slider") and isinstance(value, list) else value)
    return True


# ---------------------------------------------------------------- phase 1: every knob's extremes, one at a time
@pytest.mark.parametrize("page", pages())
def test_every_widget_at_its_extremes(page):
    at = open_page(page)
    check(at, f"{page} defaults", 0)
    base_charts = chart_count(at)
    knobs = discover(at)
    assert knobs, f"no widgets discovered on {page}"
    defaults = values(at, knobs)
    # knobs disabled with the defaults (e.g. α while balancing is not 'aux loss') are fuzzed as soon as one of the
    # single changes below enables them, in that state
    pending = {k.key for k in knobs.values() if k.disabled}
    cases = [(k, v) for k in knobs.values() if not k.disabled for v in k.values]
    missing = []
    for knob, value in cases:
        w = find(at, knob.kind, knob.key)
        if w is None or not set_value(w, value):
            # not rendered / disabled in the current state: start again from the defaults
            at = open_page(page)
            w = find(at, knob.kind, knob.key)
            if w is None or not set_value(w, value):
                missing.append(knob.key)
                continue
        run(at)
        STATS["widget_cases"] += 1
        what = f"{page}: {knob.kind} {knob.key} = {str(value)[:60]}"
        check(at, what, base_charts)
        for key in sorted(pending):
            w2 = find(at, knobs[key].kind, key)
            if w2 is None or getattr(w2.proto, "disabled", False):
                continue
            pending.discard(key)
            sub = knob_of(at, knobs[key].kind, w2)
            for v2 in sub.values:
                if not set_value(find(at, sub.kind, key), v2):
                    missing.append(key)
                    break
                run(at)
                STATS["widget_cases"] += 1
                check(at, f"{what}, then {sub.kind} {key} = {str(v2)[:60]}", base_charts)
            w2 = find(at, sub.kind, key)
            if w2 is not None:
                set_value(w2, sub.default)
        # put the knob back (applied together with the next case's change) ...
        w = find(at, knob.kind, knob.key)
        if w is not None:
            set_value(w, knobs[knob.key].default)
        # ... or in a rerun of its own when this change moved other knobs (e.g. a new model resets its followers)
        now = values(at, knobs)
        if any(k != knob.key and k in now and not _same(now[k], defaults[k]) for k in defaults):
            run(at)
            now = values(at, knobs)
            drift = {k: now[k] for k in defaults if k in now and not _same(now[k], defaults[k])}
            if drift:  # still not back: a fresh session
                at = open_page(page)
    assert not missing, f"{page}: widgets vanished or stayed disabled and could not be fuzzed: {missing}"
    assert not pending, f"{page}: disabled with the defaults and no single change enabled them: {sorted(pending)}"


# ---------------------------------------------------------------- phase 2: a sample of the cartesian product
@pytest.mark.parametrize("page", pages())
def test_random_combinations(page):
    rng = random.Random(f"{SEED}-{page}")
    at = open_page(page)
    base_charts = chart_count(at)
    model = find(at, "selectbox", "model")
    presets = _real_options(at, model) if model is not None else [None]
    for i in range(COMBOS_PER_PAGE):
        at = open_page(page)
        preset = presets[i % len(presets)] if i < len(presets) else rng.choice(presets)
        if preset is not None and model is not None and preset != find(at, "selectbox", "model").value:
            find(at, "selectbox", "model").set_value(preset)
            run(at)
            check(at, f"{page}: model {preset}", 0)
        knobs = discover(at)
        choice = {}
        for k in knobs.values():
            if k.key == "model" or not k.values:
                continue
            v = rng.choice(k.values + [k.default])
            if set_value(find(at, k.kind, k.key), v):
                choice[k.key] = v
        run(at)
        STATS["combo_cases"] += 1
        what = f"{page}: combination {i} on {preset}: " + ", ".join(f"{k}={str(v)[:20]}" for k, v in choice.items())
        check(at, what, base_charts if not at.error else 0)


# ---------------------------------------------------------------- phase 3: garbage URL parameters
def _accepted(knob: Knob, w, raw: str) -> bool:
    """Did the widget take the URL value `raw`? (If not, the app must say so.)"""
    v = w.value
    if knob.kind in OPTION_KINDS or knob.kind == "select_slider":
        if isinstance(v, (list, tuple)):
            return False
        idx = w.index if hasattr(w, "index") else None
        if idx is None and knob.options:
            idx = next((i for i, o in enumerate(knob.options) if _same(o, v)), None)
        return idx is not None and knob.labels[idx] == raw
    if knob.kind in ("toggle", "checkbox"):
        return raw.strip().lower() == str(v).lower()
    if knob.kind in ("slider", "number_input"):
        if v is None:
            return raw == ""
        try:
            return math.isclose(float(raw), float(v), rel_tol=1e-9)
        except (ValueError, OverflowError):
            return False
    return str(v) == raw


@pytest.mark.parametrize("page", pages())
def test_garbage_url_parameters(page):
    at = open_page(page)
    base_knobs = discover(at)
    bound = {k.url_key: k for k in base_knobs.values() if k.url_key}
    assert bound, f"no URL-bound knobs on {page}"
    # one fresh session per garbage value, with every bound key of the page set to it at once (each knob falls back
    # on its own, so they do not interfere); plus a repeated parameter (?k=1&k=2) for every key
    for raw in GARBAGE + [REPEATED]:
        at = open_page(page, {k: raw for k in bound})
        STATS["url_cases"] += 1
        shown = str(raw)[:30]
        check(at, f"{page}: every bound key = {shown!r}", 0)
        notes = " ".join(w.value for w in at.warning)
        for key, knob in bound.items():
            w = find(at, knob.kind, knob.key)
            if w is None:  # the page stopped before this knob (an st.error explains it: checked above)
                continue
            STATS["url_key_checks"] += 1
            last = raw[-1] if isinstance(raw, list) else raw
            if isinstance(raw, list) or _accepted(knob, w, last):
                continue
            assert knob.label in notes, (f"{page}: ?{key}={shown!r} was not taken ({knob.label} = {w.value!r}) "
                                         f"and no note names it; notes: {notes[:500]}")
        if isinstance(raw, str) and len(raw) > 100:
            assert all(len(w.value) < 1000 for w in at.warning), "a note quotes a whole kilobytes-long URL value"


def test_url_notes_survive_an_impossible_combination():
    """A link with an invalid value *and* an impossible combination shows both the note and the error (notes are
    written as they arise; before the fix they were lost when the page called st.stop())."""
    at = open_page("pages/mla.py", {"seed": "inf", "mla_groups": "7"})
    check(at, "mla seed=inf groups=7", 0)
    assert at.error and "GQA groups" in " ".join(e.value for e in at.error)
    assert "Seed" in " ".join(w.value for w in at.warning)
    at = open_page("pages/overview.py", {"seed": "2147483648", "ov_hidden_size": "1e400"})
    check(at, "overview seed too big", 0)
    notes = " ".join(w.value for w in at.warning)
    assert "Seed" in notes and "Hidden size" in notes, notes


def test_fuzz_covers_all_pages_and_kinds():
    """The discovery really finds knobs: every page has URL-bound knobs of several kinds."""
    seen = set()
    for page in pages():
        knobs = discover(open_page(page))
        seen |= {k.kind for k in knobs.values()}
        assert any(k.url_key for k in knobs.values()), page
    assert {"slider", "select_slider", "selectbox", "radio", "number_input", "toggle"} <= seen, seen
