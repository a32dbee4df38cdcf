"""The whole model against transformers' DeepseekV3ForCausalLM (fp32), checkpoints and generation.

transformers is a test-only reference: core never imports it.
"""
import json
import warnings

import pytest
import torch

from core.calc import param_counts
from core.checkpoint import CheckpointError, eva_to_hf, hf_to_eva, load_hf, save_hf
from core.config import PRESETS, ModelConfig
from core.model import DeepSeekV3, generate

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

CASES = {
    "base": {},
    "yarn_past_original_context": dict(rope_scaling=YARN, max_position_embeddings=64),
    "yarn_v2_mscale": dict(rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=0.707), max_position_embeddings=64),
    "groups_negative_bias": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3),
    "no_q_lora": dict(q_lora_rank=None),
    "no_dense_layer": dict(first_k_dense_replace=0),
    "single_group_top1": dict(n_group=1, topk_group=1, num_experts_per_tok=1),
}


def _tiny(**changes) -> ModelConfig:
    return PRESETS["tiny"].replace(vocab_size=97, **changes)


def _hf_model(cfg: ModelConfig, seed: int = 0, bias_scale: float = 0.5, bias_shift: float = -1.0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg.to_hf())).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))  # non-trivial norms
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # non-zero and partly negative biases: group masking must use -inf
                b.copy_(bias_shift + bias_scale * torch.randn(b.shape, generator=g))
    return hf


def _ours_from_hf(hf, cfg) -> DeepSeekV3:
    ours = DeepSeekV3(cfg.replace(num_nextn_predict_layers=0)).eval()
    state = hf_to_eva(hf.state_dict(), ours.config)
    ours.load_state_dict(state, strict=True)
    return ours


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    cfg = _tiny(**CASES[case])
    hf = _hf_model(cfg)
    ours = _ours_from_hf(hf, cfg)
    T = 40 if "yarn" in case else 24  # yarn cases run past original_max_position_embeddings (16)
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert out.shape == (2, T, cfg.vocab_size)
    assert (out - ref).abs().max().item() <= 1e-4
    # and the absorbed-cache incremental path gives the same logits
    with torch.no_grad():
        caches = ours.new_caches(2, T, kind="absorb")
        inc = [ours(ids[:, :10], 0, caches)]
        for t in range(10, T):
            inc.append(ours(ids[:, t:t + 1], t, caches))
    assert (torch.cat(inc, 1) - ref).abs().max().item() <= 1e-4


def test_parameter_count_matches_calculator():
    for name in ("tiny", "mini"):
        cfg = PRESETS[name]
        m = DeepSeekV3(cfg)
        c = param_counts(cfg)
        assert m.num_parameters() == c["total"]
        assert m.num_parameters(include_mtp=True) == c["total_with_mtp"]
    for case in ("no_q_lora", "no_dense_layer"):
        cfg = _tiny(**CASES[case])
        assert DeepSeekV3(cfg).num_parameters() == param_counts(cfg)["total"]


def test_greedy_generation_matches_transformers():
    cfg = _tiny(**CASES["groups_negative_bias"])
    hf = _hf_model(cfg, seed=5)
    ours = _ours_from_hf(hf, cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # explicit attention mask: otherwise generated tokens equal to pad_token_id get masked out
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                          min_new_tokens=20, pad_token_id=0, eos_token_id=None)[:, 7:]
    res = generate(ours, prompt, max_new_tokens=20, temperature=0.0, cache_kind="absorb")
    assert res.tokens == ref.tolist()
    res_naive = generate(ours, prompt, max_new_tokens=20, temperature=0.0, cache_kind="naive")
    assert res_naive.tokens == ref.tolist()


