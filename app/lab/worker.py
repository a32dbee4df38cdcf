"""The training lab's worker process: `python -m app.lab.worker` trains one run at a time, off the server.

Why a process, not a thread: a training step is thousands of small torch ops, each taking and releasing the GIL.
In a thread of the Streamlit server it fights every page rerun of every session for the GIL (measured here:
polling the live charts every 0.5 s doubled the run time, and the other users' pages slowed down too). A separate
process has its own GIL and uses one core (`torch.set_num_threads(1)`); the server keeps the other.

Why a plain subprocess, not `multiprocessing`: spawn re-imports the parent's `__main__`, which inside Streamlit is
the app script — the child would run the whole app. This module imports only `core` and `app.memory` (no Streamlit).

Protocol: JSON lines.
  stdin  (server -> worker): {"cmd": "run", "seq": n, "id": run_id, "model": ModelConfig.to_hf(),
                              "train": TrainConfig.to_dict(), "prompt": text the trained model continues}
                             {"cmd": "stop", "seq": n, "after": bool}   (stop job n between two steps;
                                                        after: still sample text / measure experts)
                             end of input: exit
  stdout (worker -> server): {"ev": "ready"} once, then per job {"ev": "record", "id", "rec"} for every step,
                             {"ev": "finishing", "id"}, {"ev": "end", "id", "status", "message", "after"};
                             {"ev": "idle"} after IDLE_S seconds without a job: the server may then close stdin
                             (the worker exits and frees its ~300 MB; the next Start starts a new one). The worker
                             never exits on its own, so a job sent at that moment is never lost.
Anything else the child prints goes to stderr, so stdout carries only the protocol.
"""
from __future__ import annotations

import gc
import json
import os
import queue
import sys
import threading


DEFAULT_PROMPT = {"synthetic": "47+8=", "pydoc": "The "}   # the sample prompt per dataset when the user gives none


def after_run(tr, cfg, prompt: str | None = None) -> dict:
    """Measurements for the 'after' view: text sampled after `prompt` (validated by the app; empty or None = the
    dataset's default) with MTP drafts, the domain × expert matrix."""
    from core.cli import json_safe
    out: dict = {}
    prompt = prompt or DEFAULT_PROMPT.get(cfg.dataset, "The ")
    try:
        out["sample"] = json_safe(tr.sample_text(prompt, 160, temperature=0.8, seed=cfg.seed))
        out["sample_prompt"] = prompt
    except Exception as e:  # pragma: no cover - defensive
        out["sample_error"] = f"Sampling failed: {e}"
    if tr.model.moe_layers():
        try:
            m = tr.domain_expert_matrix(num_batches=4)
            out["domains"] = {"domains": m["domains"], "layers": m["layers"], "relative": m["relative"].tolist()}
        except Exception as e:  # pragma: no cover - defensive
            out["domains_error"] = str(e)
    return out


IDLE_S = float(os.environ.get("EVA_LAB_WORKER_IDLE_S", 300))  # offer to exit after this long without a job


def main() -> None:  # pragma: no cover - runs in the child process (tested through the app)
    out = os.fdopen(os.dup(1), "w", buffering=1)   # the protocol stream
    os.dup2(2, 1)                                  # stray prints go to stderr
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def send(**ev):
        with lock:
            try:
                out.write(json.dumps(ev) + "\n")
            except (BrokenPipeError, ValueError):  # the server went away: nobody to report to
                os._exit(0)

    jobs: queue.Queue = queue.Queue()
    stop = {"seq": 0, "after": True}

    def read_commands():
        for line in sys.stdin:
            try:
                cmd = json.loads(line)
            except ValueError:
                continue
            if cmd.get("cmd") == "stop":
                stop["after"] = bool(cmd.get("after", True))
                stop["seq"] = cmd.get("seq", 0)
            elif cmd.get("cmd") == "run":
                jobs.put(cmd)
        jobs.put(None)  # stdin closed: the server went away

    threading.Thread(target=read_commands, daemon=True).start()

    from app.memory import keep_freed_pages, trim
    keep_freed_pages()  # a step re-allocates what the last one freed: keep those pages (trim() after each job)
    import torch
    torch.set_num_threads(1)
    import torch._dynamo  # noqa: F401  (the optimizer imports it on first use: ~1 s; do it before any job)

    from core.config import ModelConfig
    from core.data import get_dataset
    from core.cli import json_safe
    from core.train import TrainConfig, TrainingDiverged, train
    try:
        get_dataset("synthetic", 0)  # the default dataset, built once
    except Exception:
        pass
    send(ev="ready")
    while True:
        try:
            job = jobs.get(timeout=IDLE_S)
        except queue.Empty:
            send(ev="idle")
            job = jobs.get()
        if job is None:
            return
        seq, run_id = job["seq"], job["id"]
        status, message, after = "error", None, {}
        try:
            cfg = TrainConfig(**job["train"])
            tr = train(ModelConfig.from_hf(job["model"]), cfg, stop=lambda: stop["seq"] == seq)
            for rec in tr:
                send(ev="record", id=run_id, rec=json_safe(rec))
            status = tr.status if tr.status in ("done", "stopped", "time limit") else "done"
            message = None
            if status == "stopped":
                message = f"Stopped at step {tr.step_count} of {cfg.steps}."
            elif status == "time limit":
                message = (f"Stopped at step {tr.step_count} of {cfg.steps}: this server caps a run at "
                           f"{cfg.max_time_s:.0f} s.")
            if tr.records and (stop["seq"] != seq or stop["after"]):
                send(ev="finishing", id=run_id)
                after = after_run(tr, cfg, job.get("prompt"))
        except TrainingDiverged as e:
            if e.record is not None:
                send(ev="record", id=run_id, rec=json_safe(e.record))
            status, message = "diverged", str(e)
        except Exception as e:  # report, never die: the next job starts fresh
            status, message = "error", f"{type(e).__name__}: {e}"
        send(ev="end", id=run_id, status=status, message=message, after=after)
        # The model, optimizer state and batches (~200 MB) would otherwise stay resident until the next job.
        tr = after = None
        gc.collect()
        trim()


if __name__ == "__main__":
    main()
