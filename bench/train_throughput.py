"""Training throughput, quality and balance of Eva's engine against transformers' DeepseekV3ForCausalLM.

Speed (default): both models are built from the SAME `mini` config (hidden 256, 4 layers with the first dense,
4 heads, q/kv ranks 128/64, nope/rope/v 32/16/32, 16 routed + 1 shared experts, top-4, 4 groups / top-2,
expert width 128, dense width 768, vocab 256) with identical weights, on 2 CPU threads, and trained on the same
16 x 128 pydoc batches, one step of each in turn (interleaved, so machine noise hits both alike): AdamW (fused),
gradient clipping 1.0. transformers runs its `grouped_mm` experts path and SDPA attention; it has no MTP, so
ours runs with MTP off for the comparison (an extra line shows ours with MTP on). Printed: median tokens/s of
each, the ratio, and MFU = counted model FLOPs / step time / peak, the peak being the fastest 2048^3 matmul
measured in the same run (fp32: torch's MKL sgemm and oneDNN, see core.gemm; bf16: torch's oneDNN).
Ours runs its fp32 GEMMs on oneDNN where available (core.gemm: MKL uses only AVX2 on AMD CPUs); an extra line
shows ours on torch's own fp32 GEMMs, the library transformers uses, so the kernel choice and the rest of the
engine can be told apart. FLOPs are counted analytically (`step_flops`), including the routed-expert GEMMs that
torch's FlopCounterMode misses (`torch._grouped_mm`); the FlopCounterMode figure is printed as a cross-check.
Then bf16: ours in bf16 mode (bf16 compute, fp32 master weights) vs transformers fp32 and transformers under
CPU bf16 autocast.

    python bench/train_throughput.py                   # speed, fp32 and bf16  (~1 min)
    python bench/train_throughput.py --fp32-only --profile 6   # ... then where the time of 6 fp32 steps goes,
                                                       # ours and transformers on torch's GEMMs (torch.profiler)
    python bench/train_throughput.py --fp32-only --compile   # ... fp32, and ours with compiled blocks too
    python bench/train_throughput.py --quality         # 300-step recipe on pydoc: val nats/byte (fp32, bf16)
    python bench/train_throughput.py --quality --hf    # ... and transformers on the same batches
    python bench/train_throughput.py --quality --seeds 0 1 2   # per seed, then means (runs vary ~0.02 by seed)
    python bench/train_throughput.py --balance         # MaxVio over the last 100 of 300 steps: none vs aux_free
                                                       # (gamma 1e-3 = V3's value, and 3e-3 for a run this short)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from core import gemm  # noqa: E402
from core.checkpoint import eva_to_hf  # noqa: E402
from core.config import PRESETS, ModelConfig  # noqa: E402
from core.data import pydoc_dataset  # noqa: E402
from core.train import TrainConfig, TrainRun, lr_at  # noqa: E402


# ---------------------------------------------------------------------------------------------- FLOPs
def forward_macs_per_token(cfg: ModelConfig, seq_len: int, mtp: bool) -> dict[str, float]:
    """Multiply-accumulates per token of one forward pass, by part (causal attention: (T+1)/2 keys on average)."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    keys = (seq_len + 1) / 2

    def attention() -> float:
        if cfg.attention_type == "mla":
            dq = cfg.qk_head_dim
            q = h * nh * dq if cfg.q_lora_rank is None else h * cfg.q_lora_rank + cfg.q_lora_rank * nh * dq
            kv = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
            kv += cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)
            o = nh * cfg.v_head_dim * h
            return q + kv + o + nh * (dq + cfg.v_head_dim) * keys
        dh, nkv = cfg.v_head_dim, cfg.kv_heads
        return h * nh * dh + 2 * h * nkv * dh + nh * dh * h + nh * 2 * dh * keys

    dense = 3 * h * cfg.intermediate_size
    experts = cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size
    shared = cfg.n_shared_experts * 3 * h * cfg.moe_intermediate_size
    router = h * cfg.n_routed_experts
    head = h * cfg.vocab_size
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    n_dense = cfg.num_hidden_layers - n_moe
    out = {"attention": cfg.num_hidden_layers * attention(), "dense_ffn": n_dense * dense,
           "routed_experts": n_moe * experts, "shared_experts": n_moe * shared, "router": n_moe * router,
           "head": head}
    if mtp and cfg.num_nextn_predict_layers:
        d = cfg.num_nextn_predict_layers
        out["mtp"] = d * (2 * h * h + attention() + experts + shared + router + head)
    return out


