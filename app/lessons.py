"""The masterclass as data: six sections of short steps. Each step explains one idea (a few sentences, optional
display math), names the dashboard and the knob values that show it, and says what to notice.

`url_params(step)` turns a step's knobs into the exact query parameters the target page binds (the URL holds each
option's label, e.g. `?ov_ctx=128K`, `?fp8_fmt=E5M2`), so the same dict serves the in-app button, the "open in a
new tab" link an instructor shares, and the tests (tests/test_app_lessons.py opens every step's page with these
parameters and checks every widget value).

The lessons page itself is bound to `?ls_sec=<section>&ls_step=<n>`, so a link reaches any step.

(Longer than ~500 lines because most of it is the lesson prose itself; every number in that prose comes from
`core` / `core.published` at import, via `app.texts` where the explanations quote it too.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import math

from app.pages import PAGES
from app.texts import (COUNTS, E4M3, E5M2, MINI, V2, V3, V3_KV_MHA, V3_KV_MLA, activated_share,
                       fp8_validation_sentence)
from core.calc import weight_bytes
from core.published import (H800_FP8_ACCUM_BITS, V2_ACTIVATED_PARAMS, V2_TOTAL_PARAMS, V3_ACTIVATED_PARAMS,
                            V3_CONTEXT_TOKENS, V3_PROMOTION_INTERVAL, V3_TOTAL_PARAMS, billions)
from core.train import APP_DEFAULT
from core.units import human_count, tokens

# ====================================================================== data model
PAGE_TITLES = {p.path: p.title for p in PAGES}
PAGE_URLS = {p.path: p.url_path for p in PAGES}


@dataclass(frozen=True)
class Step:
    title: str
    body: str                              # Markdown; $...$ math allowed
    page: str                              # target page script, e.g. "pages/mla.py"
    knobs: dict = field(default_factory=dict)   # URL key -> knob value (Python value, as the widget returns it)
    notice: str = ""                       # "what to notice"
    latex: tuple = ()                      # display equations
    preview: tuple = ()                    # preview charts on the lessons page (see app/lesson_previews)


@dataclass(frozen=True)
class Section:
    id: str                                # short label, also the URL value of ?ls_sec=
    title: str
    summary: str
    steps: tuple


# ====================================================================== URL formatting
def _g(v) -> str:
    return f"{v:g}"


def _osz(v) -> str:
    return f"{v:.0e}".replace("e+0", "e")


def _bool(v) -> str:
    return "true" if v else "false"


def _formatters() -> dict[str, Callable[[Any], str]]:
    """How each bound knob's value is written in the URL (the widget's option label)."""
    from app.compute.fp8 import FMT_LABELS
    from app.compute.moe import STRATEGY_LABELS
    from app.lab.knobs import KNOBS

    f: dict[str, Callable[[Any], str]] = {
        "lesson": _bool, "mla_log": _bool,
        "ov_ctx": tokens, "mla_ctx": tokens,
        "fp8_fmt": FMT_LABELS.__getitem__, "fp8_osz": _osz,
        "fp8_over": {"saturate": "saturate", "nan": "NaN / inf"}.__getitem__,
        "moe_strategy": STRATEGY_LABELS.__getitem__,
        "moe_gamma": _g, "moe_alpha": _g, "moe_cf": _g, "moe_skew": _g,
    }
    f.update({k: kn.fmt for k, kn in KNOBS.items()})
    return f


def url_value(key: str, value) -> str:
    return _formatters().get(key, str)(value)


def url_params(step: Step) -> dict[str, str]:
    """The query parameters that open `step.page` with the step's knobs."""
    return {k: url_value(k, v) for k, v in step.knobs.items()}


def query_string(step: Step) -> str:
    from urllib.parse import urlencode
    return urlencode(url_params(step))


# ====================================================================== the six sections
L = {"lesson": True}   # every step opens its dashboard in lesson mode (explanations open, "what to notice" notes)
# Knob values that a step's prose also quotes (one place each).
_WALL = {"mla_batch": 16, "mla_gpus": 8, "mla_gpumem": 80, "mla_wdtype": "fp8"}
_SERVE = {"mla_batch": 32, "mla_gpus": 16, "mla_gpumem": 80, "mla_wdtype": "fp8"}
_GQA_GROUPS = 8
_ROPE_X2 = 2 * V3.qk_rope_head_dim
_TOPK_GROUPS = 2

