"""fp32 GEMMs on CPU: which library multiplies, and the `Linear` / grouped-expert products built on it.

Why this module exists: torch's CPU fp32 `mm`/`addmm`/`_grouped_mm` call MKL's sgemm, and MKL runs only its AVX2
kernels on non-Intel CPUs, leaving AVX-512 idle; oneDNN (which torch also ships, and already uses for bf16) does
not (figures: docs/performance.md). Both are IEEE fp32 with fp32 accumulation (no TF32/BF16 shortcuts): results
differ from MKL only by summation order.

Backend (`fp32_backend()`), chosen once per process from the environment variable `EVA_FP32_GEMM`:
    "auto" (default): decided from what the machine IS, never from a timing (a timing would let two processes on
                      one machine pick different libraries under different load, and the same seed and knobs would
                      then give slightly different numbers): CPU vendor, family and ISA flags (/proc/cpuinfo), and
                      whether this torch build has oneDNN's fp32 linear. The rule is the table `AUTO_RULES`, with
                      the measurement behind each row beside it; `choice()` says which row applied.
    "onednn":         oneDNN fp32 GEMMs (falls back to "torch" where oneDNN is unavailable)
    "torch":          torch's defaults (MKL on x86-64)
`set_fp32_backend` switches it at run time (benchmarks, tests; the app's server process picks "torch", see
`app.compute.common.torch_setup`). `choice()` is recorded in every training record (core.train) and printed by
bench/train_throughput.py. Memory: oneDNN JIT-compiles a kernel per GEMM shape and keeps it in a cache of up to
1024 kernels (sizes per run: docs/performance.md); `ONEDNN_PRIMITIVE_CACHE_CAPACITY` (read before oneDNN's first
use) bounds it.

Only fp32 CPU tensors outside autocast take the oneDNN path; everything else (bf16, CUDA, autocast regions, empty
inputs) goes to the torch ops unchanged.

oneDNN is reached through `torch.ops.mkldnn._linear_pointwise(X, W, B, "none", [], "")` = X @ W^T + B, the op
torch's own inductor uses for CPU linears. It has no autograd formula, so `linear` and `grouped_linear` are
autograd Functions whose backward GEMMs use the same op:
    dX = dY @ W  = lp(dY, W^T),      dW = dY^T @ X = lp(dY^T, X^T),      dB = sum of dY over rows.
"""
from __future__ import annotations

import os
import platform
from contextlib import contextmanager
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FP32_BACKENDS", "ENV_VAR", "AUTO_RULES", "CpuInfo", "cpu_info", "auto_backend", "choice", "fp32_backend",
           "set_fp32_backend", "using", "onednn_available", "segment_granule", "linear", "grouped_linear", "Linear"]

FP32_BACKENDS = ("auto", "onednn", "torch")
ENV_VAR = "EVA_FP32_GEMM"