def test_mtp_loss_and_draft_acceptance():
    cfg = _tiny()
    torch.manual_seed(0)
    m = DeepSeekV3(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    out = m.compute_loss(ids[:, :-1], ids[:, 1:], mtp_lambda=0.3)
    assert len(out["mtp_losses"]) == cfg.num_nextn_predict_layers
    assert torch.isfinite(out["loss"]) and out["mtp_loss"] > 0
    out["loss"].backward()
    assert m.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    res = generate(m, ids[:, :5], max_new_tokens=8)
    assert res.mtp_drafts == 2 * 7 and 0 <= res.acceptance <= 1
    # MTP drafts must agree with a from-scratch recomputation of depth 1 on the final sequence
    seq = torch.cat([ids[:, :5], torch.tensor(res.tokens)], 1)
    with torch.no_grad():
        h = m.model.norm(m.hidden_states(seq))
        draft = m.lm_head(m.mtp_hidden(h, seq)[0]).argmax(-1)  # draft[:, i] predicts seq[:, i + 2]
    P = 5
    expect = (draft[:, P - 1:P - 1 + 7] == seq[:, P + 1:P + 8]).sum().item()
    assert res.mtp_accepted == expect


# ------------------------------------------------------------------------------------ checkpoints
def test_hf_save_pretrained_loads_in_eva(tmp_path):
    cfg = _tiny(**CASES["groups_negative_bias"])
    hf = _hf_model(cfg)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("fused", [False, True])
def test_eva_save_loads_in_transformers(tmp_path, fused):
    cfg = _tiny(**CASES["groups_negative_bias"])
    torch.manual_seed(1)
    ours = DeepSeekV3(cfg).eval()
    with torch.no_grad():
        for mod in ours.moe_layers():
            mod.gate.e_score_correction_bias.normal_(-1, 0.5)
    save_hf(ours, tmp_path, fused_experts=fused)
    names = set(json.loads((tmp_path / "config.json").read_text()))
    assert {"hidden_size", "kv_lora_rank", "n_group"} <= names
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    if fused:
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in keys)
    else:
        assert any(k.endswith("mlp.experts.0.gate_proj.weight") for k in keys)
        L = cfg.num_hidden_layers
        assert f"model.layers.{L}.eh_proj.weight" in keys and f"model.layers.{L}.shared_head.head.weight" in keys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path).float().eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4
    back = load_hf(tmp_path)  # and round-trips through our loader, MTP included
    with torch.no_grad():
        assert torch.equal(back(ids), ours(ids))
        assert torch.equal(back.mtp[0].eh_proj.weight, ours.mtp[0].eh_proj.weight)


def test_fp8_checkpoint_dequantized_on_load(tmp_path):
    cfg = _tiny()
    torch.manual_seed(2)
    ours = DeepSeekV3(cfg).eval()
    save_hf(ours, tmp_path, fp8=True)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_a_proj.weight")
        s = f.get_tensor("model.layers.0.self_attn.q_a_proj.weight_scale_inv")
    assert w.dtype == torch.float8_e4m3fn and s.shape == (1, 1)  # 48x64 weight -> one 128x128 block
    back = load_hf(tmp_path)
    a = back.model.layers[0].self_attn.q_a_proj.weight
    b = ours.model.layers[0].self_attn.q_a_proj.weight
    assert (a - b).norm() / b.norm() < 0.05  # E4M3 relative error ~2.6%
    assert torch.equal(back.model.embed_tokens.weight, ours.model.embed_tokens.weight)  # kept high precision


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(tmp_path)
    save_hf(DeepSeekV3(_tiny()), tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_hf(tmp_path)
    # a config that does not match the tensors
    save_hf(DeepSeekV3(_tiny()), tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    d = json.loads((tmp_path / "config.json").read_text())
    d["hidden_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="shape"):
        load_hf(tmp_path)


def test_state_dict_names_round_trip():
    cfg = _tiny()
    m = DeepSeekV3(cfg)
    back = hf_to_eva(eva_to_hf(m), cfg)
    sd = m.state_dict()
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_every_module_initialises_its_own_weights_as_transformers():
    """N(0, initializer_range) for embeddings, linears, router and experts, zero biases, unit norms (transformers'
    DeepseekV3PreTrainedModel); a module owning parameters without its own init_weights is refused."""
    cfg = PRESETS["tiny"].replace(attention_type="mha", attention_bias=True, initializer_range=0.05)
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert abs(p.mean().item()) < 0.01 and abs(p.std().item() - 0.05) < 0.01, name

    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))

    model.model.layers[0].extra = Bare()
    with pytest.raises(TypeError, match="Bare owns parameters but defines no init_weights"):
        model.init_weights()
