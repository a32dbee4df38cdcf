"""FP8 lab dashboard: quantize test tensors with `core.fp8` (formats, granularities, current vs delayed scaling)
and measure the FP8 GEMM's accumulation error."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app import memory
from app.lab.knobs import FP8_SWITCH_OPTIONS, switch_label  # noqa: F401  (the page's switch labels)
from app.compute.common import torch_setup

FP8_SHAPE = (512, 512)
GRAN_LABELS = {"tensor": "per tensor", "row": "per row", "tile": "1×128 tile", "block": "128×128 block",
               "mx": "MX 1×32 (E8M0)"}
FMT_LABELS = {"e4m3": "E4M3", "e5m2": "E5M2", "bf16": "BF16"}
DATA_LABELS = {"gaussian": "Gaussian N(0,1)", "heavy_tail": "Heavy tail (Student-t, 3 dof)",
               "outliers": "Outlier channels"}


def _test_tensor(kind: str, seed: int, out_ch: int, out_scale: float, shape=FP8_SHAPE):
    from core import fp8
    torch_setup()
    return fp8.make_test_tensor(kind, shape, seed=seed, outlier_channels=out_ch, outlier_scale=out_scale)


def _hist(values, edges) -> list[int]:
    import numpy as np
    return np.histogram(values, bins=edges)[0].tolist()


@st.cache_data(max_entries=64, show_spinner=False)
@memory.heavy
def fp8_quantize(fmt: str, gran: str, overflow: str, kind: str, out_ch: int, out_scale: float, seed: int) -> dict:
    """Quantize one test tensor; error figures and the histogram of the scaled values over the format's grid."""
    import numpy as np

    from core import fp8

    torch = torch_setup()
    x, mask = _test_tensor(kind, seed, out_ch, out_scale)
    r = fp8.quantize_and_measure(x, fmt, gran, overflow=overflow, outlier_mask=mask if mask.any() else None)
    spec = fp8.get_format(fmt)
    # x / s per element: dequantize a tensor of ones (in the storage dtype) to broadcast each group's scale.
    s_full = fp8.dequantize(torch.ones_like(x).to(r["q"].dtype), r["scale"], gran)
    scaled = (x / s_full).abs().flatten().numpy().astype(np.float64)
    stored = r["q"].float().abs().flatten().numpy().astype(np.float64)
    lo_exp = int(np.floor(np.log2(spec.min_subnormal))) - 4
    hi_exp = int(np.ceil(np.log2(spec.max))) + 3
    if fmt == "bf16":
        nz = scaled[scaled > 0]
        lo_exp = int(np.floor(np.log2(nz.min()))) - 1 if nz.size else -24
        hi_exp = int(np.ceil(np.log2(max(nz.max(), 1.0)))) + 1 if nz.size else 24
    edges = 2.0 ** np.arange(lo_exp, hi_exp + 0.25, 0.25)
    hist = pd.DataFrame({"bin_low": edges[:-1], "bin_high": edges[1:],
                         "count_scaled_input": _hist(scaled, edges), "count_stored_fp8": _hist(stored, edges)})
    grid = fp8.representable_values(fmt)
    grid = grid[grid > 0].numpy().tolist() if fmt != "bf16" else []
    metrics = {k: v for k, v in r.items() if k not in ("q", "scale", "x_hat")}
    metrics.update(
        zero_inputs=int((scaled == 0).sum()), zero_stored=int((stored == 0).sum()), numel=int(scaled.size),
        below_min_subnormal=int(((scaled > 0) & (scaled < spec.min_subnormal / 2)).sum()),
        subnormal_range=int(((scaled >= spec.min_subnormal / 2) & (scaled < spec.min_normal)).sum()),
        max=spec.max, min_normal=spec.min_normal, min_subnormal=spec.min_subnormal, has_outliers=bool(mask.any()),
        scale_min=float(r["scale"].min()), scale_max=float(r["scale"].max()), n_scales=int(r["scale"].numel()),
        levels_used=int(np.unique(stored[stored > 0]).size), levels_total=len(grid) if grid else None)
    return {"metrics": metrics, "hist": hist, "grid": grid}


