"""Knobs whose range moves with another knob or with the model: driven to their extreme, then their range shrunk
through every knob that bounds it. The page never raises; the knob comes back inside its new range, and a note says
so whenever the value it carried was changed (app/state.py `_fit`). Before `_fit`, "Heatmap head" 7 on DeepSeek-V3
then the mini preset gave StreamlitValueAboveMaxError on every later rerun of the MLA page (issue #18).

`BOUNDED` is the one table of such knobs; `test_every_moving_range_is_in_the_table` moves the model and every
bounding knob on every page and fails for any knob whose range moved but is not in the table, so a new one gets
tested here.
"""
from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from app import lessons as ls
from app.sidebar import PRESET_LABELS
from apptest_helpers import open_page, widget

PRESETS = list(PRESET_LABELS)
PAGES = ["pages/overview.py", "pages/mla.py", "pages/moe.py", "pages/fp8.py", "pages/lessons.py",
         "pages/training.py"]

# knob -> (page, URL it starts from, {bounding knob: the values its range shrinks through})
BOUNDED: dict[str, tuple[str, dict, dict[str, list]]] = {
    # the heatmap shows one head of the scaled-down module (<= 8 heads): n_h and the preset bound it (1 GQA group
    # divides every head count, so no impossible combination stops the page before the heatmap)
    "mla_head": ("pages/mla.py", {"mla_groups": "1"}, {"model": PRESETS, "mla_heads": [1, 2, 4]}),
    # the query latent dim's options include the model's q_lora_rank (tiny's is off the grid); it follows the model
    "mla_q": ("pages/mla.py", {}, {"model": PRESETS}),
    # expert parallelism on the Overview: the EP ranks divide the model's routed experts, the nodes divide the EP
    # ranks, and the node limit M is at most the nodes (and M nodes must hold top-k experts)
    "ov_ep": ("pages/overview.py", {}, {"model": PRESETS}),
    "ov_nodes": ("pages/overview.py", {"ov_ep": "64"}, {"model": PRESETS, "ov_ep": [64, 8, 2, 1]}),
    "ov_mlimit": ("pages/overview.py", {"ov_ep": "64", "ov_nodes": "8"}, {"ov_nodes": [8, 4, 2, 1]}),
    # a lesson's step: the section bounds it (4 or 5 steps)
    "ls_step": ("pages/lessons.py", {"ls_sec": "MoE"}, {"ls_sec": list(ls.SECTION_IDS)}),
}
KINDS = ("slider", "select_slider", "radio", "selectbox", "number_input")


def _widget(at: AppTest, key: str):
    return widget(at, key, KINDS)


def _range(w) -> tuple:
    """What the knob may hold now: (min, max) of a slider / number, else its option labels."""
    if w.type in ("slider", "number_input"):
        return (w.min, w.max)
    return tuple(w.options)


def _value(w, label: str):
    """An option label back to the knob's value (the labels of these knobs are the values' str())."""
    for cast in (int, float):
        try:
            return cast(label)
        except ValueError:
            pass
    return label


def _extreme(w):
    """The largest value the knob may hold now."""
    if w.type in ("slider", "number_input"):
        return int(w.max) if float(w.max).is_integer() else w.max
    return _value(w, w.options[-1])


def _inside(w) -> bool:
    if w.type in ("slider", "number_input"):
        return w.min <= w.value <= w.max
    if w.value is None:  # an option whose value is None ("no limit"): its label is the format function's
        return getattr(w, "index", None) is not None
    return str(w.value) in w.options


def _assert_clean(at: AppTest, what: str) -> None:
    assert not at.exception, (what, [e.value for e in at.exception])


CASES = [(knob, bound) for knob, (_, _, bounds) in BOUNDED.items() for bound in bounds]


@pytest.mark.parametrize("knob, bound", CASES, ids=[f"{k}-by-{b}" for k, b in CASES])
@pytest.mark.parametrize("via", ["widget", "session"])
def test_knob_at_its_extreme_survives_every_shrink_of_its_range(knob, bound, via):
    """`via` "widget": the bounding knob moved by the user; "session": set by code (a lesson's Open button, a
    restored position) without the widget's callbacks."""
    page, start, bounds = BOUNDED[knob]
    at = open_page(page, start)
    _assert_clean(at, "start")
    original = _widget(at, bound).value
    label, default = _widget(at, knob).label, _widget(at, knob).value
    for value in bounds[bound]:
        if value == original:
            continue
        w = _widget(at, knob)
        top = _extreme(w)
        w.set_value(top)
        at.run()
        _assert_clean(at, f"{knob} -> {top}")
        assert _widget(at, knob).value == top
        if via == "widget":
            _widget(at, bound).set_value(value)
        else:
            at.session_state[bound] = value
        at.run()
        what = f"{knob} = {top}, then {bound} -> {value}"
        _assert_clean(at, what)
        w = _widget(at, knob)
        assert _inside(w), (what, w.value, _range(w))
        notes = " ".join(x.value for x in at.warning)
        if w.value != top and w.value != default:  # changed, and not reset to its default by a callback
            assert label in notes, (what, w.value, notes)
        at.run()  # a later rerun still works (the old bug came back on every one)
        _assert_clean(at, f"{what}, rerun")
        _widget(at, bound).set_value(original)  # back to the wide range for the next value
        at.run()
        _assert_clean(at, f"{bound} back to {original}")


def test_a_stale_link_value_outside_the_range_is_clamped_with_a_note():
    """The knob's URL value left behind by an earlier range (the browser keeps ?mla_head=7 while the preset
    changes): the page shows the note, not StreamlitValueAboveMaxError."""
    at = open_page("pages/mla.py", {"model": "mini", "mla_head": "7"})
    _assert_clean(at, "open")
    w = _widget(at, "mla_head")
    assert w.min <= w.value <= w.max
    assert any("Heatmap head" in x.value for x in at.warning)


def _ranges(at: AppTest) -> dict[str, tuple]:
    out = {}
    for kind in KINDS:
        for w in getattr(at, kind):
            if w.key and not w.key.startswith("$$"):
                out[w.key] = _range(w)
    return out


@pytest.mark.parametrize("page", PAGES)
def test_every_moving_range_is_in_the_table(page):
    """Move the model and every bounding knob of the table on this page; any knob whose range changed must be in
    BOUNDED (then the test above drives it)."""
    drivers = {"model": PRESETS}
    for _, _, bounds in BOUNDED.values():
        drivers.update(bounds)
    at = open_page(page)
    _assert_clean(at, page)
    seen: dict[str, set] = {}

    def record():
        for k, r in _ranges(at).items():
            seen.setdefault(k, set()).add(r)

    record()
    for knob, values in drivers.items():
        try:
            original = _widget(at, knob).value
        except KeyError:
            continue  # not on this page
        for v in values:
            _widget(at, knob).set_value(v)
            at.run()
            _assert_clean(at, f"{page}: {knob} -> {v}")
            record()
        _widget(at, knob).set_value(original)
        at.run()
    moving = {k for k, rs in seen.items() if len(rs) > 1}
    assert moving <= set(BOUNDED), f"knobs whose range moves but are not in BOUNDED: {sorted(moving - set(BOUNDED))}"