def onednn_available() -> bool:
    """True when this torch build exposes oneDNN's fp32 linear on this CPU (x86-64 builds with mkldnn)."""
    machine = platform.machine().lower()
    return (machine in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@dataclass(frozen=True)
class CpuInfo:
    """What the auto rule looks at: vendor_id, cpu family and flags as /proc/cpuinfo spells them, and the model name
    (for the records; no rule reads it)."""
    vendor: str
    family: int | None
    flags: frozenset
    model: str


def _parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's fields of a /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # end of the first processor's block: all cores of one machine are alike
            continue
        k, _, v = line.partition(":")
        fields.setdefault(k.strip(), v.strip())
    try:
        family = int(fields.get("cpu family", ""))
    except ValueError:
        family = None
    return CpuInfo(vendor=fields.get("vendor_id", ""), family=family, flags=frozenset(fields.get("flags", "").split()),
                   model=fields.get("model name", ""))


_cpu: CpuInfo | None = None


def cpu_info() -> CpuInfo:
    """This machine's CPU (read once): /proc/cpuinfo on Linux; elsewhere only the platform's processor name (no
    vendor/family/flags, so the auto rule keeps torch's defaults)."""
    global _cpu
    if _cpu is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                _cpu = _parse_cpuinfo(f.read())
        except OSError:
            _cpu = CpuInfo(vendor="", family=None, flags=frozenset(), model=platform.processor() or platform.machine())
    return _cpu


@dataclass(frozen=True)
class _Rule:
    """Use oneDNN for fp32 when the CPU's vendor matches, its family is >= min_family and it has the `flag` ISA."""
    vendor: str
    min_family: int
    flag: str
    reason: str


# The auto rule, as data: the first row that matches picks oneDNN; no row -> torch's defaults. Evidence
# (docs/performance.md, "fp32 GEMM library"): MKL's sgemm runs only its AVX2 kernels on non-Intel CPUs.
# - AMD Zen 5 (family 26, full-width 512-bit AVX-512 units): oneDNN fp32 measured ~2x MKL, and training faster.
# - AMD Zen 4 (family 25, AVX-512 executed as two 256-bit halves): oneDNN measured only 1.11x MKL on a GEMM and
#   training on it was slower (the engine's copies around oneDNN's kernels eat the gain) -> no row: torch.
# - Intel: MKL runs its full AVX-512 kernels -> no row: torch.
AUTO_RULES: tuple[_Rule, ...] = (
    _Rule(vendor="AuthenticAMD", min_family=26, flag="avx512f",
          reason="AMD family >= 26 (Zen 5) with full-width AVX-512: MKL runs only AVX2 here; oneDNN fp32 ~2x MKL"),
)


def auto_backend(cpu: CpuInfo, onednn: bool) -> tuple[str, str]:
    """("onednn" | "torch", why) for a CPU and whether this torch build has oneDNN's fp32 linear. Pure: the same
    machine always gets the same answer."""
    if not onednn:
        return "torch", "this torch build / CPU has no oneDNN fp32 linear"
    for r in AUTO_RULES:
        if cpu.vendor == r.vendor and cpu.family is not None and cpu.family >= r.min_family and r.flag in cpu.flags:
            return "onednn", r.reason
    if cpu.vendor == "GenuineIntel":
        return "torch", "Intel CPU: MKL runs its full kernels"
    if cpu.vendor == "AuthenticAMD":
        return "torch", (f"AMD family {cpu.family}: below family 26 (Zen 4 runs AVX-512 as two halves; oneDNN "
                         "trained slower there)" if "avx512f" in cpu.flags else
                         f"AMD family {cpu.family} without AVX-512: oneDNN has no wider kernels than MKL's AVX2")
    return "torch", f"no rule for this CPU ({cpu.vendor or 'vendor unknown'}): torch's defaults"


def _resolve(name: str) -> tuple[str, str]:
    if name not in FP32_BACKENDS:
        raise ValueError(f"{ENV_VAR} / fp32 GEMM backend must be one of {FP32_BACKENDS}, got {name!r}")
    if name == "auto":
        return auto_backend(cpu_info(), onednn_available())
    if name == "onednn" and onednn_available():
        return "onednn", "asked for (onednn)"
    if name == "onednn":
        return "torch", "asked for onednn, but this torch build / CPU has no oneDNN fp32 linear"
    return "torch", "asked for (torch)"


def _from_environment() -> str:
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in FP32_BACKENDS:  # a typo must not stop the app from starting: say so and use the default
        warnings.warn(f"{ENV_VAR}={name!r} is not one of {FP32_BACKENDS}; using 'auto'", stacklevel=3)
        name = "auto"
    return name


_requested = _from_environment()
_setting = _requested  # what was asked for last: the environment's value or set_fp32_backend's argument
_backend: tuple[str, str] | None = None  # (backend, why), resolved at the first fp32 GEMM
_lock = threading.Lock()  # the app's script threads may reach the first GEMM together


def _current() -> tuple[str, str]:
    global _backend
    if _backend is None:
        with _lock:
            if _backend is None:
                _backend = _resolve(_requested)
    return _backend


def fp32_backend() -> str:
    """The library fp32 CPU GEMMs use in this process: "onednn" or "torch"."""
    return _current()[0]


def choice() -> dict[str, str]:
    """What runs this process's fp32 GEMMs and why, for records and bench output: {"backend", "reason", "setting"
    (the `EVA_FP32_GEMM` value or what `set_fp32_backend` asked for), "cpu" (the CPU's model name)}."""
    backend, reason = _current()
    return {"backend": backend, "reason": reason, "setting": _setting, "cpu": cpu_info().model}


def set_fp32_backend(name: str) -> str:
    """Switch fp32 CPU GEMMs to "auto" / "onednn" / "torch". Returns the previous setting, which
    `set_fp32_backend` accepts to restore it."""
    global _backend, _setting
    with _lock:
        resolved = _resolve(name)
        previous = _setting
        _backend, _setting = resolved, name
    return previous


@contextmanager
def using(name: str):
    """`with gemm.using("torch"): ...` runs the block on that backend and restores the previous setting."""
    previous = set_fp32_backend(name)
    try:
        yield
    finally:
        set_fp32_backend(previous)


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.dim() >= 2 and x.numel() > 0
            and not torch.is_autocast_enabled("cpu") and fp32_backend() == "onednn")