@st.cache_data(max_entries=32, show_spinner=False)
@memory.heavy
def fp8_granularity_sweep(fmt: str, out_ch: int, seed: int,
                          sizes: tuple = (1.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6)) -> pd.DataFrame:
    """SQNR of the non-outlier values for every granularity as the outlier channels grow (256×512 tensors)."""
    from core import fp8

    rows = []
    for size in sizes:
        x, mask = _test_tensor("outliers", seed, out_ch, size, shape=(256, 512))
        for g in fp8.GRANULARITIES:
            r = fp8.quantize_and_measure(x, fmt, g, outlier_mask=mask)
            rows.append({"granularity": g, "label": GRAN_LABELS[g], "outlier_size": size,
                         "sqnr_db_non_outlier": r["sqnr_db_non_outlier"], "sqnr_db_all": r["sqnr_db"],
                         "flushed_fraction_non_outlier": r["flushed_to_zero_fraction_non_outlier"],
                         "n_scales": r["n_scales"]})
    return pd.DataFrame(rows)


def _amplitude(step: int) -> float:
    """Activation scale over the simulated steps: flat, a steady rise, a one-step spike, then flat again."""
    if step < 12:
        return 1.0
    if step < 28:
        return 1.25 ** (step - 11)
    if step == 34:
        return 1.25 ** 16 * 8.0
    return 1.25 ** 16


@st.cache_data(max_entries=32, show_spinner=False)
@memory.heavy
def fp8_delayed_scaling(fmt: str, gran: str, overflow: str, kind: str, out_ch: int, out_scale: float,
                        history_len: int, algo: str, seed: int, steps: int = 44) -> pd.DataFrame:
    """Current vs delayed (amax-history) scaling over a sequence of steps whose magnitude rises and spikes
    (a fresh 64×256 tensor of the chosen data per step)."""
    from core import fp8

    torch_setup()
    scaler = fp8.DelayedScaler(fmt, gran, history_len=history_len, algo=algo)
    rows = []
    for t in range(steps):
        x, mask = _test_tensor(kind, seed + 1000 + t, out_ch, out_scale, shape=(64, 256))
        x = x * _amplitude(t)
        m = mask if mask.any() else None
        for name in ("current", "delayed"):
            if name == "current":
                q, s = fp8.quantize(x, fmt, gran, overflow=overflow)
            else:
                q, s = scaler.quantize(x, overflow=overflow)
            e = fp8.error_metrics(x, fp8.dequantize(q, s, gran), m, scale=s, fmt=fmt, granularity=gran)
            rows.append({"step": t, "scaling": name, "amax": float(x.abs().max()), "amplitude": _amplitude(t),
                         "sqnr_db": e["sqnr_db_non_outlier"] if m is not None else e["sqnr_db"],
                         "overflow_count": e["overflow_count"], "nonfinite_count": e["nonfinite_count"],
                         "flushed_to_zero_count": e["flushed_to_zero_count"]})
    return pd.DataFrame(rows)


@st.cache_data(max_entries=32, show_spinner=False)
@memory.heavy
def fp8_gemm_curves(acc_bits: int, promote_every: int, fmt: str, seed: int) -> pd.DataFrame:
    """Relative GEMM error vs K with a limited-precision accumulator, with and without promotion to FP32."""
    from core import fp8

    torch_setup()
    c = fp8.accumulation_error_curve(Ks=(128, 256, 512, 1024, 2048, 4096, 8192), M=32, N=32,
                                     acc_mantissa_bits=acc_bits, promote_every=promote_every,
                                     fmt=None if fmt == "bf16" else fmt, seed=seed)
    rows = []
    for i, k in enumerate(c["K"]):
        rows.append({"K": k, "accumulation": f"promotion every {promote_every}",
                     "max_rel_error": c["max_rel_promotion"][i], "fro_rel_error": c["fro_rel_promotion"][i]})
        rows.append({"K": k, "accumulation": "no promotion",
                     "max_rel_error": c["max_rel_no_promotion"][i], "fro_rel_error": c["fro_rel_no_promotion"][i]})
    return pd.DataFrame(rows)


@st.cache_data(max_entries=32, show_spinner=False)
@memory.heavy
def fp8_gemm_on_data(fmt: str, kind: str, out_ch: int, out_scale: float, seed: int) -> dict:
    """DeepSeek's FP8 GEMM (1×128 activation tiles, 128×128 weight blocks, FP32 per-block accumulation) on the
    chosen data as activations and Gaussian weights, against the FP32 product (DeepGEMM's calc_diff)."""
    from core import fp8

    torch = torch_setup()
    a, _ = _test_tensor(kind, seed, out_ch, out_scale, shape=(256, 512))
    g = torch.Generator().manual_seed(seed + 5)
    w = torch.randn(384, 512, generator=g) * 0.02
    ref = a @ w.T
    y = fp8.fp8_gemm(a, w, fmt=fmt)
    return {"calc_diff": fp8.calc_diff(y, ref),
            "rel_error": float((y - ref).norm() / ref.norm()), "shape": "A [256, 512] × Wᵀ [512, 384]"}


