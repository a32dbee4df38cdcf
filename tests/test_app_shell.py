"""AppTest for the shell: shared sidebar (preset / uploaded config.json / seed / lesson mode), state that survives
page changes, URL binding of the shared knobs, knobs that follow the model, and page-opening through the entry
point."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from apptest_helpers import HANG_S

from core.calc import param_counts
from core.config import PRESETS
from core.published import PUBLISHED_CONFIGS
from core.units import human_count

APP = str(Path(__file__).resolve().parent.parent / "streamlit_app.py")


def start(query: dict | None = None, page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=HANG_S)
    if query:
        at.query_params.update(query)
    if page:
        at.switch_page(page)
    return at.run()


def metric(at: AppTest, label: str) -> str:
    for m in at.metric:
        if m.label == label:
            return m.value
    raise KeyError(label)


def clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def test_every_page_runs_inside_the_entry_point():
    # Opening a page URL first must still show the shared sidebar (app/shell.py reruns through the entry point).
    for page in ("pages/overview.py", "pages/mla.py", "pages/moe.py", "pages/fp8.py"):
        at = start(page=page)
        clean(at)
        assert at.selectbox(key="model").value == "deepseek-v3", page
        assert at.toggle(key="lesson").value is False


def test_preset_changes_numbers_and_survives_page_changes():
    at = start()
    assert metric(at, "Total parameters") == human_count(param_counts(PRESETS["deepseek-v3"])["total"])
    at.selectbox(key="model").set_value("mini").run()
    clean(at)
    assert metric(at, "Total parameters") == human_count(param_counts(PRESETS["mini"])["total"])
    at.switch_page("pages/mla.py").run()
    clean(at)
    assert at.selectbox(key="model").value == "mini"
    assert at.select_slider(key="mla_dc").value == PRESETS["mini"].kv_lora_rank  # page knobs start from the model
    at.switch_page("pages/overview.py").run()
    assert at.selectbox(key="model").value == "mini"


def test_page_knobs_follow_a_model_change():
    at = start(page="pages/mla.py")
    at.select_slider(key="mla_dc").set_value(256).run()
    assert at.select_slider(key="mla_dc").value == 256
    at.selectbox(key="model").set_value("deepseek-v2-lite").run()
    clean(at)
    assert at.select_slider(key="mla_dc").value == PRESETS["deepseek-v2-lite"].kv_lora_rank
    assert at.select_slider(key="mla_heads").value == PRESETS["deepseek-v2-lite"].num_attention_heads


def test_shared_knobs_from_the_url():
    at = start({"model": "deepseek-v2", "seed": "7", "lesson": "true"}, page="pages/fp8.py")
    clean(at)
    assert at.selectbox(key="model").value == "deepseek-v2"
    assert at.number_input(key="seed").value == 7
    assert at.toggle(key="lesson").value is True
    assert at.info, "lesson mode adds 'what to notice' notes"
    assert all(e.proto.expanded for e in at.expander if "How" in e.label), "lesson mode opens the explanation"


def test_invalid_shared_url_values_fall_back_with_a_note():
    at = start({"model": "gpt-5", "lesson": "maybe"})
    clean(at)
    assert at.selectbox(key="model").value == "deepseek-v3"
    assert at.toggle(key="lesson").value is False
    text = " ".join(w.value for w in at.warning)
    assert "gpt-5" in text and "maybe" in text


def test_uploaded_link_explains_why_it_cannot_be_restored():
    at = start({"model": "uploaded"})
    clean(at)
    assert at.selectbox(key="model").value == "deepseek-v3"
    assert "cannot travel in a link" in " ".join(w.value for w in at.warning)


def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    at.get("file_uploader")[0].upload(name, data, "application/json")
    return at.run()


def test_upload_valid_config_json():
    at = start()
    doc = PUBLISHED_CONFIGS["deepseek-v2-lite"]
    upload(at, "config.json", json.dumps(doc).encode())
    clean(at)
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="model").value == "uploaded"
    assert metric(at, "Total parameters") == human_count(param_counts(PRESETS["deepseek-v2-lite"])["total"])


def test_upload_invalid_json_keeps_previous_state():
    at = start()
    at.selectbox(key="model").set_value("mini").run()
    upload(at, "config.json", b'{"hidden_size": 64,,}')
    clean(at)
    assert any("not valid JSON" in e.value for e in at.error), [e.value for e in at.error]
    assert at.selectbox(key="model").value == "mini"
    assert metric(at, "Total parameters") == human_count(param_counts(PRESETS["mini"])["total"])


def test_upload_impossible_config_names_the_field():
    at = start()
    doc = dict(PUBLISHED_CONFIGS["deepseek-v3"], n_group=7)  # 256 experts are not divisible into 7 groups
    upload(at, "bad.json", json.dumps(doc).encode())
    clean(at)
    msg = " ".join(e.value for e in at.error)
    assert "n_group" in msg and "divisible" in msg, msg
    assert at.selectbox(key="model").value == "deepseek-v3"


def test_upload_too_large_is_refused():
    at = start()
    upload(at, "config.json", b"{" + b" " * 300_000 + b"}")
    clean(at)
    assert any("KiB" in e.value for e in at.error)


def test_custom_architecture_override_and_its_error():
    at = start({"ov_num_hidden_layers": "30"})
    clean(at)
    assert not at.error
    cfg = PRESETS["deepseek-v3"].replace(num_hidden_layers=30)
    assert metric(at, "Total parameters") == human_count(param_counts(cfg)["total"])
    assert any("Custom model" in i.value for i in at.info)
    at = start({"ov_n_group": "7"})
    clean(at)
    msg = " ".join(e.value for e in at.error)
    assert "Expert groups" in msg and "n_group" in msg


def test_every_preset_renders_every_page():
    # Page knobs default to the model's values, so every preset must give a valid view on every page.
    for model in PRESETS:
        for page in ("pages/overview.py", "pages/mla.py", "pages/moe.py", "pages/fp8.py"):
            at = start({"model": model} if model != "deepseek-v3" else None, page=page)
            clean(at)
            assert not at.error, (model, page, [e.value for e in at.error])
            assert at.get("plotly_chart"), (model, page)