FOUNDATIONS = Section("Foundations", "Foundations: attention and the KV-cache problem",
                      "Why a language model that generates text needs memory that grows with every token.", (
    Step("Attention looks back at every earlier token",
         "A transformer layer turns each token into a query $q$, a key $k$ and a value $v$. The output for token $t$ "
         "is a weighted average of the values of tokens $1 \\dots t$, with weights from a softmax over "
         "$q_t^\\top k_j$. The mask is *causal*: a token never sees the future. Every head of every layer does this.",
         "pages/mla.py", {**L, "mla_heatview": "probability"},
         "In **Attention map and low rank** (near the bottom of the page): the upper triangle is empty (causal mask) "
         "and every row sums to 1. Move **Heatmap head**: each head attends differently.",
         (r"\operatorname{Attn}(q_t, K, V) = \sum_{j \le t} \operatorname{softmax}_j\!\Big(\frac{q_t^\top k_j}"
          r"{\sqrt{d_h}}\Big)\, v_j",),
         ("attention", "kv")),
    Step("The KV cache grows with every token",
         "When generating, the keys and values of earlier tokens never change, so they are kept — the **KV cache** — "
         "instead of being recomputed. Standard multi-head attention (MHA) stores $2 n_h d_h$ numbers per token "
         f"per layer: for a DeepSeek-V3-sized model with MHA that is {V3_KV_MHA:,} numbers × "
         f"{V3.num_hidden_layers} layers for *every* token of *every* sequence being served.",
         "pages/mla.py", {**L, "mla_ctx": 131072, "mla_batch": 1, "mla_log": False},
         "On a linear scale every line is straight: memory is proportional to the context. Read the MHA line at "
         f"{tokens(V3_CONTEXT_TOKENS)} tokens: that is the cache of ONE sequence.",
         (r"\text{KV bytes} = 2\, n_h\, d_h \cdot L \cdot T \cdot B \cdot \text{bytes/element}",),
         ("kv",)),
    Step("The memory wall: what fits on the GPUs",
         "Serving means many sequences at once. The GPUs hold the weights first; whatever is left holds the KV "
         f"caches. With an MHA-sized cache, a node of {_WALL['mla_gpus']} × {_WALL['mla_gpumem']} GiB fits only a "
         f"short context for a batch of {_WALL['mla_batch']} — the cache, not compute, limits how many users one "
         "server can take.",
         "pages/mla.py", {**L, **_WALL},
         "In **What fits on your GPUs**, compare the MHA bar with the MLA bar: same memory, very different "
         "longest context.",
         (r"T_{\max} = \Big\lfloor \frac{M_{\text{GPUs}} - M_{\text{weights}}}{e \cdot L \cdot B \cdot "
          r"\text{bytes}} \Big\rfloor",),
         ("kv",)),
    Step("GQA and MQA: share the K/V heads",
         "The classic fix shares one K/V head between a group of query heads: grouped-query attention (GQA, $n_g$ "
         "groups) or multi-query attention (MQA, one K/V head). The cache shrinks by $n_h / n_g$ — by removing K/V "
         "capacity, which costs quality.",
         "pages/mla.py", {**L, "mla_groups": _GQA_GROUPS},
         f"The orange GQA-{_GQA_GROUPS} line sits {V3.num_attention_heads // _GQA_GROUPS}× below MHA, the green MQA "
         f"line {V3.num_attention_heads}× below. Keep the MLA (blue) line in mind for the next section.",
         (r"e_{\text{GQA}} = 2\, n_g\, d_h,\qquad e_{\text{MQA}} = 2\, d_h",),
         ("kv",)),
))

