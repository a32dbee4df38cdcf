"""Training lab: the lab's knobs, the server-wide run manager and the page's sections.

Hosted-server manners (a classroom shares one small server):

* **one run at a time per server** — `RunManager` is a `st.cache_resource` singleton holding a lock, the active
  run and a short queue. A second user who presses Start is refused politely, sees the running run's progress,
  can watch it live (read-only) or queue their run (it starts by itself when the server is free; the page shows
  the queue position);
* **the run trains in a worker process** (app/training_worker.py, one core, started when the lab page is first
  opened), so it never competes with the server's page reruns for the GIL; its records stream back through a
  queue into a bounded list that the page polls with `st.fragment(run_every=...)`;
* **caps** — steps, tokens per run (steps × batch × sequence length), wall time (`TrainConfig.max_time_s`), and a
  hard kill of the worker if a run overstays the cap by a minute;
* **runs stop when their session goes away** — the owner's browser polls the run (the live view's fragment; on
  other pages a small sidebar fragment) and every poll refreshes the run's heartbeat. The manager's receiver
  thread stops the run when the heartbeat is older than `STALE_AFTER_S`, or sooner when Streamlit reports the
  session disconnected.

After training, the worker samples text (with MTP draft acceptance) and measures the domain × expert matrix, so
the page only draws.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
import streamlit as st

from app import charts_training as ct
from app import state, ui
from app.training_worker import DEFAULT_PROMPT  # the sample prompt per dataset when the prompt knob is empty

# ====================================================================== caps (hosted manners)
MAX_STEPS = int(os.environ.get("EVA_LAB_MAX_STEPS", 400))
MAX_TOKENS = int(os.environ.get("EVA_LAB_MAX_TOKENS", 320_000))        # steps × batch × seq_len per run
MAX_SECONDS = float(os.environ.get("EVA_LAB_MAX_SECONDS", 120))         # wall time per run
STALE_AFTER_S = float(os.environ.get("EVA_LAB_STALE_S", 20))            # owner not seen for this long -> stop
MAX_QUEUE = 5
HISTORY = 8            # finished runs kept per session
POLL_S = 1.0           # owner's live view refresh (the first point comes with the Start response itself)
WATCH_POLL_S = 2.0     # a watcher's refresh (cheaper: many watchers share the server)
SIDEBAR_POLL_S = 2.0   # heartbeat + progress in the sidebar on other pages

MODEL = "mini"         # the lab always trains the `mini` preset with the knobs below
MAX_PROMPT_BYTES = 64  # the sample prompt, in UTF-8 bytes (the model is byte-level: one token per byte)

# ====================================================================== knobs
PRECISION_LABELS = {
    "fp32": "FP32", "bf16": "BF16", "deepseek": "FP8 deepseek", "tensor-current": "FP8 tensor-current",
    "tensor-delayed": "FP8 tensor-delayed", "hybrid": "FP8 hybrid", "mxfp8": "FP8 mxfp8", "rowwise": "FP8 rowwise",
}
ATTN_LABELS = {"mla": "MLA", "mha": "MHA", "gqa": "GQA", "mqa": "MQA"}
FFN_LABELS = {"moe": "MoE", "dense": "dense"}
BAL_LABELS = {"none": "none", "aux_loss": "aux loss", "aux_free": "aux-loss-free", "both": "both"}
DATA_LABELS = {"synthetic": "synthetic", "pydoc": "pydoc"}


def _g(v) -> str:
    return f"{v:g}"


@dataclass(frozen=True)
class Knob:
    """One lab knob: URL key, label, widget kind, options, default, option labels (what the URL holds)."""
    key: str
    label: str
    kind: str                     # "radio" | "selectbox" | "select_slider" | "toggle" | "text"
    options: tuple = ()
    default: Any = None
    labels: dict | Callable | None = None
    help: str | None = None
    short: str = ""               # prefix in run labels

    def fmt(self, v) -> str:
        """The option's label (the value the URL holds)."""
        if self.kind == "toggle":
            return "true" if v else "false"
        if callable(self.labels):
            return self.labels(v)
        if isinstance(self.labels, dict):
            return self.labels[v]
        return str(v)


KNOBS: dict[str, Knob] = {k.key: k for k in [
    Knob("tr_attn", "Attention", "radio", tuple(ATTN_LABELS), "mla", ATTN_LABELS,
         "MLA caches a small latent (DeepSeek-V3); MHA a K and V per head; GQA shares K/V between 2 heads; MQA "
         "one K/V for all heads."),
    Knob("tr_ffn", "Feed-forward", "radio", tuple(FFN_LABELS), "moe", FFN_LABELS,
         "MoE: 1 shared + routed experts after the first (dense) layer, as DeepSeek-V3. dense: a SwiGLU FFN in "
         "every layer."),
    Knob("tr_experts", "Routed experts", "select_slider", (4, 8, 16, 32), 16, None,
         "Routed experts per MoE layer, in up to 4 groups (node-limited routing: a token uses its best half "
         "of the groups).", "E"),
    Knob("tr_topk", "Experts per token (top-k)", "select_slider", (1, 2, 3, 4, 6, 8), 4, None,
         "Routed experts each token uses (plus the shared expert). At most half of the routed experts.", "k"),
    Knob("tr_bal", "Load balancing", "radio", tuple(BAL_LABELS), "aux_free", BAL_LABELS,
         "aux-loss-free = DeepSeek-V3's bias controller; aux loss = a sequence-wise balance loss weighted by α; "
         "both = bias + a tiny aux loss; none = let the router collapse."),
    Knob("tr_gamma", "Bias update speed γ", "select_slider", (1e-3, 3e-3, 1e-2, 3e-2), 1e-2, _g,
         "V3 used 0.001 over thousands of steps; 0.01 lets the controller act within a short run.", "γ="),
    Knob("tr_alpha", "Aux loss weight α", "select_slider", (1e-4, 1e-3, 1e-2, 1e-1), 1e-3, _g,
         "Weight of the sequence-wise balance loss (used by 'aux loss' and 'both').", "α="),
    Knob("tr_prec", "Precision", "selectbox", tuple(PRECISION_LABELS), "fp32", PRECISION_LABELS,
         "FP32; BF16 compute with FP32 master weights; or an emulated FP8 recipe (every linear layer's GEMM "
         "quantized like on an FP8 GPU)."),
    Knob("tr_mtp", "Multi-token prediction (MTP)", "toggle", (), True, None,
         "One MTP module that also predicts the token after next (V3 §2.2); its drafts are checked when sampling."),
    Knob("tr_data", "Dataset", "radio", tuple(DATA_LABELS), "synthetic", DATA_LABELS,
         "synthetic: four token domains (arithmetic, brackets, copy, sorted) — lets you see experts specialise. "
         "pydoc: English text of Python's bundled documentation."),
    Knob("tr_steps", "Steps", "select_slider", (25, 50, 100, 150, 200, 300, 400), 150, None,
         f"Optimizer steps (this server allows up to {MAX_STEPS}).", "steps="),
    Knob("tr_lr", "Learning rate", "select_slider", (3e-4, 1e-3, 3e-3, 1e-2, 3e-2), 3e-3, _g,
         "Peak AdamW learning rate (linear warm-up over 10% of the steps, then cosine decay).", "lr="),
    Knob("tr_batch", "Batch (sequences)", "select_slider", (2, 4, 8, 16, 32), 8, None, None, "batch="),
    Knob("tr_seq", "Sequence length (tokens)", "select_slider", (16, 32, 64, 128, 256), 64, None, None, "seq="),
    Knob("tr_prompt", "Sample prompt", "text", (), "", None,
         "After training, the model continues this text (160 sampled bytes). Empty: the dataset's default prompt. "
         f"The model reads bytes, so at most {MAX_PROMPT_BYTES} bytes of UTF-8 (an accented letter is 2, "
         "an emoji 4). It does not change the training."),
]}
DEFAULTS = {k: kn.default for k, kn in KNOBS.items()}
MOE_ONLY = ("tr_experts", "tr_topk", "tr_bal", "tr_gamma", "tr_alpha")
AFTER_ONLY = ("tr_prompt",)   # knobs of the sampling after training: not part of a run's label


