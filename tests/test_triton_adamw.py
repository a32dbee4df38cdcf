"""core.cuda.triton_adamw, the one-pass AdamW update with fp32 masters, against core.optim.AdamW's torch path (itself
checked against torch's AdamW in tests/test_optim.py): on CPU under the Triton interpreter (TRITON_INTERPRET=1;
skipped where triton is not installed, as in CI) and on a GPU, where it is also compared with torch's fused AdamW."""
from __future__ import annotations

import os

import pytest
import torch

from core.optim import AdamW

triton = pytest.importorskip("triton")
from core.cuda import triton_adamw as ta  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])
if not DEVICES:
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)


def _state(p, moment_dtype, gen):
    return {"step": 0, "master": (p.float() + 1e-4 * torch.randn(p.shape, generator=gen).to(p.device))
            if p.dtype != torch.float32 else None,
            "exp_avg": (torch.randn(p.shape, generator=gen) * 1e-2).to(p.device, moment_dtype),
            "exp_avg_sq": (torch.rand(p.shape, generator=gen) * 1e-4).to(p.device, moment_dtype)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pdtype,mdtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float32, torch.bfloat16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("n,scaled", [(5000, True), (129, False), (0, True)])
def test_fused_update_matches_the_torch_path(device, pdtype, mdtype, n, scaled):
    gen = torch.Generator().manual_seed(n)
    p = (torch.randn(n, generator=gen) * 0.1).to(device, pdtype)
    grad = torch.randn(n, generator=gen).to(device, pdtype)
    scale = torch.tensor([0.37], device=device) if scaled else None
    st = _state(p, mdtype, gen)
    ref_p, ref_st = p.clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
    ref_p.grad = grad
    hyper = dict(lr=3e-3, b1=0.9, b2=0.95, eps=1e-8, wd=0.1)
    for step in (1, 2, 3):
        st["step"] = ref_st["step"] = step
        ta.adamw_step(p, grad, st["master"], st["exp_avg"], st["exp_avg_sq"], scale, lr=hyper["lr"],
                      beta1=hyper["b1"], beta2=hyper["b2"], eps=hyper["eps"], weight_decay=hyper["wd"], step=step)
        AdamW._update(ref_p, ref_st, scale, **hyper)
    # bf16 moments: a moment rounded one ulp apart (fp32 arithmetic order; the interpreter truncates) moves that
    # element's update by a few percent of lr
    tol = dict(rtol=1e-5, atol=1e-7) if mdtype == torch.float32 else dict(rtol=0, atol=0.25 * hyper["lr"])
    if st["master"] is not None:
        torch.testing.assert_close(st["master"], ref_st["master"], **tol)
        if device == "cuda":  # round to nearest even, as torch's cast (the interpreter truncates to bf16)
            assert torch.equal(p, st["master"].to(pdtype))
        torch.testing.assert_close(p.float(), st["master"], rtol=2 ** -7, atol=0)
    else:
        torch.testing.assert_close(p, ref_p, **tol)
    for k in ("exp_avg", "exp_avg_sq"):  # equal up to a rounding of the storage dtype
        ref = ref_st[k].float()
        ulp = 2 ** -7 if mdtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(st[k].float(), ref, rtol=2 * ulp, atol=2 * ulp * float(ref.abs().max()) if n else 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_optimizer_matches_torch_fused_adamw_on_fp32_masters():
    gen = torch.Generator().manual_seed(3)
    shapes = ((1024, 384), (384,), (64, 512, 3))
    low = [torch.nn.Parameter((torch.randn(*s, generator=gen) * 0.05).cuda().bfloat16()) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().float()) for p in low]
    ours = AdamW(low, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, moment_dtype=torch.float32)
    fused = torch.optim.AdamW(ref, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen).cuda().bfloat16() for p in low]
        for p, r, g in zip(low, ref, grads):
            p.grad, r.grad = g, g.float()
        assert abs(ours.clip_grad_norm_(1.0) - float(torch.nn.utils.clip_grad_norm_(ref, 1.0))) < 1e-3
        ours.step()
        fused.step()
    from core.optim import fused_adamw_status
    assert fused_adamw_status()["ran"] == ["adamw_step"], fused_adamw_status()
    for p, r in zip(low, ref):
        torch.testing.assert_close(ours.state[p]["master"], r.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), ours.state[p]["master"].to(torch.bfloat16))
