"""Config validation / round-trips and the calculators against the published DeepSeek figures."""
import json
import math

import pytest

from core.calc import (flops_per_token, kv_cache_bytes, kv_elements_per_token, max_context, param_counts, param_table,
                       weight_bytes)
from core.config import PRESETS, ConfigError, ModelConfig, get_preset
from core.published import PAPER_FIGURES, PUBLISHED_CONFIGS


# ---------------------------------------------------------------- published figures
def test_v3_total_is_671b_and_685b_with_mtp():
    c = param_counts(PRESETS["deepseek-v3"])
    assert round(c["total"] / 1e9, 1) == 671.0
    # model card: 685B = 671B main model + 14B MTP module (incl. its stored embedding/head copies)
    assert round(c["checkpoint_total"] / 1e9) == 684 or round(c["checkpoint_total"] / 1e9) == 685
    assert abs(c["checkpoint_total"] - 685e9) / 685e9 < 0.005
    # README_WEIGHTS: 11.5B unique MTP params; our count of one MTP block + eh_proj + norms is 11.6B
    assert abs(c["mtp"] - 11.5e9) / 11.5e9 < 0.02


def test_v3_activated_about_37b():
    c = param_counts(PRESETS["deepseek-v3"])
    assert 36.5e9 < c["activated"] < 38e9
    assert abs(c["activated"] - 37.55e9) < 0.01e9  # our documented definition


@pytest.mark.parametrize("name,total", [("deepseek-v2", 235.74e9), ("deepseek-v2-lite", 15.71e9)])
def test_v2_totals(name, total):
    assert abs(param_counts(PRESETS[name])["total"] - total) < 0.01e9


def test_v2_activated_near_paper():
    assert abs(param_counts(PRESETS["deepseek-v2"])["activated"] - 21e9) / 21e9 < 0.03
    assert abs(param_counts(PRESETS["deepseek-v2-lite"])["activated"] - 2.4e9) / 2.4e9 < 0.12


def test_component_breakdown_adds_up():
    for cfg in PRESETS.values():
        c = param_counts(cfg)
        rows = param_table(cfg)
        assert sum(r["total"] for r in rows) == c["total"]
        assert sum(r["activated"] for r in rows) == c["activated"]
    v3 = param_counts(PRESETS["deepseek-v3"])
    assert v3["embedding"] == 129280 * 7168 == v3["head"]
    assert abs(v3["attention"] / 61 - 187.1e6) < 0.1e6  # reference §1.2: attention params per V3 layer


def test_kv_cache_figures():
    v3 = PRESETS["deepseek-v3"]
    assert kv_elements_per_token(v3, "mla") == (512 + 64) * 61 == 35_136
    assert kv_cache_bytes(v3, "mla", seq_len=1) == 70_272  # bf16
    assert kv_elements_per_token(v3, "mha") == 1_998_848
    assert kv_elements_per_token(v3, "mla_naive") == 2_498_560
    assert kv_elements_per_token(PRESETS["deepseek-v2"], "mla") == 34_560
    assert kv_elements_per_token(PRESETS["deepseek-v2-lite"], "mla") == 15_552
    assert kv_elements_per_token(v3, "mqa") == 2 * 128 * 61
    assert kv_elements_per_token(v3, "gqa", num_kv_heads=8) == 2 * 8 * 128 * 61
    # linear in context, batch and element size
    assert kv_cache_bytes(v3, "mla", 4096, batch=3, bytes_per_element=1) == 35_136 * 4096 * 3
    for k, v in PAPER_FIGURES.items():
        assert kv_elements_per_token(PRESETS[k], "mla") == v["kv_elements_per_token"]


def test_kv_cache_rejects_bad_arguments():
    v3 = PRESETS["deepseek-v3"]
    with pytest.raises(ConfigError, match="kind"):
        kv_cache_bytes(v3, "xyz", 10)
    with pytest.raises(ConfigError, match="seq_len"):
        kv_cache_bytes(v3, "mla", -1)
    with pytest.raises(ConfigError, match="num_kv_heads"):
        kv_cache_bytes(v3, "gqa", 10, num_kv_heads=3)


def test_flops_and_memory():
    v3 = PRESETS["deepseek-v3"]
    f = flops_per_token(v3, context=0)
    # ~2 x activated non-embedding params
    assert 2 * 35e9 < f["forward"] < 2 * 37.6e9
    assert flops_per_token(v3, 4096)["attention"] == 2 * 61 * 128 * (192 + 128) * 4096
    assert weight_bytes(v3, "bf16") == 2 * param_counts(v3)["total"]
    fp8 = weight_bytes(v3, "fp8")
    assert 0.5 * weight_bytes(v3, "bf16") < fp8 < 0.52 * weight_bytes(v3, "bf16")
    # 80 GB does not even hold V3's weights
    assert max_context(v3, "mla", 80e9) == 0
    lite = PRESETS["deepseek-v2-lite"]
    n = max_context(lite, "mla", 80e9)
    assert kv_cache_bytes(lite, "mla", n) <= 80e9 - weight_bytes(lite, "bf16") < kv_cache_bytes(lite, "mla", n + 1)


