"""AppTest for every dashboard: defaults render with charts and no exception, a knob changes the chart's data,
an impossible combination shows st.error (not an exception), a URL parameter sets the bound knob, and an invalid
URL value falls back to the default with a visible note.

The app is started from the entry point (st.navigation) and switched to each page, as a browser would.
"""
from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from apptest_helpers import open_page, widget


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def notes(at: AppTest) -> list[str]:
    return [w.value for w in at.warning]


def chart_data(spec: dict) -> str:
    """The data part of a plotly spec (traces), as canonical JSON."""
    return json.dumps(spec.get("data"), sort_keys=True)


PAGES = {
    # page: (knob to change, new value, index of a chart whose data must change)
    "pages/overview.py": ("ov_ctx", 8192, 1),
    "pages/mla.py": ("mla_dc", 256, 0),
    "pages/moe.py": ("moe_topk", 4, 0),
    "pages/fp8.py": ("fp8_osz", 100000.0, 0),
}


@pytest.mark.parametrize("page", list(PAGES))
def test_page_renders_defaults_with_charts(page):
    at = open_page(page)
    assert_clean(at)
    specs = charts(at)
    assert len(specs) >= 2
    for s in specs:  # every chart has a title saying what to notice and at least one trace
        assert s["layout"]["title"]["text"], page
        assert s["data"], page
    assert at.get("download_button"), "every chart offers its data as CSV"
    assert any("How" in e.label for e in at.expander), "explanation expander"


@pytest.mark.parametrize("page", list(PAGES))
def test_knob_change_changes_chart_data(page):
    key, value, idx = PAGES[page]
    at = open_page(page)
    before = chart_data(charts(at)[idx])
    widget(at, key).set_value(value)
    at.run()
    assert_clean(at)
    after = chart_data(charts(at)[idx])
    assert before != after, f"{key} -> {value} did not change chart {idx}"
    # (the browser writes a moved bound knob into the URL; tests/test_e2e_browser.py checks that)


IMPOSSIBLE = {
    "pages/overview.py": ({"ov_num_experts_per_tok": "300"}, "Experts per token"),
    "pages/mla.py": ({"mla_groups": "7"}, "GQA groups"),
    "pages/moe.py": ({"moe_groups": "4", "moe_topkg": "8"}, "Groups per token"),
    "pages/fp8.py": ({"fp8_fmt": "BF16", "fp8_gran": "mx"}, "granularity"),
}


@pytest.mark.parametrize("page", list(IMPOSSIBLE))
def test_impossible_combination_shows_error_not_exception(page):
    query, knob = IMPOSSIBLE[page]
    at = open_page(page, query)
    assert not at.exception, [e.value for e in at.exception]
    assert at.error, "expected an st.error"
    msg = " ".join(e.value for e in at.error)
    assert knob.lower() in msg.lower(), msg


# The URL holds an option's label (what the knob shows): ?ov_ctx=32K, ?fp8_fmt=E5M2.
URL = {
    "pages/overview.py": ("ov_ctx", "32K", 32768),
    "pages/mla.py": ("mla_dc", "256", 256),
    "pages/moe.py": ("moe_cf", "2", 2.0),
    "pages/fp8.py": ("fp8_fmt", "E5M2", "e5m2"),
}


@pytest.mark.parametrize("page", list(URL))
def test_url_parameter_sets_bound_knob(page):
    key, raw, expected = URL[page]
    at = open_page(page, {key: raw})
    assert_clean(at)
    assert widget(at, key).value == expected
    assert not notes(at)


INVALID = {
    "pages/overview.py": ("ov_kvdt", "fp4"),
    "pages/mla.py": ("mla_dc", "999"),
    "pages/moe.py": ("moe_scoring", "relu"),
    "pages/fp8.py": ("fp8_osz", "banana"),
}


@pytest.mark.parametrize("page", list(INVALID))
def test_invalid_url_value_falls_back_with_note(page):
    key, raw = INVALID[page]
    at = open_page(page, {key: raw})
    assert_clean(at)
    default = widget(open_page(page), key).value
    assert widget(at, key).value == default
    msg = " ".join(notes(at))
    assert raw in msg and "not a valid value" in msg, msg


def test_overview_all_to_all_section_follows_the_node_limit():
    """The Overview's expert-parallel traffic comes from core.comm for the knobs in the URL, and the node limit moves
    the cross-node figure (V3 layout: EP64 on 8 nodes)."""
    from core.comm import a2a_volume
    from core.config import get_preset
    from core.units import human_bytes

    v3 = get_preset("deepseek-v3")
    shown = {}
    for m in (4, 2):
        at = open_page("pages/overview.py", {"model": "deepseek-v3", "ov_ep": "64", "ov_nodes": "8",
                                             "ov_mlimit": str(m)})
        assert not at.exception and not at.error
        assert at.selectbox(key="ov_mlimit").value == m
        expected = human_bytes(a2a_volume(v3, 64, 8, m, "fp8", "bf16")["bytes_inter_node_dedup"])
        cards = {mt.label: mt.value for mt in at.metric}
        assert cards["Cross-node, one copy per node"] == expected, m
        shown[m] = expected
    assert shown[2] != shown[4]


def test_fp8_recipe_table_is_core_and_switches_show_the_tensor_errors():
    """The FP8 page's recipe table is core.fp8.recipe_table for every recipe, its knobs list core's recipes and
    switches, and one flipped switch shows its recipe, its notes and (on request) every tensor's SQNR."""
    from app.compute import fp8 as cfp8
    from app.lab import knobs
    from core import fp8
    assert cfp8.RECIPE_NAMES == tuple(fp8.RECIPES) and knobs.FP8_SWITCHES == tuple(fp8.SWITCHES)
    at = open_page("pages/fp8.py")
    assert_clean(at)
    table = next(d.value for d in at.dataframe if "deepseek-v3" in d.value.columns)
    assert list(table.columns[4:]) == list(fp8.RECIPES)
    for name in fp8.RECIPES:
        assert list(table[name]) == [cfp8._cell(r) for r in fp8.recipe_table(name)]
    v3 = table.set_index(["where", "GEMM", "tensor"])["deepseek-v3"]
    assert v3[("Linear after attention (o_proj)", "Fprop", "input x")] == "E5M6 · 1x128 · 2^k"
    assert v3[("Linear after attention (o_proj)", "Wgrad", "input x")] == "E5M6 · 128x1 · 2^k"
    assert any("Approximation" in c.value for c in at.caption)
    at = open_page("pages/fp8.py", {"fp8_recipe": "deepseek-v3", "fp8_switch": "without e5m6_attn_out", "fp8_probe": "true"})
    assert_clean(at)
    assert any("deepseek-v3-e5m6_attn_out" in m.value for m in at.markdown)
    titles = [s["layout"]["title"]["text"] for s in charts(at)]
    assert any(t.startswith("deepseek-v3-e5m6_attn_out") for t in titles), titles
    at = open_page("pages/fp8.py", {"fp8_recipe": "tensor-current", "fp8_switch": "with wgrad_128x1"})
    assert not at.exception and "wgrad_tiling" in " ".join(e.value for e in at.error)
