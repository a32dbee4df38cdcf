"""The "Measured on a GPU" sections of the FP8 and MLA pages: the H200 figures that `bench/gpu_bench.py` wrote to
docs/gpu_results.json (loaded by `core.cuda.results`), labelled with device, versions and date, with the issue #14
target each one was measured against (met or missed, shown either way), a chart and its CSV.

    gpu_view.fp8_section(lesson)    # FP8 vs bf16 linear layers and training steps, validation-loss gap
    gpu_view.mla_section(lesson)    # absorbed vs naive decode, batch 1 and 8, 4k-32k context
    gpu_view.train_section(lesson)  # the bf16 training step against transformers, eager and compiled, MFU

A missing or malformed results file gives a message, never a traceback."""
from __future__ import annotations

import math
import os

import pandas as pd
import streamlit as st

from app import ui
from app.charts import gpu as charts
from core.config import ModelConfig
from core.cuda import results
from core.units import human_bytes, ratio_text, tokens

RESULTS_PATH = results.DEFAULT_PATH
_SHOWN_PATH = "docs/gpu_results.json"

# The targets of issue #14 ("Targets (H200, ratios measured in one run)"); docs/performance.md reports each as met
# or missed. They apply to the largest measured shape / config (the issue: "at large shapes", "hidden >= 4096").
TARGET_FP8_LINEAR = 1.4   # FP8 linear layer forward + backward vs bf16
TARGET_FP8_STEP = 1.3     # FP8 training step vs the bf16 step
TARGET_LOSS_GAP = 0.01    # FP8 validation loss within 1% of bf16
TARGET_DECODE = 3.0       # absorbed vs naive decode tokens/s at the longest context, batch 8
TARGET_TRAIN = 1.5        # bf16 training step vs transformers on the 920M config


@st.cache_data(max_entries=4, show_spinner=False)
def _load(path: str, mtime_ns: int) -> dict:
    """Label and rows of the results file at `path` (`mtime_ns` keys the cache: a rewritten file is re-read), or
    {"error": message} if it is not a results file of bench/gpu_bench.py."""
    try:
        res = results.load_gpu_results(path)
        if res is None:
            return {"missing": True}
        return {"label": results.label(res), "fp8": results.fp8_rows(res), "scaling": results.scaling_rows(res),
                "lossgap": results.lossgap_row(res), "decode": results.decode_rows(res),
                "train": results.train_rows(res)}
    except ValueError as e:
        return {"error": str(e)}
    except (KeyError, TypeError, AttributeError) as e:  # valid JSON with a field missing or of the wrong type
        return {"error": f"gpu results: {path} lacks a field the app reads ({type(e).__name__}: {e})"}


def _results(path: str | None) -> dict | None:
    """The loaded results, or None after showing why there are none."""
    path = os.fspath(path or RESULTS_PATH)
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        mtime = None
    r = {"missing": True} if mtime is None else _load(path, mtime)
    if r.get("missing"):
        st.info(f"No GPU measurements to show: `{_SHOWN_PATH}` is not there. Write it on a CUDA machine with "
                f"`python bench/gpu_bench.py --out {_SHOWN_PATH}`.", icon=":material/info:")
        return None
    if "error" in r:
        st.warning(f"The GPU measurements cannot be shown: {r['error']}. Re-run `bench/gpu_bench.py` to rewrite "
                   "the file.", icon=":material/warning:")
        return None
    return r


def _heading(title: str, r: dict) -> None:
    st.subheader(f"Measured on a GPU: {title}")
    st.caption(f"**{r['label']}** · measured by `bench/gpu_bench.py` (each reference and contender timed in the same "
               f"process), committed in `{_SHOWN_PATH}`; method and profiles in `docs/performance.md`.")


def _verdict(value: float, target: float, *, above: bool = True) -> str:
    met = value >= target if above else value <= target
    return "met" if met else "missed"


def fp8_frame(rows: list[dict]) -> pd.DataFrame:
    """`core.cuda.results.fp8_rows` as a table with a `target` column: issue #14's target on the largest linear
    shape (M·K·N) and on the largest training-step config (parameters; every batch measured of it), NaN elsewhere."""
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["target"] = math.nan
    lin, step = df[df["kind"] == "linear"], df[df["kind"] == "step"]
    if not lin.empty:
        df.loc[(lin["m"] * lin["k"] * lin["n"]).astype(float).idxmax(), "target"] = TARGET_FP8_LINEAR
    if not step.empty and step["params"].notna().any():
        params = step["params"].astype(float)
        df.loc[params[params == params.max()].index, "target"] = TARGET_FP8_STEP
    return df