def knob_panel(container=None) -> dict:
    """Draw the lab's knobs (URL-bound) in the sidebar; returns {key: value}."""
    sb = container or st.sidebar
    sb.subheader("Training lab knobs")
    vals: dict = {}

    def draw(key, **kw):
        kn = KNOBS[key]
        common = dict(help=kn.help, **kw)
        if kn.kind == "toggle":
            vals[key] = state.toggle(kn.label, key, kn.default, **common)
        elif kn.kind == "text":
            vals[key] = st.text_input(kn.label, kn.default, key=key, bind="query-params", **common) or ""
        elif kn.kind == "radio":
            vals[key] = state.radio(kn.label, key, kn.options, kn.default, fmt=kn.fmt, **common)
        elif kn.kind == "selectbox":
            vals[key] = state.selectbox(kn.label, key, kn.options, kn.default, fmt=kn.fmt, **common)
        else:
            vals[key] = state.select_slider(kn.label, key, kn.options, kn.default, fmt=kn.fmt, **common)

    with sb.expander("Model", expanded=True, icon=":material/architecture:"):
        draw("tr_attn")
        draw("tr_ffn")
        dense = st.session_state.get("tr_ffn", "moe") == "dense"
        draw("tr_experts", disabled=dense)
        draw("tr_topk", disabled=dense)
        draw("tr_prec")
        draw("tr_mtp")
    with sb.expander("Load balancing", expanded=True, icon=":material/balance:"):
        draw("tr_bal", disabled=dense, horizontal=False)
        draw("tr_gamma", disabled=dense or vals["tr_bal"] not in ("aux_free", "both"))
        draw("tr_alpha", disabled=dense or vals["tr_bal"] not in ("aux_loss", "both"))
    with sb.expander("Data and schedule", expanded=True, icon=":material/schedule:"):
        draw("tr_data")
        draw("tr_steps")
        draw("tr_lr")
        draw("tr_batch")
        draw("tr_seq")
        draw("tr_prompt", placeholder=f"default: {DEFAULT_PROMPT[vals['tr_data']]!r}")
    return vals


# ====================================================================== knobs -> configs
class LabConfigError(ValueError):
    """An impossible knob combination; `knob` is the knob's label."""

    def __init__(self, knob: str, rule: str):
        self.knob, self.rule = knob, rule
        super().__init__(f"{knob}: {rule}")


_FIELD_KNOB = {"num_experts_per_tok": "tr_topk", "n_group": "tr_experts", "topk_group": "tr_experts",
               "n_routed_experts": "tr_experts", "steps": "tr_steps", "batch_size": "tr_batch",
               "seq_len": "tr_seq", "lr": "tr_lr", "kv_heads": "tr_attn", "balancing": "tr_bal",
               "precision": "tr_prec", "attention": "tr_attn", "ffn": "tr_ffn", "dataset": "tr_data"}


