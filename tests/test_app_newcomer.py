"""What a newcomer depends on (issue #19): the landing says where to start, every lesson step names a chart on its
page (its link opening the page there, with the step's note and exactly its knobs: tests/test_app_lessons.py),
titles / sidebar summaries / card deltas are built from the values on screen, knob labels carry no raw TeX, and the
small print (jargon hovers, domains, the decode-timing verdict, MaxVio's one definition) says what the numbers mean."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from app import lessons as ls
from app import pages as app_pages
from apptest_helpers import open_page
from core.calc import param_counts
from core.config import PRESETS
from core.units import human_bytes, human_count


def clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def summary(at) -> str:
    return next(c.value for c in at.sidebar.caption if "activated per token" in c.value)


def counts_line(cfg) -> str:
    c = param_counts(cfg)
    return f"{human_count(c['total'])} parameters, {human_count(c['activated'])} activated per token"


# ---------------------------------------------------------------- landing
def test_landing_introduces_the_model_and_offers_the_lessons_and_every_dashboard():
    at = open_page("pages/overview.py")
    clean(at)
    intro = next(e for e in at.expander if e.label.startswith("New here"))
    assert intro.proto.expanded
    text = " ".join(m.value for m in intro.markdown)
    assert "DeepSeek-V3" in text and "671B" in text and "37B" in text
    labels = [lnk.proto.label for lnk in intro.get("page_link")]
    lines = [c.value for c in intro.caption]
    for p in app_pages.PAGES:
        if p.path != "pages/lessons.py":
            assert p.title in labels and p.answers in lines, p.title  # the line comes from PAGES
    at.button(key="land_lessons").click().run()
    clean(at)
    assert at.title[0].value.startswith("Lessons")
    assert at.radio(key="ls_sec").value == ls.SECTIONS[0].id and at.select_slider(key="ls_step").value == 1


# ---------------------------------------------------------------- lesson links
def test_every_step_has_a_target_on_its_page():
    assert set(ls.TARGETS) == {(s.id, n) for s, n, _ in ls.all_steps()}
    for (sid, n), key in ls.TARGETS.items():
        page = ls.section(sid).steps[n - 1].page
        assert key == "" or key.startswith(ls.PAGE_KNOB_PREFIX.get(page, "tr_")), (sid, n, key)


def test_opening_a_step_resets_knobs_an_earlier_step_set():
    sec = ls.section("Foundations")
    at = open_page("pages/lessons.py", ls.step_query(sec, 1))
    at.button(key="ls_open").click().run()
    clean(at)
    assert at.radio(key="mla_heatview").value == "probability"  # step 1 sets it
    at.switch_page("pages/lessons.py").run()
    at.select_slider(key="ls_step").set_value(2).run()
    at.button(key="ls_open").click().run()
    clean(at)
    assert at.radio(key="mla_heatview").value == "× uniform", "step 2 says every other knob is at its default"
    assert at.query_params.get(ls.STEP_PARAM) in ("Foundations/2", ["Foundations/2"])


# ---------------------------------------------------------------- titles, summaries and deltas follow the knobs
@pytest.mark.parametrize("query,experts", [({}, 256), ({"moe_experts": "64"}, 64), ({"model": "mini"}, 16)])
def test_moe_title_and_sidebar_follow_the_experts(query, experts):
    at = open_page("pages/moe.py", query)
    clean(at)
    assert at.title[0].value.endswith(f"over {experts} experts")
    assert at.select_slider(key="moe_experts").value == experts
    model = PRESETS[query.get("model", "deepseek-v3")]
    if "moe_experts" in query:
        assert summary(at) == "With these MoE knobs: " + counts_line(model.replace(n_routed_experts=experts))
    else:
        assert summary(at) == counts_line(model)


def test_mla_cards_and_sidebar_follow_the_latent_dim():
    v3 = PRESETS["deepseek-v3"]
    at = open_page("pages/mla.py", {"mla_dc": "128"})
    clean(at)
    assert summary(at) == "With these MLA knobs: " + counts_line(v3.replace(kv_lora_rank=128))
    per_token = {m.label: m for m in at.metric}
    mla = per_token["MLA cache per token"]
    new, old = (128 + v3.qk_rope_head_dim), (v3.kv_lora_rank + v3.qk_rope_head_dim)
    assert mla.value == "22.88 KiB" == f"{new * v3.num_hidden_layers * 2 / 1024:.2f} KiB"
    assert mla.proto.delta == f"−{round(100 * (1 - new / old))}% vs d_c = {v3.kv_lora_rank}"
    ctx = next(m for m in at.metric if m.label.startswith("MLA cache, 128K tokens × 1"))
    assert ctx.value == human_bytes(new * v3.num_hidden_layers * 2 * 131072) == "2.86 GiB"  # BF16, 128K tokens
    assert per_token["MHA cache per token"].proto.delta == ""  # the MHA cache did not move
    at.select_slider(key="mla_dc").set_value(v3.kv_lora_rank).run()
    assert summary(at) == counts_line(v3) and at.metric[0].proto.delta == ""


def test_overview_custom_architecture_and_lab_name_the_model_they_show():
    at = open_page("pages/overview.py", {"ov_num_hidden_layers": "30"})
    clean(at)
    assert summary(at) == "Custom architecture: " + counts_line(PRESETS["deepseek-v3"].replace(num_hidden_layers=30))
    assert "custom, based on" in at.caption[0].value
    total = next(m for m in at.metric if m.label == "Total parameters")
    c30, c61 = param_counts(PRESETS["deepseek-v3"].replace(num_hidden_layers=30)), param_counts(PRESETS["deepseek-v3"])
    assert total.proto.delta == f"−{round(100 * (1 - c30['total'] / c61['total']))}% vs DeepSeek-V3"
    lab = open_page("pages/training.py")
    assert not lab.exception
    from app.lab.knobs import defaults, lab_config
    mcfg, _ = lab_config(defaults(), 0)
    assert summary(lab) == "The lab's mini model: " + counts_line(mcfg)


# ---------------------------------------------------------------- labels and small print
@pytest.mark.parametrize("page", ["pages/mla.py", "pages/moe.py", "pages/fp8.py", "pages/overview.py"])
def test_knob_labels_have_no_raw_tex(page):
    at = open_page(page)
    labels = [w.label for kind in ("select_slider", "slider", "radio", "selectbox", "number_input", "toggle")
              for w in at.get(kind)]
    for label in labels:
        plain = re.sub(r"\$[^$]+\$", "", label)
        assert "_" not in plain and "^" not in plain, label


def test_jargon_cards_have_a_hover_and_domains_are_explained_at_the_heatmap():
    at = open_page("pages/moe.py")
    helps = {m.label: m.proto.help for m in at.metric}
    assert helps["MaxVio"] and helps["CV of loads"]
    from core import data
    cap = " ".join(c.value for c in at.caption)
    assert all(d in cap for d in data.DOMAINS) and all(ex in cap for ex in data.domain_examples(0).values())
    fp8 = open_page("pages/fp8.py")
    assert next(m for m in fp8.metric if m.label.startswith("SQNR")).proto.help


def test_token_labels_are_readable():
    from app.charts import moe as charts
    at_least = 11
    assert charts.TOKEN_LABEL_PX >= at_least


def _latency(absorbed_ms: float, naive_ms: float) -> pd.DataFrame:
    rows = []
    for c in (128, 1024):
        rows += [{"kind": "MLA", "context_tokens": c, "ms_min": absorbed_ms, "ms_per_token": absorbed_ms,
                  "repeats": 21, "cache_bytes_fp32": 1000},
                 {"kind": "MLA (naive)", "context_tokens": c, "ms_min": naive_ms, "ms_per_token": naive_ms,
                  "repeats": 21, "cache_bytes_fp32": 4400}]
    return pd.DataFrame(rows)


def test_decode_chart_says_plainly_whether_absorption_is_faster():
    from app.charts.mla import decode_latency
    same = decode_latency(_latency(0.34, 0.34)).layout.title.text.replace("<br>", " ")
    assert same.startswith("No speed-up on this CPU at this size") and "4.4× smaller" in same
    slower = decode_latency(_latency(0.5, 0.34)).layout.title.text.replace("<br>", " ")
    assert slower.startswith("No speed-up") and "1.47×" in slower
    faster = decode_latency(_latency(0.2, 0.4)).layout.title.text.replace("<br>", " ")
    assert faster.startswith("Absorbed decoding is 2.0× faster")


def test_lab_table_and_charts_use_one_maxvio():
    from app.lab import charts as ct
    from app.lab import records as rec
    records = [{"step": i, "loss": 5.0, "max_vio": v, "max_vio_layers": [v]} for i, v in
               enumerate([2.0, 1.5, 0.9, 0.7, 0.72])]
    final = rec.final_maxvio(records)
    assert final == pytest.approx(float(rec.maxvio_smooth([r["max_vio"] for r in records])[-1]))
    assert final != records[-1]["max_vio"]
    title = ct.overlay_maxvio([("#1 default", records)]).layout.title.text.replace("<br>", " ")
    assert f"MaxVio {final:.2f}" in title


def test_lab_estimate_is_a_range_until_this_server_has_timed_a_run():
    from types import SimpleNamespace

    from app.lab import knobs
    _, cfg = knobs.lab_config(knobs.defaults(), 0)
    est = knobs.estimate_seconds(cfg)
    before = knobs.estimate_text(cfg, None)
    assert f"about {est:.0f}–{est * knobs.UNCALIBRATED_SLOWDOWN:.0f} s" in before
    timed = SimpleNamespace(speed_ratio=2.0)
    assert knobs.estimate_text(cfg, timed) == f"≈ {knobs.estimate_seconds(cfg, timed):.0f} s on this server " \
                                              "(timed from its earlier runs)"


def test_a_run_link_keeps_the_sidebar_model():
    from types import SimpleNamespace

    from app.lab.views import run_query
    run = SimpleNamespace(knobs={"tr_bal": "none"}, train_cfg=SimpleNamespace(seed=3), link_id=None)  # not stored
    assert run_query(run, model="mini") == {"tr_bal": "none", "seed": "3", "model": "mini"}
    assert "model" not in run_query(run)  # the default model, left out as Streamlit does
    assert "model" not in run_query(run, model="uploaded")  # an upload cannot travel in a link
