"""Eva on one GPU, every figure against a reference measured in the same run; writes one JSON results file.

    python bench/gpu_bench.py --out docs/gpu_results.json            # everything (~8 min on an H200)
    python bench/gpu_bench.py --only gemm,decode --out /tmp/r.json     # some sections
    python bench/gpu_bench.py --smoke --out /tmp/r.json                # tiny shapes, runs on a CPU (tests the bench)
    python bench/gpu_bench.py --only train --compiled-blocks --out r.json   # ... also with compiled blocks (core.compile)
    python bench/gpu_bench.py --update --only lossgap --out r.json     # add / replace sections of an existing file

Sections (results keys):
  peak       bf16 matmul TFLOP/s at 8192^3 (the MFU denominator) and the FP8 blockwise GEMM at the same size
  scaling    the FP8 GEMM alone at 8192^3 under each scaling torch's scaled_mm offers (per tensor, per row, V3's 1x128
             tiles x 128x128 blocks, 1x128 x 1x128 tiles as in Wgrad) and operand formats (E4M3, E5M2): TFLOP/s, or
             the error when cuBLAS refuses the combination
  gemm       FP8 linear layer (core.cuda.fp8_linear: quantize + 1x128/128x128 GEMMs, Fprop+Dgrad+Wgrad) vs bf16
             F.linear, forward+backward, at large shapes; plus the GEMM alone, the layer on the compiled one-layout
             quantizers (EVA_CUDA_TRITON=0) and the quantizers per call (fused cast-transpose vs compiled)
  quant      the fused FP8 quantizers' launch knobs (core.cuda.triton_quant: rows per chunk, warps, pipeline
             stages; the previous one-shot kernel is one setting) on x/dy (bf16) and W (fp32) of the large shapes:
             ms, GB/s and the ratio to a copy of as many bytes, each setting's outputs checked bit-identical
  train      a training step (bf16, fp32 masters, one-pass AdamW, MTP off) of the engine vs transformers'
             DeepseekV3ForCausalLM (bf16, grouped_mm experts, SDPA, fused AdamW) on the same batches, interleaved;
             tokens/s, MFU, peak memory; configs "920M" and "100M"
  fp8step    the engine's step in FP8 (recipe "deepseek" on the GPU GEMMs) vs bf16: "920M", "dense-2B" (hidden 4096,
             at two batch sizes) and "V3-dense" (V3's dense-layer shapes, 4 layers); --fp8-experts adds "920M" with
             its routed experts in FP8 too
  lossgap    300 steps on pydoc, bf16 vs FP8, same seed and batches: validation loss of each and the relative gap,
             per seed (--loss-seeds, run --loss-procs at a time); the mean gap and its 95% interval over the seeds;
             --loss-batch sets the batch; --loss-control repeats each bf16 run (the noise without FP8); with
             --update, seeds of the same protocol already in the file are kept and only new ones run;
             --loss-emulated adds fp32 and the emulated (fake-quantized, core.fp8) FP8 of the first seed
  decode     one DeepSeek-V3 MLA layer (hidden 7168, 128 heads): absorbed (latent cache) vs naive (per-head K/V)
             decode tokens/s and cache bytes, contexts 4k-32k, batch 1 and 8
  profile    top CUDA kernels of two engine steps from torch.profiler: 920M bf16 (and compiled, with --compiled-blocks),
             dense-2B FP8
Timings: CUDA events around each call, median of the timed repeats after warm-up.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.train_throughput import HFTrainer, step_flops  # noqa: E402
from core.config import ModelConfig  # noqa: E402
from core.cuda import fp8_linear as g  # noqa: E402
from core.compile import compile_errors  # noqa: E402
from core.cuda.device import describe_device  # noqa: E402
from core.data import pydoc_dataset  # noqa: E402
from core.layers import fused_swiglu_status  # noqa: E402
from core.optim import fused_adamw_status  # noqa: E402
from core.train import TrainConfig, TrainRun  # noqa: E402

SECTIONS = ("peak", "scaling", "gemm", "quant", "train", "fp8step", "lossgap", "decode", "profile")


def _model(hidden, layers, heads, q_rank, kv_rank, experts, top_k, moe_i, groups, dense_i=None, dense_layers=0,
           vocab=32000) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, q_lora_rank=q_rank, kv_lora_rank=kv_rank, qk_nope_head_dim=128,
                       qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=experts, num_experts_per_tok=top_k,
                       n_shared_experts=1, moe_intermediate_size=moe_i, n_group=groups, topk_group=max(1, groups // 2),
                       intermediate_size=dense_i or 4 * hidden, first_k_dense_replace=dense_layers,
                       max_position_embeddings=4096, rope_scaling=None, num_nextn_predict_layers=0)


#: name -> (model config, batch, seq_len). "920M" is issue #14's: hidden 1024, 8 layers, 64 routed experts top-6
#: + 1 shared, q/kv ranks 384/256, vocab 32k (16 heads and expert width 512 give 924M parameters).
CONFIGS = {
    "920M": (_model(1024, 8, 16, 384, 256, 64, 6, 512, 8), 8, 2048),
    "100M": (_model(512, 6, 8, 192, 128, 32, 4, 256, 4), 16, 1024),
    "dense-2B": (_model(4096, 8, 32, 1536, 512, 0, 1, 1, 1, dense_i=14336, dense_layers=8), 4, 2048),
    # V3's own dense-layer shapes (hidden 7168, 128 heads, FFN 18432, its first 3 layers), 4 layers: 2.79B
    "V3-dense": (_model(7168, 4, 128, 1536, 512, 0, 1, 1, 1, dense_i=18432, dense_layers=4), 4, 2048),
}
SMOKE = {
    "920M": (_model(128, 2, 2, 128, 128, 8, 2, 64, 2, vocab=512), 2, 128),
    "100M": (_model(128, 2, 2, 128, 128, 8, 2, 64, 2, vocab=512), 2, 128),
    "dense-2B": (_model(256, 2, 2, 128, 128, 0, 1, 1, 1, dense_i=256, dense_layers=2, vocab=512), 2, 128),
    "V3-dense": (_model(256, 2, 2, 128, 128, 0, 1, 1, 1, dense_i=384, dense_layers=2, vocab=512), 2, 128),
}


# ---------------------------------------------------------------------------------------------- timing
def timed(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds of fn() (CUDA events on a GPU, perf_counter on a CPU)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(out)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------------------- sections
def peak(dev, smoke) -> dict:
    n = 512 if smoke else 8192
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = timed(lambda: a @ b, 3 if smoke else 10, 3)
    out = {"n": n, "bf16_tflops": 2 * n ** 3 / t / 1e12}
    aq, as_ = g.quant_tile(a)
    bq, bs = g.quant_block(b)
    t8 = timed(lambda: g.fp8_gemm(aq, as_, bq, bs, "block"), 3 if smoke else 10, 3)
    out.update(fp8_blockwise_tflops=2 * n ** 3 / t8 / 1e12, fp8_over_bf16=t / t8)
    return out


#: scaled_mm's scalings: name -> (what it is, the recipe that uses it)
SCALINGS = {"tensor": "one scale per tensor (per-tensor current scaling)",
            "row": "one scale per row of A and per column of B",
            "block": "1x128 tiles of A x 128x128 blocks of B (V3's Fprop and Dgrad)",
            "tile": "1x128 tiles of A x 1x128 tiles of B (V3's Wgrad)"}


def scaling(dev, smoke) -> list[dict]:
    """The FP8 GEMM alone at n^3 for each scaling and pair of operand formats: TFLOP/s, or cuBLAS's refusal."""
    if dev.type != "cuda":
        print("  skipped: needs CUDA (torch's scaled_mm)", flush=True)
        return []
    n = 512 if smoke else 8192
    st = F.ScalingType
    fmts = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
    rows = []
    for (an, ad), (bn, bd) in [(a, b) for a in fmts.items() for b in fmts.items()]:
        a = torch.randn(n, n, device=dev).to(ad)
        b = torch.randn(n, n, device=dev).to(bd)
        for name, what in SCALINGS.items():
            row = {"scaling": name, "what": what, "a": an, "b": bn, "n": n}
            if name == "tensor":
                one = torch.ones((), device=dev)
                fn = (lambda: F.scaled_mm(a, b.t(), one, st.TensorWise, one, st.TensorWise,  # noqa: E731
                                          output_dtype=torch.bfloat16))
            elif name == "row":
                sa, sb = torch.ones(n, 1, device=dev), torch.ones(1, n, device=dev)
                fn = (lambda: F.scaled_mm(a, b.t(), sa, st.RowWise, sb, st.RowWise,  # noqa: E731
                                          output_dtype=torch.bfloat16))
            else:
                sa = torch.ones(n, n // 128, device=dev)
                sb = torch.ones((n // 128 if name == "block" else n), n // 128, device=dev)
                fn = lambda: g.fp8_gemm(a, sa, b, sb, name)  # noqa: E731
            try:
                t = timed(fn, 3 if smoke else 10, 3)
                row["tflops"] = 2 * n ** 3 / t / 1e12
            except (RuntimeError, ValueError) as e:  # cuBLAS / torch refuse this combination: say which way
                row["error"] = str(e).splitlines()[0][:200]
            rows.append(row)
            print(f"  {an} x {bn} {name}: " + (f"{row['tflops']:.0f} TFLOP/s" if "tflops" in row else row["error"]),
                  flush=True)
        del a, b
    return rows


def gemm(dev, smoke) -> list[dict]:
    shapes = [(256, 512, 384)] if smoke else [(16384, 7168, 18432), (16384, 4096, 4096), (8192, 4096, 11008),
                                               (8192, 1024, 2816)]
    rows = []
    for m, k, n in shapes:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_(True)
        dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)

        def fwd_bwd(f):
            def run():
                x.grad = w.grad = None
                f(x, w).backward(dy)
            return run

        def unfused(f):  # the same call on the compiled one-layout quantizers (EVA_CUDA_TRITON=0)
            def run():
                before = os.environ.get("EVA_CUDA_TRITON")
                os.environ["EVA_CUDA_TRITON"] = "0"
                try:
                    return f()
                finally:
                    if before is None:
                        del os.environ["EVA_CUDA_TRITON"]
                    else:
                        os.environ["EVA_CUDA_TRITON"] = before
            return run
        reps = 2 if smoke else 10
        t_bf = timed(fwd_bwd(F.linear), reps)
        t_f8 = timed(fwd_bwd(g.fp8_linear), reps)
        t_f8_unfused = timed(unfused(fwd_bwd(g.fp8_linear)), reps)
        with torch.no_grad():
            tf_bf = timed(lambda: F.linear(x, w), reps)
            tf_f8 = timed(lambda: g.fp8_linear(x, w), reps)
            xq, xs = g.quant_tile(x)
            wq, ws = g.quant_block(w)
            tg_f8 = timed(lambda: g.fp8_gemm(xq, xs, wq, ws, "block"), reps)
            # quantizing an operand into both layouts its GEMMs read: fused pass vs compiled quantizers (+ copies);
            # the fused kernels' launch knobs are swept in the section `quant`
            tq = {f"quant_{name}_{kind}_ms": timed(run(lambda: quantize(t)), reps) * 1e3
                  for name, quantize, t in (("x", g.quant_tile_both, x), ("w", g.quant_block_both, w))
                  for kind, run in (("fused", lambda f: f), ("compiled", unfused))}
        fused = g.compile_status()["fused"]
        flops = 2 * m * k * n
        rows.append({"m": m, "k": k, "n": n, "bf16_fwd_bwd_ms": t_bf * 1e3, "fp8_fwd_bwd_ms": t_f8 * 1e3,
                     "fwd_bwd_speedup": t_bf / t_f8, "bf16_fwd_ms": tf_bf * 1e3, "fp8_fwd_ms": tf_f8 * 1e3,
                     "fwd_speedup": tf_bf / tf_f8, "gemm_only_speedup": tf_bf / tg_f8,
                     "fp8_gemm_tflops": flops / tg_f8 / 1e12, "fp8_fwd_bwd_tflops": 3 * flops / t_f8 / 1e12,
                     "fp8_unfused_fwd_bwd_ms": t_f8_unfused * 1e3, "fused_over_unfused": t_f8_unfused / t_f8,
                     "fused_quantizers_ran": fused["ran"], "fused_quantizers_error": fused["error"], **tq})
        print(f"  gemm {m}x{k}->{n}: fwd+bwd bf16 {t_bf * 1e3:.2f} ms, fp8 {t_f8 * 1e3:.2f} ms "
              f"({t_bf / t_f8:.2f}x; unfused quantizers {t_f8_unfused * 1e3:.2f} ms, {t_bf / t_f8_unfused:.2f}x); "
              f"fwd {tf_bf / tf_f8:.2f}x; GEMM alone {tf_bf / tg_f8:.2f}x; quantize x both layouts "
              f"{tq['quant_x_fused_ms']:.3f} vs {tq['quant_x_compiled_ms']:.3f} ms, W {tq['quant_w_fused_ms']:.3f} vs "
              f"{tq['quant_w_compiled_ms']:.3f} ms (fused vs compiled); fused ran {fused['ran']}, "
              f"error {fused['error']}", flush=True)
        del x, w, dy
        free()
    return rows


#: quant: operands of the fused quantizers (core.cuda.triton_quant), both layouts each: activations / gradients
#: in bf16 (1x128 tiles of x and x^T; 16384x18432 is the dy of the 16384x7168->18432 layer) and fp32 master
#: weights (128x128 blocks of W and W^T)
QUANT_X = [(16384, 7168), (16384, 18432), (8192, 4096)]
QUANT_W = [(18432, 7168), (4096, 4096)]
#: the launch knobs swept (sub, num_warps, num_stages); (128, 16, 1) is the previous one-shot kernel
QUANT_KNOBS = [(16, 2, 1), (16, 4, 1), (32, 4, 1), (32, 8, 1), (32, 4, 2), (32, 4, 3), (64, 4, 1), (64, 8, 1),
               (64, 8, 2), (128, 8, 1), (128, 16, 1)]
QUANT_ONE_SHOT = (128, 16, 1)


def _per_call_s(fn, n: int, reps: int) -> tuple[float, str]:
    """Seconds per call of fn: n calls captured in a CUDA graph and replayed (no Python launch time: the kernel's
    own cost), median of `reps` replays; on a CPU, or if capture fails, a loop of n calls."""
    if torch.cuda.is_available():
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(n):
                    fn()
            return timed(graph.replay, reps) / n, "cuda_graph"
        except Exception as e:  # noqa: BLE001 - the loop still gives a (launch-inclusive) figure
            print(f"  (CUDA graph capture failed: {type(e).__name__}: {e}; timing a loop)", flush=True)
            torch.cuda.synchronize()
    return timed(lambda: [fn() for _ in range(n)], reps) / n, "loop"


def _quant_case(kind, quant, t, knobs, out_dtype, n, reps) -> dict:
    """One operand: every knob setting's time, bandwidth (bytes read + written) against a copy of as many bytes
    timed the same way, and whether its outputs equal the default setting's bit for bit."""
    ref = quant(t, True, out_dtype)
    moved = t.numel() * t.element_size() + sum(o.numel() * o.element_size() for o in ref)
    src = torch.empty(moved // 2, dtype=torch.uint8, device=t.device)
    dst = torch.empty_like(src)
    t_copy, method = _per_call_s(lambda: dst.copy_(src), n, reps)  # reads and writes `moved` bytes in all
    del src, dst

    def bits(o):
        return o.view(torch.uint8) if o.element_size() == 1 else o

    row = {"kind": kind, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "bytes": moved,
           "copy_ms": t_copy * 1e3, "copy_gbps": moved / t_copy / 1e9, "timing": method, "settings": []}
    for sub, nw, ns in knobs:
        kw = dict(sub=sub, num_warps=nw, num_stages=ns)
        try:
            out = quant(t, True, out_dtype, **kw)
            same = all(torch.equal(bits(a), bits(b)) for a, b in zip(out, ref))
            del out
            sec, _ = _per_call_s(lambda: quant(t, True, out_dtype, **kw), n, reps)
            row["settings"].append({**kw, "ms": sec * 1e3, "gbps": moved / sec / 1e9, "of_copy": t_copy / sec,
                                    "identical": same})
        except Exception as e:  # noqa: BLE001 - a setting that fails to build must not end the sweep
            row["settings"].append({**kw, "error": f"{type(e).__name__}: {e}"[:500]})
        free()
    ok = [s for s in row["settings"] if "ms" in s]
    if ok:
        best = min(ok, key=lambda s: s["ms"])
        row["best"] = {k: best[k] for k in ("sub", "num_warps", "num_stages", "ms", "of_copy")}
        one = [s for s in ok if (s["sub"], s["num_warps"], s["num_stages"]) == QUANT_ONE_SHOT]
        if one:
            row["best_over_one_shot"] = one[0]["ms"] / best["ms"]
    print(f"  quant {kind} {row['dtype']} {t.shape[0]}x{t.shape[1]}: {moved / 1e6:.0f} MB moved, copy "
          f"{t_copy * 1e3:.3f} ms ({row['copy_gbps']:.0f} GB/s, {method})\n"
          f"    {'sub':>4} {'warps':>5} {'stages':>6} {'ms':>8} {'GB/s':>7} {'of copy':>7}  identical", flush=True)
    for s in row["settings"]:
        head = f"    {s['sub']:>4} {s['num_warps']:>5} {s['num_stages']:>6}"
        print(f"{head} {s['ms']:>8.3f} {s['gbps']:>7.0f} {s['of_copy']:>7.2f}  {s['identical']}" if "ms" in s else
              f"{head}  failed: {s['error']}", flush=True)
    return row


def quant(dev, smoke) -> dict:
    """The fused quantizers' launch knobs swept (quant_tile_dual on x, quant_block_dual on W, both layouts).
    On a CPU they run only under Triton's interpreter (TRITON_INTERPRET=1; fp32 outputs, its FP8 cast is wrong)."""
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if dev.type != "cuda" and not interp:
        why = "needs CUDA (or TRITON_INTERPRET=1 on a CPU)"
    else:
        kernels = g._QUANT.load()
        why = None if kernels is not None else f"triton_quant unavailable: {g.compile_status()['fused']['error']}"
    if why:
        print(f"  skipped: {why}", flush=True)
        return {"skipped": why}
    out_dtype = torch.float8_e4m3fn if dev.type == "cuda" else torch.float32
    xs, ws = ([(200, 320)], [(256, 384)]) if smoke else (QUANT_X, QUANT_W)
    knobs = [(32, 4, 1), QUANT_ONE_SHOT] if smoke else QUANT_KNOBS
    n, reps = (1, 1) if smoke else (10, 10)
    default = {"tile": (kernels.TILE_SUB, kernels.TILE_WARPS, kernels.TILE_STAGES),
               "block": (kernels.BLOCK_SUB, kernels.BLOCK_WARPS, kernels.BLOCK_STAGES)}
    rows = []
    for kind, quantizer, shapes, dtype in (("tile", kernels.quant_tile_dual, xs, torch.bfloat16),
                                           ("block", kernels.quant_block_dual, ws, torch.float32)):
        for shape in shapes:
            t = torch.randn(*shape, device=dev, dtype=dtype) * (1 if kind == "tile" else 0.02)
            rows.append(_quant_case(kind, quantizer, t, knobs, out_dtype, n, reps))
            del t
            free()
    return {"default": default, "rows": rows,
            "all_identical": all(s.get("identical", False) for r in rows for s in r["settings"])}


def _batches(n, B, T, dev, vocab):
    data = pydoc_dataset()
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x, y = data.batch(B, T, gen)[:2]
        out.append((x.to(dev), y.to(dev)))
    return out


def _tcfg(B, T, precision, dev, steps=10 ** 6) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=B, seq_len=T, mtp=False, eval_every=0, lr=1e-3, warmup=20,
                       precision=precision, device=dev.type)


class HFStep(HFTrainer):
    """transformers' DeepseekV3ForCausalLM in bf16 on `dev`, with bench/train_throughput's step (the engine's: CE,
    backward, clip 1.0, fused AdamW, warm-up + cosine); random init (a speed reference needs no shared weights)."""

    def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, dev):
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = DeepseekV3ForCausalLM._from_config(
                DeepseekV3Config(**mcfg.to_hf()), attn_implementation="sdpa",
                experts_implementation="grouped_mm").to(device=dev, dtype=torch.bfloat16).train()
        super().__init__(hf, tcfg)
        self.impl = {"attention": hf.config._attn_implementation,
                     "experts": getattr(hf.config, "_experts_implementation", None)}


def interleaved(steppers: dict, batches, warmup: int) -> dict:
    """One step of each stepper per batch, order rotated; median seconds after warm-up, and the losses."""
    times, losses = {k: [] for k in steppers}, {k: [] for k in steppers}
    first = {}
    names = list(steppers)
    for i, (x, y) in enumerate(batches):
        for k in names[i % len(names):] + names[:i % len(names)]:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            losses[k].append(steppers[k](x, y))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
            elif i == 0:
                first[k] = time.perf_counter() - t
    losses["first_step_s"] = first  # includes compilation
    return {k: statistics.median(v) for k, v in times.items()}, losses


def _ours(mcfg, tcfg, compiled: bool = False):
    """The engine's TrainRun and a step function; compiled=True compiles its decoder blocks (core.compile)."""
    run = TrainRun(mcfg, tcfg.replace(compile=compiled))
    return run, (lambda x, y: run.step((x, y))["loss"])


def train(dev, smoke, peak_tflops, compiled_blocks: bool = False) -> dict:
    out = {}
    for name in ("920M", "100M"):
        mcfg, B, T = (SMOKE if smoke else CONFIGS)[name]
        steps, warm = (3, 1) if smoke else (12, 4)
        batches = _batches(steps, B, T, dev, mcfg.vocab_size)
        tcfg = _tcfg(B, T, "bf16", dev)
        run, ours = _ours(mcfg, tcfg)
        steppers = {"ours": ours}
        if compiled_blocks:
            steppers["ours_compiled"] = _ours(mcfg, tcfg, compiled=True)[1]
        hf = HFStep(mcfg, tcfg, dev)
        steppers["transformers"] = hf.step
        med, losses = interleaved(steppers, batches, warm)
        flops = step_flops(run.model_config, B, T)
        params = run.model.num_parameters()
        row = {"params": params, "batch": B, "seq_len": T, "config": mcfg.to_hf(), "hf_impl": hf.impl}
        for k, t in med.items():
            row[k] = {"step_ms": t * 1e3, "tokens_per_s": B * T / t, "mfu": flops / t / 1e12 / peak_tflops,
                      "first_loss": losses[k][0], "last_loss": losses[k][-1],
                      "first_step_s": losses["first_step_s"].get(k)}
        row["speedup_vs_transformers"] = med["transformers"] / med["ours"]
        if compiled_blocks:
            row["compiled_speedup_vs_transformers"] = med["transformers"] / med["ours_compiled"]
        if torch.cuda.is_available():
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        out[name] = row
        print(f"  train {name} ({params / 1e6:.0f}M): ours {B * T / med['ours']:,.0f} tok/s "
              f"(MFU {row['ours']['mfu']:.1%}), transformers {B * T / med['transformers']:,.0f} tok/s: "
              f"{row['speedup_vs_transformers']:.2f}x", flush=True)
        del run, hf, ours, steppers, batches
        free()
    return out


#: fp8step's configs and batch sizes: the dense-2B config at two batches, because the optimizer and the weight
#: quantizers cost the same per step at any batch while the GEMMs grow with it
FP8STEP = (("920M", 1), ("dense-2B", 1), ("dense-2B", 2), ("V3-dense", 1))


def fp8step(dev, smoke, peak_tflops, experts: bool = False) -> dict:
    """FP8 vs bf16 step of the FP8STEP configs; experts=True also times the MoE config with its routed experts in
    FP8 too (`--fp8-experts`: one FP8 GEMM per expert)."""
    out = {}
    if experts and dev.type != "cuda":
        print("  --fp8-experts: skipped, the FP8 experts are a CUDA path (TrainConfig.fp8_experts)", flush=True)
    for name, mult, fp8_experts in [(n, m, False) for n, m in FP8STEP] + [("920M", 1, True)] * (
            experts and dev.type == "cuda"):
        mcfg, B, T = (SMOKE if smoke else CONFIGS)[name]
        B *= mult
        key = (name if mult == 1 else f"{name} {B}x{T}") + (" FP8 experts" if fp8_experts else "")
        steps, warm = (3, 1) if smoke else (10, 4)
        batches = _batches(steps, B, T, dev, mcfg.vocab_size)
        bf, bf_step = _ours(mcfg, _tcfg(B, T, "bf16", dev))
        f8, f8_step = _ours(mcfg, _tcfg(B, T, "deepseek", dev).replace(fp8_experts=fp8_experts))
        med, losses = interleaved({"bf16": bf_step, "fp8": f8_step}, batches, warm)
        flops = step_flops(bf.model_config, B, T)
        out[key] = {"config": name, "params": bf.model.num_parameters(), "batch": B, "seq_len": T,
                    "fp8_experts": fp8_experts,
                    "fp8_linears": sum(type(m).__name__ == "FP8LinearGPU" for m in f8.model.modules()),
                    **{k: {"step_ms": t * 1e3, "tokens_per_s": B * T / t, "mfu": flops / t / 1e12 / peak_tflops,
                           "last_loss": losses[k][-1]} for k, t in med.items()},
                    "fp8_speedup": med["bf16"] / med["fp8"]}
        print(f"  fp8 step {key} ({B}x{T}): bf16 {med['bf16'] * 1e3:.1f} ms, fp8 {med['fp8'] * 1e3:.1f} ms "
              f"({med['bf16'] / med['fp8']:.2f}x)", flush=True)
        del bf, f8, bf_step, f8_step, batches
        free()
    return out


def _loss_run(mcfg, tcfg, emulate: bool = False) -> dict:
    """Train `tcfg.steps` steps and evaluate on the full validation split. emulate=True forces the CPU reference's
    fake-quantized FP8 (core.fp8, fp32 working weights) on the GPU instead of the real FP8 GEMMs: a diagnostic."""
    import core.train as ct
    real = ct.gpu_fp8
    if emulate:
        ct.gpu_fp8 = lambda cfg: False
    try:
        run = TrainRun(mcfg, tcfg)
    finally:
        ct.gpu_fp8 = real
    t = time.perf_counter()
    run.run()
    out = {"train_loss": run.records[-1]["loss"], "val_loss": run.evaluate(None), "seconds": time.perf_counter() - t}
    del run
    free()
    return out


def _loss_shape(smoke, batch: int | None = None) -> tuple:
    """(model config, batch, seq_len) of the loss-gap runs: the 100M config at 512 tokens a sequence, `batch`
    sequences a step (default: the 100M config's)."""
    mcfg, B, T = (SMOKE if smoke else CONFIGS)["100M"]
    return mcfg, batch or B, min(T, 512)


def _seed_pair(job: tuple) -> tuple[int, dict]:
    """bf16 and FP8 runs of one seed (a worker of `lossgap`; module-level so a spawned process can run it)."""
    seed, steps, lr, smoke, dev_type, batch, threads, control = job
    if threads:  # several workers share the host's cores: torch's default (all of them each) oversubscribes
        torch.set_num_threads(threads)
    dev = torch.device(dev_type)
    mcfg, B, T = _loss_shape(smoke, batch)
    cfg = _tcfg(B, T, "bf16", dev, steps=steps).replace(seed=seed, lr=lr)
    row = {p: _loss_run(mcfg, cfg.replace(precision=p)) for p in ("bf16", "deepseek")}
    row["relative_gap"] = row["deepseek"]["val_loss"] / row["bf16"]["val_loss"] - 1
    if control:  # the same bf16 run again: how far two runs of one seed land apart without FP8
        row["bf16_repeat"] = _loss_run(mcfg, cfg)
        row["repeat_gap"] = row["bf16_repeat"]["val_loss"] / row["bf16"]["val_loss"] - 1
    return seed, row


#: what makes two loss-gap sections the same experiment (their seeds can be pooled)
_PROTOCOL = ("config", "steps", "batch", "seq_len", "lr", "recipe", "control")


def lossgap(dev, smoke, steps, seeds=(0, 1), emulated: bool = False, lr: float = 1e-3, procs: int = 1,
            batch: int | None = None, control: bool = False, earlier: dict | None = None) -> dict:
    """bf16 vs FP8 (real GEMMs) validation loss after `steps` steps, for each seed (the seed changes the initial
    weights and the batches). The per-seed gaps are paired, so their mean's 95% interval
    (`core.cuda.results.mean_interval`) is what the runs can decide about a target. `procs` > 1 runs the seeds in
    that many spawned processes on the same GPU (a 100M model's step is launch-bound: the GPU has room for several).
    emulated=True adds fp32 and emulated-FP8 runs of the first seed (does the GPU path match the reference?).
    control=True runs each seed's bf16 run twice: the gap between the two is the noise FP8's gap is read against.
    `earlier`: a loss-gap section of an earlier run (`--update`); with the same protocol (`_PROTOCOL`) its seeds are
    kept and only the new ones run, so seeds can be added over several device calls; otherwise it is replaced."""
    mcfg, B, T = _loss_shape(smoke, batch)
    from core.fp8 import get_recipe
    out = {"config": "100M", "steps": steps, "batch": B, "seq_len": T, "lr": lr, "recipe": get_recipe("deepseek").name,
           "control": control, "seeds": {}, "procs": procs}
    if earlier and "control" not in earlier:  # written before the key existed: a control run has repeat gaps
        earlier = {**earlier, "control": all("repeat_gap" in v for v in earlier.get("seeds", {}).values())}
    if earlier and all(earlier.get(k) == out[k] for k in _PROTOCOL):
        out["seeds"] = dict(earlier["seeds"])
        print(f"  pooled with the {len(out['seeds'])} seeds of the earlier run", flush=True)
    train_tokens = int(pydoc_dataset().splits["train"].numel())
    out["epochs"] = steps * B * T / train_tokens  # passes over the train split: >1 measures memorisation too
    threads = max(1, (os.cpu_count() or 1) // procs) if procs > 1 else None
    jobs = [(seed, steps, lr, smoke, dev.type, B, threads, control) for seed in seeds if str(seed) not in out["seeds"]]
    t0 = time.perf_counter()
    if procs > 1 and jobs:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(min(procs, len(jobs))) as pool:
            pairs = pool.map(_seed_pair, jobs, chunksize=1)
    else:
        pairs = map(_seed_pair, jobs)
    for seed, row in pairs:
        out["seeds"][str(seed)] = row
        print(f"  seed {seed}, {steps} steps: bf16 {row['bf16']['val_loss']:.4f}, fp8 {row['deepseek']['val_loss']:.4f}"
              f" ({row['relative_gap']:+.2%}; {row['bf16']['seconds']:.0f} s / {row['deepseek']['seconds']:.0f} s)",
              flush=True)
    out["wall_s"] = time.perf_counter() - t0
    rows = [out["seeds"][k] for k in sorted(out["seeds"], key=int)]
    first = rows[0]
    out["bf16"], out["deepseek"], out["relative_gap"] = first["bf16"], first["deepseek"], first["relative_gap"]
    if len(rows) > 1:
        bf = [r["bf16"]["val_loss"] for r in rows]
        gaps = [r["relative_gap"] for r in rows]
        out["bf16_seed_spread"] = (max(bf) - min(bf)) / min(bf)
        out["mean_relative_gap"] = statistics.mean(gaps)
        from core.cuda.results import mean_interval
        _, lo, hi = mean_interval(gaps)
        out["gap_interval_95"] = [lo, hi]
        print(f"  bf16 seed-to-seed spread {out['bf16_seed_spread']:.2%}; mean FP8 gap {out['mean_relative_gap']:+.2%}"
              f" (95% interval {lo:+.2%} .. {hi:+.2%}) over {len(rows)} seeds; {out['wall_s']:.0f} s for "
              f"{len(jobs)} run here", flush=True)
        if control:
            reps = [r["repeat_gap"] for r in rows]
            print(f"  per-seed gap standard deviation: FP8 vs bf16 {statistics.stdev(gaps):.2%}, bf16 vs bf16 again "
                  f"{statistics.stdev(reps):.2%} (mean {statistics.fmean(reps):+.2%})", flush=True)
    if emulated:
        tc = _tcfg(B, T, "fp32", dev, steps=steps).replace(seed=int(min(out["seeds"], key=int)), lr=lr)
        out["emulated"] = {"fp32": _loss_run(mcfg, tc),
                           "deepseek": _loss_run(mcfg, tc.replace(precision="deepseek"), emulate=True)}
        e = out["emulated"]
        e["relative_gap"] = e["deepseek"]["val_loss"] / e["fp32"]["val_loss"] - 1
        print(f"  emulated (fp32 working weights): fp32 {e['fp32']['val_loss']:.4f}, fp8 {e['deepseek']['val_loss']:.4f}"
              f" ({e['relative_gap']:+.2%})", flush=True)
    return out


def decode(dev, smoke) -> list[dict]:
    from core.attention import MLA, make_cache
    cfg = ModelConfig() if not smoke else ModelConfig(hidden_size=256, num_attention_heads=4, q_lora_rank=64,
                                                      kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                                                      v_head_dim=32)
    torch.manual_seed(0)
    attn = MLA(cfg).to(device=dev, dtype=torch.bfloat16).eval()
    rows = []
    ctxs = (256, 512) if smoke else (4096, 8192, 16384, 32768)
    for ctx in ctxs:
        for batch in (1, 8):
            x = torch.randn(batch, 1, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
            row = {"context": ctx, "batch": batch}
            for kind in ("absorbed", "naive"):
                cache = make_cache(cfg, kind, batch, ctx, torch.bfloat16, dev)
                if kind == "absorbed":  # the cache contents do not change the work; random latents fill it
                    cache.update(0, torch.randn(batch, ctx - 1, cfg.kv_lora_rank, device=dev, dtype=torch.bfloat16),
                                 torch.randn(batch, ctx - 1, cfg.qk_rope_head_dim, device=dev, dtype=torch.bfloat16))
                else:
                    h = cfg.num_attention_heads
                    cache.update(0, torch.randn(batch, ctx - 1, h, cfg.qk_head_dim, device=dev, dtype=torch.bfloat16),
                                 torch.randn(batch, ctx - 1, h, cfg.v_head_dim, device=dev, dtype=torch.bfloat16))
                with torch.no_grad():
                    t = timed(lambda: attn(x, start_pos=ctx - 1, cache=cache), 3 if smoke else 10, 2)
                row[kind] = {"ms_per_step": t * 1e3, "tokens_per_s": batch / t, "cache_bytes": cache.nbytes()}
                del cache
                free()
            row["absorbed_speedup"] = row["naive"]["ms_per_step"] / row["absorbed"]["ms_per_step"]
            rows.append(row)
            print(f"  decode ctx {ctx} batch {batch}: absorbed {row['absorbed']['ms_per_step']:.2f} ms, naive "
                  f"{row['naive']['ms_per_step']:.2f} ms ({row['absorbed_speedup']:.1f}x); cache "
                  f"{row['absorbed']['cache_bytes'] / 2 ** 20:.0f} vs {row['naive']['cache_bytes'] / 2 ** 20:.0f} MiB",
                  flush=True)
    return rows


def profile(dev, smoke, compiled_blocks: bool = False) -> dict:
    """Top kernels of two steps: the 920M config in bf16 (also with compiled blocks when asked) and the dense-2B
    config in FP8."""
    from torch.profiler import ProfilerActivity, profile as prof
    out = {}
    cases = [("920M", "bf16", False)] + [("920M", "bf16", True)] * compiled_blocks + [("dense-2B", "deepseek", False)]
    for name, precision, compiled in cases:
        mcfg, B, T = (SMOKE if smoke else CONFIGS)[name]
        run, step = _ours(mcfg, _tcfg(B, T, precision, dev), compiled)
        batches = _batches(5, B, T, dev, mcfg.vocab_size)
        for x, y in batches[:3]:
            step(x, y)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with prof(activities=acts) as p:
            for x, y in batches[3:]:
                step(x, y)
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        table = p.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=70)
        tag = f"{name}-{precision}" + ("-compiled" if compiled else "")
        print(f"  profile {tag}\n{table}", flush=True)
        out[tag] = {"steps": 2, "table": table}
        del run, step, batches
        free()
    return out


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON results file (rewritten after every section)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (runs on a CPU; checks the bench itself)")
    ap.add_argument("--update", action="store_true",
                    help="keep the other sections of an existing --out file (a bench split over several runs)")
    ap.add_argument("--compiled-blocks", action="store_true",
                    help="train: also time the engine with its decoder blocks compiled (core.compile, --compile)")
    ap.add_argument("--fp8-experts", action="store_true",
                    help="fp8step: also time the 920M config with its routed experts in FP8 (one GEMM per expert)")
    ap.add_argument("--loss-steps", type=int, default=300, help="steps of the FP8-vs-bf16 loss-gap runs")
    ap.add_argument("--loss-lr", type=float, default=1e-3, help="peak learning rate of the loss-gap runs")
    ap.add_argument("--loss-seeds", type=int, nargs="+", default=[0, 1], help="seeds of the loss-gap runs")
    ap.add_argument("--loss-batch", type=int, default=None,
                    help="sequences of 512 tokens a step in the loss-gap runs (default: the 100M config's 16)")
    ap.add_argument("--loss-procs", type=int, default=1,
                    help="lossgap: run the seeds in this many processes at once on the one GPU (>= 1)")
    ap.add_argument("--loss-control", action="store_true",
                    help="lossgap: run each seed's bf16 run twice (the run-to-run noise without FP8)")
    ap.add_argument("--loss-emulated", action="store_true",
                    help="lossgap: also fp32 and emulated-FP8 runs of the first seed (is the GPU path the reference?)")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    bad = [s for s in only if s not in SECTIONS]
    if args.loss_procs < 1:
        ap.error(f"--loss-procs must be >= 1, got {args.loss_procs}")
    if args.loss_batch is not None and args.loss_batch < 1:
        ap.error(f"--loss-batch must be >= 1, got {args.loss_batch}")
    if bad:
        ap.error(f"--only: unknown section(s) {bad}; choose from {SECTIONS}")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import transformers
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    res = {"meta": {**describe_device(dev), "transformers": transformers.__version__, "triton": triton_v,
                    "date": datetime.date.today().isoformat(), "smoke": args.smoke,
                    "command": "python bench/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}}
    if args.update and os.path.exists(args.out):  # keep the sections this run does not measure
        with open(args.out) as f:
            old = json.load(f)
        res["meta"]["earlier_commands"] = old["meta"].get("earlier_commands", []) + [old["meta"]["command"]]
        res = {**{k: v for k, v in old.items() if k not in ("meta", "errors", "seconds")}, **res,
               "seconds": old.get("seconds", {})}
    peak_tflops = None

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)

    for sec in only:
        t0 = time.perf_counter()
        print(f"== {sec}", flush=True)
        try:
            if sec == "peak" or (peak_tflops is None and sec in ("train", "fp8step")):
                res["peak"] = peak(dev, args.smoke)
                peak_tflops = res["peak"]["bf16_tflops"]
                print(f"  bf16 {peak_tflops:.0f} TFLOP/s, fp8 blockwise {res['peak']['fp8_blockwise_tflops']:.0f}",
                      flush=True)
            if sec == "gemm":
                res["gemm"] = gemm(dev, args.smoke)
            elif sec == "scaling":
                res["scaling"] = scaling(dev, args.smoke)
            elif sec == "quant":
                res["quant"] = quant(dev, args.smoke)
            elif sec == "train":
                res["train"] = train(dev, args.smoke, peak_tflops, args.compiled_blocks)
            elif sec == "fp8step":
                res["fp8step"] = fp8step(dev, args.smoke, peak_tflops, args.fp8_experts)
            elif sec == "lossgap":
                res["lossgap"] = lossgap(dev, args.smoke, args.loss_steps, tuple(args.loss_seeds), args.loss_emulated,
                                         args.loss_lr, args.loss_procs, args.loss_batch, args.loss_control,
                                         res.get("lossgap") if args.update else None)
            elif sec == "decode":
                res["decode"] = decode(dev, args.smoke)
            elif sec == "profile":
                res["profile"] = profile(dev, args.smoke, args.compiled_blocks)
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others' results
            traceback.print_exc()
            res.setdefault("errors", {})[sec] = f"{type(e).__name__}: {e}"[:2000]
            free()
        res.setdefault("seconds", {})[sec] = round(time.perf_counter() - t0, 1)
        res["meta"]["fp8_quantizers"] = g.compile_status()
        res["meta"]["fp8_scale_layouts"] = g.scale_layouts()
        res["meta"]["compiled_block_errors"] = compile_errors()
        res["meta"]["fused_swiglu"] = fused_swiglu_status()
        res["meta"]["fused_adamw"] = fused_adamw_status()
        save()
    return 1 if res.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