MLA = Section("MLA", "Multi-head Latent Attention: compress the cache, keep the heads",
              "DeepSeek-V2/V3 cache one small latent vector per token and rebuild every head's K and V from it.", (
    Step("One latent vector per token",
         f"MLA projects each token down to a latent $c^{{KV}}_t$ of $d_c = {V3.kv_lora_rank}$ numbers and rebuilds all "
         f"{V3.num_attention_heads} heads' keys and values from it with up-projections. Only the latent (plus a small "
         f"RoPE key, two steps on) is cached: {V3_KV_MLA:,} numbers per token per layer instead of {V3_KV_MHA:,}.",
         "pages/mla.py", {**L},
         f"The **MLA saves vs MHA** card: {1 - V3_KV_MLA / V3_KV_MHA:.1%} for DeepSeek-V3's shape, and the blue line "
         "far below all others.",
         (r"c^{KV}_t = W^{DKV} h_t,\qquad k^C_{t,i} = W^{UK}_i c^{KV}_t,\qquad v^C_{t,i} = W^{UV}_i c^{KV}_t",),
         ("kv",)),
    Step("The latent dimension is the knob",
         "$d_c$ (`kv_lora_rank`) sets the cache size directly, independent of the number of heads. Halve it and "
         "the MLA cache nearly halves; the other lines do not move.",
         "pages/mla.py", {**L, "mla_dc": 256},
         "Only the blue MLA line moved. Then try **Attention heads** in the sidebar: MHA moves, MLA does not.",
         (r"e_{\text{MLA}} = d_c + d_h^R",),
         ("kv",)),
    Step("Decoupled RoPE",
         "At decode time MLA folds $W^{UK}$ into the query (the absorption of the next step) so that keys are never "
         "rebuilt from the latent. Rotary position embeddings on those keys would put a rotation that depends on the "
         "query's and each cached token's positions *between* $W^{Q}$ and $W^{UK}$; matrix products do not commute, "
         "so $W^{UK}$ could no longer be absorbed and every cached key would have to be recomputed for each new token "
         "(DeepSeek-V2 report §2.1.3). So the content keys get no RoPE; instead MLA adds one small extra key $k^R_t$ "
         f"($d_h^R = {V3.qk_rope_head_dim}$), rotated by RoPE and shared by all heads, with a RoPE query $q^R_{{t,i}}$ "
         "per head. It is cached too — a fixed cost per token.",
         "pages/mla.py", {**L, "mla_rope": _ROPE_X2},
         f"Doubling the RoPE key dim adds {_ROPE_X2 - V3.qk_rope_head_dim} numbers per token per layer: the MLA card's "
         f"element count goes from {V3_KV_MLA:,} × {V3.num_hidden_layers} to "
         f"{V3.kv_lora_rank + _ROPE_X2:,} × {V3.num_hidden_layers}.",
         (r"k^R_t = \operatorname{RoPE}(W^{KR} h_t),\qquad k_{t,i} = [k^C_{t,i};\ k^R_t]",),
         ("kv",)),
    Step("Absorb the up-projection: decode on the latent",
         "A head's score has a content part and a RoPE part, $q^\\top k = (q^C)^\\top W^{UK} c + (q^R)^\\top k^R$. "
         "Because $(q^C)^\\top (W^{UK} c) = (W^{UK\\top} q^C)^\\top c$, the up-projection can be folded into the "
         "query, and $W^{UV}$ into the output projection; the RoPE part uses the cached $k^R$ as it is. Decoding "
         "attends directly over the cached latents. The measured section runs the real module both ways.",
         "pages/mla.py", {**L, "mla_dtype": "bf16"},
         "In **Measured: the real MLA module**: naive and absorbed decodes give the same output, and the measured "
         "cache bytes equal the formula — the absorbed cache is many times smaller.",
         (r"q_{t,i}^\top k_{j,i} = \big((W^{UK}_i)^\top q^C_{t,i}\big)^\top c^{KV}_j + (q^R_{t,i})^\top k^R_j",),
         ("kv",)),
))

