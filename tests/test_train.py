"""core.train: the training engine, its records, balancing, NaN guard, checkpoints and the CLI.

All runs use the `tiny` preset (hidden 64, 2 layers, 8 experts) so the whole file stays fast on 2 cores.
"""
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from apptest_helpers import HANG_S
from core.checkpoint import load_hf
from core.config import PRESETS
from core.data import get_dataset
from core.train import (APP_DEFAULT, RECORD_FIELDS, TrainConfig, TrainConfigError, TrainingDiverged, lr_at,
                        train)

ROOT = Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a 2-thread OpenMP pool stalls badly when other processes
    share the 2 cores; determinism does not depend on it."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup=5, eval_every=0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("dataset", ["pydoc", "synthetic"])
def test_loss_falls(dataset):
    run = train(TINY, _cfg(dataset=dataset, eval_every=40, eval_batches=2))
    recs = run.run()
    assert len(recs) == 40 and run.status == "done"
    first = sum(r["loss"] for r in recs[:5]) / 5
    last = sum(r["loss"] for r in recs[-5:]) / 5
    assert last < first - 1.0, (first, last)  # from ~ln(256) = 5.5 nats
    assert recs[-1]["val_loss"] < math.log(256) - 1.0


def test_same_seed_bit_identical_and_seed_matters():
    cfg = _cfg(steps=6, balancing="both", z_loss=1e-3, dataset="synthetic")
    a, b = train(TINY, cfg).run(), train(TINY, cfg).run()
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["router_bias"] for r in a] == [r["router_bias"] for r in b]
    c = train(TINY, cfg.replace(seed=1)).run()
    assert [r["loss"] for r in a] != [r["loss"] for r in c]
    bf16 = cfg.replace(precision="bf16", steps=3)
    assert [r["loss"] for r in train(TINY, bf16).run()] == [r["loss"] for r in train(TINY, bf16).run()]


def test_records_carry_every_field():
    cfg = _cfg(steps=4, eval_every=2, eval_batches=1, balancing="both", z_loss=1e-3)
    recs = train(TINY, cfg).run()
    n_moe = TINY.num_hidden_layers - TINY.first_k_dense_replace
    for i, r in enumerate(recs, start=1):
        assert set(RECORD_FIELDS) <= set(r)
        assert r["step"] == i and r["error"] is None and r["fp8"] is None
        assert r["fp32_gemm"]["backend"] in ("torch", "onednn") and r["fp32_gemm"]["reason"]
        for k in ("loss", "lm_loss", "mtp_loss", "balance_loss", "aux_loss", "z_loss", "lr", "grad_norm",
                  "tokens_per_s", "elapsed_s", "max_vio"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), k
        assert r["aux_loss"] > 0 and r["mtp_loss"] > 0
        assert r["tokens"] == i * 8 * 32
        assert len(r["expert_loads"]) == n_moe and len(r["router_bias"]) == n_moe
        for loads, bias in zip(r["expert_loads"], r["router_bias"]):
            assert len(loads) == len(bias) == TINY.n_routed_experts
            assert sum(loads) == 8 * 32 * TINY.num_experts_per_tok
        assert len(r["max_vio_layers"]) == n_moe and r["max_vio"] >= 0
    assert [r["val_loss"] is not None for r in recs] == [False, True, False, True]


def test_fp8_and_bf16_runs_report_and_train():
    fp8 = train(TINY, _cfg(steps=2, precision="deepseek")).run()
    assert all(isinstance(r["fp8"], dict) and r["fp8"]["numel"] > 0 for r in fp8)
    assert "overflow_count" in fp8[-1]["fp8"]
    bf16 = train(TINY, _cfg(steps=3, precision="bf16"))
    recs = bf16.run()
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    assert bf16.model.moe_layers()[0].gate.weight.dtype == torch.float32  # router stays fp32
    # master weights: the bf16 parameters equal the rounded fp32 masters after each step
    masters = [(p, bf16.optimizer.state[p]["master"]) for p in bf16.model.parameters() if p.dtype == torch.bfloat16]
    assert masters and all(m.dtype == torch.float32 and torch.equal(p, m.to(torch.bfloat16)) for p, m in masters)
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for _, m in masters)  # masters keep fp32 bits


