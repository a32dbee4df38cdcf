"""MLA / baseline attention, KV caches, RoPE + YaRN.

transformers is a TEST-ONLY reference here (core never imports it): parity with `DeepseekV3Attention`, its rotary
embedding and `_compute_yarn_parameters`.
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import _compute_yarn_parameters
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_interleave,
    yarn_apply_mscale,
)

from core.attention import (
    MLA,
    GroupedQueryAttention,
    KVCache,
    MLACache,
    NaiveKVCache,
    build_attention,
    cache_bytes_formula,
    make_cache,
)
from core.config import PRESETS
from core.probes import attention_probs, kv_rank_truncation_error
from core.rope import (
    RotaryEmbedding,
    apply_rotary_interleaved,
    find_correction_dim,
    rope_attention_factor,
    rope_inv_freq,
    softmax_scale,
    yarn_get_mscale,
)

TOL = 1e-5
# Small MLA shapes; v_head_dim != qk_nope_head_dim on purpose (catches split / view mix-ups).
DIMS = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64)


def yarn(mscale=1.0, mscale_all_dim=1.0, factor=4, orig=16, **extra):
    d = {"type": "yarn", "factor": factor, "original_max_position_embeddings": orig, "beta_fast": 32,
         "beta_slow": 1, **extra}
    if mscale is not None:
        d["mscale"] = mscale
    if mscale_all_dim is not None:
        d["mscale_all_dim"] = mscale_all_dim
    return d


def our_cfg(rope_scaling=None, q_lora_rank=24, attention_bias=False, **kw):
    return PRESETS["tiny"].replace(**{**DIMS, **kw}, q_lora_rank=q_lora_rank, rope_scaling=rope_scaling,
                                   attention_bias=attention_bias, rope_theta=10000.0)


def hf_cfg(rope_scaling=None, q_lora_rank=24, attention_bias=False, **kw):
    """transformers 5.x wants `rope_parameters` (rope_type + rope_theta inside); `rope_scaling` is the old name."""
    rp = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling is not None:
        rp = {"rope_theta": 10000.0, "rope_type": rope_scaling["type"],
              **{k: v for k, v in rope_scaling.items() if k != "type"}}
    return DeepseekV3Config(**{**DIMS, **kw}, q_lora_rank=q_lora_rank, rope_parameters=rp,
                            attention_bias=attention_bias, attn_implementation="eager")


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights: peaked-enough attention, RMSNorm weights far from 1, non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "layernorm" in name:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:  # o_proj smaller: keeps outputs O(1) so a 1e-5 absolute tolerance is meaningful, not marginal
                gain = 0.5 if name.startswith("o_proj") else 1.5
                p.copy_(torch.randn(p.shape, generator=g) * (gain / math.sqrt(p.shape[1])))


def hf_forward(attn: DeepseekV3Attention, rotary: DeepseekV3RotaryEmbedding, x: torch.Tensor) -> torch.Tensor:
    b, t, _ = x.shape
    pos = torch.arange(t)[None].expand(b, -1)
    cos, sin = rotary(x, pos)
    mask = torch.full((t, t), torch.finfo(x.dtype).min).triu(1)[None, None].expand(b, 1, t, t)
    out, _ = attn(x, (cos, sin), mask)
    return out


def make_pair(rope_scaling=None, q_lora_rank=24, attention_bias=False, seed=0):
    hc = hf_cfg(rope_scaling, q_lora_rank, attention_bias)
    hf = DeepseekV3Attention(hc, layer_idx=0).eval()
    randomize(hf, seed)
    ours = MLA(our_cfg(rope_scaling, q_lora_rank, attention_bias)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # names map 1:1
    return hc, hf, DeepseekV3RotaryEmbedding(hc), ours


def decode(module, x, cache, splits):
    """Run x through `module` with `cache` in chunks starting at the given positions; concat outputs."""
    outs, bounds = [], list(splits) + [x.shape[1]]
    for s, e in zip(bounds[:-1], bounds[1:]):
        outs.append(module(x[:, s:e], start_pos=s, cache=cache))
    return torch.cat(outs, dim=1)


# --------------------------------------------------------------------------------------------- HF parity
PARITY_CASES = {
    "default-rope": dict(rope_scaling=None),
    "q_lora_none": dict(rope_scaling=None, q_lora_rank=None),
    "yarn-1.0/1.0": dict(rope_scaling=yarn(1.0, 1.0)),
    "yarn-0.707/0.707": dict(rope_scaling=yarn(0.707, 0.707)),
    "yarn-1.0/0.5": dict(rope_scaling=yarn(1.0, 0.5)),          # attention_factor != 1 on cos/sin
    "yarn-mscale-only": dict(rope_scaling=yarn(0.707, None)),   # fallback: get_mscale(s), no softmax correction
    "yarn-q_lora_none-bias": dict(rope_scaling=yarn(1.0, 1.0), q_lora_rank=None, attention_bias=True),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
@torch.no_grad()
def test_mla_matches_transformers(case):
    kw = PARITY_CASES[case]
    ocfg = our_cfg(**kw)
    hc, hf, rotary, ours = make_pair(**kw)
    t = 40 if kw["rope_scaling"] else 24  # yarn: past original_max_position_embeddings (16)
    x = torch.randn(2, t, DIMS["hidden_size"], generator=torch.Generator().manual_seed(1))
    ref = hf_forward(hf, rotary, x)

    if kw["rope_scaling"] is not None:  # make sure the reference really runs yarn with the expected factors
        assert rotary.rope_type == "yarn"
        assert rotary.attention_scaling == pytest.approx(rope_attention_factor(ocfg), rel=1e-12)
        assert torch.allclose(rotary.inv_freq, rope_inv_freq(ocfg), rtol=1e-6, atol=0)
        assert not torch.allclose(rotary.inv_freq, rope_inv_freq(our_cfg(None)))
    assert hf.scaling == pytest.approx(ours.softmax_scale, rel=1e-12)

    out_train = ours(x)
    out_absorbed = decode(ours, x, make_cache(ocfg, "absorbed", 2, None, torch.float32),
                          [0, t // 2, t // 2 + 1, t // 2 + 2])
    assert (out_train - ref).abs().max() <= TOL
    assert (out_absorbed - ref).abs().max() <= TOL
    assert ref.abs().mean() > 1e-2  # a non-trivial output


@torch.no_grad()
def test_yarn_parity_is_meaningful():
    """Negative control: the yarn and default reference outputs really differ (so the parity above can fail)."""
    _, hf_y, rot_y, _ = make_pair(rope_scaling=yarn(1.0, 1.0))
    _, hf_d, rot_d, _ = make_pair(rope_scaling=None)
    x = torch.randn(1, 40, DIMS["hidden_size"], generator=torch.Generator().manual_seed(2))
    assert (hf_forward(hf_y, rot_y, x) - hf_forward(hf_d, rot_d, x)).abs().max() > 1e-2


@pytest.mark.parametrize("q_lora_rank", [24, None])
@pytest.mark.parametrize("bias", [False, True])
def test_mla_state_dict_names_match_transformers(q_lora_rank, bias):
    hf = DeepseekV3Attention(hf_cfg(None, q_lora_rank, bias), layer_idx=0)
    ours = MLA(our_cfg(None, q_lora_rank, bias))
    hf_sd, our_sd = hf.state_dict(), ours.state_dict()
    assert set(hf_sd) == set(our_sd)
    assert all(hf_sd[k].shape == our_sd[k].shape for k in hf_sd)


# --------------------------------------------------------------------------------------------- MLA paths
@pytest.mark.parametrize("q_lora_rank", [24, None])
@pytest.mark.parametrize("rope_scaling", [None, yarn(0.707, 0.707)])
@torch.no_grad()
def test_mla_naive_absorbed_training_agree(q_lora_rank, rope_scaling):
    cfg = our_cfg(rope_scaling, q_lora_rank)
    m = MLA(cfg).eval()
    randomize(m, 3)
    x = torch.randn(3, 21, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    ref = m(x)  # training path (SDPA)
    # explicit-softmax path must agree with SDPA too
    ref_eager, probs = m(x, return_attn=True)
    assert (ref_eager - ref).abs().max() <= TOL
    schedules = {
        "prefill+decode": [0, 8] + list(range(9, 21)),          # prefill 8, then 1 token at a time
        "chunked": [0, 5, 12, 13, 14, 19],                       # chunks of T>1 at start_pos > 0
        "token-by-token": list(range(21)),
    }
    for kind in ("absorbed", "naive"):
        for name, splits in schedules.items():
            cache = make_cache(cfg, kind, 3, None if name != "chunked" else 32, torch.float32)
            out = decode(m, x, cache, splits)
            assert (out - ref).abs().max() <= TOL, (kind, name)
            assert cache.seq_len == 21
    # attention probabilities from the cached path equal the training ones (prefill of the whole sequence)
    _, p_abs = m(x, 0, make_cache(cfg, "absorbed", 3, None, torch.float32), return_attn=True)
    assert (p_abs - probs).abs().max() <= TOL


@torch.no_grad()
def test_chunked_prefill_mask_is_causal():
    """A chunk at start_pos > 0 must not see its own future tokens: changing a later token of the chunk leaves the
    earlier outputs unchanged, and the last output changes."""
    cfg = our_cfg(yarn())
    m = MLA(cfg).eval()
    randomize(m, 5)
    x = torch.randn(1, 12, cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    x2 = x.clone()
    x2[:, 11] += 1.0
    outs = []
    for inp in (x, x2):
        c = make_cache(cfg, "absorbed", 1, None, torch.float32)
        m(inp[:, :6], 0, c)
        outs.append(m(inp[:, 6:], 6, c))
    assert (outs[0][:, :5] - outs[1][:, :5]).abs().max() == 0
    assert (outs[0][:, 5] - outs[1][:, 5]).abs().max() > 1e-4


def test_training_path_has_gradients_and_rewind():
    cfg = our_cfg(yarn())
    m = MLA(cfg)
    x = torch.randn(2, 9, cfg.hidden_size, requires_grad=True)
    m(x).square().mean().backward()
    assert x.grad is not None and all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    with torch.no_grad():
        # rewinding the cache (re-prefill from 0) reproduces the first result
        c = make_cache(cfg, "absorbed", 2, None, torch.float32)
        a = m(x, 0, c)
        b = m(x, 0, c)
        assert torch.equal(a, b) and c.seq_len == 9
        with pytest.raises(ValueError):
            m(x[:, :1], 11, c)  # a gap in the cache
        with pytest.raises(ValueError):
            m(x[:1, :1], 9, c)  # wrong batch


@torch.no_grad()
def test_bf16_module_runs_all_paths():
    cfg = our_cfg(yarn())
    m = MLA(cfg)
    randomize(m, 7)
    x = torch.randn(1, 10, cfg.hidden_size)
    ref = m(x)
    mb = m.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    for out in (mb(xb), decode(mb, xb, make_cache(cfg, "absorbed", 1, None, torch.bfloat16), [0, 7, 8, 9]),
                decode(mb, xb, make_cache(cfg, "naive", 1, None, torch.bfloat16), [0, 7, 8, 9])):
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref).abs().max() <= 0.1 * ref.abs().max()


# --------------------------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("attention_type,kv_heads", [("mha", 4), ("gqa", 2), ("mqa", 1)])
@torch.no_grad()
def test_baseline_paths_agree(attention_type, kv_heads):
    cfg = our_cfg(yarn(), attention_type=attention_type, num_key_value_heads=2)
    m = build_attention(cfg)
    assert isinstance(m, GroupedQueryAttention) and m.num_kv_heads == kv_heads
    assert m.k_proj.weight.shape == (kv_heads * cfg.v_head_dim, cfg.hidden_size)
    randomize(m, 8)
    x = torch.randn(2, 17, cfg.hidden_size, generator=torch.Generator().manual_seed(9))
    ref = m(x)
    out_eager, p = m(x, return_attn=True)
    assert (out_eager - ref).abs().max() <= TOL
    for splits in ([0, 9] + list(range(10, 17)), [0, 4, 11, 12]):
        cache = make_cache(cfg, "kv", 2, None, torch.float32)
        assert isinstance(cache, KVCache)
        assert (decode(m, x, cache, splits) - ref).abs().max() <= TOL


@torch.no_grad()
def test_gqa_equals_mha_with_repeated_kv_heads():
    """Grouping check: GQA == MHA whose K/V projections repeat each kv head for its group of query heads."""
    gcfg = our_cfg(None, attention_type="gqa", num_key_value_heads=2)
    g = GroupedQueryAttention(gcfg)
    randomize(g, 10)
    m = GroupedQueryAttention(our_cfg(None, attention_type="mha"))
    d = gcfg.v_head_dim
    with torch.no_grad():
        m.q_proj.weight.copy_(g.q_proj.weight)
        m.o_proj.weight.copy_(g.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(g, name).weight.view(2, d, -1).repeat_interleave(2, dim=0).reshape(4 * d, -1)
            getattr(m, name).weight.copy_(w)
    x = torch.randn(2, 11, gcfg.hidden_size)
    assert (g(x) - m(x)).abs().max() <= TOL


# --------------------------------------------------------------------------------------------- cache bytes
@pytest.mark.parametrize("dtype,bpe", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float8_e4m3fn, 1)])
@pytest.mark.parametrize("max_len", [None, 40])
@torch.no_grad()
def test_measured_cache_bytes_equal_formula(dtype, bpe, max_len):
    batch, seq = 3, 13
    C, R, H, Dqk, Dv = 32, 8, 4, 24, 12  # DIMS
    expected = {
        "absorbed": batch * seq * (C + R) * bpe,
        "naive": batch * seq * H * (Dqk + Dv) * bpe,
        "mha": batch * seq * 2 * 4 * Dv * bpe,
        "gqa": batch * seq * 2 * 2 * Dv * bpe,
        "mqa": batch * seq * 2 * 1 * Dv * bpe,
    }
    x = torch.randn(batch, seq, DIMS["hidden_size"])
    for kind, want in expected.items():
        if kind in ("absorbed", "naive"):
            cfg = our_cfg(yarn())
            m = MLA(cfg)
        else:
            cfg = our_cfg(yarn(), attention_type=kind, num_key_value_heads=2)
            m = GroupedQueryAttention(cfg)
        cache = make_cache(cfg, kind, batch, max_len, dtype)
        decode(m, x, cache, [0, 9, 10, 11, 12])
        assert cache.seq_len == seq
        assert all(t.dtype == dtype for t in cache.tensors().values())
        assert cache.nbytes() == want, kind
        assert cache_bytes_formula(cfg, kind, seq, batch, bpe) == want
        if max_len is not None:
            assert cache.allocated_bytes() == want // seq * max_len


def test_fp8_cache_saturates():
    c = MLACache(1, 4, 2, dtype=torch.float8_e4m3fn)
    ckv, kpe = c.update(0, torch.tensor([[[1000.0, -1000.0, 1.0, 0.5]]]), torch.tensor([[[3.0, -2.0]]]))
    assert ckv.float().tolist() == [[[448.0, -448.0, 1.0, 0.5]]] and kpe.float().tolist() == [[[3.0, -2.0]]]
    assert c.nbytes() == 6 and c.bytes_per_element == 1


def test_v3_cache_elements_per_token():
    v3 = PRESETS["deepseek-v3"]
    assert cache_bytes_formula(v3, "absorbed", 1, 1, 1) == 576
    assert cache_bytes_formula(v3, "naive", 1, 1, 1) == 128 * (192 + 128)
    c = MLACache(1, v3.kv_lora_rank, v3.qk_rope_head_dim, dtype=torch.bfloat16)
    c.update(0, torch.randn(1, 4, 512), torch.randn(1, 4, 64))
    assert c.nbytes() == 4 * 576 * 2
    n = NaiveKVCache(1, 128, 192, 128, max_len=4, dtype=torch.bfloat16)
    n.update(0, torch.randn(1, 2, 128, 192), torch.randn(1, 2, 128, 128))
    assert n.nbytes() == 2 * 40960 * 2


# --------------------------------------------------------------------------------------------- YaRN numbers
def test_yarn_frequency_blend_v3():
    v3 = PRESETS["deepseek-v3"]
    assert find_correction_dim(32, 64, 1e4, 4096) == pytest.approx(10.47, abs=5e-3)
    assert find_correction_dim(1, 64, 1e4, 4096) == pytest.approx(22.51, abs=5e-3)
    inv = rope_inv_freq(v3).double()
    base = 1.0 / (1e4 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    assert inv.shape == (32,)
    assert torch.allclose(inv[:11], base[:11], rtol=1e-6, atol=0)              # indices <= 10 unchanged
    assert torch.allclose(inv[23:], base[23:] / 40, rtol=1e-6, atol=0)         # indices >= 23 divided by 40
    mid = slice(11, 23)
    assert bool(((inv[mid] < base[mid] * (1 - 1e-6)) & (inv[mid] > base[mid] / 40 * (1 + 1e-6))).all())


def test_softmax_scale_v3_and_v2_lite():
    assert softmax_scale(PRESETS["deepseek-v3"]) == pytest.approx(0.1352338, abs=1e-6)
    assert softmax_scale(PRESETS["deepseek-v2-lite"]) == pytest.approx(0.1147214, abs=1e-6)
    assert rope_attention_factor(PRESETS["deepseek-v3"]) == 1.0
    assert softmax_scale(PRESETS["mini"]) == PRESETS["mini"].qk_head_dim ** -0.5  # no rope_scaling
    assert yarn_get_mscale(40, 1.0) == pytest.approx(1.368888, abs=1e-6)
    assert yarn_get_mscale(1.0, 5.0) == 1.0


YARN_VARIANTS = {
    "v3": yarn(1.0, 1.0, factor=40, orig=4096),
    "v2-lite": yarn(0.707, 0.707, factor=40, orig=4096),
    "unequal": yarn(1.0, 0.5, factor=4, orig=16),
    "mscale-only": yarn(0.707, None, factor=4, orig=16),
    "none": yarn(None, None, factor=8, orig=32),
    "explicit-attention-factor": yarn(1.0, 1.0, factor=4, orig=16, attention_factor=1.3),
    "no-truncate": yarn(1.0, 1.0, factor=4, orig=16, truncate=False),
    "betas": yarn(1.0, 1.0, factor=16, orig=64, beta_fast=16),
}


@pytest.mark.parametrize("name", list(YARN_VARIANTS))
def test_yarn_parameters_match_transformers(name):
    rs = YARN_VARIANTS[name]
    kw = dict(qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=163840)
    hc = hf_cfg(rs, **kw)
    ours = our_cfg(rs, **kw)
    inv, factor = _compute_yarn_parameters(hc)
    assert torch.allclose(rope_inv_freq(ours), inv, rtol=1e-6, atol=0)
    assert rope_attention_factor(ours) == pytest.approx(factor, rel=1e-12)
    assert softmax_scale(ours) == pytest.approx(yarn_apply_mscale(hc.rope_parameters, 192 ** -0.5), rel=1e-12)


# --------------------------------------------------------------------------------------------- RoPE layout
@pytest.mark.parametrize("rope_scaling", [None, yarn(1.0, 0.5)])
@torch.no_grad()
def test_interleaved_rope_equals_permute_then_rotate_half(rope_scaling):
    d, t = 16, 40
    hc = hf_cfg(rope_scaling, qk_rope_head_dim=d)
    cfg = our_cfg(rope_scaling, qk_rope_head_dim=d)
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(2, t, 3, d, generator=g), torch.randn(2, t, 3, d, generator=g)
    cos, sin = DeepseekV3RotaryEmbedding(hc)(q, torch.arange(t)[None])  # [1, T, d]
    freqs = RotaryEmbedding(cfg)(0, t)
    qr, kr = apply_rotary_interleaved(q, freqs), apply_rotary_interleaved(k, freqs)
    ours = torch.einsum("bthd,bshd->bhts", qr, kr)

    def perm(z):  # [x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...]  (reference §2.4)
        return z.view(*z.shape[:-1], d // 2, 2).transpose(-1, -2).reshape(z.shape)

    # transformers' rotate_half form on permuted channels; tensors as [B, H, T, d]
    qh, kh = apply_rotary_pos_emb(perm(q).transpose(1, 2), perm(k).transpose(1, 2), cos, sin)
    theirs = torch.einsum("bhtd,bhsd->bhts", qh, kh)
    assert (ours - theirs).abs().max() <= TOL
    assert (perm(qr).transpose(1, 2) - qh).abs().max() <= TOL  # same vectors up to the permutation
    # transformers 5.x direct interleave form
    qi, _ = apply_rotary_pos_emb_interleave(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert (perm(qr).transpose(1, 2) - qi).abs().max() <= TOL
    # negative control: rotate_half WITHOUT the permutation is a different rotation
    qw, kw_ = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert (torch.einsum("bhtd,bhsd->bhts", qw, kw_) - ours).abs().max() > 0.1


@pytest.mark.parametrize("nope", [4, 5])  # 5: the rope slice sits at an odd offset (no complex view possible)
def test_rope_on_a_sliced_head_matches_the_rotation_formula_with_gradients(nope):
    """x[2i], x[2i+1] -> (x0 cos - x1 sin, x0 sin + x1 cos), for the q[..., nope:] slices MLA rotates."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 3, nope + 8, generator=g, requires_grad=True)
    ang = torch.randn(6, 4, generator=g)
    freqs = torch.polar(torch.ones_like(ang), ang)
    out = apply_rotary_interleaved(q[..., nope:], freqs)
    x0, x1 = q[..., nope::2], q[..., nope + 1::2]
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
    ref = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    assert (out - ref).abs().max() <= 1e-6
    w = torch.randn(out.shape, generator=g)
    (gq,) = torch.autograd.grad((out * w).sum(), q)
    (gr,) = torch.autograd.grad((ref * w).sum(), q)
    assert (gq - gr).abs().max() <= 1e-6 and gq[..., :nope].abs().max() == 0
    one = torch.randn(3, generator=g)[1:].view(1, 1, 2)  # one pair at an odd storage offset, size-1 dims
    assert torch.equal(apply_rotary_interleaved(one, freqs[:1]), apply_rotary_interleaved(one.clone(), freqs[:1]))


