"""Fused FP8 cast-transpose quantizers (Triton): one pass over an operand writes both layouts its GEMMs read.

DeepSeek-V3 §3.3 runs every Linear's three GEMMs in FP8 (see core.cuda.fp8_linear): Fprop reads x in 1x128 tiles
along K and Wgrad reads x^T in 1x128 tiles along M; Dgrad reads dy along N and Wgrad reads dy^T along M; Fprop
reads W in 128x128 blocks and Dgrad reads W^T in the same blocks. Quantizing each layout separately reads the
operand twice and needs a transposed copy; here one Triton program per 128x128 block of the operand reads it
(a second pass re-reads it from L2, below) and writes

    quant_tile_dual(x [M, K])  ->  q [M, Kp] + s [M, Kp/128]          (1x128 tiles along K, row amax)
                                   qt [K, Mp] + st [K, Mp/128]        (1x128 tiles of x^T along M, column amax)
    quant_block_dual(w [N, K]) ->  q [Np, Kp] + s [Np/128, Kp/128]     (128x128 blocks)
                                   qt [Kp, Np] + st [Kp/128, Np/128]   (the same blocks transposed)

the fused cast-transpose of DeepSeek's and TransformerEngine's FP8 training. Every output equals
core.cuda.fp8_linear's `_quant_tile_eager(x)`, `_quant_tile_eager(x.t())`, `_quant_block_eager(w)` and its
transpose bit for bit, padding and scale layouts included (s and st outer-dim-major, strides (1, rows): the
layout cuBLAS's 1x128 scaling reads): fp32 arithmetic, zero padding, s = max(amax, AMAX_FLOOR) / 448,
q = cast(clamp(x / s, -448, 448)) with an IEEE division (`div_rn`; Triton's `/` is approximate on fp32) and a
round-to-nearest-even cast (Hopper's cvt.rn.satfinite; the clamp makes its saturation moot).

Chunks, not the whole block: the kernels are memory-bound, so what matters is how many bytes are in flight per
SM. A whole 128x128 fp32 block in registers takes a 512-thread program about the whole register file: one
program per SM, its load, math and stores in series. So a program walks its block in chunks of `sub` rows
(`sub`=128 is that one-shot design, kept as a setting): a 1x128 tile of x needs only its own row, so the first
pass quantizes `sub` full rows at a time; a tile of x^T needs a whole column of the block and nothing else, so
the second pass re-reads the block (32-64 kB, just read: meant to hit L2) `sub` full columns at a time and
writes them as `sub` whole rows of qt. A weight block's one scale needs the whole block: one chunked pass for the
amax, one to cast and write both layouts. Small chunks at few warps leave many programs resident per SM, whose
loads overlap one another's math and stores; `num_stages` > 1 also software-pipelines the chunk loops (tl.range).
The chunking changes no value: amax is a max, exact in any order, and every element sees the same fp32 operations.

One device difference is reproduced on purpose: torch's eager CUDA kernel divides a tensor by a Python scalar as a
multiplication by the scalar's fp32 reciprocal (ATen BinaryDivTrueKernel.cu: "compute a * reciprocal(b)"), the
CPU kernel divides; `recip_scale` (default: the input is on CUDA) follows the device, so the kernels match the
eager quantizer wherever it runs (1/448 is no binary fraction: the two forms often differ by one ulp).

NaN: a NaN element stays NaN in q (the clamp propagates it) and so reaches the GEMM's output and the loss, as on
the eager path; its tile's scale comes from the other elements on the GPU (the compiled amax drops NaNs, a
second NaN-aware reduction per layout is not worth its cost), where torch's amax makes the whole tile NaN.

`out_dtype` is the stored element type: E4M3 for training; float32 stores the clamped x / s before the cast,
which is how the CPU tests check these kernels under TRITON_INTERPRET=1 (the interpreter's FP8 cast is wrong).
This module imports triton; core.cuda.fp8_linear imports it only when a CUDA tensor arrives.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from core.cuda.kernels import on_device, use_torch_ptxas
from core.fp8 import AMAX_FLOOR

use_torch_ptxas()  # this module's kernels are built by the ptxas inductor would pick (core.cuda.kernels)

__all__ = ["BLOCK", "TILE_SUB", "TILE_WARPS", "TILE_STAGES", "BLOCK_SUB", "BLOCK_WARPS", "BLOCK_STAGES",
           "FUSED_TRANSPOSE_DTYPES", "quant_tile_dual", "quant_block_dual"]

BLOCK = 128
_FP8 = torch.float8_e4m3fn
_FMAX = float(torch.finfo(_FP8).max)  # 448
#: Launch knobs (keyword arguments of quant_tile_dual / quant_block_dual; no setting changes a result).
#: sub: rows (tile kernel: rows, then columns, of x^T) a program handles at once, a power of two <= 128;
#: BLOCK means the one-shot design (the whole block in registers, loaded once). num_warps: warps per program.
#: num_stages: software-pipelining depth of the chunk loops (tl.range; 1 = none).
# Defaults from the H200 sweep (bench/gpu_bench.py --only quant; docs/performance.md): x in chunks of 32 rows at 4
# warps; a weight block in one shot at 16 warps (an fp32 block, read once: the chunked two-pass form was slower, and
# its outputs at large weights did not all agree across settings in that sweep, so it is not the default; the fp32
# weights' W^T of both forms were later found miscompiled, 3/8 vs 1/4 of it wrong: FUSED_TRANSPOSE_DTYPES)
TILE_SUB, TILE_WARPS, TILE_STAGES = 32, 4, 1
BLOCK_SUB, BLOCK_WARPS, BLOCK_STAGES = 128, 16, 1
#: Weight dtypes whose W^T the block kernel writes in its own pass on a GPU; for other dtypes W^T is a transposed copy
#: of q (one byte an element; training quantizes bf16 working weights, so this costs training nothing). Built by
#: Triton's bundled ptxas (12.8, torch 2.11's Triton 3.6) for an H200, the kernel wrote 3/8 of W^T's bytes wrong for
#: every fp32 weight tried (130x129 to 18432x7168; W itself and every bf16 weight right), the ptxas bug class of
#: triton-lang/triton#11111 (an FP8 tile stored in two layouts); torch's own ptxas (13.0) built it right. Kernels now
#: build with torch's ptxas where it ships one (core.cuda.kernels.use_torch_ptxas); this gate covers the rest.
FUSED_TRANSPOSE_DTYPES = (torch.bfloat16,)
SUBS = (8, 16, 32, 64, 128)
WARPS = (1, 2, 4, 8, 16, 32)


@triton.jit
def _max(a, b):
    """max that returns NaN when either is NaN, like torch's clamp (Triton's default drops NaNs)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _scale(amax, FLOOR: tl.constexpr, FMAX: tl.constexpr, RECIP: tl.constexpr):
    """Dequantization scale max(amax, FLOOR) / FMAX in fp32, divided or multiplied by 1/FMAX like torch eager."""
    a = _max(amax, FLOOR)
    if RECIP:
        s = a * (1.0 / FMAX)
    else:
        s = tl.math.div_rn(a, FMAX)
    return s


