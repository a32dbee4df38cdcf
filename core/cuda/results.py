"""The measured GPU figures committed in docs/gpu_results.json (written by bench/gpu_bench.py), for the app.

    res = load_gpu_results()            # None when the file is absent
    label(res)                          # "NVIDIA H200 · torch 2.11.0+cu130 · CUDA 13.0 · transformers 5.17.0 · 2026-12-01"
    fp8_rows(res), scaling_rows(res), decode_rows(res), train_rows(res)   # flat rows
    lossgap_row(res)                    # one dict (or None) (lists of dicts) for tables and charts
    gap_verdict(lossgap_row(res), 0.01) # "within" / "outside" / "unresolved" / "one run": the loss gap vs a target

Pure Python (json + the standard library): importing it needs no GPU.
"""
from __future__ import annotations

import json
import math
import os
import statistics

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "docs", "gpu_results.json")


def load_gpu_results(path: str | os.PathLike = DEFAULT_PATH) -> dict | None:
    """The results dict, or None if the file does not exist. ValueError (naming the file) if it is not a results
    file of bench/gpu_bench.py (JSON object with a "meta" block naming the device and date)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"gpu results: {os.fspath(path)} is not readable JSON ({type(e).__name__})") from None
    meta = res.get("meta") if isinstance(res, dict) else None
    if not isinstance(meta, dict) or not meta.get("device") or not meta.get("date"):
        raise ValueError(f"gpu results: {os.fspath(path)} has no meta block with device and date")
    return res


def label(res: dict) -> str:
    """Device, software versions and date of a results dict, one line."""
    m = res["meta"]
    parts = [m["device"], f"torch {m.get('torch')}"]
    if m.get("cuda"):
        parts.append(f"CUDA {m['cuda']}")
    if m.get("transformers"):
        parts.append(f"transformers {m['transformers']}")
    parts.append(m["date"])
    return " · ".join(parts)


def fp8_rows(res: dict) -> list[dict]:
    """FP8 vs bf16: one row per measured linear-layer shape (kind "linear": M, K, N and the speed-up of
    the FP8 GEMM alone) and per training-step config (kind "step": its parameter count)."""
    rows = [{"what": f"linear {r['m']}x{r['k']}->{r['n']} fwd+bwd", "kind": "linear", "m": r["m"], "k": r["k"],
             "n": r["n"], "params": None, "bf16_ms": r["bf16_fwd_bwd_ms"], "fp8_ms": r["fp8_fwd_bwd_ms"],
             "speedup": r["fwd_bwd_speedup"], "gemm_only_speedup": r.get("gemm_only_speedup"),
             # the fused single-pass quantizers (core.cuda.triton_quant) ran; results before them have no such key
             "fused_quantizers": bool(r.get("fused_quantizers_ran")),
             "unfused_speedup": (r["bf16_fwd_bwd_ms"] / r["fp8_unfused_fwd_bwd_ms"]
                                 if r.get("fp8_unfused_fwd_bwd_ms") else None)} for r in res.get("gemm", [])]
    for name, r in res.get("fp8step", {}).items():
        what = f"training step {r.get('config', name)}, {r['batch']}×{r['seq_len']} tokens" if "batch" in r else \
            f"training step {name}"
        if r.get("fp8_experts"):  # `--fp8-experts`: the routed experts' GEMMs in FP8 too, one GEMM per expert
            what += ", routed experts in FP8 too"
        rows.append({"what": what, "kind": "step", "m": None, "k": None, "n": None,
                     "params": r.get("params"), "bf16_ms": r["bf16"]["step_ms"],
                     "fp8_ms": r["fp8"]["step_ms"], "speedup": r["fp8_speedup"], "gemm_only_speedup": None,
                     "fused_quantizers": None, "unfused_speedup": None})
    return rows


def scaling_rows(res: dict) -> list[dict]:
    """The FP8 GEMM alone under each scaling and pair of operand formats (bench section "scaling"): scaling,
    what it is, formats a and b, TFLOP/s (None where cuBLAS refused the combination) and the refusal."""
    return [{"scaling": r["scaling"], "what": r["what"], "a": r["a"], "b": r["b"], "n": r["n"],
             "tflops": r.get("tflops"), "error": r.get("error")} for r in res.get("scaling", [])]


def decode_rows(res: dict) -> list[dict]:
    """MLA decode, absorbed vs naive: context, batch, tokens/s, cache bytes and ms per step of each, speed-up."""
    return [{"context": r["context"], "batch": r["batch"],
             "absorbed_tokens_per_s": r["absorbed"]["tokens_per_s"], "naive_tokens_per_s": r["naive"]["tokens_per_s"],
             "absorbed_cache_bytes": r["absorbed"]["cache_bytes"], "naive_cache_bytes": r["naive"]["cache_bytes"],
             "absorbed_ms": r["absorbed"].get("ms_per_step"), "naive_ms": r["naive"].get("ms_per_step"),
             "speedup": r["absorbed_speedup"]} for r in res.get("decode", [])]


def lossgap_row(res: dict) -> dict | None:
    """Validation loss of bf16 vs FP8 after the same training run, or None if not measured: config, steps, tokens
    per batch, the FP8 recipe's name, both losses and the relative gap (FP8 / bf16 - 1) of the first seed; with
    several seeds also `seed_gaps` {seed: gap}, `bf16_seed_spread` (the noise floor: relative distance between the
    bf16 runs of different seeds), `mean_relative_gap` (None when one seed was run) and `gap_interval` (lo, hi): the
    95% interval of that mean (`mean_interval`; None for one seed); `gap` is the one to show: the mean, or the single
    run's. Runs with a control (each seed's bf16 run repeated) add the repeat's loss to `seed_losses` ("bf16_again"),
    `repeat_gaps` {seed: second bf16 / first - 1}
    and the standard deviations across seeds `gap_sd` (FP8 vs bf16) and `repeat_gap_sd` (bf16 vs bf16); else
    `repeat_gaps` is {} and both are None."""
    r = res.get("lossgap")
    if not r:
        return None
    from core.fp8 import get_recipe
    seeds = r.get("seeds") or {}
    ci = mean_interval(v["relative_gap"] for v in seeds.values())
    return {"config": r["config"], "steps": r["steps"], "batch": r["batch"], "seq_len": r["seq_len"],
            "recipe": r.get("recipe") or get_recipe("deepseek").name,
            "bf16_val_loss": r["bf16"]["val_loss"], "fp8_val_loss": r["deepseek"]["val_loss"],
            "bf16_seconds": r["bf16"]["seconds"], "fp8_seconds": r["deepseek"]["seconds"],
            "relative_gap": r["relative_gap"],
            "seed_gaps": {int(k): v["relative_gap"] for k, v in seeds.items()},
            "seed_losses": {int(k): {"bf16": v["bf16"]["val_loss"], "fp8": v["deepseek"]["val_loss"],
                                     **({"bf16_again": v["bf16_repeat"]["val_loss"]} if "bf16_repeat" in v else {})}
                            for k, v in seeds.items()}, "lr": r.get("lr"),
            "bf16_seed_spread": r.get("bf16_seed_spread"), "mean_relative_gap": r.get("mean_relative_gap"),
            # the gap to show and judge: the mean over the seeds when there are several, else the one run's
            "gap": r["mean_relative_gap"] if len(seeds) > 1 and r.get("mean_relative_gap") is not None
            else r["relative_gap"],
            "gap_interval": ci[1:] if ci else None, **_control(seeds)}


def _control(seeds: dict) -> dict:
    """The bf16-vs-bf16 control of `lossgap_row` (None/{} where the run had none or a single seed)."""
    reps = {int(k): v["repeat_gap"] for k, v in seeds.items() if "repeat_gap" in v}
    if len(reps) < 2 or len(reps) != len(seeds):
        return {"repeat_gaps": {}, "gap_sd": None, "repeat_gap_sd": None}
    return {"repeat_gaps": reps, "gap_sd": statistics.stdev(v["relative_gap"] for v in seeds.values()),
            "repeat_gap_sd": statistics.stdev(reps.values())}


# Student's t 0.975 quantiles (two-sided 95%) for 1..30 degrees of freedom, from any t table (e.g. the NIST/SEMATECH
# e-Handbook of Statistical Methods, §1.3.6.7.2); beyond 30 the normal quantile 1.960 is within 4%.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_interval(xs) -> tuple[float, float, float] | None:
    """(mean, lo, hi): the mean of `xs` and its two-sided 95% Student-t confidence interval, mean -/+ t * s / sqrt(n)
    with s the sample standard deviation; None for fewer than two values."""
    xs = [float(x) for x in xs]
    if len(xs) < 2:
        return None
    m = statistics.fmean(xs)
    half = (T_975[len(xs) - 2] if len(xs) - 1 <= len(T_975) else 1.960) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def gap_verdict(row: dict, target: float) -> str:
    """The loss-gap target read against the seed noise. row: `lossgap_row`. The gaps of the seeds are paired (FP8
    and bf16 of one seed saw the same initial weights and batches), so their mean's 95% interval says what the runs
    can decide: "within" when the whole interval lies inside +-target, "outside" when it lies wholly beyond it,
    "unresolved" when it straddles a bound (more seeds or steps needed), "one run" when a single seed ran (no noise
    estimate: its gap alone decides nothing)."""
    ci = row.get("gap_interval")
    if ci is None:
        return "one run"
    lo, hi = ci
    if -target <= lo and hi <= target:
        return "within"
    if lo > target or hi < -target:
        return "outside"
    return "unresolved"


def train_rows(res: dict) -> list[dict]:
    """Training step vs transformers per config: tokens/s of each, the ratio and Eva's MFU; with the engine's
    decoder blocks compiled too where the run measured it (`--compiled-blocks`; else None), and the batch."""
    rows = []
    for name, r in res.get("train", {}).items():
        comp = r.get("ours_compiled")
        rows.append({"config": name, "params": r["params"], "batch": r.get("batch"), "seq_len": r.get("seq_len"),
                     "eva_tokens_per_s": r["ours"]["tokens_per_s"],
                     "transformers_tokens_per_s": r["transformers"]["tokens_per_s"],
                     "speedup": r["speedup_vs_transformers"], "eva_mfu": r["ours"]["mfu"],
                     "compiled_tokens_per_s": comp["tokens_per_s"] if comp else None,
                     "compiled_speedup": r.get("compiled_speedup_vs_transformers") if comp else None,
                     "compiled_mfu": comp["mfu"] if comp else None})
    return rows
