"""core.cuda.triton_swiglu, the routed experts' fused SwiGLU, against the eager formula: on CPU under the Triton
interpreter (TRITON_INTERPRET=1; skipped where triton is not installed, as in CI) and on a GPU."""
from __future__ import annotations

import os

import pytest
import torch

from core.layers import swiglu_packed as eager_swiglu_packed

triton = pytest.importorskip("triton")
from core.cuda import triton_swiglu as ts  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])
if not DEVICES:
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)


def _reference(gu: torch.Tensor, w: torch.Tensor | None, dh: torch.Tensor):
    """h and the gradients of sum(h * dh) by autograd in float64."""
    gu64 = gu.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_() if w is not None else None
    g, u = gu64.chunk(2, dim=-1)
    h = torch.nn.functional.silu(g) * u * (w64 if w64 is not None else 1.0)
    grads = torch.autograd.grad(h, [gu64] + ([w64] if w64 is not None else []), dh.double())
    return h, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s,i,weighted", [(37, 200, True), (16, 128, False), (5, 64, True), (0, 64, True)])
def test_fused_swiglu_matches_the_formula_forward_and_backward(device, dtype, s, i, weighted):
    gen = torch.Generator().manual_seed(s * 1000 + i)
    gu = (torch.randn(s, 2 * i, generator=gen) * 2).to(device, dtype).requires_grad_()
    w = torch.rand(s, 1, generator=gen).to(device, dtype).requires_grad_() if weighted else None
    dh = torch.randn(s, i, generator=gen).to(device, dtype)
    h = ts.swiglu_packed(gu, w)
    grads = torch.autograd.grad(h, [gu] + ([w] if weighted else []), dh)
    ref_h, ref_grads = _reference(gu, w, dh)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)  # one bf16 rounding
    torch.testing.assert_close(h.double(), ref_h, **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, **tol)
    assert grads[0].shape == gu.shape and (not weighted or grads[1].shape == w.shape)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_swiglu_reads_a_strided_gate_up_and_no_grad_inputs(device):
    """A [S, 2I] slice of a wider buffer (row stride > 2I) and a forward without autograd give the eager result."""
    gen = torch.Generator().manual_seed(1)
    buf = torch.randn(9, 300, generator=gen).to(device)
    gu, w = buf[:, :256], torch.rand(9, 1, generator=gen).to(device)
    with torch.no_grad():
        torch.testing.assert_close(ts.swiglu_packed(gu, w), eager_swiglu_packed(gu.cpu(), w.cpu()).to(device),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"gate_up must be \[S, 2I\]"):
        ts.swiglu_packed(buf[:, :255], None)
