"""core.cuda.triton_quant on a CPU: the fused cast-transpose kernels under Triton's interpreter against the eager
quantizers of core.cuda.fp8_linear (the reference), every layout, padding and mask.

Runs where triton is installed (skipped otherwise, e.g. in CI); on a machine without CUDA it switches the
interpreter on itself (TRITON_INTERPRET=1 before the kernels are defined). The interpreter's FP8 cast is wrong,
so the kernels store their fp32 values x / s (clamped, before the cast) and torch casts them; the kernels'
own E4M3 cast is checked on the GPU (tests/test_gpu_fp8.py).
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton defines its own jit functions (tl.max)
import triton.language as tl  # noqa: E402

if type(tl.max).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported without TRITON_INTERPRET=1: run `TRITON_INTERPRET=1 python -m pytest "
                "tests/test_triton_quant.py` (on a GPU, tests/test_gpu_fp8.py's gpu tests check the kernels)",
                allow_module_level=True)

from core.cuda import fp8_linear as g  # noqa: E402
from core.cuda import triton_quant as tq  # noqa: E402
from core.fp8 import AMAX_FLOOR  # noqa: E402

E4M3 = torch.float8_e4m3fn
SHAPES = [(200, 320), (5, 100), (384, 256), (130, 129)]


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.to(E4M3).view(torch.uint8)  # fp32 kernel output (exact E4M3 grid after torch's cast) or E4M3


def _input(shape, dtype, contiguous, seed):
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        return (torch.randn(*shape, generator=gen) * 4).to(dtype)
    big = (torch.randn(shape[1], 2 * shape[0], generator=gen) * 4).to(dtype)
    return big[:, ::2].t()  # strides (2, 2 * M): neither dim contiguous


def _precast(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """clamp(x / s) for x [M, K] (zero-padded to s's tiles) and 1x128 scales s [M, Kp/128]: the eager formula."""
    m, k = x.shape
    xp = torch.nn.functional.pad(x.float(), (0, s.shape[1] * 128 - k)).reshape(m, -1, 128)
    return (xp / s.unsqueeze(-1)).clamp(-448.0, 448.0).reshape(m, -1)


def _same(out, ref):
    (q, s), (q_ref, s_ref) = out, ref
    assert q.shape == q_ref.shape and s.shape == s_ref.shape
    # the layout cuBLAS reads: outer-dim-major (strides (1, rows)) for tiles, row-major for blocks
    assert (s.is_contiguous(), s.t().is_contiguous()) == (s_ref.is_contiguous(), s_ref.t().is_contiguous())
    assert torch.equal(s, s_ref)
    assert torch.equal(_bits(q), _bits(q_ref))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_tile_dual_equals_the_eager_quantizer_in_both_layouts(shape, dtype, contiguous):
    x = _input(shape, dtype, contiguous, seed=shape[0] + shape[1])
    q, s, qt, st = tq.quant_tile_dual(x, True, torch.float32)
    _same((q, s), g._quant_tile_eager(x))
    _same((qt, st), g._quant_tile_eager(x.t()))
    # the stored values themselves (not only after rounding to E4M3): x / s with an exact division, clamped
    assert torch.equal(q, _precast(x, s)) and torch.equal(qt, _precast(x.t(), st))
    assert not q[:, shape[1]:].any() and not qt[:, shape[0]:].any()  # zero padding in both layouts


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_block_dual_equals_the_eager_quantizer_and_its_transpose(shape, dtype, contiguous):
    w = _input(shape, dtype, contiguous, seed=7 * shape[0] + shape[1])
    q, s, qt, st = tq.quant_block_dual(w, True, torch.float32)
    q_ref, s_ref = g._quant_block_eager(w)
    _same((q, s), (q_ref, s_ref))
    _same((qt, st), (q_ref.t().contiguous(), s_ref.t().contiguous()))
    assert q.is_contiguous() and qt.is_contiguous() and st.is_contiguous()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("knobs", [dict(sub=16), dict(sub=64, num_warps=8, num_stages=3), dict(sub=128)])
def test_launch_knobs_never_change_an_output(shape, knobs):
    """Every chunk size (sub=128: the one-shot design) writes the same bits as the defaults and the eager
    quantizers, in both layouts, for bf16 and fp32, strided or not, shapes not multiples of 128 nor of sub."""
    for dtype, contiguous in ((torch.bfloat16, False), (torch.float32, True)):
        x = _input(shape, dtype, contiguous, seed=shape[0] * 3 + shape[1])
        tile, block = tq.quant_tile_dual(x, True, torch.float32, **knobs), tq.quant_block_dual(x, True, torch.float32,
                                                                                              **knobs)
        for out, ref in ((tile, tq.quant_tile_dual(x, True, torch.float32)),
                         (block, tq.quant_block_dual(x, True, torch.float32))):
            assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(out, ref))
        _same(tile[:2], g._quant_tile_eager(x))
        _same(tile[2:], g._quant_tile_eager(x.t()))
        q_ref, s_ref = g._quant_block_eager(x)
        _same(block[:2], (q_ref, s_ref))
        _same(block[2:], (q_ref.t().contiguous(), s_ref.t().contiguous()))


