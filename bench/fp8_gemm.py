"""Benchmark: emulated DeepSeek FP8 GEMM (core.fp8.fp8_gemm) vs a plain fp32 matmul, same run.

The FP8 GEMM is emulated on CPU (quantize 1x128 / 128x128 -> fp32 matmul per K-block -> scale), so it is
*slower* than fp32; the ratio shows the cost of the emulation, not an FP8 speed-up (there is none on CPU).
Also times the limited-accumulation model the FP8 lab plots (K up to 8192, M = N = 64).

    python bench/fp8_gemm.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from core import fp8  # noqa: E402


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'M x K x N':>20} {'fp32 ms':>9} {'fp8 emu ms':>11} {'ratio':>7} {'calc_diff':>10}")
    g = torch.Generator().manual_seed(0)
    for M, K, N in [(128, 1024, 1024), (512, 2048, 2048), (1024, 4096, 1024)]:
        a = torch.randn(M, K, generator=g)
        b = torch.randn(N, K, generator=g)
        t32 = best_of(lambda: a @ b.T, args.repeat)
        t8 = best_of(lambda: fp8.fp8_gemm(a, b), args.repeat)
        d = fp8.calc_diff(fp8.fp8_gemm(a, b), a @ b.T)
        print(f"{f'{M}x{K}x{N}':>20} {t32 * 1e3:9.2f} {t8 * 1e3:11.2f} {t8 / t32:7.1f} {d:10.2e}")
    t_curve = best_of(lambda: fp8.accumulation_error_curve(Ks=(256, 512, 1024, 2048, 4096, 8192)), 1)
    a, b = torch.rand(64, 8192, generator=g), torch.rand(64, 8192, generator=g)
    t_ref = best_of(lambda: a @ b.T, args.repeat)
    t_lim = best_of(lambda: fp8.limited_accumulation_gemm(a, b, promote_every=128), args.repeat)
    print(f"limited accumulation 64x8192x64: {t_lim * 1e3:.1f} ms vs fp32 matmul {t_ref * 1e3:.2f} ms "
          f"(ratio {t_lim / t_ref:.0f}); full error curve (6 Ks, with and without promotion): {t_curve * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
