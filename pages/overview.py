"""Overview / scale calculator: parameters (total vs activated), FLOPs per token, weight memory, KV cache, and the
all-to-all traffic of expert parallelism."""
import streamlit as st

from app import landing, shell, sidebar, state, texts, ui
from app.charts import overview as charts
from app.compute import overview as compute
from app.compute.common import apply_overrides
from core.published import PAPER_FIGURES, V3_CONTEXT_TOKENS, billions
from core.units import flops, human_bytes, human_count, tokens
from core.comm import CommError
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

ep_knobs = None
if base_cfg.n_routed_experts:
    with sb.expander("Expert parallelism", icon=":material/hub:"):
        n_r = base_cfg.n_routed_experts
        ep_opts = [d for d in range(1, min(n_r, 1024) + 1) if n_r % d == 0]  # bounded loop: n_r may be 2**31-1
        ep = state.selectbox("EP ranks (GPUs holding the experts)", "ov_ep", ep_opts,
                             max(d for d in ep_opts if d <= 64), follow=sh.model_id,
                             help="Routed experts are split evenly over these ranks (V3 trains with EP64).")
        node_opts = [d for d in range(1, ep + 1) if ep % d == 0]
        nodes = state.selectbox("Nodes", "ov_nodes", node_opts, ep // 8 if ep % 8 == 0 else 1, follow=sh.model_id,
                                help="The EP ranks sit on this many nodes (V3: 8 nodes of 8 GPUs).")
        k = base_cfg.num_experts_per_tok
        # 0 = no limit (a None option would read as "nothing selected" when a range change resets the knob)
        limit_opts = [0] + [m for m in range(1, nodes + 1) if m * n_r // nodes >= k]
        limit_default = (base_cfg.topk_group if base_cfg.n_group == nodes and base_cfg.topk_group in limit_opts
                         else 0)
        node_limit = state.selectbox("Node limit M (nodes per token)", "ov_mlimit", limit_opts, limit_default,
                                     fmt=lambda m: "no limit" if not m else str(m), follow=sh.model_id,
                                     help="Node-limited routing: each token may use experts on at most M nodes "
                                          "(V3: 4).") or None
        dispatch = state.radio("Dispatch dtype", "ov_disp", ["fp8", "bf16", "fp32"], "fp8",
                               help="V3 sends the dispatch in FP8 (with a scale per 128 channels).")
        combine = state.radio("Combine dtype", "ov_comb", ["bf16", "fp32"], "bf16",
                              help="V3 sends the combine in BF16.")
        ep_knobs = (ep, nodes, node_limit, dispatch, combine)

ui.page_header(texts.OVERVIEW_TITLE, texts.OVERVIEW_SUB, sh,
               model_label=f"custom, based on {sh.label}" if overrides else None)
landing.render(lesson=sh.lesson)
try:
    cfg_json = apply_overrides(sh.cfg_json, overrides)
except ConfigError as e:
    ui.config_error(e, texts.OVERRIDE_LABELS, where="Custom architecture — ")
    st.stop()
sidebar.summary(cfg_json, "Custom architecture" if overrides else None)

d = compute.overview(cfg_json, context, kv_dtype)
c = d["counts"]
paper = PAPER_FIGURES.get(sh.model) if not overrides else None
if overrides:
    st.info(f"Custom model based on **{sh.label}**: " + ", ".join(
        f"{texts.OVERRIDE_LABELS[k]} = {v:,}" for k, v in overrides.items()) +
        ". Published figures are hidden because this is no longer a released model.", icon=":material/tune:")

ui.explanation("How the numbers are computed", texts.OVERVIEW_EXPLAIN, texts.OVERVIEW_EQUATIONS, lesson=sh.lesson)

# a custom architecture: every headline card says how far it moved from the model it is based on
c0 = compute.overview(sh.cfg_json, context, kv_dtype)["counts"] if overrides else c
base_label = sh.label.split(" · ")[0]
fl = d["flops_at_context"]
kvb = d["kv_bytes_per_token"]
kv_formula = (r"(d_c + d_h^R)\cdot L\cdot\text{bytes}" if d["kv_kind"] == "mla"
              else r"2\,n_{kv}\,d_h\cdot L\cdot\text{bytes}")
with ui.cards():
    ui.number_with_formula("Total parameters", human_count(c["total"]),
                           r"N_{\text{total}} = \textstyle\sum_{\text{components}} N_i",
                           delta=ui.vs(c["total"], c0["total"], base_label),
                           paper=(billions(paper['total']) + (f"; checkpoint {billions(paper['checkpoint_total'])}"
                                                               if "checkpoint_total" in paper else ""))
                           if paper else None,
                           detail=f"MTP module adds {human_count(c['mtp'])}; the checkpoint (MTP with its own "
                                  f"embedding/head copies) holds {human_count(c['checkpoint_total'])}")
    ui.number_with_formula("Activated per token", human_count(c["activated"]),
                           r"N_{\text{total}} - (N_r - K_r)\,3\,d\,d_e\,L_{\text{MoE}}",
                           delta=ui.vs(c["activated"], c0["activated"], base_label),
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
with st.expander("Table with formulas", expanded=True), ui.scroll_x("ov_formulas", 680):
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

if ep_knobs is not None:
    st.subheader("Expert parallelism: all-to-all traffic")
    ep, nodes, node_limit, dispatch, combine = ep_knobs
    try:
        a2a = compute.comm(cfg_json, ep, nodes, node_limit, dispatch, combine)
    except CommError as e:
        ui.knob_error(texts.COMM_KNOBS.get(e.knob, e.knob), str(e).split(": ", 1)[1])
        a2a = None
    if a2a is not None:
        v = a2a["volume"]
        ui.explanation("How the traffic is counted", texts.COMM_EXPLAIN, texts.COMM_EQUATIONS, lesson=sh.lesson)
        with ui.cards():
            ui.number_with_formula("One token copy", f"{human_bytes(v['dispatch_token_bytes'])} + "
                                   f"{human_bytes(v['combine_token_bytes'])}",
                                   r"d\cdot b_{\text{disp}} + 4\lceil d/128\rceil,\;\; d\cdot b_{\text{comb}}",
                                   detail=f"dispatch in {dispatch.upper()}, combine in {combine.upper()}")
            ui.number_with_formula("Off-rank, per slot", human_bytes(v["bytes_off_rank"]),
                                   r"K_r\,(1 - 1/\text{EP})\,(B_{\text{disp}} + B_{\text{comb}})",
                                   detail=f"{v['slots_off_rank']:.2f} of {base_cfg.num_experts_per_tok} slots leave "
                                          f"the rank; per token per MoE layer, forward")
            ui.number_with_formula("Cross-node, one copy per node", human_bytes(v["bytes_inter_node_dedup"]),
                                   r"(n-1)\,\tfrac{M}{n}\,P_{\text{hit}}\,(B_{\text{disp}} + B_{\text{comb}})",
                                   detail=f"{v['remote_nodes_expected']:.2f} remote nodes expected, at most "
                                          f"{v['nodes_per_token_max']}")
            ui.number_with_formula(f"Per token, all {a2a['moe_layers']} MoE layers",
                                   human_bytes(v["bytes_inter_node_dedup"] * a2a["moe_layers"]),
                                   r"L_{\text{MoE}} \times \text{cross-node bytes}",
                                   detail="forward only; training sends the same again in the backward")
        ui.chart(ui.fig(charts.a2a_vs_node_limit, a2a["by_limit"], node_limit, nodes), a2a["by_limit"],
                 "all-to-all bytes vs node limit", key="ov_a2a", lesson=sh.lesson,
                 notice="The blue line falls as M shrinks: fewer nodes per token means fewer InfiniBand copies, "
                        "which is why V3 caps each token at 4 nodes. The grey per-slot line does not move: an "
                        "exchange that sends one copy per expert gains nothing from the limit.")