def loss_gap_verdict(lg: dict, target: float) -> str:
    """"met" / "missed" for the loss-gap target when the seeds' 95% interval decides it
    (`core.cuda.results.gap_verdict`), else why the runs cannot decide it."""
    v = results.gap_verdict(lg, target)
    if v == "unresolved":
        lo, hi = lg["gap_interval"]
        return (f"not resolvable with {len(lg['seed_gaps'])} seeds: the 95% interval of the mean gap, "
                f"{100 * lo:+.2f}% … {100 * hi:+.2f}%, crosses ±{100 * target:g}%")
    if v == "one run":
        return _verdict(abs(lg["gap"]), target, above=False) + " (one seed: no noise estimate)"
    return "met" if v == "within" else "missed"


def _fp8_limits(big, lin: pd.DataFrame) -> str:
    """What keeps the FP8 layer below its GEMM's speed-up, from the results (which quantizers ran)."""
    slow = lin[lin["speedup"] < 1]
    text = (f"**What limits FP8 here.** At {int(big['m']):,}×{int(big['k']):,}→{int(big['n']):,} the FP8 GEMM "
            f"alone is {big['gemm_only_speedup']:.2f}× bf16, the whole layer "
            f"{ratio_text(big['speedup'], TARGET_FP8_LINEAR)}. ")
    if big.get("fused_quantizers"):
        text += ("Each operand (x, W and the incoming gradient) is read once by a fused kernel that writes both "
                 "layouts its GEMMs need, the 1×128 tiles and the transposed tiles for Dgrad/Wgrad")
        if big.get("unfused_speedup"):
            text += f" (with two-pass quantizers and transposed copies instead: {big['unfused_speedup']:.2f}×)"
        text += ("; those passes are memory-bound and still cost a share of the GEMM's gain, more so at small "
                 "shapes where the GEMM itself is short")
    else:
        text += ("Every operand is first quantized (two compiled kernels, an amax reduction then the "
                 "scale-and-cast) and Dgrad/Wgrad need transposed copies of the operands; these kernels eat the "
                 "GEMM's gain")
    if len(slow):
        text += f"; at {len(slow)} of the {len(lin)} shapes the FP8 layer is slower than bf16"
    return text + ". The profiles are in `docs/performance.md`."


def fp8_section(lesson: bool = False, path: str | None = None) -> None:
    """FP8 vs bf16 on the GPU: linear layers (forward + backward) and training steps, then the loss gap."""
    r = _results(path)
    if r is None:
        return
    _heading("FP8 vs bf16", r)
    st.markdown(gpu_recipes_text())
    if not r["fp8"] and not r["lossgap"]:
        st.info("The results file holds no FP8 measurements (sections `gemm`, `fp8step`, `lossgap`).",
                icon=":material/info:")
        return
    df = fp8_frame(r["fp8"])
    targeted = df[df["target"].notna()] if not df.empty else df
    with ui.cards():
        for _, row in targeted.iterrows():
            what = "FP8 linear, largest shape" if row["kind"] == "linear" else f"FP8 {row['what']}"
            ui.number_with_formula(what, ratio_text(row["speedup"], row["target"]),
                                   r"t_{\text{bf16}} / t_{\text{FP8}}",
                                   paper=f"≥ {row['target']:g}× — {_verdict(row['speedup'], row['target'])}",
                                   paper_label="Target", detail=f"bf16 {row['bf16_ms']:.1f} ms, FP8 "
                                                                f"{row['fp8_ms']:.1f} ms")
        lg = r["lossgap"]
        if lg:
            n = len(lg["seed_gaps"])
            ui.number_with_formula("FP8 validation-loss gap" + (f", mean of {n} seeds" if n > 1 else ""),
                                   f"{100 * lg['gap']:+.2f}%", r"L_{\text{FP8}} / L_{\text{bf16}} - 1",
                                   paper=f"within {100 * TARGET_LOSS_GAP:g}% — {loss_gap_verdict(lg, TARGET_LOSS_GAP)}",
                                   paper_label="Target", detail=f"after {lg['steps']} steps of {lg['batch']}×"
                                                                f"{lg['seq_len']} tokens, config {lg['config']}")
    if not df.empty:
        ui.chart(ui.fig(charts.fp8_speedup_bars, df), df, "gpu fp8 vs bf16", key="gpu_fp8", lesson=lesson,
                 notice="Compare each bar with its diamond: the diamond is what the FP8 tensor cores give, the bar "
                        "what is left once the operands are quantized and transposed.")
        lin = df[df["kind"] == "linear"]
        g = lin["gemm_only_speedup"].astype(float)
        if g.notna().any():
            big = lin.loc[(lin["m"] * lin["k"] * lin["n"]).astype(float).idxmax()]
            st.markdown(_fp8_limits(big, lin))
    if r.get("scaling"):
        st.markdown(scaling_text(r["scaling"]))
        st.dataframe(scaling_frame(r["scaling"]), hide_index=True)
    lg = r["lossgap"]
    if lg:
        gap = (pd.DataFrame([{"seed": k, "bf16_val_loss": v["bf16"], "fp8_val_loss": v["fp8"],
                              "relative_gap": lg["seed_gaps"][k],
                              **({"bf16_again_val_loss": v["bf16_again"]} if "bf16_again" in v else {})}
                             for k, v in lg["seed_losses"].items()])
               if lg.get("seed_losses") else pd.DataFrame([lg]))  # one row per seed: the chart's points
        n = max(1, len(lg.get("seed_losses") or {}))
        with st.container(width=min(1100, 440 + 80 * n)):  # a pair of points per seed: full width only for many
            ui.chart(ui.fig(charts.fp8_loss_gap, lg, TARGET_LOSS_GAP), gap, "gpu fp8 loss gap", key="gpu_lossgap",
                     lesson=lesson,
                     notice="Both runs saw the same batches in the same order from the same seed: the distance "
                            "between the points is what FP8 costs in quality at this size and step count, plus "
                            "the run-to-run noise of GPU training.")
        if lg.get("repeat_gaps"):
            st.markdown(_noise_text(lg))


