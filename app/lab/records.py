"""The training lab's records as tables (also for the masterclass notebook): `core.train` step records (see
`core.train.RECORD_FIELDS`) in, pandas / numpy out — one flat row per step, moving averages, per-expert loads as a
multiple of the fair share, router biases, the learning-rate table, final losses. No Streamlit, no torch, no plotly.

Losses are in nats per token; every dataset here is byte-level, so that is nats per byte (ln 256 = 5.55 is a
uniform guess over the 256 byte values).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

UNIFORM_LOSS = math.log(256)  # cross-entropy of a uniform guess over 256 bytes
_SCALARS = ("step", "loss", "lm_loss", "mtp_loss", "balance_loss", "aux_loss", "z_loss", "val_loss", "lr",
            "grad_norm", "tokens_per_s", "tokens", "elapsed_s", "max_vio", "error")


# ====================================================================== records -> tables
def records_frame(records: list[dict]) -> pd.DataFrame:
    """Every record as one flat row: the scalar fields, then per-layer MaxVio, expert loads, router biases and
    FP8 counters as columns `max_vio_moe{l}`, `load_moe{l}_e{e}`, `bias_moe{l}_e{e}`, `fp8_{name}`.

    `moe{l}` counts the main model's MoE layers from 0 (layer `first_k_dense_replace + l` of the model)."""
    rows = []
    for r in records:
        row = {k: r.get(k) for k in _SCALARS}
        for li, v in enumerate(r.get("max_vio_layers") or []):
            row[f"max_vio_moe{li}"] = v
        for li, loads in enumerate(r.get("expert_loads") or []):
            for e, c in enumerate(loads):
                row[f"load_moe{li}_e{e}"] = c
        for li, bias in enumerate(r.get("router_bias") or []):
            for e, b in enumerate(bias):
                row[f"bias_moe{li}_e{e}"] = b
        for k, v in (r.get("fp8") or {}).items():
            if isinstance(v, (int, float)):
                row[f"fp8_{k}"] = v
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else list(_SCALARS))
    for c in ("val_loss", "mtp_loss", "max_vio"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def ema(values, alpha: float = 0.1) -> np.ndarray:
    """Exponential moving average (bias-corrected, so the first value is the first point), NaNs skipped."""
    out, m, w = [], 0.0, 0.0
    for v in values:
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            m = (1 - alpha) * m + alpha * float(v)
            w = (1 - alpha) * w + alpha
        out.append(m / w if w else float("nan"))
    return np.array(out)


def n_moe_layers(records: list[dict]) -> int:
    for r in records:
        if r.get("expert_loads"):
            return len(r["expert_loads"])
    return 0


def relative_loads(records: list[dict], layer: int | None = None) -> np.ndarray:
    """[steps, experts] load of each expert as a multiple of the fair share (1 = balanced).
    `layer` None: the mean over the MoE layers."""
    mats = []
    for r in records:
        loads = r.get("expert_loads")
        if not loads:
            continue
        a = np.asarray(loads, dtype=float)  # [layers, E]
        rel = a / np.maximum(a.sum(-1, keepdims=True), 1) * a.shape[-1]
        mats.append(rel.mean(0) if layer is None else rel[layer])
    return np.array(mats) if mats else np.zeros((0, 0))


def router_biases(records: list[dict], layer: int | None = None) -> np.ndarray:
    """[steps, experts] router bias b_i (aux-loss-free controller state); `layer` None: mean over layers."""
    mats = []
    for r in records:
        b = r.get("router_bias")
        if not b:
            continue
        a = np.asarray(b, dtype=float)
        mats.append(a.mean(0) if layer is None else a[layer])
    return np.array(mats) if mats else np.zeros((0, 0))


def lr_table(lrs: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"step": np.arange(1, len(lrs) + 1), "lr": lrs})


def final_losses(records: list[dict]) -> dict:
    """{'train': EMA of the LM loss at the last step, 'val': the last validation loss (or None)}."""
    lm = [r.get("lm_loss") if r.get("lm_loss") is not None else r.get("loss") for r in records]
    val = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    tr = ema(lm)
    return {"train": float(tr[-1]) if len(tr) else None, "val": float(val[-1]) if val else None}



def maxvio_table(runs: list[tuple[str, list[dict]]]) -> pd.DataFrame:
    """The data behind `overlay_maxvio`: one row per run and step (run, step, max_vio = mean over MoE layers)."""
    frames = []
    for label, recs in runs:
        df = records_frame(recs)
        if len(df) and df["max_vio"].notna().any():
            frames.append(df.loc[df["max_vio"].notna(), ["step", "max_vio"]].assign(run=label))
    cols = ["run", "step", "max_vio"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)
