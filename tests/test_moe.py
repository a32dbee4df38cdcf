"""Tests for core/moe.py: router semantics vs transformers and an official-code loop reference, expert dispatch
(grouped_mm vs loop vs transformers), balancing rules, losses and load metrics.

transformers is a TEST-ONLY reference here (core never imports it)."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from core.config import get_preset
from core.moe import (MoE, Experts, Router, load_metrics, router_z_loss, sequence_balance_loss, switch_aux_loss,
                      update_bias)
from core.moe_sim import simulate_bias_controller

hf_v3 = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config  # noqa: E402
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe  # noqa: E402
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config  # noqa: E402


# ------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP stalls when other jobs share the cores (restored after)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def cfg_v3(**changes):
    """tiny preset (H=64, I=32, E=8, K=2, G=4, topk_group=2, sigmoid, noaux_tc, 1 shared) with changes."""
    return get_preset("tiny").replace(**changes)


def hf_v3_config(cfg):
    d = {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type", "attention_type")}
    c = DeepseekV3Config(**d)
    c._experts_implementation = "eager"
    return c


def randomize(module, seed=0, bias_low=-1.0, bias_high=1.0):
    """Random weights everywhere and a random (also negative) e_score_correction_bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            # router: spread-out logits (real routing decisions); experts: O(1) outputs for absolute tolerances
            std = 0.3 if name.endswith("gate.weight") or name == "weight" else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) * (bias_high - bias_low) + bias_low)
    return module


def sort_by_index(indices, weights):
    order = indices.argsort(dim=-1)
    return indices.gather(-1, order), weights.gather(-1, order)