_SCALING_NAMES = {"tensor": "per tensor", "row": "per row", "block": "1×128 tiles × 128×128 blocks (V3 Fprop, Dgrad)",
                  "tile": "1×128 tiles × 1×128 tiles (V3 Wgrad)"}


def gpu_recipes_text() -> str:
    """Which FP8 recipes run real FP8 GEMMs on a GPU and what keeps the others emulated
    (`core.cuda.fp8_linear.gpu_recipe_gaps`, from the one list of the switches the GPU path implements)."""
    from core.cuda.fp8_linear import gpu_recipe_gaps
    from core.fp8 import RECIPES
    gaps = {n: gpu_recipe_gaps(n) for n in RECIPES}
    real = [n for n, v in gaps.items() if not v]
    other = {n: v for n, v in gaps.items() if v}
    return (f"**What runs on the GPU.** With `--device cuda`, recipe {', '.join(f'`{n}`' for n in real)} runs real FP8 "
            "GEMMs (Fprop, Dgrad and Wgrad, E4M3, 1×128 tiles and 128×128 blocks, fp32 master weights) for every "
            "Linear but the embedding, output head and router, which stay high precision (V3 §3.3.1); "
            "`--fp8-experts` puts the routed experts' GEMMs in FP8 too (one GEMM per expert: host-bound with many "
            "small experts, docs/performance.md), otherwise they stay bf16 grouped GEMMs. The other recipes run emulated (fake quantization) on "
            "the GPU, for the switches the GPU path lacks: "
            + "; ".join(f"`{n}` ({', '.join(v)})" for n, v in other.items()) + ".")


def scaling_frame(rows: list[dict]) -> pd.DataFrame:
    """`core.cuda.results.scaling_rows` as a table: one row per scaling, one TFLOP/s column per operand pair
    ("refused" where cuBLAS refused it)."""
    df = pd.DataFrame(rows)
    df["pair"] = df["a"].str.upper() + " × " + df["b"].str.upper()
    df["value"] = [f"{t:,.0f}" if t == t and t is not None else "refused" for t in df["tflops"]]
    out = df.pivot(index="scaling", columns="pair", values="value").reindex(
        [k for k in _SCALING_NAMES if k in set(df["scaling"])])
    out.index = [_SCALING_NAMES[k] for k in out.index]
    return out.rename_axis(f"scaling (TFLOP/s at {int(df['n'].iloc[0]):,}³)").reset_index()


