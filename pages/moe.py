"""MoE routing: a real `core.moe.Router` on a multi-domain token stream (routing heatmaps, expert load, balance
metrics, group-limited routing) and `core.moe_sim.simulate_bias_controller` (no balancing vs aux loss vs aux-loss-free
bias vs both)."""
import streamlit as st

from app import shell, sidebar, state, texts, ui
from app.charts import moe as charts
from app.compute import moe as compute
from core.config import ConfigError
from core.published import V3_BIAS_UPDATE_SPEED

FULL = dict(height=420, width_chars=85)  # the step heatmaps at full page width

shell.require()  # run inside the entry point (see app/shell.py)

sh = sidebar.shared()
cfg = sh.cfg
f = sh.model_id
sb = st.sidebar
EXPERT_OPTIONS = [4, 8, 16, 32, 64, 128, 160, 256, 512]  # hosted-mode cap: the real router runs on at most 512
sb.subheader("MoE knobs")
with sb.expander("Router", expanded=True, icon=":material/hub:"):
    experts = state.select_slider("Routed experts N_r", "moe_experts", EXPERT_OPTIONS,
                                  min(max(cfg.n_routed_experts, 4), EXPERT_OPTIONS[-1]), follow=f)
    shared = state.slider("Shared experts N_s", "moe_shared", 0, 4, min(cfg.n_shared_experts, 4), follow=f,
                          help="Experts every token uses; they take no part in routing.")
    top_k = state.slider("Experts per token K_r (top-k)", "moe_topk", 1, 16, min(max(cfg.num_experts_per_tok, 1), 16),
                         follow=f)
    g0 = cfg.n_group if cfg.n_group in (1, 2, 4, 8, 16) else 1
    groups = state.select_slider("Expert groups (nodes)", "moe_groups", [1, 2, 4, 8, 16], g0, follow=f)
    topk_groups = state.slider("Groups per token", "moe_topkg", 1, 16, min(cfg.topk_group, g0), follow=f,
                               help="topk_group: how many groups (nodes) one token may use.")
    scoring = state.radio("Scoring", "moe_scoring", ["sigmoid", "softmax"], cfg.scoring_func, follow=f)
    scale = state.select_slider("Route scale", "moe_scale", [0.5, 1.0, 2.0, 2.5, 4.0, 8.0, 16.0],
                                cfg.routed_scaling_factor, follow=f,
                                help="routed_scaling_factor: multiplies the gate values (not the choice).")
