"""core.gemm: the oneDNN fp32 GEMMs give F.linear's / the grouped matmul's values and gradients, fall back to
torch's ops outside fp32 CPU, and the backend knob is validated."""
from __future__ import annotations

import os
import subprocess
import textwrap
import sys

import pytest
import torch
import torch.nn.functional as F

from core import gemm

onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="torch build without oneDNN on this CPU")


@pytest.fixture
def backend():
    """Run a test on a chosen backend and restore the process's backend afterwards."""
    previous = gemm.fp32_backend()
    yield gemm.set_fp32_backend
    gemm.set_fp32_backend(previous)


def _grads(fn, *tensors):
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*ts)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))  # a non-uniform upstream gradient
    return y.detach(), [t.grad for t in ts]


def _close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@onednn
@pytest.mark.parametrize("shape,bias", [((37, 24), False), ((3, 11, 24), True)])
def test_onednn_linear_matches_f_linear_values_and_grads(backend, shape, bias):
    backend("onednn")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(40, 24, generator=g)
    args = (x, w, torch.randn(40, generator=g)) if bias else (x, w)
    y, grads = _grads(gemm.linear, *args)
    y_ref, grads_ref = _grads(F.linear, *args)
    assert y.shape == y_ref.shape and _close(y, y_ref)
    for a, b in zip(grads, grads_ref):
        assert a.shape == b.shape and _close(a, b)


@onednn
def test_onednn_linear_takes_strided_inputs_and_is_deterministic(backend):
    backend("onednn")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 48, generator=g)[:, 8:40]      # a column slice: not contiguous
    w = torch.randn(32, 20, generator=g).t()           # [20, 32] transposed view
    y = gemm.linear(x, w)
    assert _close(y, x @ w.t()) and torch.equal(y, gemm.linear(x.contiguous(), w.contiguous()))


def test_weights_reach_onednn_row_or_column_major():
    """oneDNN runs other weight strides on its reference kernel (~1000x slower): those are copied first, while a
    weight or its plain transpose goes through as it is (no copy)."""
    w = torch.randn(64, 48)
    wt = w.t()
    assert gemm._dense(w) is w and gemm._dense(wt) is wt
    sliced = w[:, :40].t()  # [40, 64] with strides (1, 48): the transpose of a column slice
    dense = gemm._dense(sliced)
    assert dense.is_contiguous() and torch.equal(dense, sliced)


@onednn
def test_grouped_linear_matches_per_segment_products_with_empty_groups(backend):
    backend("onednn")
    g = torch.Generator().manual_seed(2)
    counts = torch.tensor([5, 0, 9, 1, 0, 17])
    x, w = torch.randn(int(counts.sum()), 16, generator=g), torch.randn(len(counts), 12, 16, generator=g)

    def per_segment(x_, w_):
        return torch.cat([x_e @ w_[e].t() for e, x_e in enumerate(x_.split(counts.tolist()))])

    y, (dx, dw) = _grads(lambda a, b: gemm.grouped_linear(a, b, counts), x, w)
    y_ref, (dx_ref, dw_ref) = _grads(per_segment, x, w)
    assert _close(y, y_ref) and _close(dx, dx_ref) and _close(dw, dw_ref)
    assert torch.count_nonzero(dw[[1, 4]]) == 0  # experts without tokens get a zero gradient


def test_torch_backend_and_other_dtypes_are_exactly_torch_ops(backend):
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(8, 16, generator=g), torch.randn(4, 16, generator=g)
    backend("torch")
    assert gemm.fp32_backend() == "torch"
    assert torch.equal(gemm.linear(x, w), F.linear(x, w))
    backend("auto")
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(gemm.linear(xb, wb), F.linear(xb, wb))      # bf16 keeps torch's own oneDNN path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm.linear(x, w).dtype == torch.bfloat16            # autocast still applies
    assert torch.equal(gemm.linear(x[:0], w), F.linear(x[:0], w))   # empty input


def test_segment_granule_pads_only_gemms_that_run_on_onednn(backend):
    assert gemm.segment_granule(torch.bfloat16, "cpu") == 32
    assert gemm.segment_granule(torch.bfloat16, "meta") == 1
    backend("torch")
    assert gemm.segment_granule(torch.float32, "cpu") == 1
    if gemm.onednn_available():
        backend("onednn")
        assert gemm.segment_granule(torch.float32, "cpu") == 32


ZEN5 = ("vendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel name\t: AMD EPYC 9B45\n"
        "flags\t\t: fpu sse avx2 avx512f avx512bw\n")
