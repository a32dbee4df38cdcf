"""FP8 lab: formats, scaling granularity, current vs delayed scaling, overflow, bit layout and GEMM accumulation —
every number computed by `core.fp8` on a seeded test tensor."""
import streamlit as st

from app import shell, sidebar, state, texts, ui
from app import gpu_view
from app.charts import fp8 as charts
from app.compute import fp8 as compute
from core.published import H800_FP8_ACCUM_BITS, V3_PROMOTION_INTERVAL

shell.require()  # run inside the entry point (see app/shell.py)

sh = sidebar.shared()
sb = st.sidebar
sb.subheader("FP8 knobs")
G = compute.GRAN_LABELS
with sb.expander("Quantization", expanded=True, icon=":material/data_array:"):
    fmt = state.radio("Format", "fp8_fmt", ["e4m3", "e5m2", "bf16"], "e4m3", fmt=compute.FMT_LABELS.get)
    gran = state.selectbox("Scaling granularity", "fp8_gran", list(G), "tensor", fmt=str,
                           help=" · ".join(f"{k}: {v}" for k, v in G.items()))
    overflow = state.radio("On overflow", "fp8_over", ["saturate", "nan"], "saturate",
                           fmt={"saturate": "saturate", "nan": "NaN / inf"}.get,
                           help="What a value beyond the format's max becomes (matters for delayed scaling).")
with sb.expander("Data", expanded=True, icon=":material/scatter_plot:"):
    kind = state.selectbox("Data", "fp8_data", list(compute.DATA_LABELS), "outliers", fmt=str,
                           help=" · ".join(f"{k}: {v}" for k, v in compute.DATA_LABELS.items()))
    out_ch = state.slider("Outlier channels (of 512)", "fp8_och", 1, 64, 4)
    out_scale = state.select_slider("Outlier size (× the other values)", "fp8_osz",
                                    [10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0], 10000.0,
                                    fmt=lambda v: f"{v:.0e}".replace("e+0", "e"))
with sb.expander("Delayed scaling & GEMM", expanded=False, icon=":material/history:"):
    hist_len = state.select_slider("amax history length (steps)", "fp8_hist", [1, 2, 4, 8, 16, 32, 64, 128], 16)
    algo = state.radio("amax from the history", "fp8_algo", ["max", "most_recent"], "max")
    acc_bits = state.slider("Accumulator mantissa bits", "fp8_accbits", 8, 23, H800_FP8_ACCUM_BITS - 1,
                            help=f"H800 FP8 tensor cores keep about {H800_FP8_ACCUM_BITS} bits "
                                 f"({H800_FP8_ACCUM_BITS - 1} explicit + the implicit one).")
    n_c = state.select_slider("Promote to FP32 every N_C products", "fp8_nc", [16, 32, 64, 128, 256, 512, 1024],
                              V3_PROMOTION_INTERVAL)

ui.page_header(texts.FP8_TITLE, texts.FP8_SUB, sh)
ui.explanation("How FP8 quantization works", texts.FP8_EXPLAIN, texts.FP8_EQUATIONS, lesson=sh.lesson)

if gran == "mx" and fmt == "bf16":
    ui.knob_error("Scaling granularity × Format",
                  "MX (1×32 blocks with power-of-two E8M0 scales) is a scheme for FP8/FP6/FP4 elements; BF16 needs "
                  "no scale. Pick E4M3 or E5M2, or another granularity.")
    st.stop()

q = compute.fp8_quantize(fmt, gran, overflow, kind, out_ch, out_scale, sh.seed)
m = q["metrics"]
outl = m["has_outliers"]
suffix = "_non_outlier" if outl else ""
anchor = {"e4m3": "≈31.6 dB on N(0,1), any granularity", "e5m2": "≈25.6 dB on N(0,1)",
          "bf16": "≈55.6 dB on N(0,1)"}[fmt]
with ui.cards():
    ui.number_with_formula("SQNR" + (" (non-outlier values)" if outl else ""), f"{m['sqnr_db' + suffix]:.1f} dB",
                           r"10\log_{10}\frac{\sum x^2}{\sum (x-\hat x)^2}", paper=anchor if kind == "gaussian" else None,
                           paper_label="Expected (reference measurement)",
                           detail=(f"whole tensor {m['sqnr_db']:.1f} dB — dominated by the outliers' energy"
                                   if outl else f"{compute.DATA_LABELS[kind]}, 512×512, seed {sh.seed}"))
    ui.number_with_formula("Relative error", f"{100 * m['rel_error' + suffix]:.2f}%",
                           r"\lVert x - \hat x\rVert_F / \lVert x\rVert_F",
                           detail=f"max |error| {m['max_abs_error' + suffix]:.3g}")
    ui.number_with_formula("Flushed to zero", f"{m['flushed_to_zero_count']:,}", r"\#\{x_i \ne 0,\ \hat x_i = 0\}",
                           detail=f"{100 * m['flushed_to_zero_fraction']:.2f}% of the values")
    ui.number_with_formula("Overflowed", f"{m['overflow_count']:,}", r"\#\{|x_i / s| > \text{max}_{\text{fmt}}\}",
                           detail="0 by construction with current scaling — see delayed scaling below; "
                                  f"{m['nonfinite_count']:,} became NaN/inf")
    ui.number_with_formula("Scales stored", f"{m['n_scales']:,}", r"32 \cdot n_{\text{scales}} / n\ \text{bits/value}",
                           detail=f"{G[gran]}: {32 * m['n_scales'] / m['numel']:.3f} extra bits per value "
                                  f"(FP32 scales{'; E8M0 would need 8' if gran == 'mx' else ''})")
    ui.number_with_formula("Levels used", f"{m['levels_used']:,}" + (f" / {m['levels_total']}" if m["levels_total"]
                                                                    else ""),
                           r"\#\{\,|q_i|\ \text{distinct}, > 0\}",
                           detail="distinct positive values the stored tensor uses; "
                                  f"{m['subnormal_range']:,} values in the subnormal range")

