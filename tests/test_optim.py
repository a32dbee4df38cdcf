"""core.optim.AdamW, the training engine's optimizer for bf16 working weights (fp32 masters in its state) and for
the FP8 recipes with BF16 moments: the same numbers as torch's AdamW and gradient clipping on the fp32 masters."""
from __future__ import annotations

import torch

from core.optim import AdamW


def _params(gen, dtype):
    return [torch.nn.Parameter((torch.randn(*s, generator=gen) * 0.1).to(dtype)) for s in ((33, 17), (17,), (4, 5, 6))]


def test_bf16_parameters_follow_torch_adamw_on_fp32_masters_with_clipping():
    gen = torch.Generator().manual_seed(0)
    low = _params(gen, torch.bfloat16)
    ref = [torch.nn.Parameter(p.detach().float()) for p in low]  # what the old master-weights path updated
    ours = AdamW([{"params": low[:2], "weight_decay": 0.1}, {"params": low[2:], "weight_decay": 0.0}], lr=3e-3,
                 betas=(0.9, 0.95), moment_dtype=torch.float32)
    torch_opt = torch.optim.AdamW([{"params": ref[:2], "weight_decay": 0.1}, {"params": ref[2:], "weight_decay": 0.0}],
                                  lr=3e-3, betas=(0.9, 0.95))
    for i, max_norm in enumerate((0.5, 1e9, 0.05)):
        grads = [torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in low]
        for p, r, g in zip(low, ref, grads):
            p.grad, r.grad = g, g.float()
        norm = ours.clip_grad_norm_(max_norm)
        ref_norm = float(torch.nn.utils.clip_grad_norm_(ref, max_norm))
        assert abs(norm - ref_norm) <= 1e-6 * ref_norm
        ours.step()
        torch_opt.step()
        for p, r in zip(low, ref):
            master = ours.state[p]["master"]
            torch.testing.assert_close(master, r.detach(), rtol=1e-6, atol=1e-7)
            assert torch.equal(p.detach(), master.to(torch.bfloat16))  # working weights: the rounded masters
    assert ours.state[low[0]]["exp_avg"].dtype == torch.float32


def test_clipping_applies_only_to_the_next_step():
    gen = torch.Generator().manual_seed(1)
    a, b = _params(gen, torch.float32)[:1], _params(torch.Generator().manual_seed(1), torch.float32)[:1]
    oa, ob = AdamW(a, lr=1e-2, moment_dtype=torch.float32), AdamW(b, lr=1e-2, moment_dtype=torch.float32)
    g = torch.randn(a[0].shape, generator=gen)
    a[0].grad, b[0].grad = g.clone(), g * 0.25
    norm = oa.clip_grad_norm_(float(g.norm()) * 0.25)
    assert abs(norm - float(g.norm())) < 1e-4
    oa.step()
    ob.step()
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    a[0].grad, b[0].grad = g.clone(), g.clone()  # no clip this time: the full gradient
    oa.step()
    ob.step()
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_keeps_fp32_masters_and_moment_dtypes():
    gen = torch.Generator().manual_seed(2)
    low = _params(gen, torch.bfloat16)
    opt = AdamW(low, lr=1e-2, moment_dtype=torch.bfloat16)
    for p in low:
        p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
    opt.step()
    saved = opt.state_dict()
    fresh = AdamW([torch.nn.Parameter(p.detach().clone()) for p in low], lr=1e-2, moment_dtype=torch.bfloat16)
    fresh.load_state_dict(saved)
    for p, q in zip(low, fresh.param_groups[0]["params"]):
        a, b = opt.state[p], fresh.state[q]
        assert b["master"].dtype == torch.float32 and torch.equal(a["master"], b["master"])
        assert b["exp_avg"].dtype == torch.bfloat16 and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert b["step"] == a["step"] == 1