def reference_route(x, weight, bias, cfg, mask_value=float("-inf")):
    """Independent per-token loop following the official inference/model.py Gate (fp64, plain Python)."""
    E, K, G, TG = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    per = E // G
    logits = x.double() @ weight.double().T
    out_idx, out_w = [], []
    for t in range(x.shape[0]):
        if cfg.scoring_func == "sigmoid":
            s = [1.0 / (1.0 + math.exp(-v)) for v in logits[t].tolist()]
        else:
            m = max(logits[t].tolist())
            ex = [math.exp(v - m) for v in logits[t].tolist()]
            s = [e / sum(ex) for e in ex]
        b = [si + float(bias[i]) for i, si in enumerate(s)] if bias is not None else list(s)
        if G > 1 and cfg.topk_method != "greedy":
            gscore = []
            for g in range(G):
                vals = sorted(b[g * per:(g + 1) * per], reverse=True)
                gscore.append(vals[0] + vals[1] if bias is not None else vals[0])
            keep = sorted(range(G), key=lambda g: -gscore[g])[:TG]
            b = [bi if i // per in keep else mask_value for i, bi in enumerate(b)]
        chosen = sorted(range(E), key=lambda i: -b[i])[:K]
        w = [s[i] for i in chosen]
        if cfg.norm_topk_prob:
            tot = sum(w)
            w = [wi / (tot + 1e-20) for wi in w]
        out_idx.append(chosen)
        out_w.append([wi * cfg.routed_scaling_factor for wi in w])
    return torch.tensor(out_idx), torch.tensor(out_w, dtype=torch.float64)


ROUTER_CFGS = {
    "tiny_G4_TG2_K2": dict(),
    "E16_G4_TG2_K4": dict(n_routed_experts=16, num_experts_per_tok=4),
    "E16_G1_K4": dict(n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1),
    "E32_G8_TG3_K6": dict(n_routed_experts=32, num_experts_per_tok=6, n_group=8, topk_group=3),
}


# ------------------------------------------------------------------------------------------------- router
def test_installed_transformers_router_masks_groups_with_minus_inf():
    """transformers 5.23 carries the #45441 fix (-inf group mask), so it is a valid reference for negative biases
    too; older versions masked with 0.0 (then only the loop reference below covers negative biases)."""
    src = inspect.getsource(hf_v3.DeepseekV3TopkRouter.forward)
    assert 'masked_fill(~score_mask.bool(), float("-inf"))' in src


@pytest.mark.parametrize("name", list(ROUTER_CFGS))
@pytest.mark.parametrize("bias_range", [(0.0, 0.5), (-1.0, 1.0), (-3.0, -1.0)])
def test_router_matches_transformers(name, bias_range):
    cfg = cfg_v3(**ROUTER_CFGS[name])
    src = inspect.getsource(hf_v3.DeepseekV3TopkRouter.forward)
    if bias_range[0] < 0 and 'float("-inf")' not in src:
        pytest.skip("installed transformers masks groups with 0.0: negative biases are checked by the loop reference")
    ours = randomize(Router(cfg), seed=1, bias_low=bias_range[0], bias_high=bias_range[1])
    hf = hf_v3.DeepseekV3TopkRouter(hf_v3_config(cfg))
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(96, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    r = ours(x)
    hf_logits, hf_w, hf_idx = hf(x)
    i1, w1 = sort_by_index(r.indices, r.weights)
    i2, w2 = sort_by_index(hf_idx, hf_w)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r.logits, hf_logits, rtol=1e-6, atol=1e-6)
    assert r.indices.dtype == torch.int64 and r.weights.dtype == torch.float32


@pytest.mark.parametrize("name", list(ROUTER_CFGS))
def test_router_matches_official_loop_reference_with_negative_bias(name):
    cfg = cfg_v3(**ROUTER_CFGS[name])
    ours = randomize(Router(cfg), seed=3, bias_low=-4.0, bias_high=-1.0)
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    r = ours(x)
    ref_idx, ref_w = reference_route(x, ours.weight, ours.e_score_correction_bias, cfg)
    i1, w1 = sort_by_index(r.indices, r.weights)
    i2, w2 = sort_by_index(ref_idx, ref_w)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(w1.double(), w2, rtol=1e-5, atol=1e-6)


def test_negative_bias_never_selects_masked_groups_and_zero_mask_would():
    """All biased scores < 0: a 0.0 group mask (pre-fix official / old HF) would pick masked experts; -inf never."""
    cfg = cfg_v3(n_routed_experts=16, num_experts_per_tok=4)
    router = randomize(Router(cfg), seed=5)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(-5.0 - torch.rand(16))
    x = torch.randn(128, cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    r = router(x)
    per = cfg.n_routed_experts // cfg.n_group
    assert r.group_mask.shape == (128, cfg.n_group) and r.group_mask.sum(-1).eq(cfg.topk_group).all()
    assert r.group_mask.gather(1, r.indices // per).all()  # every chosen expert lies in a chosen group
    # The buggy 0.0 mask on the same inputs picks out-of-group experts (so this case really exercises the fix).
    bad_idx, _ = reference_route(x, router.weight, router.e_score_correction_bias, cfg, mask_value=0.0)
    assert not r.group_mask.gather(1, bad_idx // per).all()


def test_bias_selects_but_never_enters_weights():
    cfg = cfg_v3(n_routed_experts=16, num_experts_per_tok=4)
    router = randomize(Router(cfg), seed=7)
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(8))
    r1 = router(x)
    with torch.no_grad():  # a uniform shift keeps the selection (group scores shift by 2c) but changes s + b
        router.e_score_correction_bias.add_(3.0)
    r2 = router(x)
    assert torch.equal(r1.indices, r2.indices)
    torch.testing.assert_close(r1.weights, r2.weights, rtol=0, atol=0)
    # weights are exactly the renormalized UNBIASED scores of the chosen experts, times the route scale
    s = torch.sigmoid(F.linear(x, router.weight))
    g = s.gather(1, r2.indices)
    torch.testing.assert_close(r2.weights, g / (g.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor)
    torch.testing.assert_close(r2.scores, s)


def test_tiny_scores_survive_a_large_bias():
    """flashinfer #3875: (s + b) - b with b ~ 12 and s ~ 1e-7 loses s; we keep the original scores."""
    cfg = cfg_v3(n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=False, routed_scaling_factor=1.0)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = -16.0  # expert 0: s = sigmoid(-16) ~ 1.1e-7
        router.e_score_correction_bias.zero_()
        router.e_score_correction_bias[0] = 12.0  # ... but the bias makes it selected
    x = torch.zeros(1, cfg.hidden_size)
    x[0, 0] = 1.0
    r = router(x)
    assert 0 in r.indices[0].tolist()
    w0 = r.weights[0, r.indices[0].tolist().index(0)]
    assert w0 == torch.sigmoid(torch.tensor(-16.0))  # exact, not 0 and not 1.19e-7 rounding noise


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_normalized_weights_sum_to_route_scale(scale):
    cfg = cfg_v3(n_routed_experts=16, num_experts_per_tok=4, routed_scaling_factor=scale)
    router = randomize(Router(cfg), seed=9)
    r = router(torch.randn(50, cfg.hidden_size))
    torch.testing.assert_close(r.weights.sum(-1), torch.full((50,), scale), rtol=1e-6, atol=1e-6)


def _v2_pair(topk_method, seed=10):
    kw = dict(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=3, n_group=4,
              topk_group=2, topk_method=topk_method, routed_scaling_factor=16.0, n_shared_experts=2,
              scoring_func="softmax", norm_topk_prob=False)
    cfg = cfg_v3(**kw)
    c2 = DeepseekV2Config(**{k: v for k, v in kw.items() if k not in ("scoring_func",)})
    c2._experts_implementation = "eager"
    hf = DeepseekV2Moe(c2)
    ours = randomize(MoE(cfg), seed=seed)
    hf.load_state_dict(ours.state_dict())
    return cfg, ours, hf


@pytest.mark.parametrize("topk_method", ["group_limited_greedy", "greedy"])
def test_softmax_v2_router_and_moe_match_transformers_v2(topk_method):
    cfg, ours, hf = _v2_pair(topk_method)
    assert ours.gate.e_score_correction_bias is None
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(11))
    r = ours.gate(x)
    _, hf_w, hf_idx = hf.gate(x)
    i1, w1 = sort_by_index(r.indices, r.weights)
    i2, w2 = sort_by_index(hf_idx, hf_w)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-6)
    # no renormalization: the weights are route_scale * softmax probabilities, summing to < route_scale
    assert (r.weights.sum(-1) < 16.0).all()
    ref_idx, ref_w = reference_route(x.reshape(-1, 64), ours.gate.weight, None, cfg)
    assert torch.equal(i1, sort_by_index(ref_idx, ref_w)[0])
    if topk_method == "group_limited_greedy":  # group score = max of the group
        per = cfg.n_routed_experts // cfg.n_group
        s = r.scores.view(-1, cfg.n_group, per).amax(-1)
        expect = torch.zeros_like(r.group_mask).scatter_(1, s.topk(cfg.topk_group, -1).indices, True)
        assert torch.equal(r.group_mask, expect)
    else:
        assert r.group_mask is None
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)


def test_router_stays_fp32_under_model_dtype_casts():
    router = Router(cfg_v3())
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.float32 and router.e_score_correction_bias.dtype == torch.float32
    r = router(torch.randn(5, 64, dtype=torch.bfloat16))
    assert r.scores.dtype == torch.float32 and r.logits.dtype == torch.float32


# ------------------------------------------------------------------------------------------------- experts / MoE
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("changes", [dict(), dict(n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2),
                                     dict(n_shared_experts=0)])
def test_moe_matches_transformers(impl, changes):
    cfg = cfg_v3(**changes)
    ours = randomize(MoE(cfg, impl=impl), seed=12)
    hf = hf_v3.DeepseekV3MoE(hf_v3_config(cfg))
    if cfg.n_shared_experts == 0:  # transformers always builds the (0-wide) shared MLP: it contributes 0
        sd = dict(ours.state_dict())
        sd.update({k: v for k, v in hf.state_dict().items() if k.startswith("shared_experts")})
        hf.load_state_dict(sd)
    else:
        hf.load_state_dict(ours.state_dict())
    x = torch.randn(3, 20, cfg.hidden_size, generator=torch.Generator().manual_seed(13))
    y = ours(x)
    assert y.shape == x.shape
    assert ours.experts.resolved_impl() == impl
    torch.testing.assert_close(y, hf(x), rtol=1e-5, atol=1e-5)


def _grads(moe, x):
    x = x.clone().requires_grad_()
    y = moe(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), {"x": x.grad, **{n: p.grad.clone() for n, p in moe.named_parameters()}}


@pytest.mark.parametrize("dead_expert", [False, True])
def test_grouped_mm_equals_loop_forward_and_backward(dead_expert):
    cfg = cfg_v3(n_routed_experts=16, num_experts_per_tok=4)
    a = randomize(MoE(cfg, impl="grouped_mm"), seed=14)
    if dead_expert:  # experts 5 and 6 (different groups' neighbours) receive zero tokens
        with torch.no_grad():
            a.gate.e_score_correction_bias[[5, 6]] = -100.0
    b = MoE(cfg, impl="loop")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 48, cfg.hidden_size, generator=torch.Generator().manual_seed(15))
    ya, ga = _grads(a, x)
    yb, gb = _grads(b, x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-5, msg=f"grad {k}")
    assert a.gate.weight.grad.abs().sum() > 0  # the router learns through the gate values
    if dead_expert:
        assert a.last_routing.loads[[5, 6]].eq(0).all()
        for g in (ga, gb):
            assert g["experts.gate_up_proj"][[5, 6]].eq(0).all() and g["experts.down_proj"][[5, 6]].eq(0).all()
            used = a.last_routing.loads > 0
            assert g["experts.gate_up_proj"][used].abs().flatten(1).sum(1).gt(0).all()