def segment_granule(dtype: torch.dtype, device: torch.device | str) -> int:
    """Row multiple to pad variable-size GEMM segments (the MoE's per-expert token groups) to.

    oneDNN compiles a kernel for every new GEMM shape (several times the cost of the multiply itself at these
    sizes) and expert segment sizes change every step, so unpadded segments would pay it on most expert GEMMs.
    Multiples of 32 rows keep the shapes to a few dozen that oneDNN's primitive cache holds. 32 where the GEMM
    runs on oneDNN on CPU (bf16/fp16 always, fp32 on the oneDNN backend); 1 (no padding) elsewhere (MKL and CUDA
    have no per-shape cost).
    """
    if torch.device(device).type != "cpu":
        return 1
    if dtype in (torch.bfloat16, torch.float16) or (dtype == torch.float32 and fp32_backend() == "onednn"):
        return 32
    return 1


def _lp(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN x @ w^T (+ b); x [..., K], w [N, K] -> [..., N].

    w must be dense, row- or column-major: oneDNN runs any other strides (e.g. the transpose of a column slice)
    on its unoptimised reference kernel (orders of magnitude slower), so those are copied first. x may have any strides (the op makes it contiguous)."""
    if torch.compiler.is_compiling():  # inside a compiled block (core.compile): the opaque op below
        return torch.ops.eva.onednn_linear(x, _dense(w), b)
    return torch.ops.mkldnn._linear_pointwise(x, _dense(w), b, "none", [], "")


# The same oneDNN call as an opaque custom op for torch.compile: inductor's own lowering of `_linear_pointwise`
# expects weights it has prepacked itself (freezing) and fails on ours; an opaque op is called as it is.
_LIB = torch.library.Library("eva", "FRAGMENT")
_LIB.define("onednn_linear(Tensor x, Tensor w, Tensor? b) -> Tensor")
_LIB.impl("onednn_linear", lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""), "CPU")


@torch.library.register_fake("eva::onednn_linear")
def _onednn_linear_fake(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _dense(w: torch.Tensor) -> torch.Tensor:
    """w itself if it is row- or column-major (2-D), else a row-major copy."""
    return w if w.is_contiguous() or w.t().is_contiguous() else w.contiguous()


def _wgrad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW = dy^T x: dy [M, N], x [M, K] -> [N, K] contiguous.

    The op copies a strided X operand to contiguous (W may have any strides), so the transposed activation it
    copies is the narrower one: dy^T [N, M] when N <= K, else x^T [K, M] (then the small [K, N] result is
    transposed back)."""
    if dy.shape[1] <= x.shape[1]:
        return _lp(dy.t(), x.t())
    return _lp(x.t(), dy.t()).t().contiguous()


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with oneDNN GEMMs forward and backward. x [..., K], W [N, K], b [N] | None -> [..., N]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _lp(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _lp(dy2, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = _wgrad(dy2, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` (y = x W^T + b; x [..., K], W [N, K] -> [..., N]) on the process's fp32 GEMM backend."""
    if _use_onednn(x, weight):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class _OneDNNGroupedLinear(torch.autograd.Function):
    """Per-expert y_e = x_e W_e^T over contiguous row segments, oneDNN GEMMs forward and backward.

    x [S, K] (rows sorted by group), weight [E, N, K], sizes: E ints summing to S -> [S, N].
    Backward: dx_e = dy_e W_e; dW_e = dy_e^T x_e (zeros for an empty group).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.sizes = sizes
        outs = [_lp(x_e, weight[e]) for e, x_e in enumerate(x.split(sizes)) if sizes[e]]
        return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        sizes = ctx.sizes
        dx = dw = None
        pieces = [(e, x_e, dy_e) for e, (x_e, dy_e) in enumerate(zip(x.split(sizes), dy.split(sizes))) if sizes[e]]
        if ctx.needs_input_grad[0]:
            dx = torch.cat([_lp(dy_e, weight[e].t()) for e, _, dy_e in pieces]) if pieces else torch.zeros_like(x)
        if ctx.needs_input_grad[1]:
            dw = torch.zeros_like(weight)
            for e, x_e, dy_e in pieces:
                dw[e] = _wgrad(dy_e, x_e)
        return dx, dw, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM for sorted expert slots: rows of x in segment e (sizes from `counts`) times W_e^T.

    x [S, K], weight [E, N, K], counts [E] int (sum S) -> [S, N]. oneDNN per segment on the fp32 oneDNN backend,
    else `torch._grouped_mm` with int32 end offsets (the caller checks `_grouped_mm`'s alignment rules).
    """
    if _use_onednn(x, weight):
        return _OneDNNGroupedLinear.apply(x, weight, counts.tolist())
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, init and state_dict) whose forward uses `linear` above."""

    def init_weights(self, std: float) -> None:
        """weight ~ N(0, std), bias = 0 (transformers' DeepseekV3PreTrainedModel `_init_weights`)."""
        nn.init.normal_(self.weight, 0.0, std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