def step_flops(cfg: ModelConfig, batch: int, seq_len: int, mtp: bool = False) -> float:
    """FLOPs of one training step: 3 x forward (backward = 2 x forward), 2 FLOPs per MAC."""
    return 6.0 * batch * seq_len * sum(forward_macs_per_token(cfg, seq_len, mtp).values())


def flop_counter_cross_check(run: TrainRun, x, y) -> tuple[float, float]:
    """(FlopCounterMode total for one fwd+bwd, the routed-expert FLOPs it cannot see)."""
    from torch.utils.flop_counter import FlopCounterMode
    with gemm.using("torch"), FlopCounterMode(display=False) as fc:  # it counts aten's mm, not oneDNN's op
        out = run.model.compute_loss(x, y, 0.0)
        out["loss"].backward()
    run.model.zero_grad(set_to_none=True)
    cfg = run.model_config
    n_moe = len(run.model.moe_layers())
    expert = 6.0 * x.numel() * n_moe * cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return float(fc.get_total_flops()), expert


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 6, backend: str = "torch") -> float:
    """Best-of-3 GFLOP/s of an n x n x n matmul: torch's `@` (MKL for fp32 on x86-64, oneDNN for bf16), or with
    backend "onednn" core.gemm's oneDNN fp32 GEMM."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    mm = (lambda: gemm.linear(a, b)) if backend == "onednn" else (lambda: a @ b)  # a @ b^T or a @ b: same FLOPs
    with gemm.using(backend):
        mm()
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(reps):
                mm()
            best = max(best, reps * 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def fp32_peaks() -> dict[str, float]:
    """fp32 matmul peaks by library: {"torch (MKL)": ..., "oneDNN": ...} (oneDNN only where available)."""
    peaks = {"torch (MKL)": matmul_peak(torch.float32)}
    if gemm.onednn_available():
        peaks["oneDNN"] = matmul_peak(torch.float32, backend="onednn")
    return peaks


# ---------------------------------------------------------------------------------------------- models
def hf_model(run: TrainRun, cfg: ModelConfig):
    """transformers' DeepseekV3ForCausalLM (grouped_mm experts, SDPA) with the weights of `run.model`."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = DeepseekV3ForCausalLM._from_config(DeepseekV3Config(**cfg.to_hf()), attn_implementation="sdpa",
                                                experts_implementation="grouped_mm").float()
    mtp = tuple(f"model.layers.{cfg.num_hidden_layers + d}." for d in range(len(run.model.mtp)))
    state = {k: v.float() for k, v in eva_to_hf(run.model, fused_experts=True).items() if not k.startswith(mtp)}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    assert hf.config._attn_implementation == "sdpa" and hf.config._experts_implementation == "grouped_mm"
    return hf.train()


class HFTrainer:
    """The same step as the engine's for transformers: CE loss, backward, clip 1.0, fused AdamW, warm-up+cosine."""

    def __init__(self, hf, tcfg: TrainConfig, autocast: bool = False):
        self.hf, self.cfg, self.autocast, self.n = hf, tcfg, autocast, 0
        decay = [p for p in hf.parameters() if p.dim() >= 2]
        no_decay = [p for p in hf.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=tcfg.lr, betas=tcfg.betas, fused=True)

    def step(self, x, y) -> float:
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.n, self.cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.hf(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.hf.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.n += 1
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, data, batch: int, seq_len: int) -> float:
        self.hf.eval()
        tot, cnt = 0.0, 0
        for x, y, _ in data.eval_batches(batch, seq_len, None):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.hf(input_ids=x).logits
            tot += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
            cnt += y.numel()
        self.hf.train()
        return tot / cnt


# ---------------------------------------------------------------------------------------------- profile
GEMM_OPS = ("aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm", "aten::_grouped_mm", "mkldnn::_linear_pointwise")


