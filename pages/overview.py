"""Overview / scale calculator: parameters (total vs activated), FLOPs per token, weight memory, KV cache."""
import streamlit as st

from app import shell, sidebar, state, texts, ui
from app.charts import overview as charts
from app.compute import overview as compute
from app.compute.common import apply_overrides
from core.published import PAPER_FIGURES, V3_CONTEXT_TOKENS, billions
from core.units import flops, human_bytes, human_count, tokens
from core.config import ConfigError

shell.require()  # run inside the entry point (see app/shell.py)

sh = sidebar.shared()
base_cfg = sh.cfg
sb = st.sidebar
sb.subheader("Overview knobs")
context = state.select_slider("Context length (tokens)", "ov_ctx", [2**i for i in range(10, 21)], 131072,
                              fmt=tokens, container=sb, help="Tokens one sequence attends to / keeps in its KV cache.")
kv_dtype = state.radio("KV cache dtype", "ov_kvdt", ["bf16", "fp8", "fp32"], "bf16", container=sb)
overrides = {}
with sb.expander("Custom architecture", icon=":material/tune:"):
    st.caption(f"Empty = the model's value. Set any field to explore a custom DeepSeek-style model.")
    for field, label, step in texts.OVERRIDE_FIELDS:
        preset_value = getattr(base_cfg, field)
        v = state.number(label, texts.OVERRIDE_KEYS[field], None, min_value=0, step=step,
                         placeholder=f"{preset_value if preset_value is not None else 'none'} (model)",
                         follow=sh.model_id)
        if v is not None:
            overrides[field] = int(v)

ui.page_header(texts.OVERVIEW_TITLE, texts.OVERVIEW_SUB, sh)
try:
    cfg_json = apply_overrides(sh.cfg_json, overrides)
except ConfigError as e:
    ui.config_error(e, texts.OVERRIDE_LABELS, where="Custom architecture — ")
    st.stop()

d = compute.overview(cfg_json, context, kv_dtype)
c = d["counts"]
paper = PAPER_FIGURES.get(sh.model) if not overrides else None
if overrides:
    st.info(f"Custom model based on **{sh.label}**: " + ", ".join(
        f"{texts.OVERRIDE_LABELS[k]} = {v:,}" for k, v in overrides.items()) +
        ". Published figures are hidden because this is no longer a released model.", icon=":material/tune:")

ui.explanation("How the numbers are computed", texts.OVERVIEW_EXPLAIN, texts.OVERVIEW_EQUATIONS, lesson=sh.lesson)

fl = d["flops_at_context"]
kvb = d["kv_bytes_per_token"]
kv_formula = (r"(d_c + d_h^R)\cdot L\cdot\text{bytes}" if d["kv_kind"] == "mla"
              else r"2\,n_{kv}\,d_h\cdot L\cdot\text{bytes}")
with ui.cards():
    ui.number_with_formula("Total parameters", human_count(c["total"]),
                           r"N_{\text{total}} = \textstyle\sum_{\text{components}} N_i",
                           paper=(billions(paper['total']) + (f"; checkpoint {billions(paper['checkpoint_total'])}"
                                                               if "checkpoint_total" in paper else ""))
                           if paper else None,
                           detail=f"MTP module adds {human_count(c['mtp'])}; the checkpoint (MTP with its own "
                                  f"embedding/head copies) holds {human_count(c['checkpoint_total'])}")
    ui.number_with_formula("Activated per token", human_count(c["activated"]),
                           r"N_{\text{total}} - (N_r - K_r)\,3\,d\,d_e\,L_{\text{MoE}}",
                           paper=billions(paper['activated']) if paper else None,
                           detail=f"{100 * c['activated'] / c['total']:.1f}% of all weights; without the input "
                                  f"embedding {human_count(c['activated_no_embedding'])} (the paper's convention "
                                  "is not stated)")
    ui.number_with_formula(f"Forward FLOPs / token ({tokens(context)} context)", flops(fl["forward"]),
                           r"2N'_{\text{act}} + 2Ln_h(d_{qk}+d_v)\,T",
                           detail=f"matmuls {flops(fl['matmul'])} + attention {flops(fl['attention'])}; "
                                  f"training ≈ 3× = {flops(fl['training'])}")
    ui.number_with_formula("Weights in BF16", human_bytes(d["weights_bf16"]), r"2\,N_{\text{total}}\ \text{bytes}",
                           detail="2 bytes per parameter")
    ui.number_with_formula("Weights in FP8", human_bytes(d["weights_fp8"]),
                           r"N_{\text{lin}} + 2N_{\text{other}} + 4\lceil N_{\text{lin}}/128^2\rceil",
                           detail=f"released checkpoint format; with MTP {human_bytes(d['weights_fp8_with_mtp'])}")
    ui.number_with_formula(f"KV cache per token ({kv_dtype.upper()})", human_bytes(kvb), kv_formula,
                           paper=(f"{paper['kv_elements_per_token']:,} elements" if paper else None),
                           detail=f"ours: {d['kv_elements_per_token']:,} elements over all layers")

st.subheader("Parameter breakdown")
params = d["params"]
ui.chart(ui.fig(charts.params_breakdown, params, c), params.drop(columns=["formula"]), "parameter breakdown",
         key="ov_params", lesson=sh.lesson,
         notice="Compare the purple routed-expert segment in the two bars: it dominates the total but shrinks to "
                "K_r/N_r of itself in the activated bar. That is the whole point of a fine-grained MoE.")
rows = ["| Component | Total | Activated | Share of total | Formula |", "|---|---:|---:|---:|---|"]
for _, r in params.iterrows():
    rows.append(f"| {r['label']} | {human_count(r['total'])} | {human_count(r['activated'])} | "
                f"{100 * r['share_of_total']:.2f}% | ${r['formula']}$ |")
with st.expander("Table with formulas", expanded=True):
    st.markdown("\n".join(rows))
    st.caption("$L$ layers, $d$ hidden size, $V$ vocabulary, $n_h$ heads, $d_c$ / $d'_c$ KV / query latent dims, "
               "$d_e$ expert width, $d_{ff}$ dense FFN width, $N_r$ / $N_s$ routed / shared experts. The MTP module "
               "is not part of the main model's total.")

st.subheader("Memory and compute")
ui.chart(ui.fig(charts.memory_bars, d["memory"]), d["memory"], "memory", key="ov_mem", lesson=sh.lesson,
         notice="FP8 halves the weight memory (the scales add under 1%); the MLA cache of a whole "
                f"{tokens(V3_CONTEXT_TOKENS)}-token "
                "sequence is small next to the weights, while an MHA cache of the same model would be comparable.")
ui.chart(ui.fig(charts.flops_vs_context, d["flops"], context), d["flops"], "flops per token", key="ov_flops",
         lesson=sh.lesson,
         notice="The matmul FLOPs are flat: they depend only on the activated parameters. The attention part "
                "grows linearly with the context and takes over for long sequences.")