@triton.jit
def _scaled(x, s, FMAX: tl.constexpr):
    """clamp(x / s, -FMAX, FMAX) with a correctly rounded division (torch's fp32 `/`)."""
    return tl.minimum(_max(tl.math.div_rn(x, s), -FMAX), FMAX, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _load(ptr, r, c, R, C, stride_r, stride_c):
    """x[r, c] in fp32 (r, c: int64 index vectors), zero outside [R, C] (the padding of the last tiles)."""
    return tl.load(ptr + r[:, None] * stride_r + c[None, :] * stride_c,
                   mask=(r[:, None] < R) & (c[None, :] < C), other=0.0).to(tl.float32)


@triton.jit
def _tile_dual_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K, Mp, Kp, stride_m, stride_k,
                      TRANSPOSED: tl.constexpr, RECIP: tl.constexpr, FLOOR: tl.constexpr, FMAX: tl.constexpr,
                      B: tl.constexpr, SUB: tl.constexpr, STAGES: tl.constexpr):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    m0 = pid_m.to(tl.int64) * B  # int64: M * Kp passes 2**31 at ~120k tokens x 18432
    k0 = pid_k.to(tl.int64) * B
    if SUB == B:  # one shot: the block loaded once, both layouts from registers
        rm, rk = m0 + tl.arange(0, B), k0 + tl.arange(0, B)
        x = _load(x_ptr, rm, rk, M, K, stride_m, stride_k)
        s = _scale(tl.max(tl.abs(x), axis=1), FLOOR, FMAX, RECIP)  # 1x128 tiles along K: a scale per row
        tl.store(q_ptr + rm[:, None] * Kp + rk[None, :], _scaled(x, s[:, None], FMAX).to(q_ptr.dtype.element_ty),
                 mask=(rm < M)[:, None])
        tl.store(s_ptr + pid_k * M + rm, s, mask=rm < M)  # s [M, Kp/128], strides (1, M)
        if TRANSPOSED:  # 1x128 tiles of x^T along M: a scale per column, stored as rows of qt [K, Mp]
            st = _scale(tl.max(tl.abs(x), axis=0), FLOOR, FMAX, RECIP)
            qt = tl.trans(_scaled(x, st[None, :], FMAX).to(qt_ptr.dtype.element_ty))  # cast first: 1-byte transpose
            tl.store(qt_ptr + rk[:, None] * Mp + rm[None, :], qt, mask=(rk < K)[:, None])
            tl.store(st_ptr + pid_m * K + rk, st, mask=rk < K)  # st [K, Mp/128], strides (1, K)
    else:
        # a row's tile needs only that row: SUB full rows at a time, each chunk self-contained
        rk = k0 + tl.arange(0, B)
        for i in tl.range(0, B // SUB, num_stages=STAGES):
            rm = m0 + i * SUB + tl.arange(0, SUB)
            x = _load(x_ptr, rm, rk, M, K, stride_m, stride_k)
            s = _scale(tl.max(tl.abs(x), axis=1), FLOOR, FMAX, RECIP)
            tl.store(q_ptr + rm[:, None] * Kp + rk[None, :],
                     _scaled(x, s[:, None], FMAX).to(q_ptr.dtype.element_ty), mask=(rm < M)[:, None])
            tl.store(s_ptr + pid_k * M + rm, s, mask=rm < M)
        if TRANSPOSED:
            # a column's tile needs all 128 rows of it and nothing else: SUB full columns at a time (the block
            # is read again, from L2), each written as SUB whole 128-byte rows of qt
            # new names: Triton carries a name bound before a loop through it, and its shape must not change
            cm = m0 + tl.arange(0, B)
            for j in tl.range(0, B // SUB, num_stages=STAGES):
                ck = k0 + j * SUB + tl.arange(0, SUB)
                xc = _load(x_ptr, cm, ck, M, K, stride_m, stride_k)
                st = _scale(tl.max(tl.abs(xc), axis=0), FLOOR, FMAX, RECIP)
                qt = tl.trans(_scaled(xc, st[None, :], FMAX).to(qt_ptr.dtype.element_ty))
                tl.store(qt_ptr + ck[:, None] * Mp + cm[None, :], qt, mask=(ck < K)[:, None])
                tl.store(st_ptr + pid_m * K + ck, st, mask=ck < K)


@triton.jit
def _block_dual_kernel(w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, N, K, Np, Kp, stride_n, stride_k,
                       TRANSPOSED: tl.constexpr, RECIP: tl.constexpr, FLOOR: tl.constexpr, FMAX: tl.constexpr,
                       B: tl.constexpr, SUB: tl.constexpr, STAGES: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    n0 = pid_n.to(tl.int64) * B
    rk = pid_k.to(tl.int64) * B + tl.arange(0, B)
    if SUB == B:  # one shot
        rn = n0 + tl.arange(0, B)
        w = _load(w_ptr, rn, rk, N, K, stride_n, stride_k)
        s = _scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), FLOOR, FMAX, RECIP)
        q = _scaled(w, s, FMAX).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + rn[:, None] * Kp + rk[None, :], q)  # padded blocks: no mask
        if TRANSPOSED:  # W^T reuses the block and its scale (why weights use 128x128 blocks)
            tl.store(qt_ptr + rk[:, None] * Np + rn[None, :], tl.trans(q))
    else:
        # pass 1: the block's amax, SUB rows at a time; the first chunk seeds it (a 0 seed would turn an all-NaN
        # block's NaN amax into the floor: Triton's max drops a NaN against a number, as the one-shot reduction)
        rn = n0 + tl.arange(0, SUB)
        amax = tl.max(tl.max(tl.abs(_load(w_ptr, rn, rk, N, K, stride_n, stride_k)), axis=1), axis=0)
        for i in tl.range(1, B // SUB, num_stages=STAGES):
            rn = n0 + i * SUB + tl.arange(0, SUB)
            w = _load(w_ptr, rn, rk, N, K, stride_n, stride_k)
            amax = tl.maximum(amax, tl.max(tl.max(tl.abs(w), axis=1), axis=0))
        s = _scale(amax, FLOOR, FMAX, RECIP)
        # pass 2: the block again (from L2), cast, both layouts
        for i in tl.range(0, B // SUB, num_stages=STAGES):
            rn = n0 + i * SUB + tl.arange(0, SUB)
            q = _scaled(_load(w_ptr, rn, rk, N, K, stride_n, stride_k), s, FMAX).to(q_ptr.dtype.element_ty)
            tl.store(q_ptr + rn[:, None] * Kp + rk[None, :], q)
            if TRANSPOSED:
                tl.store(qt_ptr + rk[:, None] * Np + rn[None, :], tl.trans(q))
    tl.store(s_ptr + pid_n * (Kp // B) + pid_k, s)  # s [Np/128, Kp/128] row-major
    if TRANSPOSED:
        tl.store(st_ptr + pid_k * (Np // B) + pid_n, s)  # st [Kp/128, Np/128] row-major


def _ceil(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _check_knobs(fn: str, sub, num_warps, num_stages) -> None:
    """Launch knobs: clear messages naming the keyword (they reach the bench's command line)."""
    if sub not in SUBS:
        raise ValueError(f"{fn}: sub must be one of {SUBS} (rows per chunk; {BLOCK} = one shot), got {sub!r}")
    if num_warps not in WARPS:
        raise ValueError(f"{fn}: num_warps must be one of {WARPS}, got {num_warps!r}")
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or not 1 <= num_stages <= 8:
        raise ValueError(f"{fn}: num_stages must be an integer from 1 to 8, got {num_stages!r}")


def _quantize(kernel, x, transposed, out_dtype, recip_scale, knobs, shapes, outer_major):
    """Allocate q, s (and qt, st) of `shapes` (scales outer-dim-major when `outer_major`), run `kernel` with one
    program per 128x128 block of x [R, C] and `knobs` (sub, num_warps, num_stages), return the outputs."""
    sub, num_warps, num_stages = knobs
    dev = x.device
    out = []
    for i, shape in enumerate(shapes[: 4 if transposed else 2]):
        if i % 2 == 0:
            out.append(torch.empty(shape, dtype=out_dtype, device=dev))
        elif outer_major:  # strides (1, rows)
            out.append(torch.empty(shape[::-1], dtype=torch.float32, device=dev).t())
        else:
            out.append(torch.empty(shape, dtype=torch.float32, device=dev))
    r, c = x.shape
    rp, cp = _ceil(r), _ceil(c)
    if rp and cp:  # else an empty operand: empty outputs
        with on_device(x):
            kernel[(rp // BLOCK, cp // BLOCK)](
                x, *(out if transposed else out * 2), r, c, rp, cp, x.stride(0), x.stride(1), TRANSPOSED=transposed,
                RECIP=x.is_cuda if recip_scale is None else recip_scale, FLOOR=AMAX_FLOOR, FMAX=_FMAX, B=BLOCK,
                SUB=sub, STAGES=num_stages, num_warps=num_warps)
    return tuple(out)


def _check_2d(t: torch.Tensor, fn: str, what: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{fn}: {what} must be 2-D, got shape {tuple(t.shape)}")


def quant_tile_dual(x: torch.Tensor, transposed: bool = True, out_dtype: torch.dtype = _FP8,
                    recip_scale: bool | None = None, *, sub: int | None = None, num_warps: int | None = None,
                    num_stages: int | None = None):
    """1x128 tile quantization of x [M, K] (any strides; bf16/fp16/fp32), and of x^T when `transposed`.

    Returns (q [M, Kp], s [M, Kp/128]) or (q, s, qt [K, Mp], st [K, Mp/128]); q/qt row-major in `out_dtype`,
    s/st fp32 with strides (1, rows). Equal to `_quant_tile_eager(x)` and `_quant_tile_eager(x.t())`.
    sub / num_warps / num_stages: launch knobs (default TILE_SUB, TILE_WARPS, TILE_STAGES), same outputs."""
    _check_2d(x, "quant_tile_dual", "x [M, K]")
    knobs = (TILE_SUB if sub is None else sub, TILE_WARPS if num_warps is None else num_warps,
             TILE_STAGES if num_stages is None else num_stages)
    _check_knobs("quant_tile_dual", *knobs)
    m, k = x.shape
    mp, kp = _ceil(m), _ceil(k)
    return _quantize(_tile_dual_kernel, x, transposed, out_dtype, recip_scale, knobs,
                     [(m, kp), (m, kp // BLOCK), (k, mp), (k, mp // BLOCK)], outer_major=True)


def quant_block_dual(w: torch.Tensor, transposed: bool = True, out_dtype: torch.dtype = _FP8,
                     recip_scale: bool | None = None, *, sub: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None):
    """128x128 block quantization of a weight w [N, K], and of W^T (the Dgrad operand) when `transposed`.

    Returns (q [Np, Kp], s [Np/128, Kp/128]) or (q, s, qt [Kp, Np], st [Kp/128, Np/128]), all contiguous.
    Equal to `_quant_block_eager(w)`, its q.t().contiguous() and s.t().contiguous(). On a GPU the kernel writes W^T
    itself for bf16 weights only; for others W^T is copied from q (FUSED_TRANSPOSE_DTYPES says why).
    sub / num_warps / num_stages: launch knobs (default BLOCK_SUB, BLOCK_WARPS, BLOCK_STAGES), same outputs."""
    _check_2d(w, "quant_block_dual", "w [N, K]")
    knobs = (BLOCK_SUB if sub is None else sub, BLOCK_WARPS if num_warps is None else num_warps,
             BLOCK_STAGES if num_stages is None else num_stages)
    _check_knobs("quant_block_dual", *knobs)
    np_, kp = _ceil(w.shape[0]), _ceil(w.shape[1])
    fused_t = transposed and (w.dtype in FUSED_TRANSPOSE_DTYPES or not w.is_cuda)
    out = _quantize(_block_dual_kernel, w.detach(), fused_t, out_dtype, recip_scale, knobs,
                    [(np_, kp), (np_ // BLOCK, kp // BLOCK), (kp, np_), (kp // BLOCK, np_ // BLOCK)],
                    outer_major=False)
    if transposed and not fused_t:  # W^T by a copy of the one-byte q: see FUSED_TRANSPOSE_DTYPES
        out = out + (out[0].t().contiguous(), out[1].t().contiguous())
    return out