def test_variants_dense_mha_gqa_no_mtp():
    dense = train(TINY, _cfg(steps=2, ffn="dense", mtp=False)).run()
    assert dense[-1]["expert_loads"] == [] and dense[-1]["max_vio"] is None and dense[-1]["mtp_loss"] is None
    run = train(TINY, _cfg(steps=2, attention="gqa", kv_heads=1))
    run.run()
    assert run.model_config.attention_type == "gqa" and run.model_config.num_key_value_heads == 1
    mha = train(TINY, _cfg(steps=2, attention="mha")).run()
    assert math.isfinite(mha[-1]["loss"])


def test_bias_update_direction_and_no_gradient():
    gamma = 0.05
    run = train(TINY, _cfg(steps=3, balancing="aux_free", gamma=gamma, lr=1e-3))
    biases = [m.gate.e_score_correction_bias for m in run.moes]
    assert all(not b.requires_grad for b in biases)
    assert not any(n.endswith("e_score_correction_bias") for n, _ in run.model.named_parameters())
    before = [b.clone() for b in biases]
    rec = run.step()
    for layer, (b0, b1) in enumerate(zip(before, biases)):
        assert b1.grad is None
        if layer >= len(rec["expert_loads"]):
            continue  # MTP module's MoE: balanced too, not logged
        loads = torch.tensor(rec["expert_loads"][layer], dtype=torch.float)
        delta = b1 - b0
        over, under = loads > loads.mean(), loads < loads.mean()
        assert over.any() and under.any()
        assert torch.allclose(delta[over], torch.full_like(delta[over], -gamma))
        assert torch.allclose(delta[under], torch.full_like(delta[under], gamma))
        assert torch.equal(torch.tensor(rec["router_bias"][layer]), b1)
    # no balancing: the bias never moves
    frozen = train(TINY, _cfg(steps=2, balancing="none", gamma=gamma)).run()
    assert all(v == 0.0 for r in frozen for layer in r["router_bias"] for v in layer)


def test_nan_guard_injected_inf():
    run = train(TINY, _cfg(steps=5))
    run.step()
    with torch.no_grad():
        run.model.lm_head.weight[0, 0] = float("inf")
    snapshot = {k: v.clone() for k, v in run.model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match=r"diverged at step 2: the loss is nan.*lower learning rate"):
        run.step()
    assert run.status == "diverged" and run.records[-1]["error"] == run.error
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in snapshot.items() if k != "lm_head.weight")
    assert list(run) == []  # a diverged run yields nothing more


def test_nan_guard_huge_lr():
    with pytest.raises(TrainingDiverged, match="diverged"):
        for _ in train(TINY, _cfg(steps=30, lr=1e6, warmup=0, grad_clip=0.0)):
            pass


def test_stop_event_and_time_limit():
    ev = threading.Event()
    run = train(TINY, _cfg(steps=50), stop=ev)
    for rec in run:
        if rec["step"] == 3:
            ev.set()
    assert run.step_count == 3 and run.status == "stopped"
    calls = iter([False, False, True])
    run2 = train(TINY, _cfg(steps=50), stop=lambda: next(calls))
    assert len(run2.run()) == 2
    run3 = train(TINY, _cfg(steps=10**6, max_time_s=0.3))
    run3.run()
    assert run3.status == "time limit" and run3.step_count < 10**6


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1e-2, warmup=10, min_lr=1e-3)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert lrs[10] == pytest.approx(1e-2)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] > 1e-3 and lr_at(100, cfg) == pytest.approx(1e-3)


def test_checkpoint_round_trip(tmp_path):
    run = train(TINY, _cfg(steps=3, dataset="synthetic"))
    run.run()
    run.save(tmp_path / "ckpt")
    loaded = load_hf(tmp_path / "ckpt").eval()
    x = get_dataset("synthetic").batch(2, 16, torch.Generator().manual_seed(0)).input_ids
    run.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), run.model(x), rtol=0, atol=0)
    for a, b in zip(run.model.moe_layers(), loaded.moe_layers()):
        assert torch.equal(a.gate.e_score_correction_bias, b.gate.e_score_correction_bias)


def test_after_run_domain_matrix_and_sampling():
    run = train(TINY, _cfg(steps=5, dataset="synthetic"))
    run.run()
    m = run.domain_expert_matrix(num_batches=2)
    n_moe = len(run.model.moe_layers())
    assert m["fractions"].shape == (n_moe, 4, TINY.n_routed_experts)
    assert torch.allclose(m["fractions"].sum(-1), torch.ones(n_moe, 4))
    assert int(m["counts"].sum()) == n_moe * 2 * 8 * 32 * TINY.num_experts_per_tok
    s = run.sample_text("12+", n=12, temperature=0.0)
    assert s["text"].startswith("12+") and len(s["tokens"]) == 12
    assert 0.0 <= s["mtp_acceptance"] <= 1.0 and s["mtp_drafts"] > 0
    with pytest.raises(ValueError, match="data"):
        from core.evaluate import domain_expert_matrix
        domain_expert_matrix(run.model, get_dataset("pydoc"))