# ---------------------------------------------------------------- config round trips
@pytest.mark.parametrize("name", list(PUBLISHED_CONFIGS))
def test_published_config_round_trip(name, tmp_path):
    doc = PUBLISHED_CONFIGS[name]
    p = tmp_path / "config.json"
    p.write_text(json.dumps(doc))
    for src in (doc, p, tmp_path):
        cfg = ModelConfig.from_hf(src)
        out = cfg.to_hf()
        for k, v in doc.items():
            assert out[k] == v, k
        assert ModelConfig.from_hf(out) == cfg


def test_v2_semantics_from_config():
    v2 = PRESETS["deepseek-v2"]
    assert v2.scoring_func == "softmax" and not v2.uses_bias_routing and v2.num_nextn_predict_layers == 0
    assert PRESETS["deepseek-v2-lite"].q_lora_rank is None
    v3 = PRESETS["deepseek-v3"]
    assert v3.uses_bias_routing and v3.qk_head_dim == 192 and v3.rope_type == "yarn"


def test_v5_rope_parameters_accepted():
    doc = dict(PUBLISHED_CONFIGS["deepseek-v3"])
    rs = doc.pop("rope_scaling")
    doc.pop("rope_theta")
    doc["rope_parameters"] = dict(rs, rope_type="yarn", rope_theta=10000.0)
    cfg = ModelConfig.from_hf(doc)
    assert cfg.rope_type == "yarn" and cfg.rope_param("factor") == 40 and cfg.rope_theta == 10000.0


def test_mini_keeps_v3_structure():
    m = PRESETS["mini"]
    assert m.q_lora_rank and m.kv_lora_rank and m.qk_rope_head_dim
    assert m.first_k_dense_replace >= 1 and m.n_shared_experts >= 1 and m.n_routed_experts > m.num_experts_per_tok
    assert m.n_group > 1 and m.scoring_func == "sigmoid" and m.topk_method == "noaux_tc"
    assert m.num_nextn_predict_layers >= 1


def test_get_preset_returns_a_copy():
    a = get_preset("mini")
    a.hidden_size = 1
    assert PRESETS["mini"].hidden_size == 256
    with pytest.raises(ConfigError, match="preset"):
        get_preset("gpt-5")


# ---------------------------------------------------------------- validation messages
@pytest.mark.parametrize("changes,field,rule", [
    (dict(num_experts_per_tok=20), "num_experts_per_tok", "must be <= n_routed_experts"),
    (dict(topk_group=5), "topk_group", "between 1 and n_group"),
    (dict(n_group=3), "n_group", "divisible"),
    (dict(hidden_size=0), "hidden_size", "positive"),
    (dict(hidden_size=-5), "hidden_size", "positive"),
    (dict(hidden_size="big"), "hidden_size", "integer"),
    (dict(hidden_size=2.5), "hidden_size", "integer"),
    (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor", "finite"),
    (dict(rope_theta=float("inf")), "rope_theta", "finite"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2}), "rope_scaling.type", "unknown rope type"),
    (dict(rope_scaling={"type": "yarn", "factor": 4}), "rope_scaling.original_max_position_embeddings", "required"),
    (dict(scoring_func="relu"), "scoring_func", "one of"),
    (dict(q_lora_rank=0), "q_lora_rank", "positive"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace", "<= num_hidden_layers"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim", "even"),
    (dict(num_experts_per_tok=12, topk_group=1), "num_experts_per_tok", "topk_group"),
    (dict(attention_type="gqa", num_key_value_heads=3), "num_key_value_heads", "divide"),
    (dict(norm_topk_prob="yes"), "norm_topk_prob", "true or false"),
    (dict(hidden_act="gelu"), "hidden_act", "silu"),
])
def test_config_errors_name_field_and_rule(changes, field, rule):
    with pytest.raises(ConfigError) as e:
        PRESETS["mini"].replace(**changes)
    assert e.value.field == field
    assert rule in str(e.value)
    assert str(e.value).startswith(field)
    assert isinstance(e.value, ValueError)


def test_from_hf_rejects_bad_documents(tmp_path):
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_hf(_write(tmp_path, "[1, 2]"))
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(_write(tmp_path, "{nope"))
    cfg = ModelConfig.from_hf({"hidden_size": 4096.0, "some_future_key": 3})
    assert cfg.hidden_size == 4096 and cfg.to_hf()["some_future_key"] == 3


def _write(tmp_path, text):
    p = tmp_path / "c.json"
    p.write_text(text)
    return p


def test_all_presets_finite_figures():
    for cfg in PRESETS.values():
        c = param_counts(cfg)
        assert all(isinstance(v, int) and v >= 0 for v in c.values())
        assert all(math.isfinite(v) and v >= 0 for v in flops_per_token(cfg).values())