MOE = Section("MoE", "DeepSeekMoE and load balancing",
              f"{V3.n_routed_experts} small experts, {V3.num_experts_per_tok} per token — and how DeepSeek-V3 keeps "
              "them evenly loaded without relying on an aux loss.", (
    Step("Many small experts, a few per token",
         f"Every MoE layer has {V3.n_shared_experts} shared expert that every token uses and {V3.n_routed_experts} "
         f"routed experts; a router scores them with a sigmoid and each token uses its top {V3.num_experts_per_tok}. "
         f"Most weights live in experts, but a token touches only {V3.num_experts_per_tok}/{V3.n_routed_experts} of "
         "the routed ones.",
         "pages/moe.py", {**L},
         f"The **Experts per token** card ({V3.num_experts_per_tok} + {V3.n_shared_experts}) and the routing "
         "heatmap: rows are token domains, columns experts.",
         (r"h'_t = u_t + \sum_{i=1}^{N_s} \text{FFN}^{(s)}_i(u_t) + \sum_{i=1}^{N_r} g_{i,t}\,\text{FFN}^{(r)}_i(u_t)",),
         ("maxvio",)),
    Step("A fresh router is already unbalanced",
         "Tokens share a common direction, so a fresh router sends many of them to the same few experts: those "
         "experts become the bottleneck while others idle. MaxVio measures it. This simulation never trains the "
         "router, so the imbalance simply stays. In training it can feed on itself — the favoured experts get most "
         "of the gradient, improve, and attract still more tokens: that self-reinforcing outcome is **routing "
         "collapse** (Shazeer et al. 2017 §4; V3 §2.1.2). Section 5 trains a model without balancing to show it "
         "over steps.",
         "pages/moe.py", {**L, "moe_strategy": "none", "moe_skew": 2.0},
         "The grey 'no balancing' line stays high in **The bias controller over time** (a frozen router: the "
         "initial imbalance, not yet collapse); in the load heatmap a few bright columns take most tokens for the "
         "whole run.",
         (r"\text{MaxVio} = \frac{\max_i c_i}{\bar c} - 1",),
         ("maxvio",)),
    Step("The classic fix: an auxiliary loss",
         "Add a balance loss $\\alpha \\sum_i f_i P_i$ to the training loss: its gradient pushes the router towards "
         "uniform loads. The catch is quality: the gradient also pulls against the language-modelling objective, "
         "and an $\\alpha$ large enough to keep the loads balanced costs perplexity (LFB paper Fig. 2; V3 §2.1.2). "
         "How fast the line below falls is set by $\\alpha$ and by this simulation's learning rate (plain SGD on the "
         "router alone), not by the method.",
         "pages/moe.py", {**L, "moe_strategy": "aux_loss", "moe_alpha": 0.1},
         "The orange aux-loss line falls; move **Aux loss weight α** and see the speed change. The simulation has no "
         "language-model loss, so it cannot show the quality cost of a large α.",
         (r"\mathcal{L}_{\text{Bal}} = \alpha \sum_{i=1}^{N_r} f_i P_i,\qquad f_i = \frac{N_r}{K_r T}"
          r"\sum_t \mathbb{1}\big(s_{i,t} \in \operatorname{Topk}(\{s_{j,t}\}_{j=1}^{N_r}, K_r)\big),\qquad "
          r"P_i = \frac{1}{T}\sum_t \frac{s_{i,t}}{\sum_j s_{j,t}}",),
         ("maxvio",)),
    Step("DeepSeek-V3: aux-loss-free balancing",
         "V3 adds a per-expert bias $b_i$ to the scores *only to choose* the top-k, and after each batch moves it by "
         "$\\gamma$ against the expert's load error. Gate weights still use the unbiased scores, so balancing costs "
         "no gradient at all.",
         "pages/moe.py", {**L, "moe_strategy": "aux_free", "moe_gamma": 0.01, "moe_steps": 120},
         "The blue line falls far below the grey one within the first few dozen steps and stays there; the bias "
         "heatmap shows busy experts pushed down, idle ones pulled up.",
         (r"b_i \leftarrow b_i + \gamma\,\operatorname{sign}(\bar c - c_i)",),
         ("maxvio",)),
    Step("Node-limited routing",
         f"Experts are spread over nodes ({V3.n_group} groups in V3). Each token may use experts from at most "
         f"{V3.topk_group} groups, chosen by the sum of each group's two best (biased) scores — a cap on cross-node "
         "traffic (V3 §2.1.2).",
         "pages/moe.py", {**L, "moe_topkg": _TOPK_GROUPS},
         f"In **Group-limited routing, token by token**: each row uses experts from only {_TOPK_GROUPS} groups; the "
         "blank columns are groups the token was not allowed to use.",
         (r"\text{group score}_g = \sum \operatorname{top}_2\{s_{i,t} + b_i : i \in g\}",),
         ("maxvio",)),
))

