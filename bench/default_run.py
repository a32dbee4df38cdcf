"""The training lab's default run as the lab's worker trains it (issue 17, item 6): one thread, after `warm_up()`.

    python bench/default_run.py [--threads 1] [--repeat 1] [--knobs tr_steps=25 ...] [--malloc-defaults]

Prints the time from Start to the first record, to the last record and to the after-run results (validation
loss, domain x expert matrix, samples: `app.lab.worker.after_run`), the CPU, the fp32 GEMM library and the load
average, against the issue's targets (first point <= 1 s, whole run <= 20 s on one core). The reference is the
target itself: the run is absolute wall time, so measure it on an idle machine (the load average is printed); the
process's CPU seconds and page faults per run are printed too (less sensitive to other jobs than wall time).
`--malloc-defaults` leaves glibc's malloc as it is instead of `app.memory.keep_freed_pages()` (the worker's
setting): run both, one after the other, to see what keeping the freed pages saves.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_FIRST_S, TARGET_RUN_S = 1.0, 20.0  # issue 17, item 6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the lab's worker uses 1)")
    ap.add_argument("--repeat", type=int, default=1, help="runs one after the other in this process")
    ap.add_argument("--knobs", nargs="*", default=[], help="lab knobs KEY=VALUE changed from the defaults")
    ap.add_argument("--malloc-defaults", action="store_true",
                    help="leave glibc's malloc settings as they are (the worker sets app.memory.keep_freed_pages)")
    args = ap.parse_args(argv)
    from app.memory import keep_freed_pages, trim
    kept = False if args.malloc_defaults else keep_freed_pages()

    import resource
    import torch
    torch.set_num_threads(args.threads)
    from app.lab.knobs import lab_config
    from app.lab.worker import after_run
    from core import gemm
    from core.train import train, warm_up

    warm_up()
    knobs = dict(kv.split("=", 1) for kv in args.knobs)
    mcfg, cfg = lab_config(knobs, 0)
    cfg = cfg.replace(max_time_s=None)  # measure the whole run, whatever the server's cap
    ch = gemm.choice()
    print(f"CPU: {ch['cpu']}; fp32 GEMM: {ch['backend']} ({ch['reason']}); torch {torch.__version__}, "
          f"{args.threads} thread(s); run: {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens, "
          f"{cfg.precision}; freed pages kept: {kept}")
    for i in range(args.repeat):
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        tr = train(mcfg, cfg)
        t_first = None
        for _ in tr:
            if t_first is None:
                t_first = time.perf_counter() - t0
        t_last = time.perf_counter() - t0
        after_run(tr, cfg)
        t_results = time.perf_counter() - t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (ru.ru_utime - ru0.ru_utime, ru.ru_stime - ru0.ru_stime)
        load = os.getloadavg()
        print(f"run {i + 1}: first record {t_first:.2f} s (target <= {TARGET_FIRST_S:g} s), last record "
              f"{t_last:.1f} s (target <= {TARGET_RUN_S:g} s), after-run results {t_results:.1f} s; "
              f"CPU {cpu[0]:.1f} s user + {cpu[1]:.1f} s system, {ru.ru_minflt - ru0.ru_minflt} page faults; load average {load[0]:.2f} on {os.cpu_count()} cores")
        tr = None  # what the worker does after each job
        gc.collect()
        trim()
    return 0


if __name__ == "__main__":
    sys.exit(main())