def test_rotary_cache_grows_lazily():
    cfg = our_cfg(yarn(), max_position_embeddings=64)
    rot = RotaryEmbedding(cfg, initial_len=8)
    assert rot.cached_len == 0
    f = rot(5, 2)
    assert rot.cached_len == 8 and f.shape == (2, 4)
    f = rot(60, 30)  # past max_position_embeddings: extended further
    assert rot.cached_len >= 90
    direct = torch.polar(torch.full((30, 4), rope_attention_factor(cfg)),
                         torch.outer(torch.arange(60, 90, dtype=torch.float32), rope_inv_freq(cfg)))
    assert torch.allclose(f, direct, atol=1e-6)
    x = torch.randn(2, 30, 4 * 2)  # [B, T, d] form
    assert apply_rotary_interleaved(x, f).shape == x.shape


# --------------------------------------------------------------------------------------------- app helpers
@torch.no_grad()
def test_attention_probs_shape_and_causality():
    for cfg in (our_cfg(yarn()), our_cfg(yarn(), attention_type="gqa", num_key_value_heads=2)):
        m = build_attention(cfg)
        p = attention_probs(m, torch.randn(2, 9, cfg.hidden_size))
        assert p.shape == (2, cfg.num_attention_heads, 9, 9)
        assert torch.allclose(p.sum(-1), torch.ones(2, cfg.num_attention_heads, 9), atol=1e-5)
        assert p.triu(1).abs().max() == 0
        assert p[..., 1:, 0].abs().min() > 0