FP8 = Section("FP8", "FP8 training",
              "Eight-bit floats halve the memory traffic of BF16 — if the scaling and the accumulation are right.", (
    Step("Two FP8 formats",
         f"E4M3 has {E4M3.man_bits} mantissa bits and a max of {E4M3.max:g}; E5M2 has {E5M2.man_bits} mantissa bits "
         f"but reaches {E5M2.max:,.0f}. Rounding to nearest costs at most $2^{{-(m+1)}}$ relative error: "
         f"{2.0 ** -(E4M3.man_bits + 1):.2%} for E4M3. DeepSeek-V3 uses E4M3 for the operands of all its FP8 GEMMs "
         "(forward and both backward GEMMs, where others use E5M2 for gradients) and gets range from fine-grained "
         "scales (V3 report §3.3.2). Not everything is E4M3: the activations entering the linear after attention are "
         "kept in a custom E5M6 format, and the MoE combine and AdamW's moments stay in BF16 (§3.3.3).",
         "pages/fp8.py", {**L, "fp8_data": "gaussian", "fp8_fmt": "e4m3"},
         "Read the SQNR card on the Gaussian data. Switch **Format** to E5M2: one mantissa bit less costs about "
         f"{20 * math.log10(2):.0f} dB (each bit halves the rounding error).",
         (r"x = (-1)^s \cdot 2^{E - \text{bias}} \cdot 1.M",),
         ("fp8hist",)),
    Step("Outliers break per-tensor scaling",
         "One scale per tensor maps the largest value onto the format's max. A few outlier channels (as real "
         "activations have) set that scale, and every ordinary value is pushed down into the subnormals or to zero.",
         "pages/fp8.py", {**L, "fp8_data": "outliers", "fp8_gran": "tensor", "fp8_osz": 10000.0},
         "The histogram's bulk slides left of the 'smallest subnormal' line; the **Flushed to zero** card counts "
         "the lost values.",
         (r"s = \frac{\max|x|}{" + f"{E4M3.max:g}" + r"},\qquad q = \operatorname{RNE}(x / s)",),
         ("fp8hist",)),
    Step("Fine-grained scaling: 1×128 tiles and 128×128 blocks",
         "DeepSeek-V3 gives every 1×128 tile of an activation and every 128×128 block of a weight its own scale, so "
         "an outlier only affects its own group.",
         "pages/fp8.py", {**L, "fp8_data": "outliers", "fp8_gran": "tile", "fp8_osz": 10000.0},
         "Same data as the last step: SQNR of the non-outlier values jumps back up; in the granularity sweep the "
         "1×128 tile line stays high while per-tensor falls.",
         (r"s_g = \frac{\max_{i \in g}|x_i|}{" + f"{E4M3.max:g}" + r"}\ \text{for every group } g \text{ of } "
          r"1\times128",),
         ("fp8hist", "sweep")),
    Step(f"Promote the accumulator every {V3_PROMOTION_INTERVAL} products",
         f"An FP8 GEMM sums $K$ products. H800 tensor cores accumulate with about {H800_FP8_ACCUM_BITS} bits, so the "
         f"error grows with $K$. V3 copies partial sums to FP32 registers every $N_C = {V3_PROMOTION_INTERVAL}$ "
         "elements of $K$, where the scales are applied too (V3 report §3.3.2).",
         "pages/fp8.py", {**L, "fp8_nc": 128, "fp8_accbits": 13},
         "In **GEMM accumulation**: without promotion the error grows with K; with promotion every 128 it stays "
         "flat. Set N_C to 1024 and watch the bound rise.",
         (r"C = \sum_{k_b} s^A_{k_b} s^B_{k_b} \sum_{k \in k_b} q^A_k q^B_k",),
         ("gemm",)),
))

TOGETHER = Section("Putting it together", "Putting it together: the training lab",
                   "Train a mini DeepSeek-V3 on this server, change one ingredient, overlay the runs.", (
    Step("Train the default mini DeepSeek-V3",
         f"The lab's default is a {MINI.num_hidden_layers}-layer model with MLA, DeepSeekMoE "
         f"({MINI.n_routed_experts} routed experts, top-{MINI.num_experts_per_tok}, {MINI.n_shared_experts} shared), "
         f"aux-loss-free balancing and MTP, trained for {APP_DEFAULT.steps} steps on four synthetic token domains. "
         "Press **Start**: the caption under the knobs gives the expected time on one core.",
         "pages/training.py", {**L, "tr_steps": APP_DEFAULT.steps},
         f"The loss falls well below ln {MINI.vocab_size} = {math.log(MINI.vocab_size):.2f} (a uniform guess); "
         "MaxVio drops as the bias controller acts; after the run the domain × expert matrix shows experts "
         "specialising by domain.",
         (r"\mathcal{L} = \mathcal{L}_{\text{LM}} + \tfrac{\lambda}{D}\textstyle\sum_k \mathcal{L}^k_{\text{MTP}}",),
         ("lab",)),
    Step("Balancing matters: turn it off",
         "Run again with balancing **none**, then overlay the two runs under **Compare runs**. Without balancing the "
         "router may collapse onto a few experts as training goes on — the self-reinforcing routing collapse of "
         "section 3, now over steps.",
         "pages/training.py", {**L, "tr_bal": "none"},
         "Under **Compare runs**, the MaxVio overlay: the balanced run falls, the unbalanced one stays high. The "
         "loss overlay's title gives the final-loss delta — small at this size: balance is about using every "
         "expert (and every GPU), not a lower loss here.",
         (r"b_i \leftarrow b_i + \gamma\,\operatorname{sign}(\bar c - c_i)",),
         ("lab",)),
    Step("FP8 versus FP32",
         "Run the same model with the DeepSeek FP8 recipe (E4M3 operands, 1×128 activation tiles, 128×128 weight "
         "blocks, FP32 master weights; the recipe table on the FP8 page lists every tensor) and overlay it with the "
         f"FP32 run. The V3 report gives a {fp8_validation_sentence()}. The FP8 GEMMs are emulated on the CPU, so "
         "this run takes longer (the caption under the knobs gives the estimate).",
         "pages/training.py", {**L, "tr_prec": "deepseek"},
         "The overlay's title gives the final-loss delta. Compare it with the gap between two FP32 runs that differ "
         "only in the seed: on a tiny model trained for seconds, is the FP8 gap bigger than that noise?",
         (),
         ("lab",)),
    Step("MLA versus MHA",
         "MLA caches a fraction of MHA's keys and values — does it learn as well? Switch the attention to MHA and "
         "overlay.",
         "pages/training.py", {**L, "tr_attn": "mha"},
         "Similar curves at this size: MLA's saving is in serving memory, not in what the model can learn here.",
         (),
         ("lab",)),
))