def scaling_text(rows: list[dict]) -> str:
    """What finer scaling costs the FP8 GEMM, and which scalings E5M2 operands can use, from the measured rows."""
    e4 = {r["scaling"]: r["tflops"] for r in rows if r["a"] == r["b"] == "e4m3" and r["tflops"]}
    text = f"**What the scaling costs the GEMM** ({rows[0]['n']:,}³, the FP8 GEMM alone)."
    if "tensor" in e4:
        parts = [f"{_SCALING_NAMES[k]} {v:,.0f} TFLOP/s" + (f" ({100 * v / e4['tensor']:.0f}% of per tensor)"
                                                             if k != "tensor" else "") for k, v in e4.items()]
        text += " E4M3 × E4M3: " + "; ".join(parts) + ". Finer scales cost the tensor cores some speed: V3's " \
                                                       "fine-grained quantization buys accuracy with it (§3.3.2)."
    e5 = [r for r in rows if "e5m2" in (r["a"], r["b"])]
    ran = sorted({_SCALING_NAMES[r["scaling"]] for r in e5 if r["tflops"]})
    refused = sorted({_SCALING_NAMES[r["scaling"]] for r in e5 if not r["tflops"]} - set(ran))
    if e5 and refused:
        both = [r for r in e5 if r["a"] == r["b"]]
        text += (f" With an E5M2 operand only {', '.join(ran) or 'no scaling'} ran here"
                 + (" (and no scaling with two)" if both and not any(r["tflops"] for r in both) else "") + "; "
                 f"{', '.join(refused)} were refused: fine-grained scaling takes E4M3 gradients, which is what V3 "
                 f"uses for every operand (§3.3.2), and what Eva's GPU path runs.")
    return text


def _noise_text(lg: dict) -> str:
    """The bf16-vs-bf16 control of the loss-gap runs (`core.cuda.results.lossgap_row`) in words."""
    reps = list(lg["repeat_gaps"].values())
    more = lg["gap_sd"] > lg["repeat_gap_sd"]
    text = (f"**Noise without FP8.** Each seed's bf16 run was run a second time (same initial weights, same "
            f"batches): the two bf16 runs ended {100 * min(map(abs, reps)):.2f}–{100 * max(map(abs, reps)):.2f}% "
            f"apart, a standard deviation of {100 * lg['repeat_gap_sd']:.2f}% across the {len(reps)} seeds: GPU "
            f"training here is not bit-reproducible from run to run, and {lg['steps']} steps amplify the first "
            f"differences. FP8 against bf16 spreads {100 * lg['gap_sd']:.2f}%"
            + (" — FP8's rounding moves a run further than that noise alone" if more else
               " — no more than that noise alone") + f"; its mean effect is {100 * lg['gap']:+.2f}%")
    if results.gap_verdict(lg, TARGET_LOSS_GAP) == "unresolved":
        text += f", and whether that is within {100 * TARGET_LOSS_GAP:g}% needs more seeds or less noisy runs"
    return text + "."


def _section_rows(path: str | None, title: str, key: str, what: str) -> list[dict] | None:
    """The heading and label of a one-section view and its rows (`_load`'s `key`), or None after saying why there
    are none (no results file, or none of `what` in it: bench section `key`)."""
    r = _results(path)
    if r is None:
        return None
    _heading(title, r)
    if not r[key]:
        st.info(f"The results file holds no {what} (section `{key}`).", icon=":material/info:")
        return None
    return r[key]