def profile_ops(step, batches) -> dict[str, float]:
    """torch.profiler (CPU) over one step per batch: self time per aten op in ms per step, largest first."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x, y in batches:
            step(x, y)
    per_op: dict[str, float] = {}
    for e in prof.key_averages():
        per_op[e.key] = per_op.get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / len(batches)
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def where_time_goes(profiles: dict[str, dict[str, float]], top: int = 12) -> None:
    """Print GEMM vs the rest per model, then the largest non-GEMM ops side by side (ms per step)."""
    names = list(profiles)
    tot = {k: sum(p.values()) for k, p in profiles.items()}
    gemm_ms = {k: sum(v for op, v in p.items() if op in GEMM_OPS) for k, p in profiles.items()}

    def row(label: str, values: list[str]) -> str:
        return f"  {label[:32]:32s}" + "".join(f"{v:>20s}" for v in values)

    print("\n== where the time goes: torch.profiler self CPU time, ms per step (profiling inflates small ops)")
    print(row("", names))
    print(row("GEMMs", [f"{gemm_ms[n]:.1f} ({gemm_ms[n] / tot[n]:.0%})" for n in names]))
    print(row("everything else", [f"{tot[n] - gemm_ms[n]:.1f} ({1 - gemm_ms[n] / tot[n]:.0%})" for n in names]))
    print(row("total", [f"{tot[n]:.1f}" for n in names]))
    rest: dict[str, float] = {}
    for p in profiles.values():
        for op, v in p.items():
            if op not in GEMM_OPS:
                rest[op] = max(rest.get(op, 0.0), v)
    print(f"  GEMMs = {', '.join(GEMM_OPS)}; the largest other ops:")
    for op in sorted(rest, key=lambda o: -rest[o])[:top]:
        print(row(op, [f"{profiles[n].get(op, 0.0):.1f}" for n in names]))


# ---------------------------------------------------------------------------------------------- modes
def interleaved(steppers: dict, batches, warmup: int) -> dict[str, list[float]]:
    """Run one step of every stepper per batch, rotating the order; return per-step seconds after warm-up."""
    times = {k: [] for k in steppers}
    names = list(steppers)
    for i, (x, y) in enumerate(batches):
        order = names[i % len(names):] + names[:i % len(names)]
        for k in order:
            t = time.perf_counter()
            steppers[k](x, y)
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    return times


def compiled_stepper(mcfg: ModelConfig, tcfg: TrainConfig, batch) -> tuple:
    """`--compile`: our engine with its decoder blocks compiled (core.compile), and the seconds of its first step
    (tracing + inductor code generation + one step), taken before the timed interleaved steps."""
    run = TrainRun(mcfg, tcfg.replace(compile=True))
    t = time.perf_counter()
    rec = run.step(batch)
    first = time.perf_counter() - t
    if rec["compiled"]["errors"]:
        print(f"compilation failed, the compiled line runs eager: {rec['compiled']['errors']}")
    return (lambda x, y: run.step((x, y))), first


def speed(args) -> None:
    mcfg = PRESETS["mini"]
    B, T = args.batch, args.seq_len
    tok = B * T
    data = pydoc_dataset()
    g = torch.Generator().manual_seed(0)
    batches = [data.batch(B, T, g)[:2] for _ in range(args.warmup + args.steps)]
    tcfg = TrainConfig(steps=10**6, batch_size=B, seq_len=T, mtp=False, eval_every=0, warmup=30)

    ours = TrainRun(mcfg, tcfg)
    hf = HFTrainer(hf_model(ours, ours.model_config), tcfg)
    ours_mtp = TrainRun(mcfg, tcfg.replace(mtp=True))
    flops = step_flops(ours.model_config, B, T)
    flops_mtp = step_flops(ours_mtp.model_config, B, T, mtp=True)
    fc, missed = flop_counter_cross_check(ours, *batches[0])
    print(f"threads {torch.get_num_threads()}, batch {B}x{T}; counted FLOPs/step {flops / 1e9:.2f} G "
          f"(FlopCounterMode {fc / 1e9:.2f} G + routed-expert GEMMs it misses {missed / 1e9:.2f} G); "
          f"with MTP {flops_mtp / 1e9:.2f} G")

    ours_torch = TrainRun(mcfg, tcfg)  # the same engine on torch's own fp32 GEMMs (what the GEMM library buys)

    def on_torch_gemms(x, y):
        with gemm.using("torch"):
            ours_torch.step((x, y))

    peaks = fp32_peaks()
    steppers = {"ours": lambda x, y: ours.step((x, y)), "hf": hf.step,
                "ours+mtp": lambda x, y: ours_mtp.step((x, y))}
    if gemm.fp32_backend() != "torch":
        steppers["ours_torch"] = on_torch_gemms
    if args.compile:
        steppers["ours_compiled"], first_step_s = compiled_stepper(mcfg, tcfg, batches[0])
    t32 = interleaved(steppers, batches, args.warmup)
    again = fp32_peaks()  # before and after the steps: the best of both
    peaks = {k: max(v, again[k]) for k, v in peaks.items()}
    peak32 = max(peaks.values())
    med = {k: statistics.median(v) for k, v in t32.items()}
    ch = gemm.choice()
    cpu = gemm.cpu_info()
    print(f"\n== fp32 ({args.steps} interleaved steps, median) on {ch['cpu'] or 'an unknown CPU'} ({cpu.vendor or '?'}"
          f", family {cpu.family}, AVX-512 {'yes' if 'avx512f' in cpu.flags else 'no'}); ours runs its "
          f"GEMMs on {ch['backend']!r} (core.gemm; {gemm.ENV_VAR}={ch['setting']}: {ch['reason']})")
    print("matmul peak " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
          + f" GFLOP/s; MFU against the best, {peak32:.0f}"
          + (f"; oneDNN / MKL {peaks['oneDNN'] / peaks['torch (MKL)']:.2f}x (printed, never used to choose)"
             if "oneDNN" in peaks else ""))
    print(f"transformers fp32 : {tok / med['hf']:8.0f} tokens/s  MFU {flops / med['hf'] / 1e9 / peak32:5.1%}")
    print(f"ours fp32         : {tok / med['ours']:8.0f} tokens/s  MFU {flops / med['ours'] / 1e9 / peak32:5.1%}"
          f"   ratio {med['hf'] / med['ours']:.2f}x  (the backend this machine gets: {ch['backend']})")
    eq = med.get("ours_torch", med["ours"])  # on torch's GEMMs: the same library as transformers
    print(f"ours, torch GEMMs : {tok / eq:8.0f} tokens/s  MFU {flops / eq / 1e9 / peak32:5.1%}   ratio "
          f"{med['hf'] / eq:.2f}x  (equal BLAS: the library transformers uses"
          f"{'' if 'ours_torch' in med else '; the same run as the line above'})")
    print(f"ours fp32 + MTP   : {tok / med['ours+mtp']:8.0f} tokens/s  MFU "
          f"{flops_mtp / med['ours+mtp'] / 1e9 / peak32:5.1%}   (transformers has no MTP)")
    same = "ours_torch" not in med
    print(f"ratio vs transformers on {ch['cpu'] or 'an unknown CPU'}: equal BLAS (both on torch's GEMMs) "
          f"{med['hf'] / eq:.2f}x; with the backend this machine gets ({ch['backend']}) {med['hf'] / med['ours']:.2f}x"
          + (" (the same run: auto picks torch's GEMMs here)" if same else ""))
    if args.profile:
        with gemm.using("torch"):  # equal BLAS: both models on torch's GEMMs
            run = ours if same else ours_torch
            profs = {"ours": profile_ops(lambda x, y: run.step((x, y)), batches[:args.profile]),
                     "transformers": profile_ops(hf.step, batches[:args.profile])}
        where_time_goes(profs)
    if args.compile:
        c = med["ours_compiled"]
        gain = med["ours"] - c  # seconds a compiled step saves
        pays = f"pays after ~{(first_step_s - c) / gain:.0f} steps" if gain > 0 else "never pays at this speed"
        print(f"ours fp32 compiled: {tok / c:8.0f} tokens/s  MFU {flops / c / 1e9 / peak32:5.1%}   ratio "
              f"{med['hf'] / c:.2f}x  ({med['ours'] / c:.2f}x ours eager; first step {first_step_s:.0f} s, of which "
              f"~{first_step_s - c:.0f} s compiling: {pays})")
    if args.fp32_only:
        return

    ours16 = TrainRun(mcfg, tcfg.replace(precision="bf16"))
    hf_ac = HFTrainer(hf_model(ours, ours.model_config), tcfg, autocast=True)
    peak16 = matmul_peak(torch.bfloat16)
    t16 = interleaved({"ours_bf16": lambda x, y: ours16.step((x, y)), "hf": hf.step, "hf_autocast": hf_ac.step},
                      batches, args.warmup)
    peak16 = max(peak16, matmul_peak(torch.bfloat16))
    med = {k: statistics.median(v) for k, v in t16.items()}
    print(f"\n== bf16 (bf16 matmul peak {peak16:.0f} GFLOP/s)")
    print(f"transformers fp32          : {tok / med['hf']:8.0f} tokens/s")
    print(f"transformers bf16 autocast : {tok / med['hf_autocast']:8.0f} tokens/s  "
          f"MFU {flops / med['hf_autocast'] / 1e9 / peak16:5.1%}")
    print(f"ours bf16                  : {tok / med['ours_bf16']:8.0f} tokens/s  "
          f"MFU {flops / med['ours_bf16'] / 1e9 / peak16:5.1%}   "
          f"{med['hf'] / med['ours_bf16']:.2f}x transformers fp32, "
          f"{med['hf_autocast'] / med['ours_bf16']:.2f}x transformers autocast")


def quality(args) -> None:
    """`quality_run` for each seed; with several seeds, the mean per precision and the bf16 - fp32 gap of the means
    (one 300-step run varies by a few hundredths of a nat/byte with the seed)."""
    runs = []
    for seed in args.seeds:
        print(f"-- seed {seed}", flush=True)
        runs.append(quality_run(args, seed))
    if len(runs) > 1:
        means = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        print(f"mean over seeds {args.seeds}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
        if "fp32" in means and "bf16" in means:
            print(f"bf16 - fp32 (means) = {means['bf16'] - means['fp32']:+.4f} nats/byte")


def quality_run(args, seed: int) -> dict[str, float]:
    """The issue's recipe: 300 steps of 16x128 pydoc windows, AdamW 3e-3 (0.9/0.95, wd 0.1), 30 warm-up, cosine
    to 0, clip 1.0; validation = every non-overlapping 128-byte window of the held-out 5% (nats/byte)."""
    data = pydoc_dataset()
    tcfg = TrainConfig(steps=args.quality_steps, eval_every=0, seed=seed)
    results = {}
    hf = None
    for prec in args.precisions:
        run = TrainRun(PRESETS["mini"], tcfg.replace(precision=prec))
        if args.hf and hf is None:
            hf = HFTrainer(hf_model(run, run.model_config.replace(num_nextn_predict_layers=0)), tcfg)
        t0 = time.perf_counter()
        hf_time = 0.0
        for i in range(tcfg.steps):
            x, y, _ = data.batch(tcfg.batch_size, tcfg.seq_len, run.generator)
            run.step((x, y))
            if hf is not None and hf.n < tcfg.steps:
                t = time.perf_counter()
                hf.step(x, y)
                hf_time += time.perf_counter() - t
        val = run.evaluate(None)
        results[prec] = val
        print(f"ours {prec:5s} (MTP on, aux-free gamma {tcfg.gamma:g}): val {val:.4f} nats/byte after {tcfg.steps} "
              f"steps, last train loss {run.records[-1]['lm_loss']:.4f}, "
              f"{time.perf_counter() - t0 - hf_time:.0f} s", flush=True)
        if hf is not None and hf.n == tcfg.steps and "hf" not in results:
            results["hf"] = hf.evaluate(data, tcfg.batch_size, tcfg.seq_len)
            print(f"transformers fp32 (same batches, no MTP): val {results['hf']:.4f} nats/byte, {hf_time:.0f} s",
                  flush=True)
    if "fp32" in results and "bf16" in results:
        print(f"bf16 - fp32 = {results['bf16'] - results['fp32']:+.4f} nats/byte")
    return results


def balance(args) -> None:
    """Same recipe, balancing none vs aux_free: MaxVio_batch (mean over MoE layers) averaged over the last 100 steps."""
    tcfg = TrainConfig(steps=args.quality_steps, eval_every=0, seed=args.seed)
    variants = [("none", dict(balancing="none"))]
    variants += [("aux_free", dict(balancing="aux_free", gamma=g)) for g in args.gammas]
    if args.with_aux_loss:
        variants.append(("aux_loss", dict(balancing="aux_loss")))
    for name, kw in variants:
        run = TrainRun(PRESETS["mini"], tcfg.replace(**kw))
        recs = run.run()
        tail = recs[-100:]
        mv = statistics.mean(r["max_vio"] for r in tail)
        loss = statistics.mean(r["lm_loss"] for r in tail)
        print(f"{name:9s} {str(kw):45s} MaxVio(last 100) {mv:.3f}  train lm loss(last 100) {loss:.4f}  "
              f"val {run.evaluate(None):.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per model (speed)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--fp32-only", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the fp32 speed run: profile N steps of each model on torch's GEMMs (speed)")
    ap.add_argument("--compile", action="store_true",
                    help="speed, fp32: also time our engine with compiled decoder blocks (core.compile) and print the "
                         "compile time")
    ap.add_argument("--quality", action="store_true", help="300-step quality run instead of speed")
    ap.add_argument("--hf", action="store_true", help="with --quality: train transformers on the same batches")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--balance", action="store_true", help="none vs aux_free MaxVio instead of speed")
    ap.add_argument("--with-aux-loss", action="store_true", help="with --balance: also the aux-loss strategy")
    ap.add_argument("--gammas", type=float, nargs="+", default=[1e-3, 3e-3], help="with --balance: bias speeds")
    ap.add_argument("--quality-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0, help="with --balance")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="with --quality: one run per seed, and means")
    args = ap.parse_args()
    if not 0 <= args.profile <= args.warmup + args.steps:
        ap.error(f"--profile must be between 0 and --warmup + --steps ({args.warmup + args.steps}), got {args.profile}")
    torch.set_num_threads(args.threads)
    if args.quality:
        quality(args)
    elif args.balance:
        balance(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