@torch.no_grad()
def test_kv_rank_truncation_error():
    # known spectrum: singular values 4, 3 -> rank-1 error 3/5
    r = kv_rank_truncation_error(torch.diag(torch.tensor([4.0, 3.0])), [0, 1, 2], bytes_per_element=2)
    assert r["rel_error"] == pytest.approx([1.0, 0.6, 0.0], abs=1e-7)
    assert r["bytes_per_token"] == [0, 2, 4] and r["full_bytes_per_token"] == [4, 4, 4]
    # MLA's decompressed K/V is exactly rank kv_lora_rank + rope: error vanishes there, not before
    cfg = our_cfg(yarn())
    m = MLA(cfg)
    randomize(m, 12)
    cr = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    r = kv_rank_truncation_error(m, [1, cr - 4, cr, cr + 8], seq_len=64, batch=2)
    assert r["rel_error"][2] < 1e-5 and r["rel_error"][1] > 1e-3
    assert r["rel_error"] == sorted(r["rel_error"], reverse=True)
    assert r["full_bytes_per_token"][0] == 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    # default ranks include C + R for MLA; baselines give a curve too
    assert cr in kv_rank_truncation_error(m, seq_len=64)["rank"]
    g = build_attention(our_cfg(None, attention_type="mha"))
    r = kv_rank_truncation_error(g, [4, 16], seq_len=64)
    assert r["rel_error"][0] > r["rel_error"][1] > 0


def test_make_cache_kinds_and_errors():
    cfg = our_cfg(yarn())
    assert isinstance(make_cache(cfg), MLACache)
    assert isinstance(make_cache(cfg, "naive"), NaiveKVCache)
    assert isinstance(make_cache(cfg, "absorb"), MLACache)  # official attn_impl spelling
    mqa = cfg.replace(attention_type="mqa")
    assert isinstance(make_cache(mqa), KVCache) and make_cache(mqa, "absorb", 1).capacity == 0
    assert make_cache(mqa, "absorb")._t["k"].shape[2] == 1  # baseline config: its own KV cache
    assert make_cache(cfg, dtype=None).dtype == torch.get_default_dtype()
    with pytest.raises(ValueError):
        make_cache(cfg, "bogus")
    m = MLA(cfg)
    with pytest.raises(TypeError):
        m(torch.randn(1, 2, cfg.hidden_size), 0, make_cache(cfg, "mha", 1))
    c = make_cache(cfg, "absorbed", 1, max_len=4, dtype=torch.float32)
    with pytest.raises(ValueError):
        m(torch.randn(1, 5, cfg.hidden_size), 0, c)  # overflow of a preallocated cache