@pytest.mark.parametrize("knob,value", [
    ("steps", 0), ("batch_size", -1), ("seq_len", 1), ("lr", 0.0), ("lr", float("nan")), ("betas", (0.9, 1.0)),
    ("weight_decay", -0.1), ("warmup", -1), ("min_lr", 1.0), ("grad_clip", -1.0), ("dataset", "wiki"),
    ("balancing", "magic"), ("gamma", -1e-3), ("alpha", -1.0), ("z_loss", float("inf")), ("mtp", "yes"),
    ("mtp_lambda", -0.3), ("mtp_lambda", 0.0), ("precision", "fp16"), ("attention", "linear"), ("ffn", "sparse"),
    ("eval_every", -5), ("eval_batches", 0), ("log_every", 0), ("max_time_s", 0), ("steps", 2.5),
])
def test_bad_train_config_names_the_knob(knob, value):
    with pytest.raises(ValueError, match=rf"^{knob}:"):
        TrainConfig(**{knob: value})


def test_bad_combinations_with_the_model():
    with pytest.raises(TrainConfigError, match="^seq_len:"):
        train(TINY, _cfg(seq_len=TINY.max_position_embeddings + 1))
    with pytest.raises(TrainConfigError, match="^vocab_size:"):
        train(TINY.replace(vocab_size=100), _cfg())
    with pytest.raises(TrainConfigError, match="^kv_heads:"):
        train(TINY, _cfg(attention="gqa", kv_heads=3))
    with pytest.raises(TrainConfigError, match="^balancing:"):
        train(TINY.replace(topk_method="greedy", n_group=1, topk_group=1), _cfg(balancing="aux_free"))


def test_app_default_is_valid_and_small():
    assert APP_DEFAULT.steps * APP_DEFAULT.batch_size * APP_DEFAULT.seq_len <= 150 * 8 * 64
    assert APP_DEFAULT.dataset == "synthetic" and APP_DEFAULT.uses_bias_update