def test_experts_zero_token_expert_and_manual_reference():
    cfg = cfg_v3(n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2)
    for impl in ("grouped_mm", "loop"):
        ex = randomize(Experts(cfg, impl=impl), seed=16)
        x = torch.randn(6, cfg.hidden_size)
        idx = torch.tensor([[0, 2], [2, 0], [3, 0], [0, 3], [2, 3], [3, 2]])  # expert 1 gets nothing
        w = torch.rand(6, 2)
        y = ex(x, idx, w)
        ref = torch.zeros_like(x)
        I = cfg.moe_intermediate_size
        for t in range(6):
            for j in range(2):
                e = idx[t, j]
                gu = ex.gate_up_proj[e] @ x[t]
                ref[t] += w[t, j] * (ex.down_proj[e] @ (F.silu(gu[:I]) * gu[I:]))
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        y.sum().backward()  # an expanded (stride-0) output gradient must work too
        assert ex.gate_up_proj.grad[1].eq(0).all() and ex.down_proj.grad[1].eq(0).all()
        assert ex.gate_up_proj.grad[0].abs().sum() > 0


def test_grouped_mm_bf16_forward_backward_close_to_loop():
    cfg = cfg_v3(n_routed_experts=16, num_experts_per_tok=4)
    a = randomize(MoE(cfg), seed=17).to(torch.bfloat16)
    b = MoE(cfg, impl="loop").to(torch.bfloat16)
    b.load_state_dict(a.state_dict())
    x = torch.randn(64, cfg.hidden_size).to(torch.bfloat16)
    assert a.experts.resolved_impl() == "grouped_mm"
    ya, ga = _grads(a, x)
    yb, gb = _grads(b, x)
    assert ya.dtype == torch.bfloat16
    torch.testing.assert_close(ya.float(), yb.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ga["experts.down_proj"].float(), gb["experts.down_proj"].float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granule", [1, 8])
def test_gather_token_sum_equals_index_add(monkeypatch, dtype, granule):
    """The per-token sum CUDA runs (gather by the inverse permutation + .view(T, K, H).sum(1), no atomics) gives
    the CPU's index_add result bit for bit, forward and backward, also with padded segments (pad rows skipped),
    and both sum bf16 slots in fp32."""
    import functools

    import core.moe as moe
    cfg = cfg_v3(n_routed_experts=16, num_experts_per_tok=4)
    a = randomize(MoE(cfg), seed=21).to(dtype)
    x = torch.randn(45, cfg.hidden_size).to(dtype)
    monkeypatch.setattr(moe, "segment_granule", lambda d, device: granule)
    ya, ga = _grads(a, x)
    monkeypatch.setattr(moe, "token_sum", functools.partial(moe.token_sum, gather=True))
    a.zero_grad(set_to_none=True)
    yb, gb = _grads(a, x)
    assert torch.equal(ya, yb)
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k
    assert ga["experts.gate_up_proj"].abs().sum() > 0

    rows = torch.randn(12, 3, dtype=torch.bfloat16)
    perm = torch.tensor([0, 2, 4, 1, 3, 5, 6, 7, 8, 9, 10, 11])  # T = 6 tokens, K = 2 slots each
    pos = moe.slot_positions(perm, 12, 2)
    assert pos.tolist() == [[0, 3], [1, 4], [2, 5], [6, 7], [8, 9], [10, 11]]
    want = torch.stack([rows[p].float().sum(0) for p in pos])
    for gather in (False, True):
        got = moe.token_sum(rows, perm // 2, pos, gather=gather)
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_unaligned_shapes_fall_back_to_loop():
    cfg = cfg_v3(moe_intermediate_size=30)  # 30 * 4 bytes is not 16-byte aligned
    ex = Experts(cfg, impl="grouped_mm")
    assert ex.resolved_impl() == "loop"
    y = ex(torch.randn(5, 64), torch.randint(0, 8, (5, 2)), torch.rand(5, 2))
    assert y.shape == (5, 64)


def test_empty_input():
    moe = MoE(cfg_v3())
    y = moe(torch.randn(0, 64))
    assert y.shape == (0, 64) and moe.last_routing.loads.sum() == 0


class _CountingFP8:
    """Stand-in for the FP8 engineer's hooks: rounds operands to bf16 and the gradient to bf16, counts calls."""

    def __init__(self):
        self.calls = {"act": 0, "weight": 0, "grad": 0}

    def quant_act(self, x):
        self.calls["act"] += 1
        return x + (x.to(torch.bfloat16).float() - x).detach()

    def quant_weight(self, w):
        self.calls["weight"] += 1
        return w + (w.to(torch.bfloat16).float() - w).detach()

    def quant_grad(self, y):
        self.calls["grad"] += 1

        class RoundGrad(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return t.view_as(t)

            @staticmethod
            def backward(ctx, g):
                return g.to(torch.bfloat16).float()

        return RoundGrad.apply(y)


def test_fp8_hook_is_applied_around_each_gemm_in_both_impls():
    cfg = cfg_v3(n_routed_experts=16, num_experts_per_tok=4)
    plain = randomize(MoE(cfg), seed=18)
    x = torch.randn(40, cfg.hidden_size)
    y_plain, _ = _grads(plain, x)
    results = []
    for impl in ("grouped_mm", "loop"):
        m = MoE(cfg, impl=impl)
        m.load_state_dict(plain.state_dict())
        m.experts.fp8 = hook = _CountingFP8()
        results.append(_grads(m, x))
        assert hook.calls == {"act": 2, "weight": 2, "grad": 2}
    (ya, ga), (yb, gb) = results
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga["experts.gate_up_proj"], gb["experts.gate_up_proj"], rtol=1e-5, atol=1e-5)
    assert not torch.equal(ya, y_plain)  # the hook really changed the numbers
    torch.testing.assert_close(ya, y_plain, rtol=2e-2, atol=2e-2)


def test_last_routing_record():
    cfg = cfg_v3(n_routed_experts=16, num_experts_per_tok=4)
    moe = MoE(cfg)
    assert moe.last_routing is None
    moe(torch.randn(3, 10, cfg.hidden_size))
    lr = moe.last_routing
    assert (lr.batch_size, lr.seq_len) == (3, 10)
    assert lr.loads.shape == (16,) and int(lr.loads.sum()) == 30 * 4
    assert lr.scores.shape == (30, 16) and lr.indices.shape == (30, 4) and lr.group_mask.shape == (30, 4)
    assert torch.equal(lr.loads, torch.bincount(lr.indices.flatten(), minlength=16))


# ------------------------------------------------------------------------------------------------- balancing
def test_update_bias_direction_equality_and_no_grad():
    cfg = cfg_v3()
    moe = randomize(MoE(cfg), seed=19)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
    loads = torch.tensor([10, 2, 5, 5, 8, 0, 5, 5])  # mean 5
    step = update_bias(moe.gate, loads, 1e-3)
    b = moe.gate.e_score_correction_bias
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, torch.tensor([-1, 1, 0, 0, -1, 1, 0, 0], dtype=torch.float32) * 1e-3)
    assert torch.equal(step, b)
    update_bias(moe.gate, torch.full((8,), 7), 1e-3)  # perfectly balanced: unchanged
    torch.testing.assert_close(b, torch.tensor([-1, 1, 0, 0, -1, 1, 0, 0], dtype=torch.float32) * 1e-3)
    # the bias is a buffer: no grad, not a parameter, untouched by backward and by an optimizer step
    assert "gate.e_score_correction_bias" not in dict(moe.named_parameters())
    opt = torch.optim.SGD(moe.parameters(), lr=0.1)
    before = b.clone()
    moe(torch.randn(2, 8, cfg.hidden_size)).pow(2).mean().backward()
    opt.step()
    assert b.grad is None and not b.requires_grad
    assert torch.equal(b, before)
    with pytest.raises(ValueError):
        update_bias(Router(cfg_v3(topk_method="group_limited_greedy", scoring_func="softmax")), loads, 1e-3)


def test_update_bias_balances_a_skewed_router():
    cfg = cfg_v3(n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1)
    router = Router(cfg)
    g = torch.Generator().manual_seed(20)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 64, generator=g) * 0.2)
    x = torch.randn(512, 64, generator=g) + 2.0 * torch.randn(64, generator=g)  # shared direction: skewed
    first = load_metrics(torch.bincount(router(x).indices.flatten(), minlength=16))["max_vio"]
    for _ in range(150):
        update_bias(router, torch.bincount(router(x).indices.flatten(), minlength=16), 0.01)
    last = load_metrics(torch.bincount(router(x).indices.flatten(), minlength=16))["max_vio"]
    assert first > 0.5 and last < 0.2 * first