with sb.expander("Balancing", expanded=True, icon=":material/balance:"):
    strategy = state.radio("Strategy shown in detail", "moe_strategy", list(compute.STRATEGY_LABELS), "aux_free",
                           fmt=compute.STRATEGY_LABELS.get, horizontal=False)
    gamma = state.select_slider("Bias update speed γ", "moe_gamma", [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
                                1e-2, fmt=lambda v: f"{v:g}",
                                help=f"V3 used {V3_BIAS_UPDATE_SPEED:g} over thousands of steps; 0.01 lets the "
                                     "controller act within a short simulation.")
    alpha = state.select_slider("Aux loss weight α", "moe_alpha", [1e-4, 1e-3, 1e-2, 1e-1, 1.0], 1e-2,
                                fmt=lambda v: f"{v:g}")
    steps = state.select_slider("Steps (batches)", "moe_steps", [15, 30, 60, 120, 240], 30)
    cf = state.select_slider("Capacity factor", "moe_cf", [1.0, 1.25, 1.5, 2.0, 3.0], 1.25, fmt=lambda v: f"{v:g}",
                             help="Only to count the slots a capacity-limited router would drop.")
    skew = state.select_slider("Shared direction in the hidden states", "moe_skew", [0.0, 0.5, 1.0, 2.0], 1.0,
                               fmt=lambda v: f"{v:g}", help="A common component that makes all tokens prefer the "
                                                             "same experts at first.")

ui.page_header(texts.MOE_TITLE, texts.MOE_SUB, sh)
if cfg.n_routed_experts > EXPERT_OPTIONS[-1]:
    st.info(f"**{sh.label}** has {cfg.n_routed_experts:,} routed experts; this page routes real tokens through at "
            f"most {EXPERT_OPTIONS[-1]} (the hosted app's cap), so it starts at {EXPERT_OPTIONS[-1]}.",
            icon=":material/speed:")
ui.explanation("How routing and balancing work", texts.MOE_EXPLAIN, texts.MOE_EQUATIONS, lesson=sh.lesson)

try:
    moe_json = compute.moe_arch(sh.cfg_json, n_routed_experts=experts, n_shared_experts=shared,
                                num_experts_per_tok=top_k, n_group=groups, topk_group=topk_groups,
                                scoring_func=scoring, routed_scaling_factor=scale,
                                norm_topk_prob=scoring == "sigmoid" or cfg.norm_topk_prob,
                                first_k_dense_replace=min(cfg.first_k_dense_replace, cfg.num_hidden_layers - 1))
except ConfigError as e:
    ui.config_error(e, compute.MOE_FIELD_LABELS)
    st.stop()

@st.fragment(parallel=True)
def bias_controller_section(experts, top_k, groups, topk_groups, scoring, gamma, alpha, steps, skew, seed, strategy,
                            lesson):
    """The simulation runs in a parallel fragment: it overlaps with the routing section above."""
    st.header("The bias controller over time", divider="gray")
    sim = compute.moe_simulation(experts, top_k, groups, topk_groups, scoring, gamma, alpha, steps, skew, seed)
    ui.chart(ui.fig(charts.maxvio_over_steps, sim["max_vio"]), sim["max_vio"], "maxvio per step", key="moe_maxvio",
             lesson=lesson,
             notice="Grey never improves: nothing trains the router here, so the fresh router's imbalance stays. "
                    "How fast the orange aux-loss line falls is set by α and the simulation's learning rate; with no "
                    "language-model loss it cannot show the method's real cost (a large α hurts perplexity). The "
                    "blue bias controller brings MaxVio down; a larger γ moves the biases faster, and too large a γ "
                    "makes them oscillate (LFB paper, update-rate ablation).")
    ps = sim["per_strategy"][strategy]
    table = compute.sim_table(ps)
    label = compute.STRATEGY_LABELS[strategy]
    ui.chart(ui.fig(charts.expert_load_heatmap, ps["relative_load"], label=label, **FULL), table, "load over steps",
             key="moe_loadsteps", lesson=lesson,
             notice="Pick another strategy in the sidebar ('Strategy shown in detail') to compare the load patterns.")
    ui.chart(ui.fig(charts.bias_heatmap, ps["biases"], label=label, **FULL), table, "bias over steps",
             key="moe_biassteps", lesson=lesson)



routing_area = st.container()  # filled below, while the simulation fragment runs in parallel
bias_controller_section(experts, top_k, groups, topk_groups, scoring, gamma, alpha, steps, skew, sh.seed, strategy,
                        sh.lesson)
with routing_area:
    r = compute.moe_routing(compute.routing_key(moe_json), sh.seed, skew, gamma, steps)
    mb = compute.moe_metrics(r["loads_before"], top_k, cf)
    ma = compute.moe_metrics(r["loads_after"], top_k, cf)
    after_txt = (lambda k, fmt: f"after {steps} bias updates: {fmt(ma[k])}") if r["has_bias"] else (lambda k, fmt: None)
    with ui.cards():
        ui.number_with_formula("Experts per token", f"{top_k} + {shared}", r"K_r + N_s",
                               paper="8 routed + 1 shared of 256 + 1 (V3)",
                               detail=f"{top_k} of {experts} routed experts ({top_k / experts:.1%}) plus {shared} shared")
        ui.number_with_formula("MaxVio", f"{mb['max_vio']:.2f}", r"\max\nolimits_i c_i \,/\, \bar c - 1",
                               detail=after_txt("max_vio", lambda v: f"{v:.2f}"))
        ui.number_with_formula("CV of loads", f"{mb['cv']:.2f}", r"\frac{\operatorname{std}(c)}{\bar c}",
                               detail=after_txt("cv", lambda v: f"{v:.2f}"))
        ui.number_with_formula("Normalized entropy", f"{mb['normalized_entropy']:.3f}", r"-\frac{\sum p\log p}{\log N_r}",
                               detail=after_txt("normalized_entropy", lambda v: f"{v:.3f}"))
        ui.number_with_formula("Dead experts", f"{mb['dead_experts']} / {experts}", r"\#\{i : c_i = 0\}",
                               detail=after_txt("dead_experts", lambda v: f"{v}"))
        ui.number_with_formula(f"Dropped at CF {cf:g}", f"{mb['dropped_fraction']:.1%}",
                               r"\textstyle\sum_i (c_i - C)^+ / T K_r",
                               detail=after_txt("dropped_fraction", lambda v: f"{v:.1%}"))
    st.caption(f"Metrics of a fresh router on one batch of {mb['tokens']:,.0f} tokens (hidden size {compute.MOE_HIDDEN}); "
               f"the second line of each card: after {steps} aux-loss-free bias updates. V3 itself keeps every token "
               "(no capacity limit, no dropping); the dropped share is what a capacity-limited router would lose.")

    ui.chart(ui.fig(charts.domain_heatmaps, r["domain_before"], r["domain_after"], mb, ma, steps, gamma, r["has_bias"]),
             r["domain_table"],
             "routing heatmap by domain", key="moe_domains", lesson=sh.lesson,
             notice="Rows are token domains, columns experts. Bright = more than a fair share. The fresh router sends "
                    "many tokens to a few experts; after the bias updates the load is spread, yet each domain still has "
                    "its own bright experts.")
    ui.chart(ui.fig(charts.expert_load_bars, r["loads_before"], r["loads_after"], mb, ma, cf, r["has_bias"]),
             r["load_table"],
             "expert load", key="moe_load", lesson=sh.lesson,
             notice="Bars above the red capacity line would overflow a capacity-limited router.")

    st.subheader("Group-limited routing, token by token")
    tt = compute.scaled_token_table(r["token_table"], scale)
    ui.chart(ui.fig(charts.token_expert_map, tt, top_k, topk_groups, groups, r["group_limited"], scale),
             tt, "token expert map", key="moe_tokens", lesson=sh.lesson,
             notice="Read one row: a character of the stream, the experts it was sent to (bright) and the groups it "
                    "was not allowed to use (blank).")
    if r["group_table"] is not None:
        with st.container(width=680):
            ui.chart(ui.fig(charts.group_usage, r["group_table"]["share_of_tokens"].tolist(), topk_groups),
                     r["group_table"], "group usage", key="moe_groups_use", lesson=sh.lesson)
    else:
        st.info("This configuration has a single expert group (or greedy routing): no node limit applies. "
                "Set **Expert groups** above 1 to see group-limited routing.", icon=":material/info:")
    if r["has_bias"]:
        with ui.cards():
            ui.number_with_formula("Bias range after the updates",
                                   f"{min(r['bias_final']):+.3f} … {max(r['bias_final']):+.3f}",
                                   r"b_i \leftarrow b_i + \gamma\,\operatorname{sign}(\bar c - c_i)",
                                   paper="released V3 biases are large and positive (≈ +2 … +5)",
                                   detail=f"{steps} steps × γ = {gamma:g} bound each bias to ±{steps * gamma:g}",
                                   width=420)
