"""Measured GPU figures (docs/gpu_results.json, read by `core.cuda.results`): FP8 vs bf16 speed-ups, the FP8
validation-loss gap, absorbed vs naive MLA decode, the training step against transformers. Pure builders: rows in, plotly figure out."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app import palette
from app.charts.layout import hline, layout, vline
from core.cuda.results import gap_verdict
from core.units import human_bytes, ratio_text, tokens

_O = palette.OKABE_ITO


def _row_label(r) -> str:
    if r["kind"] == "linear":
        return f"linear {int(r['m']):,}×{int(r['k']):,}→{int(r['n']):,}"
    return r["what"]


def fp8_speedup_bars(df: pd.DataFrame) -> go.Figure:
    """FP8 over bf16 speed-up (bf16 time / FP8 time) per measured linear layer (forward + backward) and training
    step, as bars; the FP8 GEMM alone as markers; issue #14's target as a tick where a row has one (`target`).

    df: `core.cuda.results.fp8_rows` plus a `target` column (NaN where no target applies)."""
    d = df.iloc[::-1].reset_index(drop=True)  # plotly draws horizontal bars bottom-up: keep the file's order
    labels = [_row_label(r) for _, r in d.iterrows()]
    fig = go.Figure()
    fig.add_bar(y=labels, x=d["speedup"], orientation="h", name="FP8 layer / step (quantize + GEMMs + transposes)",
                marker_color=palette.FORMATS["fp8"],
                text=[ratio_text(v, t) for v, t in zip(d["speedup"], d["target"].astype(float))],
                textposition="outside", cliponaxis=False,
                customdata=np.stack([d["bf16_ms"], d["fp8_ms"]], axis=1),
                hovertemplate="%{y}: FP8 %{x:.2f}× bf16<br>bf16 %{customdata[0]:.2f} ms · FP8 %{customdata[1]:.2f} ms"
                              "<extra></extra>")
    g = d["gemm_only_speedup"].astype(float)
    if g.notna().any():
        fig.add_scatter(y=[lab for lab, v in zip(labels, g) if not np.isnan(v)], x=g.dropna(), mode="markers",
                        name="FP8 GEMM alone (no quantization)",
                        marker=dict(symbol="diamond", size=11, color=_O["black"]),
                        hovertemplate="%{y}: GEMM alone %{x:.2f}× bf16<extra></extra>")
    t = d["target"].astype(float)
    if t.notna().any():
        fig.add_scatter(y=[lab for lab, v in zip(labels, t) if not np.isnan(v)], x=t.dropna(), mode="markers",
                        name="target (issue #14)",
                        marker=dict(symbol="line-ns", size=26, line=dict(width=4, color=palette.HIGHLIGHT)),
                        hovertemplate="%{y}: target %{x:.2f}×<extra></extra>")
    vline(fig, 1.0, "bf16 (1×)", color=_O["grey"], dash="dash")
    n, fast = len(d), int((d["speedup"] > 1).sum())
    ib = int(d["speedup"].astype(float).idxmax())
    best, best_text = float(d["speedup"][ib]), ratio_text(float(d["speedup"][ib]), float(d["target"][ib]))
    gbest = float(g.max()) if g.notna().any() else None
    if fast == n:
        title = f"FP8 is faster than bf16 in all {n} measurements (up to {best_text})"
    else:
        title = (f"FP8 is faster than bf16 in only {fast} of {n} measurements: at best {best_text}"
                 + (f", though the FP8 GEMM alone reaches {gbest:.2f}×" if gbest else ""))
    sub = "bars: bf16 time / FP8 time of the same work in the same run (> 1 = FP8 faster); hover for the times"
    fig.update_xaxes(range=[0, max(best, gbest or 0, float(t.max()) if t.notna().any() else 0) * 1.18])
    return layout(fig, title, sub, "Speed-up of FP8 over bf16 (×)", None, height=140 + 46 * n, width_chars=85)


_LABELLED_SEEDS = 12  # more seeds than this: no value labels (they overlap), the hover has them


def fp8_loss_gap(row: dict, target: float) -> go.Figure:
    """Validation loss of the bf16 and FP8 runs (same seed, batches, steps) as points, one pair per seed, with the
    band of losses within `target` (relative) of each bf16 point shaded, and hollow circles for a repeat of each bf16
    run where the results hold that control. row: `core.cuda.results.lossgap_row`."""
    seeds = row.get("seed_losses") or {0: {"bf16": row["bf16_val_loss"], "fp8": row["fp8_val_loss"]}}
    secs = {"bf16": row["bf16_seconds"], "fp8": row["fp8_seconds"]}
    xs = [f"seed {k}" for k in seeds]
    fig = go.Figure()
    for k, x in zip(seeds, xs):
        bf = seeds[k]["bf16"]
        fig.add_shape(type="rect", x0=xs.index(x) - 0.3, x1=xs.index(x) + 0.3, y0=bf, y1=bf * (1 + target),
                      fillcolor=palette.FORMATS["bf16"], opacity=0.12, line_width=0)
    for key, name in (("bf16", "bf16"), ("fp8", f"FP8 ({row.get('recipe', 'deepseek-gemm')} recipe)")):
        ys = [v[key] for v in seeds.values()]
        fig.add_scatter(x=xs, y=ys, mode="markers+text" if len(seeds) <= _LABELLED_SEEDS else "markers", name=name,
                        marker=dict(size=16, color=palette.FORMATS[key], symbol="circle" if key == "bf16" else "diamond"),
                        text=[f"{y:.3f}" for y in ys], textposition="middle right" if key == "fp8" else "middle left",
                        cliponaxis=False,
                        hovertemplate="%{x}, " + name + ": %{y:.4f} nats/byte after " + f"{row['steps']} steps"
                                      f"<extra></extra>")
    again = [v.get("bf16_again") for v in seeds.values()]
    if all(a is not None for a in again):  # the control: the same bf16 run once more (GPU runs are not reproducible)
        fig.add_scatter(x=xs, y=again, mode="markers", name="bf16 again (same seed and batches)",
                        marker=dict(size=11, color="rgba(0,0,0,0)", line=dict(width=2, color=palette.FORMATS["bf16"])),
                        hovertemplate="%{x}, bf16 run again: %{y:.4f} nats/byte<extra></extra>")
    n = len(seeds)
    gap = row["gap"]
    verdict = gap_verdict(row, target)
    ci = row.get("gap_interval")
    span = f" (95% interval {100 * ci[0]:+.2f}% … {100 * ci[1]:+.2f}%)" if ci else ""
    verdict = {"within": f"within the {100 * target:g}% target",
               "outside": f"outside the {100 * target:g}% target",
               "unresolved": f"{n} seeds cannot tell whether it is within {100 * target:g}%",
               "one run": f"one seed, {'within' if abs(gap) <= target else 'outside'} {100 * target:g}% "
                          "(no noise estimate)"}[verdict]
    title = (f"FP8 ends {100 * gap:+.2f}% from bf16 in validation loss after {row['steps']} steps"
             + (f", mean of {n} seeds{span}" if n > 1 else "") + f": {verdict}")
    gaps = list((row.get("seed_gaps") or {}).values())
    per_seed = (f"gap per seed {', '.join(f'{100 * g:+.1f}%' for g in gaps)}" if n <= _LABELLED_SEEDS else
                f"gaps per seed {100 * min(gaps):+.1f}% … {100 * max(gaps):+.1f}% (hover a point for its value)")
    sub = (f"config {row['config']}, batch {row['batch']} × {row['seq_len']} tokens"
           + (f", lr {row['lr']:g}" if row.get("lr") else "") + "; per seed FP8 and bf16 saw the same batches"
           + (f"; {per_seed}" if n > 1 else "")
           + f"; shaded: within {100 * target:g}% of bf16; one FP8 run {secs['fp8']:.0f} s vs bf16 {secs['bf16']:.0f} s")
    ys = [v for d in seeds.values() for v in d.values()]
    lo, hi = min(ys), max(max(ys), max(d["bf16"] for d in seeds.values()) * (1 + target))
    pad = (hi - lo) * 0.3 + 1e-3
    fig.update_yaxes(range=[lo - pad, hi + pad])
    fig.update_xaxes(range=[-0.6, n - 0.4])
    return layout(fig, title, sub, None, "Validation loss (nats/byte)", height=400, width_chars=85)


def decode_throughput(df: pd.DataFrame) -> go.Figure:
    """Decode tokens/s of the absorbed (latent cache) and naive (per-head K/V cache) MLA paths vs context, one
    panel per batch size, the absorbed/naive ratio written at each point. df: `core.cuda.results.decode_rows`."""
    batches = sorted(df["batch"].unique())
    fig = make_subplots(rows=1, cols=len(batches), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[f"batch {b}" for b in batches])
    for i, b in enumerate(batches, start=1):
        d = df[df["batch"] == b].sort_values("context")
        for kind, name, dash in (("absorbed", "MLA", "solid"), ("naive", "MLA (naive)", "dash")):
            label = "absorbed (latent cache)" if kind == "absorbed" else "naive (per-head K/V cache)"
            fig.add_scatter(
                x=d["context"], y=d[f"{kind}_tokens_per_s"], name=label, legendgroup=kind, showlegend=i == 1,
                mode="lines+markers+text" if kind == "absorbed" else "lines+markers",
                text=[f"{s:.1f}×" for s in d["speedup"]] if kind == "absorbed" else None,
                textposition="top center",
                line=dict(color=palette.ATTENTION[name], width=3, dash=dash), marker=dict(size=7),
                customdata=np.stack([d[f"{kind}_ms"].astype(float), [human_bytes(v) for v in d[f"{kind}_cache_bytes"]],
                                     d["speedup"]], axis=1),
                hovertemplate=f"{label}, batch {b}<br>%{{x:,}} tokens: %{{y:,.0f}} tokens/s"
                              "<br>%{customdata[0]:.2f} ms per step · cache %{customdata[1]}"
                              "<br>absorbed / naive: %{customdata[2]:.1f}×<extra></extra>", row=1, col=i)
    ctx = sorted(df["context"].unique())
    fig.update_xaxes(type="log", tickvals=ctx, ticktext=[tokens(c) for c in ctx])
    ys = pd.concat([df["absorbed_tokens_per_s"], df["naive_tokens_per_s"]]).astype(float)
    # log axis: decades only, with room above the highest point for its ratio label
    fig.update_yaxes(type="log", dtick=1, range=[np.log10(ys.min()) - 0.15, np.log10(ys.max()) + 0.35])
    top = df[df["context"] == max(ctx)].set_index("batch")
    hi, lo = top.loc[max(batches)], top.loc[min(batches)]
    title = (f"At {tokens(max(ctx))} context the absorbed path decodes {hi['speedup']:.1f}× faster than naive at "
             f"batch {max(batches)}, but only {lo['speedup']:.1f}× at batch {min(batches)}")
    sub = (f"naive cache at {tokens(max(ctx))} × batch {max(batches)}: {human_bytes(hi['naive_cache_bytes'])}, "
           f"absorbed {human_bytes(hi['absorbed_cache_bytes'])}; labels: absorbed / naive tokens/s")
    layout(fig, title, sub, "Context (tokens per sequence, log scale)", "Decode throughput (tokens/s, log scale)",
           height=440, width_chars=85)
    for i in range(2, len(batches) + 1):
        fig.update_xaxes(title_text="Context (tokens per sequence, log scale)", row=1, col=i)
    return fig


def train_throughput_bars(df: pd.DataFrame, target: float) -> go.Figure:
    """Training tokens/s per config: Eva eager, Eva with compiled decoder blocks (where measured) and transformers'
    DeepseekV3ForCausalLM, as grouped horizontal bars; each Eva bar's label gives its ratio to transformers.

    df: `core.cuda.results.train_rows`; target: the ratio issue #14 asks of the largest config."""
    d = df.sort_values("params").reset_index(drop=True)
    labels = [f"{r['config']} ({r['params'] / 1e6:,.0f}M params)" for _, r in d.iterrows()]
    fig = go.Figure()
    series = [("transformers_tokens_per_s", None, "transformers (bf16, grouped_mm experts)", _O["grey"]),
              ("eva_tokens_per_s", "speedup", "Eva, eager", palette.FORMATS["bf16"]),
              ("compiled_tokens_per_s", "compiled_speedup", "Eva, compiled blocks (--compile)", _O["vermillion"])]
    for col, ratio, name, color in series:
        if d[col].isna().all():
            continue
        fig.add_bar(y=labels, x=d[col], name=name, orientation="h", marker_color=color,
                    text=[f"{t / 1e3:,.0f}k" + (f" · {x:.2f}×" if ratio else "") if t == t else ""
                          for t, x in zip(d[col], d[ratio] if ratio else d[col])],
                    textposition="outside", cliponaxis=False,
                    hovertemplate="%{y}: %{x:,.0f} tokens/s<extra>" + name + "</extra>")
    best = d.iloc[-1]
    reached = max(x for x in (best["speedup"], best["compiled_speedup"]) if x == x and x is not None)
    title = (f"Eva trains the {best['config']} config {reached:.2f}× as fast as transformers"
             f" ({'meets' if reached >= target else 'misses'} the {target:g}× target)")
    layout(fig, title, "tokens/s of each engine on the same batches, interleaved in one process "
                       "(× = Eva / transformers)", "training tokens per second (bf16, AdamW)", None, height=340)
    top = float(np.nanmax(d[["transformers_tokens_per_s", "eva_tokens_per_s", "compiled_tokens_per_s"]]
                          .astype(float).to_numpy()))
    fig.update_layout(barmode="group", yaxis=dict(autorange="reversed"))
    fig.update_xaxes(range=[0, top * 1.3])  # room for the labels outside the longest bar
    return fig