SCALE = Section("Scale and deployment", f"Scale and deployment: {billions(V3_TOTAL_PARAMS)} parameters, "
                f"{billions(V3_ACTIVATED_PARAMS)} per token",
                "From the mini model back to the real one: where the parameters are and what serving needs.", (
    Step(f"{billions(V3_TOTAL_PARAMS)} total, {billions(V3_ACTIVATED_PARAMS)} activated",
         f"DeepSeek-V3 has {billions(V3_TOTAL_PARAMS)} parameters, but each token runs through only about "
         f"{billions(V3_ACTIVATED_PARAMS)}: the embedding, attention, the dense layers, the shared expert and its "
         f"{V3.num_experts_per_tok} routed experts per layer, and the output head. Eva counts "
         f"{human_count(COUNTS['deepseek-v3']['activated'])} with the input embedding and "
         f"{human_count(COUNTS['deepseek-v3']['activated_no_embedding'])} without (the report does not say which "
         "convention its figure uses). Compute follows the activated count; memory follows the total.",
         "pages/overview.py", {**L, "model": "deepseek-v3"},
         "In the parameter breakdown the purple routed-expert segment dominates the total bar and nearly vanishes "
         "in the activated bar.",
         (r"N_{\text{act}} = N_{\text{total}} - (N_r - K_r)\cdot 3\,d\,d_e \cdot L_{\text{MoE}}",),
         ("params",)),
    Step("Serving memory: weights in FP8, cache in MLA",
         "The released checkpoint stores matrices in FP8 (1 byte plus a scale per 128×128 block): about half of "
         f"BF16. The KV cache of a whole {tokens(V3_CONTEXT_TOKENS)}-token sequence is small next to the weights thanks "
         "to MLA.",
         "pages/overview.py", {**L, "model": "deepseek-v3", "ov_ctx": V3_CONTEXT_TOKENS, "ov_kvdt": "bf16"},
         f"In **Memory and compute**: FP8 weights ≈ {weight_bytes(V3, 'fp8') / weight_bytes(V3, 'bf16'):.0%} of "
         "BF16; the MLA cache bar is tiny next to the MHA one.",
         (r"M_{\text{FP8}} \approx N_{\text{lin}} + 2 N_{\text{other}} + 4\lceil N_{\text{lin}}/128^2\rceil\ "
          r"\text{bytes}",),
         ("params", "memory")),
    Step("How many users fit on a node",
         f"Serve a batch of {_SERVE['mla_batch']} sequences from {_SERVE['mla_gpus']} GPUs of "
         f"{_SERVE['mla_gpumem']} GiB with FP8 weights: what is left after the weights holds the caches. This is "
         "where MLA pays for itself.",
         "pages/mla.py", {**L, "model": "deepseek-v3", **_SERVE},
         "**Longest MLA context** vs the MHA figure below it: the ratio is the cache reduction factor.",
         (),
         ("kv",)),
    Step("DeepSeek-V2 for comparison",
         f"DeepSeek-V2 ({billions(V2_TOTAL_PARAMS)} total, {billions(V2_ACTIVATED_PARAMS)} activated) used the same "
         f"MLA but {V2.n_shared_experts} shared and {V2.n_routed_experts} routed experts with top-{V2.num_experts_per_tok}, "
         "softmax scoring and auxiliary balance losses (V2 report §2.2). Switch the model and compare.",
         "pages/overview.py", {**L, "model": "deepseek-v2"},
         "Total and activated parameters both shrink, but V3 activates a smaller share of its weights per token: "
         f"{activated_share('deepseek-v3'):.1%} against V2's {activated_share('deepseek-v2'):.1%} by Eva's count "
         f"(published: {V3_ACTIVATED_PARAMS / V3_TOTAL_PARAMS:.1%} and {V2_ACTIVATED_PARAMS / V2_TOTAL_PARAMS:.1%}).",
         (),
         ("params",)),
))

SECTIONS: tuple[Section, ...] = (FOUNDATIONS, MLA, MOE, FP8, TOGETHER, SCALE)
SECTION_IDS = [s.id for s in SECTIONS]