def mla_section(lesson: bool = False, path: str | None = None) -> None:
    """Absorbed vs naive MLA decode on the GPU: tokens/s and cache bytes per context and batch."""
    rows = _section_rows(path, "absorbed vs naive decode", "decode", "decode measurements")
    if rows is None:
        return
    df = pd.DataFrame(rows)
    v3 = ModelConfig()  # the bench's decode layer: ModelConfig() defaults, DeepSeek-V3's dimensions
    longest = df[df["context"] == df["context"].max()].set_index("batch")
    b_hi, b_lo = int(longest.index.max()), int(longest.index.min())
    with ui.cards():
        for b in sorted({b_hi, b_lo}, reverse=True):
            s = longest.loc[b, "speedup"]
            ui.number_with_formula(f"Absorbed / naive, {tokens(int(df['context'].max()))} context, batch {b}",
                                   f"{s:.1f}×", r"t_{\text{naive}} / t_{\text{absorbed}}",
                                   paper=(f"≥ {TARGET_DECODE:g}× at batch {b} — {_verdict(s, TARGET_DECODE)}"
                                          if b == b_hi else None), paper_label="Target",
                                   detail=f"{longest.loc[b, 'absorbed_tokens_per_s']:,.0f} vs "
                                          f"{longest.loc[b, 'naive_tokens_per_s']:,.0f} tokens/s")
    ui.chart(ui.fig(charts.decode_throughput, df), df, "gpu mla decode", key="gpu_decode", lesson=lesson,
             notice=f"At batch {b_hi} the naive line falls as the context doubles (its cache doubles) while the "
                    f"absorbed line stays nearly flat; at batch {b_lo} the two lines nearly coincide.",
             caption=f"One MLA layer with DeepSeek-V3's dimensions (hidden {v3.hidden_size}, "
                     f"{v3.num_attention_heads} heads, latent d_c = {v3.kv_lora_rank} + RoPE key "
                     f"{v3.qk_rope_head_dim}), bf16 cache filled to the context, one new token per sequence.")
    if b_lo == b_hi:
        return
    one, many = df[df["batch"] == b_lo].sort_values("context"), df[df["batch"] == b_hi].sort_values("context")
    t1 = pd.concat([one["absorbed_ms"], one["naive_ms"]]).astype(float)
    c0, c1 = one.iloc[0], one.iloc[-1]
    first, last = many.iloc[0], many.iloc[-1]
    bw = last["naive_cache_bytes"] / (last["naive_ms"] * 1e-3) / 1e9
    st.markdown(
        f"**Why batch {b_lo} gains little.** At batch {b_lo} both paths take {t1.min():.2f}–{t1.max():.2f} ms per "
        f"step at every context, although the naive cache grows "
        f"{c1['naive_cache_bytes'] / c0['naive_cache_bytes']:.0f}× "
        f"({human_bytes(c0['naive_cache_bytes'])} → {human_bytes(c1['naive_cache_bytes'])}): at this size most of "
        "the step time is a fixed cost that barely grows with the bytes of cache read, so reading "
        f"{c1['naive_cache_bytes'] / c1['absorbed_cache_bytes']:.0f}× fewer bytes saves little. At batch "
        f"{b_hi} the naive step time grows with its cache ({first['naive_ms']:.1f} → {last['naive_ms']:.1f} ms, "
        f"{human_bytes(last['naive_cache_bytes'])} read at ~{bw:,.0f} GB/s) while the absorbed one stays at "
        f"{many['absorbed_ms'].min():.2f}–{many['absorbed_ms'].max():.2f} ms.")


def train_section(lesson: bool = False, path: str | None = None, chart_on_request: bool = False) -> None:
    """The engine's bf16 training step on a GPU against transformers' DeepseekV3ForCausalLM: tokens/s, the ratio
    (eager and with compiled decoder blocks) and MFU per config; issue #14's target on the largest config.
    chart_on_request: the chart only once its toggle is on (a page whose first view must not load plotly)."""
    rows = _section_rows(path, "training step vs transformers", "train", "training-step measurements")
    if rows is None:
        return
    df = pd.DataFrame(rows)
    big = df.loc[df["params"].idxmax()]
    shape = f"{int(big['batch'])}×{int(big['seq_len'])} tokens a step" if big.get("batch") else "its bench batch"
    with ui.cards():
        for label, ratio, mfu in (("eager", big["speedup"], big["eva_mfu"]),
                                  ("compiled blocks", big["compiled_speedup"], big["compiled_mfu"])):
            if ratio is None or ratio != ratio:
                continue
            ui.number_with_formula(f"Eva vs transformers, {big['config']}, {label}", ratio_text(ratio, TARGET_TRAIN),
                                   r"\text{tok/s}_{\text{Eva}} / \text{tok/s}_{\text{transformers}}",
                                   paper=f"≥ {TARGET_TRAIN:g}× — {_verdict(ratio, TARGET_TRAIN)}", paper_label="Target",
                                   detail=f"MFU {100 * mfu:.1f}% of the bf16 matmul peak measured in the run; {shape}")
    if chart_on_request and not st.toggle("Tokens/s of every measured config (chart and CSV)", key="gpu_train_chart"):
        return
    ui.chart(ui.fig(charts.train_throughput_bars, df, TARGET_TRAIN), df, "gpu training vs transformers",
             key="gpu_train", lesson=lesson,
             notice="Both engines train the same DeepSeek-V3 architecture on the same batches, timed in turn in one "
                    "process; docs/performance.md profiles where each step's time goes.")
