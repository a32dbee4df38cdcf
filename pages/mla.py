"""MLA & KV cache: the cache formula for MHA / GQA / MQA / MLA, what fits in GPU memory, and a measured run of the
real `core.attention.MLA` module (cache bytes, naive vs absorbed decode, attention map, rank truncation)."""
import json

import streamlit as st

from app import shell, sidebar, state, texts, ui
from app import gpu_view
from app.charts import mla as charts
from app.compute import mla as compute
from app.compute.common import BYTES_PER_ELEMENT
from core.config import ConfigError
from core.published import PAPER_FIGURES, PUBLISHED_CONFIGS
from core.units import human_bytes, tokens

shell.require()  # run inside the entry point (see app/shell.py)

sh = sidebar.shared()
cfg = sh.cfg
f = sh.model_id
sb = st.sidebar
sb.subheader("MLA knobs")
P2 = [2**i for i in range(3, 13)]
with sb.expander("Architecture", expanded=True, icon=":material/architecture:"):
    d_c = state.select_slider("KV latent dim d_c", "mla_dc", sorted({*P2, 192, 384, 576, 768, 1536}), cfg.kv_lora_rank,
                              follow=f, help="kv_lora_rank: numbers cached per token per layer (plus the RoPE key).")
    rope = state.select_slider("RoPE key dim d_h^R", "mla_rope", [2, 4, 8, 16, 32, 64, 128, 256], cfg.qk_rope_head_dim,
                               follow=f, help="qk_rope_head_dim: the decoupled, position-carrying key shared by all heads.")
    heads = state.select_slider("Attention heads n_h", "mla_heads", [1, 2, 4, 8, 16, 32, 64, 128, 256],
                                cfg.num_attention_heads, follow=f)
    d_h = state.select_slider("Head dim d_h (values; baselines' K and V)", "mla_dh", [8, 16, 32, 64, 128, 256],
                              cfg.v_head_dim, follow=f)
    nope = state.select_slider("Key dim without RoPE d_h^nope", "mla_nope", [0, 8, 16, 32, 64, 128, 256],
                               cfg.qk_nope_head_dim, follow=f)
    q_opts = ["none"] + sorted({64, 128, 256, 512, 768, 1024, 1536, 2048, 3072} | (
        {cfg.q_lora_rank} if cfg.q_lora_rank else set()))
    q_rank = state.selectbox("Query latent dim d'_c", "mla_q", q_opts,
                             cfg.q_lora_rank if cfg.q_lora_rank else "none", follow=f,
                             help="q_lora_rank ('none' = no query compression). Changes parameters, not the cache.")
    layers = state.slider("Layers L", "mla_layers", 1, 128, cfg.num_hidden_layers, follow=f)
    h0 = cfg.num_attention_heads
    g0 = next((g for g in (8, 4, 2) if h0 % g == 0 and g < h0), 1)  # a divisor of the heads: a valid default
    groups = state.slider("GQA groups n_g (baseline)", "mla_groups", 1, 256, g0, follow=f,
                          help="K/V heads of the GQA baseline; must divide the number of heads.")
with sb.expander("Serving", expanded=True, icon=":material/dns:"):
    context = state.select_slider("Context (tokens per sequence)", "mla_ctx", [2**i for i in range(10, 21)], 131072,
                                  fmt=tokens)
    batch = state.select_slider("Batch (sequences)", "mla_batch", [1, 2, 4, 8, 16, 32, 64, 128, 256], 1)
    dtype = state.radio("Cache dtype", "mla_dtype", ["bf16", "fp8", "fp32"], "bf16")
    gpus = state.select_slider("GPUs", "mla_gpus", [1, 2, 4, 8, 16, 32, 64], 8)
    gpu_mem = state.select_slider("Memory per GPU (GiB)", "mla_gpumem", [16, 24, 32, 40, 48, 80, 96, 141, 192], 80)
    wdtype = state.radio("Weights dtype", "mla_wdtype", ["fp8", "bf16"], "fp8")
    log = state.toggle("Log scale for memory", "mla_log", True)

ui.page_header(texts.MLA_TITLE, texts.MLA_SUB, sh)
ui.explanation("How MLA shrinks the cache", texts.MLA_EXPLAIN, texts.MLA_EQUATIONS, lesson=sh.lesson)

arch = dict(kv_lora_rank=d_c, qk_rope_head_dim=rope, num_attention_heads=heads, v_head_dim=d_h,
            qk_nope_head_dim=nope, q_lora_rank=None if q_rank == "none" else int(q_rank), num_hidden_layers=layers,
            num_key_value_heads=heads)
try:
    arch_json = compute.mla_arch(sh.cfg_json, **arch)
    compute.check_groups(arch_json, groups)