ui.chart(ui.fig(charts.fp8_histogram, q["hist"], q["grid"], m, fmt, G[gran]), q["hist"], "fp8 histogram",
         key="fp8_hist", lesson=sh.lesson,
         notice="Every bar left of the 'smallest subnormal' line is lost (rounded to 0); bars between the two "
                "dotted lines on the left have fewer mantissa bits. Per-tensor scaling with outliers shifts the "
                "whole bulk of the distribution to the left.")

st.subheader("Bit layout of a number")
with st.container(horizontal=True, gap="medium", vertical_alignment="center"):
    value = state.number("Type a number", "fp8_val", 3.14159, format="%.6g", step=0.1, width=240,
                         help="Rounded (no scaling) to the chosen format.")
    b, b_table = compute.fp8_bit_layout(float(value), fmt, overflow)
    spec_bits = {"e4m3": (4, 3), "e5m2": (5, 2), "bf16": (8, 7)}[fmt]
    st.markdown(f"$({'-' if b['sign'] else '+'}1) \\times 2^{{{b['unbiased_exponent']}}} \\times "
                f"{'0' if b['is_subnormal'] or b['is_zero'] else '1'}.{b['mantissa']}_2 = {b['value']:.6g}$"
                if not (b["is_nan"] or b["is_inf"]) else f"**{b['value']}**")
with st.container(width=680):
    ui.chart(ui.fig(charts.bit_layout, b, fmt, *spec_bits), b_table, "bit layout", key="fp8_bits",
             lesson=sh.lesson, notice="Change one digit of the number and watch which bits move: the exponent "
                                      "picks the power of two, the few mantissa bits pick the step inside it.")

st.subheader("Scaling granularity under outliers")
sweep_fmt = "e4m3" if fmt == "bf16" else fmt
sweep = compute.fp8_granularity_sweep(sweep_fmt, out_ch, sh.seed)
ui.chart(ui.fig(charts.granularity_sweep, sweep, out_scale, sweep_fmt, out_ch), sweep,
         "granularity vs outliers", key="fp8_sweep", lesson=sh.lesson,
         notice="All granularities agree on well-behaved data. Push the outliers up: the per-tensor line "
                "falls first, the 1×128 tile and MX lines last — the reason DeepSeek-V3 uses fine-grained "
                "scales.", caption="BF16 needs no scaling: the sweep shows E4M3." if fmt == "bf16" else None)

st.subheader("Current vs delayed scaling")
dl = compute.fp8_delayed_scaling(fmt, gran, overflow, kind, out_ch, out_scale, hist_len, algo, sh.seed)
ui.chart(ui.fig(charts.delayed_scaling, dl, hist_len, algo), dl, "delayed scaling", key="fp8_delayed",
         lesson=sh.lesson,
         notice="Current scaling's SQNR stays flat. The delayed scaler computes this step's scale from past "
                "amax values, so while the magnitude rises (and at the spike) values land beyond the max.")

st.subheader("GEMM accumulation: why promote every 128")
g = compute.fp8_gemm_curves(acc_bits, n_c, fmt, sh.seed)
ui.chart(ui.fig(charts.gemm_error, g, n_c, acc_bits), g, "gemm error vs k", key="fp8_gemm", lesson=sh.lesson,
         notice="Without promotion the accumulator's rounding error grows linearly with K; with promotion it "
                "is bounded by the error of N_C products, independent of K.")
if fmt != "bf16":
    gd = compute.fp8_gemm_on_data(fmt, kind, out_ch, out_scale, sh.seed)
    with ui.cards():
        ui.number_with_formula("DeepSeek FP8 GEMM on this data", f"calc_diff = {gd['calc_diff']:.1e}",
                               r"1 - \frac{2\sum xy}{\sum x^2 + \sum y^2}",
                               paper="DeepGEMM test threshold < 1e-3",
                               detail=f"{gd['shape']}, 1×128 activation tiles × 128×128 weight blocks, FP32 "
                                      f"accumulation per block; relative error {100 * gd['rel_error']:.2f}%",
                               width=420)

gpu_view.fp8_section(sh.lesson)