ZEN4 = ZEN5.replace(": 26", ": 25").replace("9B45", "9R14")
ZEN5_NO_512 = ZEN5.replace(" avx512f avx512bw", "")
INTEL = ("vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n"
         "flags\t\t: fpu avx2 avx512f\n")


@pytest.mark.parametrize("text, onednn, expected", [
    (ZEN5, True, "onednn"),            # full-width AVX-512 on AMD: oneDNN ~2x MKL's AVX2 kernels
    (ZEN4, True, "torch"),             # Zen 4: oneDNN only 1.11x on a GEMM and slower training
    (ZEN5_NO_512, True, "torch"),      # no AVX-512: nothing wider than MKL's AVX2
    (INTEL, True, "torch"),            # MKL runs its full kernels on Intel
    (ZEN5, False, "torch"),            # torch build without oneDNN's fp32 linear
    ("", True, "torch"),               # unknown CPU (no /proc/cpuinfo): torch's defaults
])
def test_auto_backend_follows_the_cpu_not_a_stopwatch(text, onednn, expected):
    backend, reason = gemm.auto_backend(gemm._parse_cpuinfo(text), onednn)
    assert backend == expected and reason


def test_cpuinfo_is_read_from_the_first_processor_block():
    cpu = gemm._parse_cpuinfo("processor\t: 0\n" + ZEN5 + "\nprocessor\t: 1\n" + INTEL)
    assert (cpu.vendor, cpu.family, cpu.model) == ("AuthenticAMD", 26, "AMD EPYC 9B45")
    assert "avx512f" in cpu.flags and gemm._parse_cpuinfo("cpu family\t: ?\n").family is None


def test_auto_is_the_same_in_every_process_whatever_the_load(backend):
    """No timing decides: auto resolves to the rule's answer for this machine, every time, and says why."""
    backend("auto")
    expected = gemm.auto_backend(gemm.cpu_info(), gemm.onednn_available())
    assert (gemm.fp32_backend(), gemm.choice()["reason"]) == expected
    assert gemm.choice()["setting"] == "auto" and gemm.choice()["cpu"] == gemm.cpu_info().model
    assert not hasattr(gemm, "calibration")
    backend("torch")
    assert gemm.choice()["backend"] == "torch" and gemm.choice()["setting"] == "torch"
    if gemm.onednn_available():
        backend("onednn")  # asked for explicitly: no rule needed
        assert gemm.fp32_backend() == "onednn"


def test_using_restores_the_previous_backend_even_on_error(backend):
    backend("torch")
    with pytest.raises(RuntimeError):
        with gemm.using("auto"):
            assert gemm.fp32_backend() == gemm._resolve("auto")[0]
            raise RuntimeError
    assert gemm.fp32_backend() == "torch"


def test_bad_backend_name_is_refused_with_the_knob_named(backend):
    with pytest.raises(ValueError, match="EVA_FP32_GEMM.*auto.*onednn.*torch"):
        gemm.set_fp32_backend("mkl")


def _backend_at_import(value: str) -> subprocess.CompletedProcess:
    code = "from core import gemm; print(gemm.fp32_backend())"
    env = {**os.environ, "EVA_FP32_GEMM": value}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)


def test_environment_variable_selects_the_backend_at_import():
    assert _backend_at_import("torch").stdout.strip() == "torch"
    typo = _backend_at_import("mkl")  # warns, names the variable, and starts on the default
    assert "EVA_FP32_GEMM='mkl'" in typo.stderr and typo.stdout.strip() == gemm._resolve("auto")[0]


@onednn
def test_training_never_runs_onednn_reference_kernels():
    """oneDNN silently falls back to its reference kernels (~1000x slower) for layouts its fast kernels skip; one
    such weight layout once made FP8 training 8x slower. Train two steps of every precision and attention/FFN
    kind with oneDNN's log on and require its fast kernels for every GEMM."""
    code = textwrap.dedent("""
        import torch
        from core.train import TrainConfig, train
        torch.set_num_threads(1)
        for kw in [{}, {"precision": "bf16"}, {"precision": "deepseek"}, {"precision": "tensor-delayed"},
                   {"attention": "gqa", "ffn": "dense"}, {"attention": "mha", "mtp": False}]:
            run = train("mini", TrainConfig(steps=2, batch_size=2, seq_len=32, eval_every=0, **kw))
            for _ in run:
                pass
            run.sample_text("ab", 4)
    """)
    env = {**os.environ, "EVA_FP32_GEMM": "onednn", "ONEDNN_VERBOSE": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    execs = [line for line in out.stdout.splitlines() if ",primitive,exec," in line]
    assert len(execs) > 100, out.stdout[-2000:]
    slow = [line for line in execs if ",ref:" in line]
    assert not slow, slow[:3]