KNOB_LABELS = {
    "lesson": "Lesson mode", "model": "Model", "seed": "Seed",
    "ov_ctx": "Context length", "ov_kvdt": "KV cache dtype",
    "mla_dc": "KV latent dim d_c", "mla_rope": "RoPE key dim d_h^R", "mla_heads": "Attention heads",
    "mla_groups": "GQA groups n_g", "mla_ctx": "Context", "mla_batch": "Batch", "mla_dtype": "Cache dtype",
    "mla_gpus": "GPUs", "mla_gpumem": "Memory per GPU (GiB)", "mla_wdtype": "Weights dtype",
    "mla_log": "Log scale for memory", "mla_heatview": "Heatmap colour",
    "moe_strategy": "Strategy shown in detail", "moe_skew": "Shared direction", "moe_alpha": "Aux loss weight α",
    "moe_gamma": "Bias update speed γ", "moe_steps": "Steps", "moe_topkg": "Groups per token",
    "fp8_data": "Data", "fp8_fmt": "Format", "fp8_gran": "Scaling granularity", "fp8_osz": "Outlier size",
    "fp8_nc": "Promote every N_C", "fp8_accbits": "Accumulator mantissa bits",
}


def knob_label(key: str) -> str:
    if key.startswith("tr_"):
        from app.lab.knobs import KNOBS
        return KNOBS[key].label
    return KNOB_LABELS.get(key, key)


_POS = "_ls_pos"  # (section id, step) of this session's lesson, kept while the user visits a dashboard


def remember_position(sec_id: str, n: int) -> None:
    import streamlit as st
    st.session_state[_POS] = (sec_id, n)


def restore_position() -> None:
    """Before the lessons page draws its selectors: if this session was on a lesson step and the link names no
    step, continue there (the selectors are page widgets, so Streamlit forgets them on other pages)."""
    import streamlit as st
    pos = st.session_state.get(_POS)
    if pos is None or "ls_sec" in st.session_state or "ls_sec" in st.query_params or "ls_step" in st.query_params:
        return
    st.session_state["ls_sec"], st.session_state["ls_step"] = pos


def sidebar_back(page) -> None:
    """On a dashboard opened from a lesson: a link back to that lesson step (entry point, every page)."""
    import streamlit as st
    pos = st.session_state.get(_POS)
    if pos is None or getattr(page, "url_path", "") == "lessons":
        return
    sec_id, n = pos
    try:
        title = f": {section(sec_id).steps[n - 1].title}"
    except (StopIteration, IndexError, TypeError):
        title = ""
    # a short label (the sidebar truncates long ones); the step it returns to in a caption that wraps
    st.sidebar.page_link("pages/lessons.py", label="Back to the lesson", icon=":material/school:")
    st.sidebar.caption(f"{sec_id}, step {n}{title}")


def section(sid: str) -> Section:
    return next(s for s in SECTIONS if s.id == sid)


def all_steps() -> list[tuple[Section, int, Step]]:
    """Every (section, 1-based step number, step)."""
    return [(s, i + 1, st) for s in SECTIONS for i, st in enumerate(s.steps)]


def step_query(sec: Section, n: int) -> dict[str, str]:
    """Query parameters of the lessons page showing step `n` of `sec` (a shareable link to the step)."""
    return {"ls_sec": sec.id, "ls_step": str(n)}


# ====================================================================== previews (the lessons page)
def _model_json(model: str) -> str:
    import json

    from core.config import PRESETS
    return json.dumps(PRESETS[model].to_hf(), sort_keys=True)