def test_launch_knobs_are_validated():
    x = torch.zeros(4, 4)
    for fn, kw, msg in ((tq.quant_tile_dual, dict(sub=48), r"quant_tile_dual: sub must be one of"),
                        (tq.quant_block_dual, dict(num_warps=3), r"quant_block_dual: num_warps must be one of"),
                        (tq.quant_tile_dual, dict(num_stages=0), r"quant_tile_dual: num_stages must be an integer")):
        with pytest.raises(ValueError, match=msg):
            fn(x, **kw)


def test_one_layout_only_and_empty_inputs():
    x = _input((200, 320), torch.bfloat16, True, seed=3)
    q, s = tq.quant_tile_dual(x, False, torch.float32)
    _same((q, s), g._quant_tile_eager(x))
    wq, ws = tq.quant_block_dual(x, False, torch.float32)
    _same((wq, ws), g._quant_block_eager(x))
    for shape in ((0, 256), (64, 0)):
        e = torch.zeros(shape)
        out = tq.quant_tile_dual(e, True, torch.float32)
        ref = g._quant_tile_eager(e) + g._quant_tile_eager(e.t())
        assert [t.shape for t in out] == [t.shape for t in ref]
    with pytest.raises(ValueError, match=r"quant_tile_dual: x \[M, K\] must be 2-D"):
        tq.quant_tile_dual(torch.zeros(2, 3, 4))


def test_reciprocal_scales_follow_torch_eager_on_cuda():
    """recip_scale=True (the default for CUDA tensors) scales like torch's CUDA kernel for `amax / 448`
    (a multiplication by fp32(1/448)); about half of these scales differ by an ulp from the division."""
    x = _input((256, 1024), torch.float32, True, seed=11)
    q, s, qt, st = tq.quant_tile_dual(x, True, torch.float32, recip_scale=True)
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(448.0, dtype=torch.float32)
    s_ref = x.abs().reshape(256, 8, 128).amax(-1).clamp(min=AMAX_FLOOR) * inv
    st_ref = x.t().abs().reshape(1024, 2, 128).amax(-1).clamp(min=AMAX_FLOOR) * inv
    assert torch.equal(s, s_ref) and torch.equal(st, st_ref)
    assert not torch.equal(s, g._quant_tile_eager(x)[1])  # the two forms do differ: the switch matters
    assert torch.equal(q, _precast(x, s)) and torch.equal(qt, _precast(x.t(), st))
    w = _input((200, 320), torch.float32, True, seed=12)
    _, ws, _, wts = tq.quant_block_dual(w, True, torch.float32, recip_scale=True)
    amax = torch.nn.functional.pad(w, (0, 64, 0, 56)).abs().reshape(2, 128, 3, 128).amax(dim=(1, 3))
    assert torch.equal(ws, amax.clamp(min=AMAX_FLOOR) * inv) and torch.equal(wts, ws.t())


def test_fp8_linear_through_the_fused_quantizers_equals_the_unfused_path(monkeypatch):
    """The autograd linear fed by the fused kernels (here their fp32 output cast by torch, on the CPU) gives the
    same output and gradients, bit for bit, as the two-quantizer path: same operands, same GEMMs."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 80, 320, generator=gen)
    w = torch.randn(200, 320, generator=gen) * 0.05
    dy = torch.randn(2, 80, 200, generator=gen)
    runs, calls = [], []

    def fused_on_cpu(name, t, transposed):
        calls.append(name)
        out = getattr(tq, name)(t, transposed, torch.float32)
        return tuple(o.to(E4M3) if i % 2 == 0 else o for i, o in enumerate(out))

    for fused in (False, True):
        if fused:
            monkeypatch.setattr(g, "_fused", fused_on_cpu)
        xd, wd = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = g.fp8_linear(xd, wd)
        y.backward(dy)
        runs.append((y.detach(), xd.grad, wd.grad))
    assert sorted(set(calls)) == ["quant_block_dual", "quant_tile_dual"] and len(calls) == 3  # x, W, dy
    for a, b in zip(*runs):
        assert torch.equal(a, b)
