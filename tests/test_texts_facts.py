"""The numbers in the explanations and lessons are the ones `core` computes (or `core.published` quotes): each test
renders a page or a lesson step and looks for the value core gives, so a changed config or calculator cannot leave
stale prose behind. Also pins the #13 fact-check corrections that a reader depends on."""
from __future__ import annotations

import math

from app import lessons as ls
from app import texts
from apptest_helpers import open_page
from core import calc
from core.config import PRESETS
from core.fp8 import FORMATS
from core.published import (FP8_VALIDATION_RUNS, V2_ACTIVATED_PARAMS, V2_LITE_ACTIVATED_PARAMS, V2_TOTAL_PARAMS,
                            V3_ACTIVATED_PARAMS, V3_TOTAL_PARAMS, billions, trillions)
from core.units import human_count

PUBLISHED = {"deepseek-v3": V3_ACTIVATED_PARAMS, "deepseek-v2": V2_ACTIVATED_PARAMS,
             "deepseek-v2-lite": V2_LITE_ACTIVATED_PARAMS}


def step(title: str) -> ls.Step:
    return next(st for _, _, st in ls.all_steps() if st.title == title)


def test_activated_in_both_conventions_beside_the_published_figures():
    for name, published in PUBLISHED.items():
        c = calc.param_counts(PRESETS[name])
        assert c["activated_no_embedding"] == c["activated"] - c["embedding"]
        line = next(ln for ln in texts.OVERVIEW_EXPLAIN.splitlines() if ln.startswith(f"- {texts._NAMES[name]}:"))
        assert human_count(c["activated"]) in line and human_count(c["activated_no_embedding"]) in line
        assert f"published {billions(published)}" in line
    v3 = calc.param_counts(PRESETS["deepseek-v3"])
    body = step(f"{billions(V3_TOTAL_PARAMS)} total, {billions(V3_ACTIVATED_PARAMS)} activated").body
    assert human_count(v3["activated"]) in body and human_count(v3["activated_no_embedding"]) in body


def test_overview_page_renders_both_conventions():
    at = open_page("pages/overview.py", {"model": "deepseek-v2-lite"})
    assert not at.exception
    c = calc.param_counts(PRESETS["deepseek-v2-lite"])
    md = " ".join(m.value for m in at.markdown) + " ".join(m.value for m in at.caption)
    assert human_count(c["activated_no_embedding"]) in md
    assert f"Paper: **{billions(V2_LITE_ACTIVATED_PARAMS)}**" in md  # 2.4B, not rounded to "2B"


def test_activated_share_sentence_uses_core_counts():
    notice = step("DeepSeek-V2 for comparison").notice
    for name in ("deepseek-v3", "deepseek-v2"):
        c = calc.param_counts(PRESETS[name])
        assert f"{c['activated'] / c['total']:.1%}" in notice
    assert f"{V3_ACTIVATED_PARAMS / V3_TOTAL_PARAMS:.1%}" in notice
    assert f"{V2_ACTIVATED_PARAMS / V2_TOTAL_PARAMS:.1%}" in notice
    assert "similar" not in notice


def test_rendered_lesson_step_carries_the_core_numbers():
    """The V2 comparison step on the lessons page shows the shares core computes."""
    sec, n, st = next((s, i, x) for s, i, x in ls.all_steps() if x.title == "DeepSeek-V2 for comparison")
    at = open_page("pages/lessons.py", ls.step_query(sec, n))
    assert not at.exception
    shown = " ".join(i.value for i in at.info)
    v3 = calc.param_counts(PRESETS["deepseek-v3"])
    assert f"{v3['activated'] / v3['total']:.1%}" in shown


def test_mla_numbers_and_the_rope_term():
    v3 = PRESETS["deepseek-v3"]
    mla = calc.kv_elements_per_token(v3, "mla") // v3.num_hidden_layers
    mha = calc.kv_elements_per_token(v3, "mha") // v3.num_hidden_layers
    assert mla == v3.kv_lora_rank + v3.qk_rope_head_dim
    assert texts.math_int(mla) in texts.MLA_EXPLAIN and texts.math_int(mha) in texts.MLA_EXPLAIN
    # q.k has a content part AND the decoupled RoPE part (V2 report §2.1.3)
    assert r"(q^R_{t,i})^\top k^R_j" in texts.MLA_EXPLAIN
    assert any(r"(q^R_{t,i})^\top k^R_j" in eq for eq in texts.MLA_EQUATIONS)
    absorb = step("Absorb the up-projection: decode on the latent")
    assert r"(q^R)^\top k^R" in absorb.body and r"(q^R_{t,i})^\top k^R_j" in absorb.latex[0]
    for body in (texts.MLA_EXPLAIN, step("Decoupled RoPE").body):
        assert "§2.1.3" in body and "between" in body
    one = step("One latent vector per token")
    assert f"{1 - mla / mha:.1%}" in one.notice and f"{mla:,}" in one.body and f"{mha:,}" in one.body


def test_fp8_recipe_sentences():
    assert "E5M6" in texts.FP8_EXPLAIN and "BF16" in texts.FP8_EXPLAIN
    formats = step("Two FP8 formats").body
    assert "E5M6" in formats and "all tensors" not in formats
    assert f"{FORMATS['e4m3'].max:g}" in formats and f"{FORMATS['e5m2'].max:,.0f}" in formats
    # the training text says what is modelled: not "every linear layer", head in high precision
    assert "every linear layer" not in texts.TRAIN_EXPLAIN and "output head" in texts.TRAIN_EXPLAIN
    # the 0.25% validation was on ~16B / ~230B models, not V3
    body = step("FP8 versus FP32").body
    for params, toks in FP8_VALIDATION_RUNS:
        assert billions(params) in body and trillions(toks) in body
    assert "not on V3 itself" in body


def test_balance_loss_formula_on_the_page_is_eq18():
    eq = next(e for e in texts.MOE_EQUATIONS if r"\mathcal{L}_{\text{Bal}}" in e)
    assert r"\operatorname{Topk}(\{s_{j,t} \mid 1 \le j \le N_r\}, K_r)" in eq  # unbiased, all routed experts
    assert "b_j" not in eq


def test_training_text_numbers():
    cfg = PRESETS["mini"]
    assert f"{math.log(cfg.vocab_size):.2f}" in texts.TRAIN_EXPLAIN
    assert f"{cfg.num_hidden_layers} layers, hidden size {cfg.hidden_size}" in texts.TRAIN_EXPLAIN
