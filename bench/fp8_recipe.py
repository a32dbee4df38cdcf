"""FP8 loss gap vs fp32, per recipe and per switch of the V3 report's recipe (core.fp8.SWITCHES), on the
training lab's default run (core.train.APP_DEFAULT: mini model, synthetic domains, 150 steps of 4 x 64 tokens;
the table in docs/performance.md was measured when the default was 8 x 64).

    python bench/fp8_recipe.py                      # seeds 0 1, one process per run (all cores)
    python bench/fp8_recipe.py --seeds 0 --jobs 2   # fewer runs / processes
    python bench/fp8_recipe.py --json out.json

Rows: fp32; "deepseek-gemm" (FP8 GEMM operands only); deepseek-gemm with ONE switch on (what that switch does
alone); "deepseek-v3-fp32acc" (every switch but the 14-bit accumulator); "deepseek-v3" (the full recipe).
Columns: validation loss at the last step (nats/byte, the lab's 2 evaluation batches) and the mean train LM loss
of the last 10 steps, each as the mean over seeds of (run - fp32 run of the same seed); the fp32 seed-to-seed
spread is printed for scale. Every run is deterministic (same seed, same data order as the fp32 run).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.fp8 import SWITCHES  # noqa: E402
from core.train import APP_DEFAULT, TrainRun  # noqa: E402


def variants() -> list[tuple[str, dict]]:
    out = [("fp32", {"precision": "fp32"}), ("deepseek-gemm", {"precision": "deepseek-gemm"})]
    out += [(f"deepseek-gemm +{k}", {"precision": "deepseek-gemm", "fp8_switches": (k,)}) for k in SWITCHES]
    out += [("deepseek-v3-fp32acc", {"precision": "deepseek-v3-fp32acc"}), ("deepseek-v3", {"precision": "deepseek-v3"})]
    return out


def one(job: tuple[str, dict, int]) -> dict:
    import torch
    torch.set_num_threads(1)
    name, kw, seed = job
    t0 = time.perf_counter()
    run = TrainRun("mini", APP_DEFAULT.replace(seed=seed, **kw))
    recs = run.run()
    return {"name": name, "seed": seed, "val": recs[-1]["val_loss"],
            "train10": statistics.mean(r["lm_loss"] for r in recs[-10:]), "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--only", nargs="*", help="variant names to run (fp32 is always run)")
    ap.add_argument("--json", help="write every run's result here")
    args = ap.parse_args()
    vs = [v for v in variants() if not args.only or v[0] in args.only or v[0] == "fp32"]
    jobs = [(n, kw, s) for n, kw in vs for s in args.seeds]
    with ProcessPoolExecutor(args.jobs) as ex:
        res = list(ex.map(one, jobs))
    by = {(r["name"], r["seed"]): r for r in res}
    fp32 = {s: by[("fp32", s)] for s in args.seeds}
    print(f"APP_DEFAULT: {APP_DEFAULT.steps} steps x {APP_DEFAULT.batch_size}x{APP_DEFAULT.seq_len} tokens "
          f"({APP_DEFAULT.dataset}), seeds {args.seeds}; fp32 val {[round(fp32[s]['val'], 4) for s in args.seeds]}")
    print("| run | val − fp32 (nats/byte) | val gap % | train(last 10) − fp32 | s/run |")
    print("|---|---|---|---|---|")
    for n, _ in vs:
        dv = [by[(n, s)]["val"] - fp32[s]["val"] for s in args.seeds]
        dt = [by[(n, s)]["train10"] - fp32[s]["train10"] for s in args.seeds]
        rel = [100 * d / fp32[s]["val"] for d, s in zip(dv, args.seeds)]
        secs = statistics.mean(by[(n, s)]["seconds"] for s in args.seeds)
        print(f"| {n} | {statistics.mean(dv):+.4f} | {statistics.mean(rel):+.2f}% | {statistics.mean(dt):+.4f} | "
              f"{secs:.0f} |")
    if len(args.seeds) > 1:
        print(f"fp32 seed spread (max - min val): {max(r['val'] for r in fp32.values()) - min(r['val'] for r in fp32.values()):.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