def _balance_loss_transcribed(s: list[list[float]], n_r: int, k_r: int, seq_len: int) -> float:
    """V3 report eqs. 17-20 written out with loops, token by token and expert by expert (no tensors).

    s[t][i] = s_{i,t}, the unbiased affinity of token t (all sequences back to back) for expert i."""
    total, n_seq = 0.0, len(s) // seq_len
    for b in range(n_seq):
        seq = s[b * seq_len:(b + 1) * seq_len]
        loss = 0.0
        for i in range(n_r):
            # eq. 18: 1(s_{i,t} in Topk({s_{j,t} | 1 <= j <= N_r}, K_r)), i.e. fewer than K_r experts score higher
            hits = sum(1 for row in seq if sum(1 for j in range(n_r) if row[j] > row[i]) < k_r)
            f_i = n_r / (k_r * seq_len) * hits
            p_i = sum(row[i] / sum(row) for row in seq) / seq_len  # eqs. 19-20
            loss += f_i * p_i  # eq. 17 (without alpha)
        total += loss
    return total / n_seq


def test_sequence_balance_loss_follows_eq18_not_the_routed_selection():
    """f_i counts Topk of the UNBIASED scores over all routed experts (eq. 18), whatever the bias and the group
    limit made the router pick; the value matches a loop transcription of eqs. 17-20."""
    cfg = cfg_v3(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    router = Router(cfg)
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 64, generator=g))
        router.e_score_correction_bias.copy_(torch.randn(16, generator=g))
    B, T = 3, 12
    r = router(torch.randn(B * T, 64, generator=g))
    unbiased_topk = r.scores.topk(4, dim=-1).indices.sort(-1).values
    assert not torch.equal(unbiased_topk, r.indices.sort(-1).values)  # bias + groups changed the selection
    loss = sequence_balance_loss(r.scores, 16, 4, T)
    expect = _balance_loss_transcribed(r.scores.detach().double().tolist(), 16, 4, T)
    torch.testing.assert_close(loss.double(), torch.tensor(expect, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    loss.backward()  # differentiable through P_i (eqs. 19-20)
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    # the same scores in [B, T, E] layout give the same loss
    torch.testing.assert_close(sequence_balance_loss(r.scores.detach().view(B, T, 16), 16, 4, T), loss.detach())


def test_sequence_balance_loss_values():
    E, K, T, B = 8, 2, 16, 3
    # perfectly balanced: each expert is in the unbiased top-K of T*K/E tokens per sequence (f_i = 1) and every
    # row has the same sum, so P_i = 1/E: exactly 1
    tops = torch.arange(T * K).remainder(E).view(T, K).repeat(B, 1)
    s = torch.full((B * T, E), 0.3).scatter(1, tops, 0.6).requires_grad_(True)
    loss = sequence_balance_loss(s, E, K, T)
    torch.testing.assert_close(loss.detach(), torch.tensor(1.0))
    loss.backward()
    assert s.grad is not None
    # all tokens prefer the same K experts: imbalance raises it above 1
    one_hot = torch.full((B * T, E), 0.01)
    one_hot[:, :K] = 1.0
    assert sequence_balance_loss(one_hot, E, K, T) > 1.5


def test_switch_aux_and_z_loss():
    E, K, T = 8, 2, 32
    uniform = torch.full((T, E), 1.0 / E)
    idx = torch.arange(T * K).remainder(E).view(T, K)
    torch.testing.assert_close(switch_aux_loss(uniform, idx, E, K), torch.tensor(1.0))
    # everything on experts {0, 1} with all probability there -> N * (1/2 * 1/2 * 2) = N / 2 ... >> 1
    p = torch.zeros(T, E)
    p[:, :2] = 0.5
    assert switch_aux_loss(p, torch.tensor([[0, 1]] * T), E, K).item() == pytest.approx(E / 2)
    logits = torch.randn(T, E)
    torch.testing.assert_close(router_z_loss(logits), (torch.logsumexp(logits, -1) ** 2).mean())


# ------------------------------------------------------------------------------------------------- metrics
def test_load_metrics_unit_cases():
    N = 8
    m = load_metrics(torch.full((N,), 5))
    assert m["max_vio"] == pytest.approx(0) and m["cv"] == pytest.approx(0)
    assert m["normalized_entropy"] == pytest.approx(1) and m["dead_experts"] == 0
    assert m["relative_load"] == pytest.approx([1.0] * N)
    one = torch.zeros(N)
    one[3] = 40
    m = load_metrics(one, top_k=1)
    assert m["max_vio"] == pytest.approx(N - 1) and m["cv"] == pytest.approx(math.sqrt(N - 1))
    assert m["normalized_entropy"] == pytest.approx(0) and m["dead_experts"] == N - 1
    assert m["relative_load"][3] == pytest.approx(N) and m["tokens"] == 40
    m = load_metrics([3, 1, 2, 2])
    assert m["max_vio"] == pytest.approx(0.5) and m["cv"] == pytest.approx(math.sqrt(0.5) / 2)


def test_dropped_fraction_example():
    # T=4 tokens, K=2 -> 8 slots over N=4 experts; c = [6, 2, 0, 0]
    m = load_metrics([6, 2, 0, 0], top_k=2, capacity_factor=1.0)
    assert m["capacity"] == 2 and m["dropped_fraction"] == pytest.approx(4 / 8)  # 6 - 2 dropped... (=4)
    m = load_metrics([6, 2, 0, 0], top_k=2, capacity_factor=1.25)  # C = ceil(2.5) = 3
    assert m["capacity"] == 3 and m["dropped_fraction"] == pytest.approx(3 / 8)
    assert load_metrics([2, 2, 2, 2], top_k=2, capacity_factor=1.0)["dropped_fraction"] == 0
    assert load_metrics([2, 2, 2, 2])["dropped_fraction"] is None


# ------------------------------------------------------------------------------------------------- simulator
def test_simulate_bias_controller():
    kw = dict(n_experts=16, top_k=4, steps=60, tokens=256, seed=3)
    res = simulate_bias_controller(**kw)
    again = simulate_bias_controller(**kw)
    assert set(res) == {"none", "aux_loss", "aux_free", "both"}
    for name, r in res.items():
        assert r.loads.shape == (60, 16) and r.biases.shape == (60, 16) and r.max_vio.shape == (60,)
        assert (r.loads.sum(1) == 256 * 4).all()
        assert torch.equal(r.loads, again[name].loads) and torch.equal(r.biases, again[name].biases)
    assert res["none"].biases.eq(0).all() and res["aux_loss"].biases.eq(0).all()
    steps = res["aux_free"].biases.diff(dim=0).abs()
    assert torch.allclose(steps[steps > 0], torch.tensor(1e-2))  # +-gamma or 0 per step
    assert res["none"].max_vio[:5].mean() > 0.5  # imbalanced at the start
    assert res["aux_free"].max_vio[-10:].mean() < 0.5 * res["none"].max_vio[-10:].mean()
    assert res["aux_loss"].max_vio[-10:].mean() < res["none"].max_vio[-10:].mean()
    drift = simulate_bias_controller(["aux_free"], stream="drift", n_experts=16, top_k=4, steps=20, tokens=128)
    assert list(drift) == ["aux_free"]
    with pytest.raises(ValueError):
        simulate_bias_controller(["magic"])
