"""The switches of the FP8 training recipe (V3 report §3.3; core/fp8/recipe.py): each quantized tensor's format,
granularity and scale match the recipe table, power-of-2 scales are exact, the 128x1 Wgrad re-tiling puts the
scale groups along the Wgrad reduction dim, SwiGLU recompute, BF16 combine, BF16 AdamW moments, the limited
accumulator. Tiny shapes only."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from core import fp8
from core.config import get_preset
from core.model import DeepSeekV3
from core.moe import MoE
from core.optim import AdamW
from core.train import TrainConfig, TrainRun

TINY = get_preset("tiny")
ROLE_KEY = {"act": "x", "weight": "w", "grad": "dy", "act_wgrad": "x_wgrad", "grad_wgrad": "dy_wgrad"}
TABLE_ROW = {"x": ("Fprop", "input x"), "w": ("Fprop", "weight W"), "dy": ("Dgrad", "output gradient dY"),
             "x_wgrad": ("Wgrad", "input x"), "dy_wgrad": ("Wgrad", "output gradient dY")}


def _is_pow2(s: torch.Tensor) -> bool:
    return bool((torch.frexp(s.float())[0].abs() == 0.5).all())


def _site(key: str) -> tuple[str, str]:
    """stats key "<module>.<role>" -> (recipe site, role)."""
    mod, _, role = key.rpartition(".")
    if mod.endswith("experts.up"):
        return "expert_up", role
    if mod.endswith("experts.down"):
        return "expert_down", role
    if mod.endswith("experts"):  # the SwiGLU cache sits between the two expert GEMMs
        return "expert_up", role
    return fp8.site_of(mod), role


@pytest.fixture(scope="module")
def stats_per_recipe():
    """One forward/backward of the tiny model (MLA + MoE) per recipe; FP8Stats of every quantized tensor."""
    torch.set_num_threads(1)
    out = {}
    ids = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for name in ("deepseek-v3", "deepseek-gemm", "rowwise"):
        torch.manual_seed(0)
        model = fp8.convert_to_fp8(DeepSeekV3(TINY), name)
        logits = model(ids)
        logits = logits if torch.is_tensor(logits) else logits.logits
        logits.float().logsumexp(-1).mean().backward()
        out[name] = fp8.get_fp8_stats(model).snapshot()["tensors"]
    return out


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-gemm", "rowwise"])
def test_every_quantized_tensor_matches_the_recipe_table(stats_per_recipe, name):
    tensors = stats_per_recipe[name]
    table = {(r["site"], r["gemm"], r["tensor"]): r for r in fp8.recipe_table(name)}
    seen = set()
    for key, e in tensors.items():
        site, role = _site(key)
        if role == "swiglu_cache":
            spec = fp8.swiglu_cache_spec(name)
            row = table[("expert_up", "-", "SwiGLU input (kept for backward)")]
        else:
            spec = fp8.operand_specs(name, site)[ROLE_KEY[role]]
            row = table[(site, *TABLE_ROW[ROLE_KEY[role]])]
        assert (e["fmt"], e["granularity"]) == (spec.fmt, spec.granularity), key
        assert row["format"] == spec.fmt.upper() and row["pow2_scale"] == spec.pow2, key
        assert row["granularity"] == fp8.granularity_label(spec.granularity, spec.block_size), key
        assert e["scale_pow2"] == spec.pow2, key  # random data: a free scale is never exactly 2^k
        seen.add((site, role))
    sites = {"linear", "attn_out", "expert_up", "expert_down"}
    assert {s for s, _ in seen} == sites
    r = fp8.get_recipe(name)
    if r.wgrad_tiling == "128x1":
        assert {(s, "act_wgrad") for s in sites} <= seen and {(s, "grad_wgrad") for s in sites} <= seen
    assert (("expert_up", "swiglu_cache") in seen) == r.swiglu_recompute


def test_deepseek_v3_table_says_what_the_report_says():
    rows = fp8.recipe_table("deepseek-v3")
    by = {(r["site"], r["gemm"], r["tensor"]): r for r in rows}
    post_attn = by[("attn_out", "Fprop", "input x")]
    assert (post_attn["format"], post_attn["pow2_scale"]) == ("E5M6", True)
    assert by[("expert_up", "Fprop", "input x")]["pow2_scale"]  # FP8 dispatch
    assert by[("expert_down", "Dgrad", "output gradient dY")]["pow2_scale"]  # gradient before the down-projection
    assert not by[("linear", "Fprop", "input x")]["pow2_scale"]
    assert not by[("expert_up", "Dgrad", "output gradient dY")]["pow2_scale"]
    assert {r["granularity"] for r in rows if r["gemm"] == "Wgrad"} == {"128x1"}
    assert {r["granularity"] for r in rows if r["tensor"].startswith("weight W")} == {"128x128"}
    get = lambda site, gemm, tensor: by[(site, gemm, tensor)]  # noqa: E731
    assert get("expert_down", "-", "expert output (combine)")["format"] == "BF16"
    assert get("optimizer", "-", "AdamW moments m, v")["format"] == "BF16"
    assert get("optimizer", "-", "master weights")["format"] == "FP32"
    gemm_only = fp8.recipe_table("deepseek-gemm")
    assert {r["granularity"] for r in gemm_only if r["gemm"] == "Wgrad"} == {"1x128"}
    assert not any(r["pow2_scale"] for r in gemm_only) and "E5M6" not in {r["format"] for r in gemm_only}
    notes = fp8.recipe_notes("deepseek-v3")
    assert notes and all(isinstance(n, str) and "\n" not in n for n in notes)


def test_e5m6_grid_and_the_generic_rounder_matches_torch_fp8_casts():
    x = torch.exp2(torch.empty(20000).uniform_(-24, 17, generator=torch.Generator().manual_seed(1)))
    x = x * torch.where(torch.rand(20000, generator=torch.Generator().manual_seed(2)) < 0.5, -1.0, 1.0)
    for f in ("e4m3", "e5m2"):  # the rounder that emulates E5M6 reproduces the real FP8 casts bit for bit
        assert torch.equal(fp8.round_to_bits(x, f), fp8.cast_to_fp8(x, f).float())
    y = fp8.round_to_bits(x, "e5m6")
    assert y.abs().max() == fp8.E5M6.max == 65024.0
    normal = y.abs() >= 2.0 ** -14
    m, _ = torch.frexp(y[normal])
    assert torch.equal(m * 128, torch.round(m * 128))  # 1 implicit + 6 mantissa bits
    sub = y[~normal]
    assert torch.equal(sub / 2.0 ** -20, torch.round(sub / 2.0 ** -20))
    assert ((y - x).abs() / x.abs())[normal & (x.abs() < 65024)].max() <= 2.0 ** -7


def test_pow2_scales_are_exact_powers_of_two_and_e5m6_values_on_the_grid():
    x = torch.randn(40, 96) * 3
    spec = fp8.operand_specs("deepseek-v3", "attn_out")["x"]
    x_hat, q, s = fp8.quantize_spec(x, spec)
    assert _is_pow2(s) and q.dtype == torch.float32 and torch.equal(fp8.round_to_bits(q, "e5m6"), q)
    assert (q.abs().amax(-1) <= fp8.E5M6.max).all() and torch.equal(x_hat, q * s.repeat_interleave(128, -1)[:, :96])
    for site, key in (("expert_up", "x"), ("expert_down", "dy"), ("expert_up", "x_wgrad")):
        sp = fp8.operand_specs("deepseek-v3", site)[key]
        assert sp.pow2 and _is_pow2(fp8.quantize_spec(x, sp)[2])
    assert not _is_pow2(fp8.quantize_spec(x, fp8.operand_specs("deepseek-v3", "linear")["x"])[2])


def test_128x1_wgrad_scale_groups_run_along_the_reduction_dim():
    """dW = dY^T X reduces over the tokens. 1x128 tiles give each token its own scale, so a scale is not constant
    along the reduction; 128x1 tiles (block 32 here) hold one scale per 32 tokens per channel, so dW is a sum of
    per-block GEMMs of the FP8 codes times two scales, as a block-scaled GEMM computes it (§3.3.4)."""
    bs = 32
    g = torch.Generator().manual_seed(3)
    M, K, N = 96, 64, 48
    x, dy = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    x[5, 7] = 1e5  # one outlier (pushes its group mates into E4M3 subnormals): token 5, channel 7
    r_t = fp8.FP8Recipe("t", block_size=bs, wgrad_tiling="128x1")
    r_r = fp8.FP8Recipe("r", block_size=bs)
    sp = fp8.operand_specs(r_t)
    assert sp["x_wgrad"].granularity == "tile_t" and fp8.operand_specs(r_r)["x_wgrad"].granularity == "tile"
    xw, xq, xs = fp8.quantize_spec(x, sp["x_wgrad"])
    gw, gq, gs = fp8.quantize_spec(dy, sp["dy_wgrad"])
    assert xs.shape == (K, M // bs) and gs.shape == (N, M // bs)  # one scale per channel per 32 tokens
    cols = [slice(kb * bs, (kb + 1) * bs) for kb in range(M // bs)]  # token blocks: columns of gq [N, M], xq [K, M]
    blocks = sum((gs[:, kb, None] * xs[None, :, kb]) * (gq.float()[:, c] @ xq.float()[:, c].T) for kb, c in enumerate(cols))
    torch.testing.assert_close(blocks, gw.T @ xw, rtol=1e-5, atol=1e-4)
    _, s_row = fp8.quantize(x, "e4m3", "tile", bs)  # 1x32: scales change from token to token within a block
    assert s_row[:bs, 0].unique().numel() > 1
    # The outlier coarsens its own 32-token group of channel 7 (128x1), not the other channels of token 5 (1x32).
    x_tile = fp8.quantize_spec(x, fp8.operand_specs(r_r)["x_wgrad"])[0]
    err_t, err_r = (xw - x).abs(), (x_tile - x).abs()
    assert err_t[5, :7].max() < err_r[5, :7].max() and err_t[:bs, 7].max() > err_r[:bs, 7].max()
    # ... and the two Wgrads differ, both close to the exact dW.
    lin = torch.nn.Linear(K, N, bias=False)
    grads = {}
    for r in (r_t, r_r):
        lin.weight.grad = None
        fp8.fp8_linear(x, lin.weight, recipe=r).backward(dy)
        grads[r.name] = lin.weight.grad.clone()
    assert not torch.equal(grads["t"], grads["r"])
    exact = dy.T @ x
    assert fp8.calc_diff(grads["t"], exact) < 2e-3 and fp8.calc_diff(grads["r"], exact) < 2e-3


def _moe_grads(recipe, x, seed=5):
    torch.manual_seed(seed)
    moe = MoE(TINY)
    ops = fp8.FP8Ops(recipe, fp8.FP8Stats(), "experts")
    moe.experts.fp8 = ops
    x = x.clone().requires_grad_()
    y = moe(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), {"x": x.grad, **{n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}}, ops


def test_swiglu_recompute_gives_the_no_recompute_gradients_within_fp8_rounding():
    x = torch.randn(24, TINY.hidden_size, generator=torch.Generator().manual_seed(4))
    base = fp8.RECIPES["deepseek-gemm"]
    y0, g0, _ = _moe_grads(base, x)
    y1, g1, ops = _moe_grads(dataclasses.replace(base, name="rc", swiglu_recompute=True), x)
    assert torch.equal(y0, y1)  # the forward uses the exact SwiGLU input
    assert "experts.swiglu_cache" in ops.stats.snapshot()["tensors"]
    changed = False
    for k in ("x", "experts.gate_up_proj", "experts.down_proj"):
        # calc_diff ~ rel_err^2 / 2: 3e-3 is a ~8% relative difference, about one E4M3 unit roundoff (6.25%),
        # which is what rounding the SwiGLU input (and re-rounding the recomputed down-projection input) costs.
        assert fp8.calc_diff(g1[k], g0[k]) < 3e-3, k
        changed |= not torch.equal(g1[k], g0[k])
    assert changed  # backward really ran on the FP8 cache
    # With a cache that holds the exact input, the recompute is the ordinary SwiGLU backward.
    gu = torch.randn(10, 2 * 8, requires_grad=True)
    w = torch.rand(10, 1, requires_grad=True)
    h = fp8.training._SwiGLUFromCache.apply(gu, w, gu.detach())
    ref = torch.nn.functional.silu(gu[:, :8]) * gu[:, 8:] * w
    torch.testing.assert_close(h, ref)
    gh = torch.randn_like(h)
    torch.testing.assert_close(torch.autograd.grad(h, [gu, w], gh), torch.autograd.grad(ref, [gu, w], gh))


def test_bf16_combine_rounds_expert_outputs_forward_and_input_grads_backward():
    ops = fp8.FP8Ops(fp8.RECIPES["deepseek-v3"])
    t = torch.randn(6, 10, requires_grad=True)
    out = ops.combine(t)
    assert torch.equal(out, t.to(torch.bfloat16).float())
    g = torch.randn(6, 10)
    out.backward(g)
    assert torch.equal(t.grad, g)  # the combine's backward is the FP8 dispatch of dY (quantized by the GEMM)
    t.grad = None
    back = ops.combine_grad(t)
    assert torch.equal(back, t)
    back.backward(g)
    assert torch.equal(t.grad, g.to(torch.bfloat16).float())
    off = fp8.FP8Ops(fp8.RECIPES["deepseek-gemm"])
    assert off.combine(t) is t and off.combine_grad(t) is t


def test_bf16_moments_with_fp32_master_weights():
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=16, eval_every=0, precision="deepseek-v3-fp32acc", mtp=False)
    run = TrainRun(TINY, cfg)
    next(run)
    assert isinstance(run.optimizer, AdamW)
    states = list(run.optimizer.state.values())
    assert len(states) > 10 and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    plain = TrainRun(TINY, dataclasses.replace(cfg, precision="deepseek-gemm"))
    assert isinstance(plain.optimizer, torch.optim.AdamW)
    # The BF16-moment AdamW is torch's AdamW when the moments are kept in fp32.
    p1 = torch.nn.Parameter(torch.randn(7, 5))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = AdamW([p1], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, moment_dtype=torch.float32)
    o2 = torch.optim.AdamW([p2], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for i in range(3):
        p1.grad = p2.grad = torch.randn(7, 5, generator=torch.Generator().manual_seed(i))
        o1.step()
        o2.step()
    torch.testing.assert_close(p1, p2)


def test_limited_accumulator_in_the_training_gemm():
    g = torch.Generator().manual_seed(6)
    x, w = torch.rand(20, 256, generator=g), torch.rand(24, 256, generator=g)
    exact = fp8.fp8_linear(x, w, recipe="deepseek-gemm")
    lim = fp8.fp8_linear(x, w, recipe=dataclasses.replace(fp8.RECIPES["deepseek-gemm"], accumulation="limited"))
    full = fp8.fp8_linear(x, w, recipe=dataclasses.replace(fp8.RECIPES["deepseek-gemm"], accumulation="limited",
                                                            acc_mantissa_bits=23))
    rel = float((lim - exact).abs().max() / exact.abs().max())
    assert 0 < rel < 2e-3  # ~14-bit partial sums, promoted every 128: small but present (§3.3.2)
    torch.testing.assert_close(full, exact, rtol=1e-6, atol=1e-5)  # a 24-bit accumulator is fp32
    with pytest.raises(ValueError, match="accumulation"):
        fp8.FP8Recipe(act_gran="row", accumulation="limited")
    with pytest.raises(ValueError, match="wgrad_tiling"):
        fp8.FP8Recipe(act_gran="tensor", wgrad_tiling="128x1")
    with pytest.raises(ValueError, match="optimizer_moments"):
        fp8.FP8Recipe(optimizer_moments="fp8")


def test_retiling_with_power_of_2_scales_adds_almost_no_error():
    """V3 report §3.3.3: the post-attention input is re-tiled 1x128 -> 128x1 for backward, and "to avoid introducing
    extra quantization error, all the scaling factors are round scaled". Re-quantizing an FP8 tensor with 2^k scales
    only rescales its exponents (values change only where they fall into the subnormals); with free scales nearly
    every value is rounded again."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 256, generator=g) * torch.exp(torch.randn(256, 1, generator=g))  # tokens of varied size
    changed = {}
    for pow2 in (True, False):
        stored = fp8.quantize_spec(x, fp8.QuantSpec("e4m3", "tile", pow2))[0]
        retiled = fp8.quantize_spec(stored, fp8.QuantSpec("e4m3", "tile_t", pow2))[0]
        changed[pow2] = float((retiled != stored).float().mean())
    assert changed[True] < 1e-3 and changed[False] > 0.5, changed