except ConfigError as e:
    ui.config_error(e, compute.MLA_FIELD_LABELS)
    st.stop()

kv = compute.kv_vs_context(arch_json, context, batch, dtype, groups)
per = kv[kv["context_tokens"] == context].set_index("kind")
e_mla, e_mha = per.loc["MLA", "elements_per_token"], per.loc["MHA", "elements_per_token"]
bpe = BYTES_PER_ELEMENT[dtype]
paper = None
if sh.model in PAPER_FIGURES and arch_json == sh.cfg_json:
    pub = PUBLISHED_CONFIGS[sh.model]
    paper = (f"{PAPER_FIGURES[sh.model]['kv_elements_per_token']:,} elements "
             f"({pub['kv_lora_rank'] + pub['qk_rope_head_dim']} × {pub['num_hidden_layers']})")

with ui.cards():
    ui.number_with_formula("MLA cache per token", human_bytes(e_mla * bpe), r"(d_c + d_h^R)\,L\cdot\text{bytes}",
                           paper=paper, detail=f"({d_c} + {rope}) × {layers} = {e_mla:,} elements")
    ui.number_with_formula("MHA cache per token", human_bytes(e_mha * bpe), r"2\,n_h d_h\,L\cdot\text{bytes}",
                           detail=f"2 × {heads} × {d_h} × {layers} = {e_mha:,} elements")
    e_gqa, e_mqa = per.loc["GQA", "elements_per_token"], per.loc["MQA", "elements_per_token"]
    ui.number_with_formula(f"GQA-{groups} cache per token", human_bytes(e_gqa * bpe),
                           r"2\,n_g d_h\,L\cdot\text{bytes}",
                           detail=f"2 × {groups} × {d_h} × {layers} = {e_gqa:,} elements")
    ui.number_with_formula("MQA cache per token", human_bytes(e_mqa * bpe), r"2\,d_h\,L\cdot\text{bytes}",
                           detail=f"2 × {d_h} × {layers} = {e_mqa:,} elements: one K/V head shared by all")
    ui.number_with_formula("MLA saves vs MHA", f"{100 * (1 - e_mla / e_mha):.2f}%",
                           r"1 - \frac{d_c + d_h^R}{2 n_h d_h}",
                           detail=f"MLA is {e_mha / e_mla:,.1f}× smaller; vs naive MLA cache "
                                  f"{per.loc['MLA (naive)', 'elements_per_token'] / e_mla:,.1f}× smaller")
    ui.number_with_formula("Same cache as GQA with", f"{e_mla / (2 * d_h * layers):.2f} groups",
                           r"n_g^{\text{eq}} = \frac{d_c + d_h^R}{2 d_h}",
                           paper="2.25 groups (V2 report, d_c = 4d_h, d_h^R = d_h/2)",
                           detail="MLA's memory cost expressed in GQA groups")

ui.chart(ui.fig(charts.kv_vs_context, kv, context, batch, groups, log), kv, "kv cache vs context", key="mla_kv",
         lesson=sh.lesson,
         notice="All lines are straight: every cache grows linearly with the context. The vertical gap on the log "
                "scale is the constant reduction factor — move d_c or the number of heads and watch only the MLA "
                "or MHA line move.")

st.subheader("What fits on your GPUs")
mem_label = f"{gpus} × {gpu_mem} GiB"
mc = compute.max_context_table(arch_json, gpus * gpu_mem, batch, dtype, wdtype, groups)
if mc["free_bytes"] <= 0:
    st.warning(f"The {wdtype.upper()} weights alone ({human_bytes(mc['weights_bytes'])}) do not fit in "
               f"{mem_label} = {human_bytes(mc['memory_bytes'])}: no room for any KV cache. "
               "Add GPUs, pick FP8 weights or a smaller model.", icon=":material/memory:")
with ui.cards():
    ui.number_with_formula("Memory left for the KV cache", human_bytes(mc["free_bytes"]),
                           r"M_{\text{GPUs}} - M_{\text{weights}}",
                           detail=f"{mem_label} = {human_bytes(mc['memory_bytes'])} minus {wdtype.upper()} weights "
                                  f"{human_bytes(mc['weights_bytes'])}")
    best = mc["table"].set_index("kind")["max_context_tokens"]
    ui.number_with_formula("Longest MLA context", tokens(best["MLA"]),
                           r"T_{\max} = \left\lfloor \frac{M_{\text{free}}}{e\,L\,B\cdot\text{bytes}} \right\rfloor",
                           detail=f"batch {batch}, {dtype.upper()} cache; MHA: {tokens(best['MHA'])}")
