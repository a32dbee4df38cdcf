"""core.cuda.fp8_linear: the GPU FP8 recipe against core.fp8's emulation (the reference).

CPU tests cover the quantizers, the layouts, padding and the autograd plumbing (the GEMM is the float64 reference
there); `gpu` tests compare the hardware GEMM (cuBLAS blockwise FP8 via F.scaled_mm) with the emulation on the
same quantized inputs.
"""
from __future__ import annotations

import pytest
import torch

from core import fp8
from core.config import PRESETS
from core.cuda import fp8_linear as g
from core.model import DeepSeekV3


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


@pytest.mark.parametrize("shape", [(64, 256), (33, 320), (5, 100)])
def test_tile_quantizer_matches_core_fp8(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 5
    q, s = g.quant_tile(x)
    q_ref, s_ref = fp8.quantize(x, "e4m3", "tile", 128)
    assert q.shape[1] % 128 == 0 and s.stride(0) == 1  # padded K, outer-dim-major scales (cuBLAS layout)
    assert torch.equal(_bits(q[:, : shape[1]]), _bits(q_ref)) and torch.equal(s, s_ref)
    assert not q[:, shape[1]:].float().any()  # padding is zero


@pytest.mark.parametrize("shape", [(256, 384), (200, 320)])
def test_block_quantizer_matches_core_fp8(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    q, s = g.quant_block(w)
    q_ref, s_ref = fp8.quantize(w, "e4m3", "block", 128)
    assert torch.equal(_bits(q[: shape[0], : shape[1]]), _bits(q_ref)) and torch.equal(s, s_ref)


def test_reference_gemm_equals_emulated_gemm():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(48, 384, generator=gen), torch.randn(256, 384, generator=gen)
    aq, as_ = g.quant_tile(a)
    bq, bs = g.quant_block(b)
    ref = fp8.fp8_gemm_quantized(aq, as_, bq, bs)
    assert torch.allclose(g.reference_gemm(aq, as_, bq, bs, "block"), ref, rtol=1e-6, atol=1e-4)


def test_fp8_linear_grads_follow_the_recipe():
    """Fprop and Dgrad equal core.fp8's emulation (same tiles, same blocks); Wgrad (re-tiled along tokens, which
    the emulation does not model) stays within DeepGEMM's FP8 tolerance of the exact product."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 80, 320, generator=gen, requires_grad=True)
    w = (torch.randn(200, 320, generator=gen) * 0.05).requires_grad_(True)
    dy = torch.randn(2, 80, 200, generator=gen)
    y = g.fp8_linear(x, w)
    y.backward(dy)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    y_ref = fp8.fp8_linear(x2, w2, recipe="deepseek")
    y_ref.backward(dy)
    assert y.shape == (2, 80, 200)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    exact = dy.reshape(-1, 200).t() @ x.detach().reshape(-1, 320)
    assert fp8.calc_diff(w.grad, exact) < 1e-3
    assert w.grad.dtype == w.dtype and x.grad.shape == x.shape


def test_recipe_switches_on_the_gpu_path():
    assert g.gpu_recipe_issues("deepseek") == []
    for name in ("hybrid", "tensor-delayed", "mxfp8", "rowwise"):
        assert g.gpu_recipe_issues(name), name
    with pytest.raises(ValueError, match="precision: recipe 'hybrid'.*grad_fmt"):
        g.convert_model(torch.nn.Sequential(torch.nn.Linear(128, 128)), "hybrid")


def test_convert_model_keeps_the_high_precision_exceptions():
    model = DeepSeekV3(PRESETS["mini"])
    before = {n: p for n, p in model.named_parameters()}
    out = g.convert_model(model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["lm_head"] != "FP8LinearGPU" and kinds["model.layers.1.mlp.gate"] == "Router"
    assert kinds["model.layers.0.self_attn.q_a_proj"] == "FP8LinearGPU"
    assert out["linears"] == sum(k == "FP8LinearGPU" for k in kinds.values()) > 0
    after = {n: p for n, p in model.named_parameters()}
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)


# ---------------------------------------------------------------------------------------------- on the GPU
@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", [(256, 1024, 512), (200, 384, 320), (128, 256, 2048)])
def test_gpu_gemm_matches_emulation_on_the_same_quantized_inputs(m, k, n):
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) * 0.1
    aq, as_ = g.quant_tile(a)
    bq, bs = g.quant_block(b)
    ref = fp8.fp8_gemm_quantized(aq, as_, bq, bs)  # CPU emulation, fp32
    out = g.fp8_gemm(aq.cuda(), as_.cuda(), bq.cuda(), bs.cuda(), "block", torch.float32).cpu()
    assert fp8.calc_diff(out, ref) < 1e-6
    assert torch.allclose(out, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


@pytest.mark.gpu
def test_gpu_tile_by_tile_gemm_matches_reference():
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(256, 512, generator=gen), torch.randn(384, 512, generator=gen)
    aq, as_ = g.quant_tile(a)
    bq, bs = g.quant_tile(b)
    ref = g.reference_gemm(aq, as_, bq, bs, "tile")
    out = g.fp8_gemm(aq.cuda(), as_.cuda(), bq.cuda(), bs.cuda(), "tile", torch.float32).cpu()
    assert fp8.calc_diff(out, ref) < 1e-6


@pytest.mark.gpu
def test_gpu_compiled_quantizers_agree_with_the_cpu_reference():
    x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(7)) * 3
    q, s = g.quant_tile(x.cuda())
    q_ref, s_ref = g.quant_tile(x)
    assert torch.allclose(s.cpu(), s_ref, rtol=1e-6, atol=0)
    same = (_bits(q.cpu()) == _bits(q_ref)).float().mean()
    assert same > 0.999  # a division rounded differently may move an element by one FP8 step
    assert (q.cpu().float() - q_ref.float()).abs().max() <= 32  # one E4M3 step at the top of the range


@pytest.mark.gpu
def test_gpu_fp8_linear_matches_the_cpu_path():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 256, 1024, generator=gen)
    w = torch.randn(768, 1024, generator=gen) * 0.03
    dy = torch.randn(4, 256, 768, generator=gen)
    grads = []
    for dev in ("cpu", "cuda"):
        xd, wd = x.to(dev).detach().requires_grad_(True), w.to(dev).detach().requires_grad_(True)
        y = g.fp8_linear(xd, wd)
        y.backward(dy.to(dev))
        grads.append((y.detach().cpu(), xd.grad.cpu(), wd.grad.cpu()))
    for cpu, gpu in zip(*grads):
        assert fp8.calc_diff(gpu, cpu) < 1e-5