def fp8_bit_layout(value: float, fmt: str, overflow: str) -> tuple[dict, pd.DataFrame]:
    """`core.fp8.bit_layout` of `value` (rounded to `fmt`, no scaling) and the same as a one-row table."""
    from core import fp8
    torch_setup()
    b = fp8.bit_layout(value, fmt, overflow)
    return b, pd.DataFrame([b])


# ------------------------------------------------------------------ the training recipe, tensor by tensor
#: core.fp8.RECIPES and the switch options "", "-<switch>", "+<switch>" (static: the page imports no torch to draw
#: its knobs; tests/test_app_pages.py checks them against core).
RECIPE_NAMES = ("deepseek-v3", "deepseek-v3-fp32acc", "deepseek-gemm", "tensor-current", "tensor-delayed", "hybrid",
                "mxfp8", "rowwise")
SWITCH_OPTIONS = FP8_SWITCH_OPTIONS
SITE_LABELS = {"linear": "q/kv projections, FFN", "attn_out": "Linear after attention (o_proj)",
               "expert_up": "routed experts: up (dispatch)", "expert_down": "routed experts: down (combine)",
               "optimizer": "optimizer"}


def _cell(row: dict) -> str:
    """'E4M3 · 1x128 · 2^k' (format, scale granularity, power-of-2 scales); 'FP32' for an unscaled tensor."""
    if row["pow2_scale"] is None:
        return row["format"]
    return f"{row['format']} · {row['granularity']}" + (" · 2^k" if row["pow2_scale"] else "")


@st.cache_data(max_entries=2, show_spinner=False)
def fp8_recipe_table() -> pd.DataFrame:
    """One row per tensor of a layer (forward, backward, optimizer), one column per recipe of core.fp8.RECIPES:
    format · granularity · '2^k' when every scale is an integral power of 2. Built from core.fp8.recipe_table."""
    from core import fp8

    cols: dict[str, list[str]] = {}
    index: list[tuple] = []
    for name in fp8.RECIPES:
        rows = fp8.recipe_table(name)
        if not index:
            index = [(SITE_LABELS[r["site"]], r["pass"], r["gemm"], r["tensor"]) for r in rows]
        cols[name] = [_cell(r) for r in rows]
    df = pd.DataFrame(index, columns=["where", "pass", "GEMM", "tensor"])
    return pd.concat([df, pd.DataFrame(cols)], axis=1)


def recipe_notes(recipe: str, switch: str = "") -> tuple[str, str, list[str]]:
    """(resolved recipe name, its description, its notes: what the emulation still approximates)."""
    from core import fp8

    r = fp8.flip_switch(recipe, switch)
    return r.name, fp8.get_recipe(recipe).description, fp8.recipe_notes(r)


@st.cache_data(max_entries=16, show_spinner=False)
@memory.heavy
def fp8_tensor_errors(recipe: str, switch: str, seed: int) -> pd.DataFrame:
    """SQNR of every quantized tensor of the first MoE layer of the `mini` model under the recipe (one switch
    flipped), in one forward + backward on a batch of 2 x 64 synthetic tokens (core.fp8.probe.tensor_errors); the
    modules of one site are pooled (min SQNR). inf dB: the quantization was exact."""
    from core.fp8 import flip_switch
    from core.fp8.probe import tensor_errors

    torch_setup()
    rows = tensor_errors(flip_switch(recipe, switch), "mini", batch_size=2, seq_len=64, seed=seed)
    df = pd.DataFrame(rows)
    df["where"] = df["site"].map(SITE_LABELS)
    agg = (df.groupby(["where", "gemm", "tensor", "format", "granularity", "pow2_scale"], sort=False)
           .agg(sqnr_db=("sqnr_db", "min"), flushed_to_zero_fraction=("flushed_to_zero_fraction", "max"),
                modules=("module", lambda m: ", ".join(m)))
           .reset_index())
    return agg