def expert_groups(n_experts: int) -> tuple[int, int]:
    """(n_group, topk_group) for `n_experts`: up to 4 groups of >= 2 experts; a token may use half of them."""
    g = max(1, min(4, n_experts // 2))
    return g, max(1, g // 2)


def sample_prompt(knobs: dict) -> str:
    """The text the trained model continues: the prompt knob, or the dataset's default when it is empty. Raises
    LabConfigError (naming the knob) when it is longer than MAX_PROMPT_BYTES bytes of UTF-8."""
    k = {**DEFAULTS, **knobs}
    p = k.get("tr_prompt") or ""
    if not isinstance(p, str):
        p = str(p)
    label = KNOBS["tr_prompt"].label
    try:
        n = len(p.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate (only a crafted URL can carry one)
        raise LabConfigError(label, "it holds characters that are not valid text; type the prompt again") from None
    if n > MAX_PROMPT_BYTES:
        raise LabConfigError(label, f"{n} bytes of UTF-8 ({len(p)} characters); at most {MAX_PROMPT_BYTES} bytes. The "
                                    "model reads one byte per token, so an accented letter counts 2 and an emoji 4. "
                                    "Shorten it (or clear it for the dataset's default).")
    return p or DEFAULT_PROMPT.get(k["tr_data"], "The ")


def lab_config(knobs: dict, seed: int):
    """(ModelConfig, TrainConfig) for the lab's knobs; raises LabConfigError naming the knob and the rule. (The
    sample prompt is not part of the TrainConfig; it is validated here too, see `sample_prompt`.)"""
    from core.config import ConfigError, get_preset
    from core.train import TrainConfig, TrainConfigError, resolve_model_config

    k = {**DEFAULTS, **knobs}
    steps, batch, seq = int(k["tr_steps"]), int(k["tr_batch"]), int(k["tr_seq"])
    if steps > MAX_STEPS:
        raise LabConfigError(KNOBS["tr_steps"].label, f"this server allows at most {MAX_STEPS} steps per run")
    if steps * batch * seq > MAX_TOKENS:
        raise LabConfigError("Steps × batch × sequence length",
                             f"{steps} × {batch} × {seq} = {steps * batch * seq:,} tokens; this server allows "
                             f"{MAX_TOKENS:,} tokens per run so one run cannot starve the others. Lower one of them.")
    sample_prompt(k)
    base = get_preset(MODEL)
    try:
        if k["tr_ffn"] == "moe":
            e, topk = int(k["tr_experts"]), int(k["tr_topk"])
            g, tg = expert_groups(e)
            if topk > e // 2:
                raise LabConfigError(KNOBS["tr_topk"].label,
                                     f"at most {e // 2} with {e} routed experts (a token may use {tg} of {g} expert "
                                     f"groups of {e // g}); pick more experts or a smaller top-k")
            base = base.replace(n_routed_experts=e, num_experts_per_tok=topk, n_group=g, topk_group=tg)
        bal = k["tr_bal"]
        cfg = TrainConfig(
            steps=steps, batch_size=batch, seq_len=seq, lr=float(k["tr_lr"]), warmup=max(1, round(steps / 10)),
            seed=int(seed), dataset=k["tr_data"], balancing=bal if k["tr_ffn"] == "moe" else "none",
            gamma=float(k["tr_gamma"]), alpha=float(k["tr_alpha"]) if bal in ("aux_loss", "both") else None,
            mtp=bool(k["tr_mtp"]), precision=k["tr_prec"], attention=k["tr_attn"], ffn=k["tr_ffn"],
            eval_every=max(1, steps // 6), eval_batches=2, max_time_s=MAX_SECONDS)
        mcfg = resolve_model_config(base, cfg)
    except ConfigError as e:
        kn = KNOBS.get(_FIELD_KNOB.get(e.field, ""))
        raise LabConfigError(kn.label if kn else e.field, e.rule) from e
    except TrainConfigError as e:
        kn = KNOBS.get(_FIELD_KNOB.get(e.knob, ""))
        raise LabConfigError(kn.label if kn else e.knob, str(e).split(": ", 1)[-1]) from e
    return mcfg, cfg


# Seconds per step and per trained token of the default model on one core, and cost multipliers; only for the
# "≈ time" hint before a run. Fitted to runs of 2x32, 8x64 and 16x128 tokens per step on a 2-core AMD Zen 5 with
# fp32 GEMMs on oneDNN (core.gemm; within ~15% across that range): fp32 17 s for the default run, bf16 0.76x,
# FP8 recipes (emulated) ~3x, no MTP 0.75x. Each finished run recalibrates this server's ratio (speed_ratio).
_S_PER_STEP, _S_PER_TOKEN = 0.045, 0.00015
_FACTOR = {"bf16": 0.76, "fp32": 1.0}


def _cost_factor(cfg) -> float:
    f = _FACTOR.get(cfg.precision, 3.0)
    return f * (1.0 if cfg.mtp else 0.75)


def _model_seconds(cfg) -> float:
    """Predicted seconds of a run on the reference server (a fixed cost per step plus a cost per token)."""
    per_step = (_S_PER_STEP + _S_PER_TOKEN * cfg.batch_size * cfg.seq_len) * _cost_factor(cfg)
    return cfg.steps * per_step * (1 + 2 * cfg.eval_batches / max(cfg.eval_every, 1) / 3)


def estimate_seconds(cfg, mgr: "RunManager | None" = None) -> float:
    """≈ wall time of a run: the model above times this server's measured speed ratio (from finished runs)."""
    return 0.3 + _model_seconds(cfg) * (getattr(mgr, "speed_ratio", None) or 1.0)


def knob_summary(knobs: dict) -> list[str]:
    """['Attention = MHA', 'Sample prompt = `12+`', ...]: every knob that differs from its default, in panel order
    (Markdown; text knobs as code, so a typed value cannot format the message)."""
    out = []
    for key, kn in KNOBS.items():
        v = knobs.get(key, kn.default)
        if v != kn.default:
            out.append(f"{kn.label} = " + (code_span(str(v)) if kn.kind == "text" else f"**{kn.fmt(v)}**"))
    return out


def run_label(knobs: dict, number: int) -> str:
    """'#2 FP8 deepseek, MHA' — the knobs that differ from the lab's defaults."""
    k = {**DEFAULTS, **knobs}
    bits = []
    for key, kn in KNOBS.items():
        if key in AFTER_ONLY or key in MOE_ONLY and k["tr_ffn"] == "dense":
            continue
        if key == "tr_gamma" and k["tr_bal"] not in ("aux_free", "both"):
            continue
        if key == "tr_alpha" and k["tr_bal"] not in ("aux_loss", "both"):
            continue
        if k[key] != kn.default:
            if kn.kind == "toggle":
                bits.append(f"{'MTP' if k[key] else 'no MTP'}")
            elif key == "tr_bal":
                bits.append(f"balancing {kn.fmt(k[key])}")
            else:
                bits.append(f"{kn.short}{kn.fmt(k[key])}")
    return f"#{number} " + (", ".join(bits) if bits else "default")


# ====================================================================== runs and the manager
ACTIVE = ("queued", "starting", "running", "finishing")
STATUS_TEXT = {
    "queued": "queued", "starting": "starting", "running": "running", "finishing": "sampling text and measuring experts",
    "done": "finished", "stopped": "stopped", "time limit": "stopped at the time cap", "diverged": "diverged",
    "abandoned": "stopped (its browser tab went away)", "error": "failed",
}


@dataclass(eq=False)
class LabRun:
    """One lab run: knobs, configs, the records written by the worker, and what was measured after training."""
    owner: str                      # the owner's lab session key (session_state uuid)
    number: int                     # 1, 2, ... within the owner's session
    knobs: dict
    model_cfg: Any
    train_cfg: Any
    prompt: str = ""                # the sample prompt (see `sample_prompt`)
    session_id: str | None = None   # Streamlit runtime session id (to notice a closed tab), if known
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    records: list = field(default_factory=list)
    status: str = "queued"
    message: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    heartbeat: float = field(default_factory=time.monotonic)
    stop_event: threading.Event = field(default_factory=threading.Event)
    after: dict = field(default_factory=dict)   # {"sample": ..., "domains": ...}
    n_params: dict = field(default_factory=dict)
    seq: int = 0                                # job number in the worker process
    abandoned: bool = False                     # stopped because its browser session went away

    @property
    def label(self) -> str:
        return run_label(self.knobs, self.number)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def total_steps(self) -> int:
        return self.train_cfg.steps

    def touch(self) -> None:
        self.heartbeat = time.monotonic()

    def snapshot(self) -> list[dict]:
        return list(self.records)

    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    def progress(self) -> dict:
        recs = self.records
        step = recs[-1]["step"] if recs else 0
        tps = [r["tokens_per_s"] for r in recs[-10:] if r.get("tokens_per_s")]
        speed = sum(tps) / len(tps) if tps else None
        el = self.elapsed()
        left = None
        if len(recs) >= 2:  # recent step time (the first step also paid for building the model)
            a, b = recs[-min(len(recs), 11)], recs[-1]
            if b.get("elapsed_s") is not None and a.get("elapsed_s") is not None and b["step"] > a["step"]:
                per_step = (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
                left = min(per_step * (self.total_steps - step), max(0.0, MAX_SECONDS - el))
        return {"step": step, "total": self.total_steps, "tokens_per_s": speed, "elapsed": el, "left": left}


def _session_connected(session_id: str | None) -> bool | None:
    """True/False when Streamlit's runtime can tell whether that browser session is still connected, else None."""
    if not session_id:
        return None
    try:
        from streamlit.runtime import Runtime
        if not Runtime.exists():
            return None
        return Runtime.instance().is_active_session(session_id)  # documented thread-safe
    except Exception:  # pragma: no cover - internal API moved
        return None


def _stale(run: LabRun) -> bool:
    age = time.monotonic() - run.heartbeat
    if age > STALE_AFTER_S:
        return True
    return age > 3.0 and _session_connected(run.session_id) is False


class RunManager:
    """Server-wide: at most one active run, a short queue, and the worker process that trains (see
    app/training_worker.py). Thread-safe: one lock around the state; a receiver thread turns the worker's events
    into `LabRun` state and enforces stop / heartbeat / wall-time caps."""

    HARD_LIMIT_S = 60.0   # a run still going this long after the time cap is killed with its worker process

    def __init__(self):
        self.lock = threading.Lock()
        self.active: LabRun | None = None
        self.queue: list[LabRun] = []
        self.completed = 0
        self.speed_ratio: float | None = None  # measured / predicted run time on this server (for estimates)
        self._proc = None
        self._seq = 0
        self._ready = threading.Event()
        self._closed = False

    # -- the worker process
    def ensure_worker(self) -> None:
        """Start the worker process (and its reader / monitor threads) if it is not running. Called when the lab
        page is opened, so the process has imported torch by the time someone presses Start."""
        with self.lock:
            self._ensure_worker_locked()

    def _ensure_worker_locked(self) -> None:
        if self._closed or (self._proc is not None and self._proc.poll() is None):
            return
        import subprocess
        import sys
        from pathlib import Path
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
            [root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        proc = subprocess.Popen([sys.executable, "-m", "app.training_worker"], cwd=root, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._proc = proc
        self._ready.clear()
        threading.Thread(target=self._read, args=(proc,), name="eva-train-reader", daemon=True).start()
        threading.Thread(target=self._monitor, args=(proc,), name="eva-train-monitor", daemon=True).start()

    def _send(self, **cmd) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.stdin.write(json.dumps(cmd) + "\n")
            proc.stdin.flush()
        except (OSError, ValueError):  # the worker died; the monitor reports it
            pass

    def close(self) -> None:
        """Stop the worker process (cache eviction / shutdown)."""
        with self.lock:
            self._closed = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()
                proc.wait(3)
            except Exception:
                pass
            if proc.poll() is None:
                proc.kill()

    # -- requests from pages
    def request(self, run: LabRun, queue: bool = False) -> tuple[str, int]:
        """Start `run` now if the server is free: ("started", 0); otherwise ("queued", position) when `queue`,
        ("busy", 0) when not, or ("full", 0) when the queue is full."""
        with self.lock:
            self._drop_stale_queue()
            if self.active is None and not self.queue:
                self._start(run)
                return "started", 0
            if not queue:
                return "busy", 0
            if run in self.queue:
                return "queued", self.queue.index(run) + 1
            if len(self.queue) >= MAX_QUEUE:
                return "full", 0
            run.status = "queued"
            self.queue.append(run)
            return "queued", len(self.queue)

    def position(self, run: LabRun) -> int:
        with self.lock:
            return self.queue.index(run) + 1 if run in self.queue else 0

    def cancel(self, run: LabRun) -> None:
        """Stop a running run, or take a queued one out of the queue."""
        with self.lock:
            if run in self.queue:
                self.queue.remove(run)
                run.status, run.message = "stopped", "Taken out of the queue."
                run.finished = time.time()
                return
            run.stop_event.set()
            if self.active is run:
                self._send(cmd="stop", seq=run.seq, after=True)

    def busy(self) -> LabRun | None:
        return self.active

    def worker_ready(self) -> bool:
        """Has the worker process finished loading (torch, the default dataset)?"""
        return self._ready.is_set()

    # -- internals (called with the lock held)
    def _drop_stale_queue(self) -> None:
        for r in list(self.queue):
            if _stale(r):
                self.queue.remove(r)
                r.status, r.message = "abandoned", "Left the queue: its browser tab went away."
                r.finished = time.time()

    def _start(self, run: LabRun) -> None:
        self._ensure_worker_locked()
        self._seq += 1
        run.seq = self._seq
        self.active = run
        run.status = "starting"
        run.started = time.time()
        run.touch()
        self._send(cmd="run", seq=run.seq, id=run.id, model=run.model_cfg.to_hf(), train=run.train_cfg.to_dict(),
                   prompt=run.prompt)

    def _finish(self, run: LabRun, status: str, message: str | None, after: dict | None) -> None:
        """The run is over: publish its final state and free the server in one step (no window in which the run
        looks finished but the server is still busy), then start the next queued run whose owner is still here."""
        with self.lock:
            if run.finished is not None:  # already reported (e.g. the worker died right after its last event)
                return
            if run.abandoned:
                status = "abandoned"
                message = (f"Stopped at step {run.records[-1]['step'] if run.records else 0}: nobody was watching "
                           f"(the browser tab closed or stayed away for {STALE_AFTER_S:.0f} s).")
            run.after = after or {}
            run.message = message
            run.finished = time.time()
            run.status = status
            if self.active is run:
                self.active = None
            self.completed += 1
            if status in ("done", "time limit") and len(run.records) >= 10:  # recalibrate the estimates
                done = run.records[-1]["step"] / run.total_steps
                v = run.records[-1]["elapsed_s"] / max(_model_seconds(run.train_cfg) * done, 1e-9)
                if math.isfinite(v) and v > 0:
                    self.speed_ratio = v if self.speed_ratio is None else 0.5 * (self.speed_ratio + v)
            self._drop_stale_queue()
            if self.active is None and self.queue:
                self._start(self.queue.pop(0))

    def _read(self, proc) -> None:
        """Reader thread: the worker's events (JSON lines) -> run state."""
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("ev")
            if kind == "ready":
                self._ready.set()
                continue
            if kind == "idle":
                self._retire_idle(proc)
                continue
            run = self.active
            if run is None or ev.get("id") != run.id:
                continue
            if kind == "record":
                if run.status == "starting":
                    run.status = "running"
                if len(run.records) < MAX_STEPS + 1:
                    run.records.append(ev["rec"])
            elif kind == "finishing":
                run.status = "finishing"
            elif kind == "end":
                self._finish(run, ev.get("status", "error"), ev.get("message"), ev.get("after"))

    def _retire_idle(self, proc) -> None:
        """The worker has had no job for a while: let it exit (closing its stdin) unless a run or a queue needs it.
        Frees the worker's memory (~300 MB, torch) on a server nobody trains on; the next Start starts a new one."""
        with self.lock:
            if self._proc is not proc or self.active is not None or self.queue:
                return
            proc.eva_retired = True
            self._proc = None
            self._ready.clear()
        try:
            proc.stdin.close()
        except (OSError, ValueError):
            pass

    def _monitor(self, proc) -> None:
        """Monitor thread: Stop, the owner's heartbeat and the hard wall-time cap; reports a dead worker."""
        while proc.poll() is None:
            time.sleep(0.2)
            run = self.active
            if run is None or run.status not in ("starting", "running"):
                continue
            if not run.stop_event.is_set() and _stale(run):
                run.abandoned = True
                run.stop_event.set()
                self._send(cmd="stop", seq=run.seq, after=False)
            if run.started and time.time() - run.started > MAX_SECONDS + self.HARD_LIMIT_S:
                proc.kill()  # a run that ignores the caps: kill the worker; the next request starts a new one
        with self.lock:
            if self._proc is proc:
                self._proc = None
        if getattr(proc, "eva_retired", False):  # exited because it was idle: no run was on it
            return
        run = self.active
        if run is not None and run.active and run.status != "queued":
            self._finish(run, "error", "The training process stopped unexpectedly (out of memory, or killed after "
                                       "exceeding the time cap). Try a smaller run.", None)


@st.cache_resource(show_spinner=False, on_release=lambda m: m.close())
def manager() -> RunManager:
    """The one RunManager of this server process (shared by every session; its own lock makes it thread-safe)."""
    return RunManager()


# ====================================================================== session helpers
_SID = "_tr_sid"        # this session's lab key
_CUR = "_tr_run"        # this session's current (active or last) LabRun
_HIST = "_tr_history"   # finished LabRuns of this session (newest last)
_COUNT = "_tr_count"
_NOTICE = "_tr_notice"  # a message for the next render (refused start, ...)


def session_key() -> str:
    if _SID not in st.session_state:
        st.session_state[_SID] = uuid.uuid4().hex
    return st.session_state[_SID]


def _runtime_session_id() -> str | None:
    try:
        from streamlit.runtime.scriptrunner import get_script_run_ctx
        ctx = get_script_run_ctx()
        return ctx.session_id if ctx else None
    except Exception:  # pragma: no cover
        return None


def current() -> LabRun | None:
    return st.session_state.get(_CUR)


def history() -> list[LabRun]:
    return st.session_state.setdefault(_HIST, [])


def collect() -> None:
    """Move this session's finished run into its history (once)."""
    run = current()
    if run is None or run.active:
        return
    hist = history()
    if run in hist:
        return
    if run.records:
        hist.append(run)
        del hist[:-HISTORY]


def start(knobs: dict, seed: int, queue: bool = False) -> tuple[str, int, LabRun | None]:
    """Create this session's run from the knobs and ask the manager to start (or queue) it."""
    mcfg, cfg = lab_config(knobs, seed)
    collect()
    n = st.session_state.get(_COUNT, 0) + 1
    run = LabRun(owner=session_key(), number=n, knobs=dict(knobs), model_cfg=mcfg, train_cfg=cfg,
                 prompt=sample_prompt(knobs), session_id=_runtime_session_id())
    try:
        from core.calc import param_counts
        run.n_params = param_counts(mcfg)
    except Exception:  # pragma: no cover
        pass
    outcome, pos = manager().request(run, queue=queue)
    if outcome in ("started", "queued"):
        st.session_state[_COUNT] = n
        st.session_state[_CUR] = run
        return outcome, pos, run
    return outcome, pos, None


_LINK = "_tr_from_link"  # did this session open the lab from a link that set lab knobs?


def opened_from_link() -> bool:
    """True when the lab's first load in this session came with lab knobs in the URL (a shared or lesson link)."""
    if _LINK not in st.session_state:
        st.session_state[_LINK] = any(k in KNOBS for k in st.query_params)
    return st.session_state[_LINK]


def knobs_from_state() -> dict:
    """The lab knobs as the widgets hold them (for callbacks, which run before the page draws the widgets)."""
    return {k: st.session_state.get(k, kn.default) for k, kn in KNOBS.items()}


_OUTCOME = "_tr_outcome"


def on_start(queue: bool = False) -> None:
    """Start (or queue) button callback. Callbacks run once per click, before the script — also when the page's
    first run is restarted through the entry point (app/shell.py)."""
    run = current()
    if run is not None and run.active:
        return
    seed = st.session_state.get("seed", 0)
    try:
        outcome, pos, _ = start(knobs_from_state(), int(seed) if seed is not None else 0, queue=queue)
    except LabConfigError as e:
        outcome, pos = "invalid", 0
        st.session_state[_NOTICE] = str(e)
    st.session_state[_OUTCOME] = outcome


def outcome() -> str | None:
    """The last Start/Queue outcome of this session: started, queued, busy, full or invalid."""
    return st.session_state.get(_OUTCOME)


def on_stop() -> None:
    stop_current()


def on_leave_queue() -> None:
    stop_current()


def stop_current() -> None:
    run = current()
    if run is not None and run.active:
        manager().cancel(run)


def heartbeat() -> LabRun | None:
    """The owner's browser is still here: refresh this session's active run's heartbeat."""
    run = current()
    if run is not None and run.active:
        run.touch()
    return run


def prewarm() -> None:
    """On a real server: start the worker process in the background (it imports torch and builds the default
    dataset), so Start shows its first point quickly. Never blocks the page. Under AppTest (no Streamlit runtime)
    the worker starts with the first run instead, so tests that only render the page do not spawn a process."""
    try:
        from streamlit.runtime import Runtime
        if Runtime.exists():
            manager().ensure_worker()
    except Exception:  # pragma: no cover - a warm-up must never break the page
        pass


def wait_first_record(run: LabRun, timeout: float = 1.0) -> None:
    """Right after Start: let the worker reach its first step (the script sleeps, so the GIL is free) so the first
    render already shows the first point."""
    t0 = time.monotonic()
    while run.active and not run.records and run.status != "queued" and time.monotonic() - t0 < timeout:
        time.sleep(0.02)


# ====================================================================== rendering
def fmt_s(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "…"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def progress_text(run: LabRun) -> tuple[float, str]:
    p = run.progress()
    frac = p["step"] / max(1, p["total"])
    bits = [f"Step {p['step']} / {p['total']}"]
    if p["tokens_per_s"]:
        bits.append(f"{p['tokens_per_s']:,.0f} tokens/s")
    bits.append(f"{fmt_s(p['elapsed'])} elapsed")
    if run.active:
        bits.append(f"~{fmt_s(p['left'])} left" if p["left"] is not None else "starting…")
    return min(1.0, frac), " · ".join(bits)


def layer_choice(run: LabRun | None) -> int | None:
    """The MoE layer shown in the heatmaps (None = mean over layers); a view knob bound to ?tr_layer=."""
    n = ct.n_moe_layers(run.records) if run is not None else 0
    n = n or 3
    opts = ["mean"] + [str(i + 1) for i in range(n)]
    v = state.radio("Heatmaps show MoE layer", "tr_layer", opts, "mean",
                    help="The expert-load and bias heatmaps: one MoE layer, or the mean over all of them.")
    return None if v == "mean" else int(v) - 1


def _layer_label(layer: int | None, run: LabRun) -> str:
    if layer is None:
        return "mean over the MoE layers"
    fk = getattr(run.model_cfg, "first_k_dense_replace", 1)
    return f"MoE layer {layer + 1} (model layer {layer + fk})"


CELL_W = 430  # px: two charts side by side on a wide screen, one per row on a narrow one (the row wraps)


def grid():
    """A row of chart cells that wraps on narrow screens: `with grid(): with cell(): ...`."""
    return st.container(horizontal=True, gap="medium")


def cell():
    return st.container(width=CELL_W)


def live_charts(run: LabRun, layer: int | None, key: str, lesson: bool) -> None:
    """Loss curve + MaxVio, expert-load and bias heatmaps of `run` (whatever it has recorded so far)."""
    recs = run.snapshot()
    df = ct.records_frame(recs)
    total = run.total_steps
    cfg = {"displaylogo": False}
    moe = ct.n_moe_layers(recs) > 0 or run.knobs.get("tr_ffn", "moe") == "moe"
    with grid():
        with cell():
            st.plotly_chart(ct.loss_curve(df, total), key=f"{key}_loss", config=cfg)
            ui.lesson_note("The train loss (bold: moving average) falls fast at first, then slowly. The red "
                           "validation points are measured on held-out data: when they stop following the train "
                           "curve, the model starts to memorise.", lesson)
        with cell():
            if moe:
                st.plotly_chart(ct.maxvio_curve(df, total), key=f"{key}_maxvio", config=cfg)
                ui.lesson_note("MaxVio is how much the busiest expert exceeds the mean load. With the aux-loss-free "
                               "bias it falls within a few dozen steps; with balancing 'none' it stays high.", lesson)
            else:
                st.info("Dense FFN: no router, so no expert load or biases to show.", icon=":material/info:")
        if moe:
            if run.active:  # the heatmaps advance in blocks of 15 steps: unchanged figures cost the browser nothing
                recs = recs[:max(1, len(recs) // 15 * 15)] if len(recs) >= 15 else recs
            steps = [r["step"] for r in recs if r.get("expert_loads")]
            with cell():
                st.plotly_chart(ct.expert_load_heatmap(ct.relative_loads(recs, layer), steps, total,
                                                       _layer_label(layer, run)), key=f"{key}_load", config=cfg)
            with cell():
                st.plotly_chart(ct.bias_heatmap(ct.router_biases(recs, layer), steps, total,
                                                _layer_label(layer, run)), key=f"{key}_bias", config=cfg)


def code_span(text: str) -> str:
    """`text` as a Markdown inline code span, whatever backticks it holds (CommonMark: a longer fence)."""
    import re
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def records_csv(run: LabRun) -> bytes:
    df = ct.records_frame(run.snapshot())
    df.insert(0, "run", run.label)
    return df.to_csv(index=False).encode()


def all_records_csv(runs: list[LabRun]) -> bytes:
    frames = []
    for r in runs:
        df = ct.records_frame(r.snapshot())
        df.insert(0, "run", r.label)
        frames.append(df)
    return pd.concat(frames, ignore_index=True).to_csv(index=False).encode() if frames else b""


def domain_view(run: LabRun, layer: int | None):
    """(matrix [domains, experts], domain names, layer label, table) of a finished MoE run, or None."""
    dom = run.after.get("domains")
    if not dom:
        return None
    import numpy as np
    rel = np.asarray(dom["relative"], dtype=float)
    li = None if layer is None else min(layer, len(rel) - 1)
    mat = rel.mean(0) if li is None else rel[li]
    lab = "mean over the MoE layers" if li is None else f"MoE layer {li + 1}"
    df = pd.DataFrame(mat, index=dom["domains"], columns=[f"expert_{e}" for e in range(mat.shape[1])])
    return mat, dom["domains"], lab, df.reset_index(names="domain")


def history_table(runs: list[LabRun]) -> pd.DataFrame:
    rows = []
    for r in runs:
        f = ct.final_losses(r.records)
        last = r.records[-1] if r.records else {}
        rows.append({"run": r.label, "status": STATUS_TEXT.get(r.status, r.status),
                     "steps": last.get("step", 0), "train loss (avg)": f["train"], "val loss": f["val"],
                     "MaxVio (last)": last.get("max_vio"), "time (s)": round(r.elapsed(), 1),
                     "MTP acceptance": (r.after.get("sample") or {}).get("mtp_acceptance")})
    return pd.DataFrame(rows)


# ====================================================================== page sections
def results_section(hist: list[LabRun], layer: int | None, lesson: bool) -> None:
    """After the runs: the picked run's numbers, charts, specialisation matrix, sampled text and CSV; then the
    overlay of runs with the final-loss delta, the table of runs and the CSV of every record."""
    names = [r.label for r in hist]
    st.header("Results", divider="gray")
    # keyed by the newest run: when a run finishes, the picker shows it (a keyed widget would keep the old pick)
    pick = st.selectbox("Run", names[::-1], key=f"tr_pick_{hist[-1].id}",
                        help="Runs of this browser session, newest first.")
    r = hist[names.index(pick)]
    if r.status in ("diverged", "error"):
        st.error(r.message or "The run failed.", icon=":material/error:")
    elif r.message:
        st.warning(r.message, icon=":material/info:")
    f = ct.final_losses(r.records)
    last = r.records[-1]
    sample = r.after.get("sample") or {}
    w = 210  # four cards in one row on a wide screen
    with ui.cards():
        ui.number_with_formula("Train loss (moving avg)", f"{f['train']:.3f}" if f["train"] is not None else "—",
                               r"\mathcal{L}_{\text{LM}}", width=w,
                               detail=f"nats/byte at step {last['step']}; a uniform guess is {ct.UNIFORM_LOSS:.2f}")
        ui.number_with_formula("Validation loss", f"{f['val']:.3f}" if f["val"] is not None else "—",
                               r"\mathcal{L}_{\text{LM}}^{\text{held out}}", width=w,
                               detail=f"held-out {r.train_cfg.dataset} text")
        tokens = last.get("tokens") or 0
        ui.number_with_formula("Training speed", f"{tokens / max(r.elapsed(), 1e-9):,.0f} tok/s",
                               r"\text{tokens} / t", width=w,
                               detail=f"{tokens:,} tokens in {r.elapsed():.1f} s on one core")
        if sample.get("mtp_acceptance") is not None:
            ui.number_with_formula("MTP draft acceptance", f"{100 * sample['mtp_acceptance']:.0f}%",
                                   r"\frac{\#\,\text{drafts confirmed}}{\#\,\text{drafts}}", width=w,
                                   paper="V3: 85–90% for the 2nd token",
                                   detail=f"{sample['mtp_accepted']} of {sample['mtp_drafts']} drafts while sampling")
    if layer is None:
        layer = layer_choice(r)  # right above the charts it controls
    live_charts(r, layer, f"res_{r.id}", lesson)
    dom = domain_view(r, layer)
    if dom:
        mat, domains, lab, dfm = dom
        ui.chart(ct.domain_expert_heatmap(mat, domains, lab), dfm, f"domain expert {r.label}",
                 key=f"tr_dom_{r.id}", lesson=lesson,
                 notice="Each row is a kind of token. A trained router sends different domains to different "
                        "experts — specialisation that no one programmed. Compare with balancing 'none'.",
                 caption=None if r.train_cfg.dataset == "synthetic" else
                 "Measured on the synthetic domains (the run trained on pydoc text, which has no domain labels).")
    st.subheader("Text sampled from the model")
    if sample:
        prompt = r.after.get("sample_prompt", "")
        own = bool(r.knobs.get("tr_prompt"))
        st.caption(f"Prompt {code_span(prompt)} "
                   + ("(yours)" if own else f"(the {r.train_cfg.dataset} default; type your own in **Sample prompt** "
                                            f"in the sidebar, then train again)")
                   + f" + {len(sample.get('tokens', []))} sampled bytes, temperature 0.8, seed {r.train_cfg.seed}" + (
                       f"; the MTP module drafted the token after next at every step and "
                       f"{sample['mtp_accepted']} of {sample['mtp_drafts']} drafts matched what the model then "
                       f"sampled." if sample.get("mtp_acceptance") is not None else "; MTP was off (no drafts)."))
        st.code(sample["text"], language=None, wrap_lines=True)
    elif r.after.get("sample_error"):
        st.warning(r.after["sample_error"])
    else:
        st.caption("No sample: the run stopped before it could be sampled.")
    st.download_button(f"Download every record of {r.label} (CSV, {len(r.records)} rows)",
                       lambda r=r: records_csv(r), file_name=f"eva-training-run{r.number}.csv", mime="text/csv",
                       key=f"tr_csv_{r.id}", on_click="ignore", icon=":material/download:")

    st.header("Compare runs", divider="gray")
    default = names[-2:] if len(names) >= 2 else names
    # keyed by the newest run: when a run finishes, the selection starts again from "the last two runs"
    chosen = st.multiselect("Runs to overlay", names, default=default, key=f"tr_overlay_{hist[-1].id}",
                            help="Change one knob between runs (e.g. FP8 vs FP32, MLA vs MHA, aux-loss-free vs "
                                 "aux loss) and overlay them; the title gives the final-loss delta of the last "
                                 "picked run against the first.")
    sel = [hist[names.index(n)] for n in chosen]
    table = history_table(hist)
    curves = [(x.label, x.snapshot()) for x in sel]
    ui.chart(ct.overlay_runs(curves), table, "training runs", key="tr_overlay_chart", lesson=lesson,
             notice="Same seed, same data order: the gap between two curves is caused by the one knob you changed.")
    mv = ct.overlay_maxvio(curves)
    if mv is not None:
        ui.chart(mv, ct.maxvio_table(curves), "maxvio of runs", key="tr_overlay_maxvio", lesson=lesson,
                 notice="The balancing strategies differ here more than in the loss: compare how fast and how far "
                        "each run's MaxVio falls.")
    st.dataframe(table, hide_index=True, width="stretch")
    st.download_button("Download every record of every run (CSV)", lambda: all_records_csv(hist),
                       file_name="eva-training-runs.csv", mime="text/csv", key="tr_csv_all", on_click="ignore",
                       icon=":material/download:", type="tertiary")
    share_section(sel or hist[-1:])


def run_query(run: LabRun, lesson: bool = False) -> dict[str, str]:
    """The query parameters that open the lab with `run`'s knobs and seed (defaults left out, as Streamlit does)."""
    q = {k: KNOBS[k].fmt(v) for k, v in run.knobs.items() if k in KNOBS and v != KNOBS[k].default}
    if run.train_cfg.seed != 0:
        q["seed"] = str(run.train_cfg.seed)
    if lesson:
        q["lesson"] = "true"
    return q


def run_link(run: LabRun, lesson: bool = False) -> str:
    """An absolute link (when the server's address is known) that opens the lab with `run`'s knobs."""
    from urllib.parse import urlencode, urljoin
    qs = urlencode(run_query(run, lesson))
    path = "training" + (f"?{qs}" if qs else "")
    base = getattr(st.context, "url", None)
    return urljoin(base, path) if base else path


def share_section(runs: list[LabRun]) -> None:
    """How to show these runs to a colleague: runs live in this browser tab, links carry knobs. One link per run."""
    lesson = bool(st.session_state.get("lesson"))
    st.info("**Runs belong to this browser tab.** The server does not keep them, and a link carries knobs, not "
            "results: the address bar holds the sidebar's knobs (your *next* run), and a colleague who opens it sees "
            "no curves until they train. To show this comparison, send one link per run (below) or the CSV above: "
            "each link opens the lab with that run's knobs and seed, and on this server the same knobs and seed "
            "draw the same curves.", icon=":material/share:")
    with st.expander(f"Links to reproduce {'this run' if len(runs) == 1 else f'these {len(runs)} runs'}",
                     icon=":material/link:"):
        for r in runs:
            st.markdown(f"**{r.label}**")
            st.code(run_link(r, lesson), language=None, wrap_lines=True)


def preview_section(mcfg, cfg, expanded: bool, lesson: bool) -> None:
    """Before a run: the lab model's size and the learning-rate schedule the knobs give."""
    import json

    from app import compute
    from core.units import human_count
    from core.train import lr_at

    with st.expander("The model and schedule you are about to train", expanded=expanded,
                     icon=":material/visibility:"):
        d = compute.overview(json.dumps(mcfg.to_hf(), sort_keys=True), cfg.seq_len, "fp32")
        c = d["counts"]
        with ui.cards():
            ui.number_with_formula("Parameters", human_count(c["total"]), r"N_{\text{total}}", width=250,
                                   detail=f"+ {human_count(c['mtp'])} in the MTP module" if cfg.mtp else "MTP off")
            ui.number_with_formula("Activated per token", human_count(c["activated"]), r"N_{\text{act}}", width=250,
                                   detail=f"{100 * c['activated'] / c['total']:.0f}% of the weights")
            ui.number_with_formula("Tokens per step", f"{cfg.batch_size * cfg.seq_len:,}", r"B \times T", width=250,
                                   detail=f"{cfg.steps} steps; validation every {cfg.eval_every}")
        with grid():
            with cell():
                ui.chart(ct.lab_params(d["params"], c), d["params"].drop(columns=["formula"]),
                         "lab model parameters", key="tr_params", lesson=lesson,
                         notice="Routed experts hold most weights, but each token activates only its top-k of them.")
            with cell():
                lrs = ct.lr_table([lr_at(i, cfg) for i in range(cfg.steps)])
                ui.chart(ct.lr_schedule(lrs, cfg.warmup), lrs, "learning rate schedule", key="tr_lr_chart",
                         lesson=lesson)


# ====================================================================== sidebar status (every other page)
def sidebar_status(page) -> None:
    """While this session's run is active and the user is on another page: progress in the sidebar, and the
    polling that keeps the run's heartbeat alive; once it has finished, a note until the lab is opened again.
    Cheap no-op otherwise."""
    run = st.session_state.get(_CUR)
    if run is None or getattr(page, "url_path", "") == "training":
        return
    if not run.active:
        if run.records and run not in history():
            st.sidebar.success(f"Training {run.label}: {STATUS_TEXT.get(run.status, run.status)}.",
                               icon=":material/check_circle:")
            st.sidebar.page_link("pages/training.py", label="See the results in the training lab",
                                 icon=":material/model_training:")
        return

    @st.fragment(run_every=SIDEBAR_POLL_S)
    def _status():
        run.touch()
        with st.sidebar:
            frac, text = progress_text(run)
            st.progress(frac, text=f"Training {run.label}: " + text)
            st.page_link("pages/training.py", label="Open the training lab", icon=":material/model_training:")
        if not run.active:
            st.rerun(scope="app")  # stop polling; the finished note takes over

    _status()
