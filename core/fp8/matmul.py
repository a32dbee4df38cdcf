"""Emulated FP8 GEMM and accumulation precision: the DeepSeek block-scaled GEMM (scales applied
per 128-wide K-block, as in the official inference/kernel.py ``fp8_gemm`` and DeepGEMM), DeepGEMM's
``calc_diff`` similarity, and a model of a limited-precision tensor-core accumulator with and
without promotion to fp32.

Implements V3 report §3.3.2 "Increasing Accumulation Precision" (Fig. 7b: ~14-bit accumulation on
H800, promotion to CUDA cores every N_C = 128 elements). No FP8 hardware is used: operands are
quantized, dequantized and multiplied in fp32 (``torch._scaled_mm`` needs a CUDA GPU of compute
capability 8.9+).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from core.fp8.formats import FP8Format, get_format
from core.fp8.scaling import _grouped, quantize

__all__ = [
    "fp8_gemm", "fp8_gemm_quantized", "calc_diff", "round_mantissa", "limited_accumulation_gemm",
    "limited_block_gemm", "accumulation_error_curve",
]


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity metric: 1 - 2·Σxy / (Σx² + Σy²) (0 for identical tensors; FP8 GEMMs must
    be < 1e-3 against the reference, DeepGEMM tests/generators.py). Computed in float64."""
    xd, yd = x.detach().double(), y.detach().double()
    denom = float((xd * xd + yd * yd).sum())
    if denom == 0:
        return 0.0
    return 1.0 - 2.0 * float((xd * yd).sum()) / denom