def test_cli_end_to_end(tmp_path):
    out, ckpt = tmp_path / "run.json", tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "core.train", "--preset", "tiny", "--steps", "3", "--seed", "1",
           "--batch-size", "4", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1",
           "--balancing", "both", "--no-mtp", "--json", str(out), "--save", str(ckpt), "--threads", "1"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert p.returncode == 0, p.stderr
    assert "step 3/3" in p.stderr
    recs = json.loads(out.read_text())
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        for k in ("step", "loss", "tokens_per_s", "max_vio", "expert_loads"):
            assert r[k] is not None
        assert r["fp32_gemm"]["backend"] in ("torch", "onednn") and r["fp32_gemm"]["cpu"] is not None
    assert recs[1]["val_loss"] is not None and recs[0]["mtp_loss"] is None
    model = load_hf(ckpt)
    assert len(model.mtp) == 0 and json.loads(p.stdout.strip().splitlines()[-1])["steps"] == 3

    bad = subprocess.run([sys.executable, "-m", "core.train", "--preset", "tiny", "--balancing", "magic"],
                         cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert bad.returncode == 2 and "balancing:" in bad.stderr


def test_cli_args_become_model_and_train_configs():
    from core.cli import build_configs, parse_args
    mcfg, cfg = build_configs(parse_args(["--preset", "tiny", "--steps", "7", "--no-mtp", "--betas", "0.8", "0.9",
                                          "--kv-heads", "2", "--attention", "gqa"]))
    assert mcfg == PRESETS["tiny"]
    assert cfg == TrainConfig(steps=7, mtp=False, betas=(0.8, 0.9), kv_heads=2, attention="gqa", device="auto")
    with pytest.raises(ValueError, match="preset"):
        build_configs(parse_args(["--preset", "nope"]))


# ------------------------------------------------------------------ the training-speed paths in shared modules
def test_causal_attention_matches_sdpa():
    from core.attention import causal_attention
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 17, 12, generator=g), torch.randn(2, 3, 17, 12, generator=g)
    v = torch.randn(2, 3, 17, 8, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(causal_attention(q, k, v, 0.3), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rmsnorm_training_backward_matches_autograd(dtype):
    """The hand-written RMSNorm backward (used whenever gradients are needed) equals autograd through
    transformers' fp32-statistics forward, in bf16 and fp32; inference (no grad) gives the same output."""
    from core.layers import RMSNorm
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, 64, generator=g).to(dtype)
    dy = torch.randn(4, 9, 64, generator=g).to(dtype)
    norm = RMSNorm(64).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(64, generator=g))

    def reference(xi, w):  # transformers' DeepseekV3RMSNorm, differentiated by autograd in fp32
        h = xi.float()
        return w.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype).float()

    xi = x.clone().requires_grad_()
    y = norm(xi)
    y.backward(dy)
    xr, wr = x.float().requires_grad_(), norm.weight.detach().float().requires_grad_()
    yr = reference(xr, wr)
    yr.backward(dy.float())
    with torch.no_grad():
        y_inference = norm(x)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    assert y.dtype == dtype
    if dtype == torch.bfloat16:  # same fp32 statistics, same rounding point: bit-equal
        assert torch.equal(y.float(), yr.bfloat16().float())
    torch.testing.assert_close(y.float(), yr.to(dtype).float(), **tol)
    torch.testing.assert_close(y_inference.float(), y.detach().float(), **tol)
    for ours, ref in ((xi.grad, xr.grad), (norm.weight.grad, wr.grad)):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.float(), ref, rtol=tol["rtol"], atol=tol["rtol"] * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_swiglu_backward_equals_autograd(dtype, weighted):
    """The hand-written SwiGLU (experts and MLPs) gives autograd's values and gradients through
    silu(gate) * up * weight: bit-identical (same products, same order)."""
    from core.layers import swiglu, swiglu_packed
    g = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(37, 24, generator=g).to(dtype).requires_grad_() for _ in range(2))
    w = torch.rand(37, 1, generator=g).to(dtype).requires_grad_() if weighted else None
    dh = torch.randn(37, 24, generator=g).to(dtype)
    inputs = (gate, up, w) if weighted else (gate, up)
    ref = torch.nn.functional.silu(gate) * up * (w if weighted else 1)
    ours = swiglu(gate, up, w)
    assert torch.equal(ours, ref)
    for a, b in zip(torch.autograd.grad(ours, inputs, dh), torch.autograd.grad(ref, inputs, dh)):
        assert a.dtype == dtype and torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(swiglu(gate, up, w), ref)
    # the experts' form: one [S, 2I] gate | up tensor, whose gradient comes back as one tensor
    gu = torch.cat([gate, up], dim=-1).detach().requires_grad_()
    inputs = (gu, w) if weighted else (gu,)
    ref = torch.nn.functional.silu(gu[:, :24]) * gu[:, 24:] * (w if weighted else 1)
    ours = swiglu_packed(gu, w)
    assert torch.equal(ours, ref)
    for a, b in zip(torch.autograd.grad(ours, inputs, dh), torch.autograd.grad(ref, inputs, dh)):
        assert a.dtype == dtype and torch.equal(a, b)


def test_padded_expert_segments_are_exact(monkeypatch):
    """Pad rows (routing weight 0) change nothing: outputs and all grads bit-equal to unpadded segments
    (on torch's fp32 GEMMs, whose result per row does not depend on the segment's row count)."""
    import core.moe as moe
    from core import gemm
    monkeypatch.setattr(gemm, "_backend", ("torch", "this test"))
    cfg = TINY
    torch.manual_seed(0)
    experts = moe.Experts(cfg)
    idx = torch.stack([torch.randperm(cfg.n_routed_experts)[:2] for _ in range(37)])
    w = torch.rand(37, 2)
    x = torch.randn(37, cfg.hidden_size)

    def run():
        experts.zero_grad()
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = experts(xi, idx, wi)
        y.square().sum().backward()
        return y, xi.grad, wi.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()

    ref = run()
    monkeypatch.setattr(moe, "segment_granule", lambda dtype, device: 8)  # force the oneDNN path's padding
    padded = run()
    for a, b in zip(padded, ref):
        assert torch.equal(a, b)
    perm, counts = moe._pad_segments(torch.arange(5), torch.tensor([2, 0, 3]), 4, fill=-1)
    assert counts.tolist() == [4, 0, 4] and perm.tolist() == [0, 1, -1, -1, 2, 3, 4, -1]