def previews(step: Step, seed: int = 0) -> list[tuple]:
    """[(figure, data, name)] for the step's preview charts: the target dashboard's key chart computed with the
    step's knobs (the page's other knobs at their defaults). Uses the same cached computations as the pages."""
    from app import charts, compute
    from app.lab import charts as ct
    from app.lab import records as rec

    kn = step.knobs
    model = kn.get("model", "deepseek-v3")
    seed = kn.get("seed", seed)
    cfg_json = _model_json(model)
    cfg = compute.common.cfg_of(cfg_json)
    out = []
    for kind in step.preview:
        if kind == "kv":
            h0 = cfg.num_attention_heads
            arch = dict(kv_lora_rank=kn.get("mla_dc", cfg.kv_lora_rank),
                        qk_rope_head_dim=kn.get("mla_rope", cfg.qk_rope_head_dim),
                        num_attention_heads=kn.get("mla_heads", h0), v_head_dim=kn.get("mla_dh", cfg.v_head_dim),
                        qk_nope_head_dim=kn.get("mla_nope", cfg.qk_nope_head_dim),
                        num_hidden_layers=kn.get("mla_layers", cfg.num_hidden_layers))
            arch["num_key_value_heads"] = arch["num_attention_heads"]
            groups = kn.get("mla_groups", 8 if h0 % 8 == 0 and h0 > 8 else max(1, h0 // 2))
            ctx, batch = kn.get("mla_ctx", 131072), kn.get("mla_batch", 1)
            arch_json = compute.mla.mla_arch(cfg_json, **arch)
            kv = compute.mla.kv_vs_context(arch_json, ctx, batch, kn.get("mla_dtype", "bf16"), groups)
            out.append((charts.mla.kv_vs_context(kv, ctx, batch, groups, kn.get("mla_log", True)), kv, "kv cache"))
        elif kind == "attention":
            small = compute.mla.scaled_down(cfg_json)
            amap = compute.mla.attention_map(small, seed)
            rel = kn.get("mla_heatview", "× uniform") == "× uniform"
            out.append((charts.mla.attention_heatmap(amap["probs"][0], 0, amap["ids"], rel), amap["table"],
                        "attention heatmap"))
        elif kind == "maxvio":
            e = kn.get("moe_experts", max(cfg.n_routed_experts, 4))
            groups = kn.get("moe_groups", cfg.n_group if cfg.n_group in (1, 2, 4, 8, 16) else 1)
            sim = compute.moe.moe_simulation(e, kn.get("moe_topk", min(max(cfg.num_experts_per_tok, 1), 16)),
                                             groups, kn.get("moe_topkg", min(cfg.topk_group, 16)),
                                             kn.get("moe_scoring", cfg.scoring_func), kn.get("moe_gamma", 1e-2),
                                             kn.get("moe_alpha", 1e-2), kn.get("moe_steps", 30),
                                             kn.get("moe_skew", 1.0), seed)
            out.append((charts.moe.maxvio_over_steps(sim["max_vio"]), sim["max_vio"], "maxvio per step"))
        elif kind in ("fp8hist", "sweep"):
            fmt, gran = kn.get("fp8_fmt", "e4m3"), kn.get("fp8_gran", "tensor")
            och, osz = kn.get("fp8_och", 4), kn.get("fp8_osz", 10000.0)
            if kind == "fp8hist":
                q = compute.fp8.fp8_quantize(fmt, gran, kn.get("fp8_over", "saturate"),
                                             kn.get("fp8_data", "outliers"), och, osz, seed)
                out.append((charts.fp8.fp8_histogram(q["hist"], q["grid"], q["metrics"], fmt,
                                                     compute.fp8.GRAN_LABELS[gran]), q["hist"], "fp8 histogram"))
            else:
                f = "e4m3" if fmt == "bf16" else fmt
                sw = compute.fp8.fp8_granularity_sweep(f, och, seed)
                out.append((charts.fp8.granularity_sweep(sw, osz, f, och), sw, "granularity vs outliers"))
        elif kind == "gemm":
            nc, bits = kn.get("fp8_nc", 128), kn.get("fp8_accbits", 13)
            g = compute.fp8.fp8_gemm_curves(bits, nc, kn.get("fp8_fmt", "e4m3"), seed)
            out.append((charts.fp8.gemm_error(g, nc, bits), g, "gemm error vs k"))
        elif kind in ("params", "memory"):
            d = compute.overview.overview(cfg_json, kn.get("ov_ctx", 131072), kn.get("ov_kvdt", "bf16"))
            if kind == "params":
                out.append((charts.overview.params_breakdown(d["params"], d["counts"]),
                            d["params"].drop(columns=["formula"]), "parameter breakdown"))
            else:
                out.append((charts.overview.memory_bars(d["memory"]), d["memory"], "memory"))
        elif kind == "lab":
            from app.lab import knobs as lab_knobs
            from core.train import lr_at
            knobs = {k: v for k, v in kn.items() if k.startswith("tr_")}
            mcfg, tcfg = lab_knobs.lab_config(knobs, seed)
            d = compute.overview.overview(_json(mcfg), tcfg.seq_len, "fp32")
            out.append((ct.lab_params(d["params"], d["counts"]), d["params"].drop(columns=["formula"]),
                        "lab model parameters"))
            lrs = rec.lr_table([lr_at(i, tcfg) for i in range(tcfg.steps)])
            out.append((ct.lr_schedule(lrs, tcfg.warmup), lrs, "learning rate schedule"))
    return out


def _json(cfg) -> str:
    import json
    return json.dumps(cfg.to_hf(), sort_keys=True)