ui.chart(ui.fig(charts.max_context_bars, mc["table"], mc["max_position_embeddings"], mem_label), mc["table"],
         "max context", key="mla_maxctx", lesson=sh.lesson,
         notice="The bar lengths are the free memory divided by the bytes per token: MLA's bar is longer by "
                "exactly the reduction factor.")

# ---------------------------------------------------------------- measured run
st.header("Measured: the real MLA module", divider="gray")
small_json = compute.scaled_down(arch_json)
small = json.loads(small_json)
st.caption(
    f"`core.attention.MLA` built at a CPU size that keeps your knobs' proportions: hidden {small['hidden_size']}, "
    f"{small['num_attention_heads']} heads (≤ 8), d_c = {small['kv_lora_rank']}, d_h^R = {small['qk_rope_head_dim']}, "
    f"d_h^nope = {small['qk_nope_head_dim']}, d_v = {small['v_head_dim']}, d'_c = {small['q_lora_rank']} "
    f"(your dims ÷ {compute.MEASURE_DIM_DIV}); one layer, random weights from seed {sh.seed}.")
m = compute.measured_caches(small_json, sh.seed, dtype)
b = m["bytes"]
mla_row = b.set_index("kind").loc["MLA"]
naive_row = b.set_index("kind").loc["MLA (naive)"]
with ui.cards():
    ui.number_with_formula("Absorbed vs naive: max |Δ output|", f"{m['max_abs_diff_absorbed_vs_naive']:.1e}",
                           r"\max |y_{\text{absorbed}} - y_{\text{naive}}|",
                           detail=f"outputs of size ~{m['output_scale']:.2f}; vs the no-cache path: "
                                  f"{m['max_abs_diff_absorbed_vs_full']:.1e} (FP32 caches, "
                                  f"{m['prefill']} prefill + {m['decode']} decode steps)")
    ui.number_with_formula("Absorbed cache (measured)", human_bytes(mla_row["measured_bytes"]),
                           r"B\,T\,(d_c + d_h^R)\cdot\text{bytes}",
                           detail=f"formula: {human_bytes(mla_row['formula_bytes'])} — "
                                  f"{'equal ✓' if mla_row['match'] else 'DIFFERENT ✗'}; {mla_row['tensors']}")
    ui.number_with_formula("Naive cache (measured)", human_bytes(naive_row["measured_bytes"]),
                           r"B\,T\,n_h(d_{qk} + d_v)\cdot\text{bytes}",
                           detail=f"formula: {human_bytes(naive_row['formula_bytes'])} — "
                                  f"{'equal ✓' if naive_row['match'] else 'DIFFERENT ✗'}; "
                                  f"{naive_row['measured_bytes'] / mla_row['measured_bytes']:.1f}× the absorbed cache")

ui.chart(ui.fig(charts.measured_bytes, b), b, "measured cache bytes", key="mla_bytes", lesson=sh.lesson,
         notice="Bars are sums of the cache tensors' nbytes after a real prefill + decode; the black ticks are the "
                "paper's formula. They coincide.")
lat = compute.measured_latency(small_json, sh.seed)
ui.chart(ui.fig(charts.decode_latency, lat), lat, "decode latency", key="mla_lat", lesson=sh.lesson,
         notice="Per-token decode time grows with the context for both paths; the absorbed path reads far fewer "
                "bytes per step but does more multiply-adds per cached token.")

st.subheader("Attention map and low rank")
amap = compute.attention_map(small_json, sh.seed)
n_heads = amap["probs"].shape[0]
with st.container(horizontal=True, gap="medium"):
    head = state.slider("Heatmap head", "mla_head", 0, max(1, n_heads - 1), 0, disabled=n_heads == 1, width=260)
    view = state.radio("Colour", "mla_heatview", ["× uniform", "probability"], "× uniform", width="content")
h = min(head, n_heads - 1)
with st.container(width=680):
    ui.chart(ui.fig(charts.attention_heatmap, amap["probs"][h], h, amap["ids"], view == "× uniform"), amap["table"],
             "attention heatmap", key="mla_heat", lesson=sh.lesson,
             notice="The upper triangle is empty: causal masking. Rows sum to 1 (each is a softmax).")
rt = compute.rank_truncation(small_json, sh.seed)
exact = small["kv_lora_rank"] + small["qk_rope_head_dim"]
ui.chart(ui.fig(charts.rank_truncation, rt, exact), rt, "rank truncation", key="mla_rank", lesson=sh.lesson,
         notice="MLA's curve drops to zero at d_c + d_h^R: its cache already is an exact rank-(d_c + d_h^R) code "
                "of all heads' K and V. "
                "MHA's error decays slowly — there is no free compression left in it.")

gpu_view.mla_section(sh.lesson)