def fp8_gemm_quantized(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                       block_size: int = 128) -> torch.Tensor:
    """C = A @ B^T from pre-quantized operands (DeepSeek inference/kernel.py ``fp8_gemm(a, a_s, b, b_s)``).

    a_q [M, K] fp8 with a_s [M, ceil(K/bs)] (1 x bs tiles); b_q [N, K] fp8 (weight, out x in) with
    b_s [ceil(N/bs), ceil(K/bs)] (bs x bs blocks). For every K-block kb the FP8 products are summed in fp32
    and then scaled: C[m,n] = Σ_kb (A_q[m,kb]·B_q[n,kb]) · a_s[m,kb] · b_s[n//bs, kb] — the scales are
    applied per K-block, as in the kernel and DeepGEMM (promotion every 128 = the K-block).
    Ragged K/M/N are zero-padded. Returns float32 [M, N].
    """
    if a_q.dim() != 2 or b_q.dim() != 2 or a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"a_q/b_q: expected [M,K] and [N,K], got {tuple(a_q.shape)} and {tuple(b_q.shape)}")
    M, K = a_q.shape
    N = b_q.shape[0]
    bs = block_size
    nK = -(-K // bs)
    if tuple(a_s.shape) != (M, nK) or tuple(b_s.shape) != (-(-N // bs), nK):
        raise ValueError(f"a_s/b_s: expected {(M, nK)} and {(-(-N // bs), nK)}, "
                         f"got {tuple(a_s.shape)} and {tuple(b_s.shape)}")
    A = _grouped(a_q.float(), "tile", bs).transpose(0, 1)  # [nK, M, bs]
    B = _grouped(b_q.float(), "tile", bs).permute(1, 2, 0)  # [nK, bs, N]
    a_sT = a_s.float().T.unsqueeze(-1)  # [nK, M, 1]
    b_sT = b_s.float().repeat_interleave(bs, dim=0)[:N].T.unsqueeze(1)  # [nK, 1, N]: row n uses block n//bs
    C = torch.zeros(M, N, dtype=torch.float32)
    step = max(1, (1 << 24) // max(1, M * N))  # K-blocks per batched matmul: caps the [k, M, N] buffer at 64 MiB
    for s in range(0, nK, step):
        e = min(nK, s + step)
        partial = torch.bmm(A[s:e], B[s:e])  # exact fp32 sums of FP8 products, one per K-block
        partial.mul_(a_sT[s:e]).mul_(b_sT[s:e])  # scales applied per K-block (promotion)
        C += partial.sum(0)
    return C


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, fmt: str | FP8Format = "e4m3", block_size: int = 128) -> torch.Tensor:
    """Emulated DeepSeek FP8 GEMM: C = A @ B^T with A [..., K] (activations, quantized per 1 x bs tile)
    and B [N, K] (weight, out x in, quantized per bs x bs block). Leading dims of A are flattened and
    restored: returns float32 [..., N]. See ``fp8_gemm_quantized`` for the accumulation semantics."""
    get_format(fmt, allow_bf16=False)
    if a.dim() < 1 or b.dim() != 2 or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"a/b: expected a [..., K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])
    a_q, a_s = quantize(a2, fmt, "tile", block_size)
    b_q, b_s = quantize(b, fmt, "block", block_size)
    return fp8_gemm_quantized(a_q, a_s, b_q, b_s, block_size).reshape(*lead, b.shape[0])


def round_mantissa(x: torch.Tensor, mantissa_bits: int, rounding: str = "rne") -> torch.Tensor:
    """Round float32 ``x`` to ``mantissa_bits`` explicit mantissa bits (exponent range unchanged),
    by integer operations on the IEEE bit pattern. rounding: "rne" (nearest, ties to even) or
    "truncate" (toward zero, i.e. the low bits are dropped)."""
    if not 0 <= mantissa_bits <= 23:
        raise ValueError(f"mantissa_bits: expected 0..23, got {mantissa_bits}")
    if rounding not in ("rne", "truncate"):
        raise ValueError(f"rounding: expected 'rne' or 'truncate', got {rounding!r}")
    drop = 23 - mantissa_bits
    if drop == 0:
        return x.float().clone()
    bits = x.float().contiguous().view(torch.int32)
    if rounding == "rne":
        lsb = (bits >> drop) & 1
        bits = bits + ((1 << (drop - 1)) - 1) + lsb  # carry into the exponent is the correct rounding
    bits = bits & -(1 << drop)  # sign-magnitude: masking the magnitude bits rounds toward zero
    return bits.view(torch.float32)


def _accumulator_rounding(acc_mantissa_bits: int, rounding: str):
    """In-place rounding of a float32 running sum to ``acc_mantissa_bits`` explicit mantissa bits, on its
    integer view (the same rounding as ``round_mantissa``, without allocating)."""
    if not 0 <= acc_mantissa_bits <= 23 or rounding not in ("rne", "truncate"):
        round_mantissa(torch.zeros(0), acc_mantissa_bits, rounding)  # raises the ValueError naming the argument
    drop = 23 - acc_mantissa_bits
    keep = -(1 << drop)
    half_m1 = (1 << (drop - 1)) - 1 if drop else 0

    def round_acc_(acc: torch.Tensor) -> torch.Tensor:
        if drop:
            bits = acc.view(torch.int32)
            if rounding == "rne":
                bits.add_(((bits >> drop) & 1) + half_m1)
            bits.bitwise_and_(keep)
        return acc
    return round_acc_


def limited_block_gemm(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                       block_size: int = 128, acc_mantissa_bits: int = 13, promote_every: int = 128,
                       chunk: int = 4, rounding: str = "truncate") -> torch.Tensor:
    """``fp8_gemm_quantized`` on a limited-precision accumulator with promotion (V3 report §3.3.2, Fig. 7b):
    C = A @ B^T for a_q [M, K] (1 x bs tiles, a_s [M, nK]) and b_q [N, K] (bs x bs blocks, b_s [nN, nK]).

    Within every run of ``promote_every`` (N_C) elements of K the unscaled FP8 products are summed ``chunk`` at a
    time into a running sum rounded to ``acc_mantissa_bits`` explicit mantissa bits (the tensor core's ~14-bit
    accumulator, same model as ``limited_accumulation_gemm``); at the end of the run it is promoted: multiplied
    by the two scales of its K-block and added into fp32 (the CUDA-core step). ``promote_every`` must divide
    ``block_size`` (the scales are applied at promotion), and be a multiple of ``chunk``. All runs are
    accumulated at once ([runs, M, N] buffers), so the sequential loop is N_C / chunk steps long, whatever K.
    Returns float32 [M, N].
    """
    if a_q.dim() != 2 or b_q.dim() != 2 or a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"a_q/b_q: expected [M,K] and [N,K], got {tuple(a_q.shape)} and {tuple(b_q.shape)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    if promote_every <= 0 or block_size % promote_every or promote_every % chunk:
        raise ValueError(f"promote_every: expected a divisor of block_size={block_size} that is a multiple of "
                         f"chunk={chunk}, got {promote_every!r}")
    round_acc_ = _accumulator_rounding(acc_mantissa_bits, rounding)
    M, K = a_q.shape
    N = b_q.shape[0]
    bs = block_size
    nK = -(-K // bs)
    runs, steps = nK * (bs // promote_every), promote_every // chunk
    A = _grouped(a_q.float(), "tile", bs).reshape(M, runs, steps, chunk).permute(1, 2, 0, 3)  # [R, steps, M, c]
    B = _grouped(b_q.float(), "tile", bs).reshape(N, runs, steps, chunk).permute(1, 2, 3, 0)  # [R, steps, c, N]
    acc = torch.zeros(runs, M, N, dtype=torch.float32)
    for j in range(steps):
        round_acc_(acc.add_(torch.bmm(A[:, j], B[:, j])))
    kb = torch.arange(runs) // (bs // promote_every)  # the K-block of each run
    a_scale = a_s.float().T[kb].unsqueeze(-1)  # [R, M, 1]
    b_scale = b_s.float().repeat_interleave(bs, dim=0)[:N].T[kb].unsqueeze(1)  # [R, 1, N]
    return (acc * a_scale * b_scale).sum(0)  # promotion: scaled partial sums added in fp32


def limited_accumulation_gemm(a: torch.Tensor, b: torch.Tensor, acc_mantissa_bits: int = 13,
                              promote_every: int | None = None, fmt: str | FP8Format | None = "e4m3",
                              chunk: int = 4, rounding: str = "truncate",
                              return_reference: bool = False):
    """Simulate an H800-style FP8 tensor-core accumulator with limited precision (V3 report §3.3.2).

    A [M, K] and B [N, K] are quantized per tensor to ``fmt`` (None: use them as they are), so both
    variants below multiply the *same* operands and differ only in how they accumulate:
    - The K dimension is consumed in steps of ``chunk`` elements (default 4). Each step's ``chunk``
      products are summed exactly (fp32), added to the running partial sum, and that sum is rounded to a
      float with ``acc_mantissa_bits`` explicit mantissa bits (13 ≈ "about 14 bits" incl. the implicit
      one). ``rounding="truncate"`` (default) drops the low bits, modelling alignment of addends to the
      accumulator's exponent with a fixed-width adder; "rne" is also offered.
    - ``promote_every=N_C`` (e.g. 128 = 4 WGMMAs): every N_C elements the limited partial sum is added
      into an fp32 accumulator and reset (DeepSeek's promotion to CUDA cores). None: no promotion.
    This is a model chosen to reproduce the report's figure (about 2% error at K=4096 without promotion),
    not a bit-exact replica of the hardware; measured curves are in docs/performance.md.

    Returns C (float32 [M, N], per-tensor scales applied), or (C, C_ref) with C_ref the float64 exact
    product of the same quantized operands if ``return_reference``.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a/b: expected [M,K] and [N,K], got {tuple(a.shape)} and {tuple(b.shape)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    if promote_every is not None and (promote_every <= 0 or promote_every % chunk):
        raise ValueError(f"promote_every: expected None or a positive multiple of chunk={chunk}, got {promote_every!r}")
    M, K = a.shape
    N = b.shape[0]
    if fmt is not None:
        a_q, a_s = quantize(a, fmt, "tensor")
        b_q, b_s = quantize(b, fmt, "tensor")
        A, B, s = a_q.float(), b_q.float(), float(a_s) * float(b_s)
    else:
        A, B, s = a.detach().float(), b.detach().float(), 1.0
    nC = -(-K // chunk)
    if nC * chunk != K:
        A = F.pad(A, (0, nC * chunk - K))
        B = F.pad(B, (0, nC * chunk - K))
    # All chunk partial products at once: [nC, M, N] (vectorised; only the running sum is sequential).
    P = torch.bmm(A.reshape(M, nC, chunk).transpose(0, 1), B.reshape(N, nC, chunk).permute(1, 2, 0))
    steps_per_promo = None if promote_every is None else promote_every // chunk
    round_acc_ = _accumulator_rounding(acc_mantissa_bits, rounding)
    acc = torch.zeros(M, N, dtype=torch.float32)
    out = torch.zeros(M, N, dtype=torch.float32)
    for i in range(nC):
        round_acc_(acc.add_(P[i]))
        if steps_per_promo is not None and (i + 1) % steps_per_promo == 0:
            out += acc  # promotion: add the limited partial sum into the fp32 accumulator and reset it
            acc.zero_()
    out = (out + acc) * s
    if return_reference:
        ref = (A.double() @ B.double().T) * s
        return out, ref
    return out


def accumulation_error_curve(Ks: Iterable[int] = (256, 512, 1024, 2048, 4096, 8192), M: int = 64, N: int = 64,
                             acc_mantissa_bits: int = 13, promote_every: int = 128,
                             fmt: str | FP8Format | None = "e4m3", chunk: int = 4, rounding: str = "truncate",
                             dist: str = "uniform", seed: int = 0) -> dict:
    """Relative error of ``limited_accumulation_gemm`` vs the exact product, per K, with and without
    promotion (for the FP8 lab's "GEMM error vs K" chart; V3 report §3.3.2: ≈2% at K=4096 without).

    dist: "uniform" (U[0,1), positive so partial sums grow with K, as in accumulation studies) or
    "gaussian". Errors: max_rel = max|C-C_ref| / max|C_ref| (equals the elementwise max relative
    error for positive data, and stays meaningful for signed data); fro_rel = ||C-C_ref||_F/||C_ref||_F.
    Returns {"K": [...], "max_rel_no_promotion": [...], "max_rel_promotion": [...],
    "fro_rel_no_promotion": [...], "fro_rel_promotion": [...], "promote_every": N_C, ...}.
    """
    if dist not in ("uniform", "gaussian"):
        raise ValueError(f"dist: expected 'uniform' or 'gaussian', got {dist!r}")
    res: dict = {"K": [], "max_rel_no_promotion": [], "max_rel_promotion": [],
                 "fro_rel_no_promotion": [], "fro_rel_promotion": [], "promote_every": promote_every,
                 "acc_mantissa_bits": acc_mantissa_bits, "chunk": chunk, "rounding": rounding, "dist": dist}
    for K in Ks:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(K))
        draw = torch.rand if dist == "uniform" else torch.randn
        a = draw((M, int(K)), generator=g)
        b = draw((N, int(K)), generator=g)
        res["K"].append(int(K))
        for tag, pe in (("no_promotion", None), ("promotion", promote_every)):
            c, ref = limited_accumulation_gemm(a, b, acc_mantissa_bits, pe, fmt, chunk, rounding, return_reference=True)
            d = (c.double() - ref).abs()
            res[f"max_rel_{tag}"].append(float(d.max() / ref.abs().max()))
            res[f"fro_rel_{tag}"].append(float(d.norm() / ref.norm()))
    return res
