"""Which ptxas builds the fused FP8 quantizers right (CUDA only): each ptxas in a fresh process, the kernels' bytes
against the eager quantizers, and their time.

Triton builds its kernels with the ptxas that TRITON_PTXAS_PATH names, else its own bundled one; torch's inductor
switches it to torch/bin/ptxas on its first compile, and core.cuda's Triton modules make the same switch on import
(core.cuda.kernels.use_torch_ptxas). With Triton's bundled ptxas the weight quantizer's fused W^T came out wrong for
fp32 weights on an H200 (core.cuda.triton_quant.FUSED_TRANSPOSE_DTYPES; docs/performance.md). For each ptxas, in its
own process (a kernel is built once per process):
  "fused W^T"        the block kernel's own W^T, run directly, wrong bytes against the eager quantizer's
  quant_block_dual   the public weight quantizer's four outputs (q, s, q^T, s^T), wrong elements of each
  quant_tile_dual    the activation quantizer's four outputs, wrong elements of each
and the time of quant_tile_dual on x 16384x7168 and quant_block_dual on W 18432x7168 (bf16; triton.testing.do_bench).

    python bench/ptxas_check.py            # both ptxas, one fresh process each
    python bench/ptxas_check.py bundled    # one, in this process (bundled | torch)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def check(which: str) -> dict:
    """Bytes and times of the quantizers built by `which` ptxas ("bundled": Triton's own, "torch": torch/bin/ptxas)."""
    import triton
    if which == "bundled":  # set before core.cuda's modules are imported, which would pick torch's otherwise
        os.environ["TRITON_PTXAS_PATH"] = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                                       "ptxas")
    import torch
    from triton.backends.nvidia.compiler import get_ptxas

    from core.cuda import fp8_linear as g
    from core.cuda import triton_quant as tq
    tool = get_ptxas(90)
    res = {"ptxas": which, "path": tool.path, "version": tool.version, "wrong": {}}

    def bits(t):
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    gen = torch.Generator().manual_seed(5)
    for shape in [(768, 1024), (200, 320), (4096, 4096)]:
        for dt in (torch.float32, torch.bfloat16):
            w = (torch.randn(*shape, generator=gen) * 0.03).to("cuda", dt)
            qb, sb = g._quant_block_eager(w)
            ref = (qb, sb, qb.t().contiguous(), sb.t().contiguous())
            fused = tq._quantize(tq._block_dual_kernel, w, True, torch.float8_e4m3fn, None, (128, 16, 1),
                                 [r.shape for r in ref], False)
            x = (torch.randn(*shape, generator=gen) * 3).to("cuda", dt)
            tref = g._quant_tile_eager(x) + g._quant_tile_eager(x.t())
            res["wrong"][f"{shape} {str(dt)[6:]}"] = {
                "fused W^T": int((bits(fused[2]) != bits(ref[2])).sum()),
                "quant_block_dual": [int((bits(a) != bits(b)).sum()) for a, b in zip(tq.quant_block_dual(w), ref)],
                "quant_tile_dual": [int((bits(a) != bits(b)).sum()) for a, b in zip(tq.quant_tile_dual(x), tref)]}
    x = torch.randn(16384, 7168, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(18432, 7168, device="cuda", dtype=torch.bfloat16)
    bench = triton.testing.do_bench
    res["ms"] = {"quant_tile_dual x 16384x7168": bench(lambda: tq.quant_tile_dual(x), warmup=50, rep=300),
                 "quant_block_dual W 18432x7168": bench(lambda: tq.quant_block_dual(w), warmup=50, rep=300)}
    return res


def main(argv: list[str]) -> int:
    import torch
    if not torch.cuda.is_available():
        print("ptxas_check: needs a CUDA GPU (it checks kernels built for it)", file=sys.stderr)
        return 2
    if argv and argv[0] not in ("bundled", "torch"):
        print(f"ptxas_check: expected 'bundled' or 'torch', got {argv[0]!r}", file=sys.stderr)
        return 2
    if argv:
        print(json.dumps(check(argv[0]), indent=1))
        return 0
    env = {k: v for k, v in os.environ.items() if k != "TRITON_PTXAS_PATH"}
    for which in ("bundled", "torch"):  # a fresh process each: Triton caches a built kernel per process
        out = subprocess.run([sys.executable, os.path.abspath(__file__), which], env=env, cwd=ROOT)
        if out.returncode:
            return out.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
