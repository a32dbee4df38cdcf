"""What a shorter default run does to what the lab's lessons show (issue 17, item 6: the default run's length).

    python bench/default_quality.py [--steps 150 120] [--seed 0]

Trains the lab's default knobs (`app.lab.knobs.lab_config`, one thread, no time cap) for each step count, with the
aux-loss-free bias controller (the default) and with balancing "none", and prints per run: the final validation loss
(nats/byte), the smoothed MaxVio at the end and at step 10 (`app.lab.records.final_maxvio`: the curve the lab draws
and its run table ends on), and expert specialisation (mean |domain row - mean row| of the domain x expert relative
load matrix the results show, mean over the MoE layers; `app.lab.worker.after_run`). The reference is the first step
count in the same run; the figures are deterministic (no timing decides anything), so one run of each suffices.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(steps: int, balancing: str, seed: int) -> dict:
    import numpy as np

    from app.lab import records as rec
    from app.lab.knobs import lab_config
    from app.lab.worker import after_run
    from core.train import train

    mcfg, cfg = lab_config({"tr_steps": steps, "tr_bal": balancing}, seed)
    tr = train(mcfg, cfg.replace(max_time_s=None))
    recs = tr.run()
    rel = np.asarray(after_run(tr, cfg)["domains"]["relative"], dtype=float).mean(0)  # [domains, experts]
    return {"val": rec.final_losses(recs)["val"], "maxvio_end": rec.final_maxvio(recs),
            "maxvio_10": rec.final_maxvio(recs[:10]), "special": float(np.abs(rel - rel.mean(0)).mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[150, 120], help="step counts; the first is the reference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    ref = None
    for steps in args.steps:
        for bal in ("aux_free", "none"):
            m = measure(steps, bal, args.seed)
            print(f"{steps} steps, balancing {bal}: validation loss {m['val']:.3f} nats/byte; MaxVio (smoothed) "
                  f"{m['maxvio_10']:.2f} at step 10 -> {m['maxvio_end']:.2f} at the end; specialisation "
                  f"{m['special']:.2f}", flush=True)
            if bal == "aux_free":
                if ref is None:
                    ref = m
                else:
                    print(f"    vs {args.steps[0]} steps: validation loss {m['val'] - ref['val']:+.3f}, "
                          f"specialisation {m['special'] / ref['special']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
