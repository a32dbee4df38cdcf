"""Page texts: explanations (Markdown with $...$ math), display equations and knob labels.

Every number in the prose is computed here from `core` (configs, calculators, formats) or read from
`core.published` (the published figures, each with its source), so no figure is typed twice."""
from __future__ import annotations

import math

from core.calc import kv_elements_per_token, param_counts
from core.config import PRESETS
from core.fp8 import FORMATS
from core.published import (FP8_ACCUM_ERROR, FP8_ACCUM_ERROR_K, FP8_VALIDATION_RUNS, H800_FP8_ACCUM_BITS,
                            V2_ACTIVATED_PARAMS, V2_LITE_ACTIVATED_PARAMS, V3_ACTIVATED_PARAMS,
                            V3_ACTIVATED_PARAMS_README, V3_BALANCE_ALPHA, V3_CHECKPOINT_PARAMS, V3_CONTEXT_TOKENS,
                            V3_FP8_LOSS_REL_ERROR, V3_PROMOTION_INTERVAL, V3_TOTAL_PARAMS, billions, trillions)
from core.train import APP_DEFAULT
from core.units import human_count, tokens

V3, V2, MINI = PRESETS["deepseek-v3"], PRESETS["deepseek-v2"], PRESETS["mini"]
E4M3, E5M2 = FORMATS["e4m3"], FORMATS["e5m2"]

# Activated parameters in both common conventions (core.calc), beside the published figure of each model.
_PUBLISHED_ACTIVATED = {"deepseek-v3": (V3_ACTIVATED_PARAMS, V3_ACTIVATED_PARAMS_README),
                        "deepseek-v2": (V2_ACTIVATED_PARAMS, None), "deepseek-v2-lite": (V2_LITE_ACTIVATED_PARAMS, None)}
_NAMES = {"deepseek-v3": "DeepSeek-V3", "deepseek-v2": "DeepSeek-V2", "deepseek-v2-lite": "DeepSeek-V2-Lite"}
COUNTS = {name: param_counts(PRESETS[name]) for name in _PUBLISHED_ACTIVATED}


def activated_share(name: str) -> float:
    """Activated / total parameters of a preset (core.calc convention, with the input embedding)."""
    return COUNTS[name]["activated"] / COUNTS[name]["total"]


def activated_lines() -> str:
    """One Markdown bullet per released model: Eva's activated count with and without the input embedding, and the
    published figure (V3 report abstract; V2 report abstract and App. B; README_WEIGHTS)."""
    rows = []
    for name, (pub, readme) in _PUBLISHED_ACTIVATED.items():
        c = COUNTS[name]
        extra = f", README_WEIGHTS {billions(readme)}" if readme else ""
        rows.append(f"- {_NAMES[name]}: "
                    f"**{human_count(c['activated'])}** with the input embedding, "
                    f"**{human_count(c['activated_no_embedding'])}** without; published {billions(pub)}{extra}")
    return "\n".join(rows)


def fp8_validation_sentence() -> str:
    """What the report's FP8-vs-BF16 validation covered (V3 report §3.3, App. B.1)."""
    runs = " and ".join(f"~{billions(p)} on {trillions(t)} tokens" for p, t in FP8_VALIDATION_RUNS)
    return (f"relative loss error below {V3_FP8_LOSS_REL_ERROR:.2%} against BF16, validated on two smaller MoE models "
            f"({runs}; V3 report App. B.1), not on V3 itself")


def _per_layer(cfg, kind: str) -> int:
    """KV-cache numbers per token per layer (core.calc)."""
    return kv_elements_per_token(cfg, kind) // cfg.num_hidden_layers


V3_KV_MLA, V3_KV_MHA = _per_layer(V3, "mla"), _per_layer(V3, "mha")


def math_int(n: int) -> str:
    """An integer with thousands separators inside $...$ ({,} keeps LaTeX from spacing the comma)."""
    return f"{n:,}".replace(",", "{,}")

# ====================================================================== Overview
OVERVIEW_TITLE = "Overview — how big is DeepSeek-V3, really?"
OVERVIEW_SUB = "Parameters, FLOPs and memory of the whole model, computed from its config"

OVERVIEW_EXPLAIN = r"""
**Where the parameters are.** A DeepSeek-V3 block is pre-norm attention (MLA) followed by a feed-forward
network. The first $k$ blocks (`first_k_dense_replace`, """ + f"{V3.first_k_dense_replace}" + r""" for V3) use a dense
SwiGLU FFN; every later block uses **DeepSeekMoE**: $N_s$ shared experts that every token uses, plus $N_r$ routed
experts of which a router picks $K_r$ per token. Each expert is a small SwiGLU ($3\,d\,d_e$ weights). So almost all
weights sit in routed experts, yet a token touches only $K_r/N_r$ of them (""" + (
    f"{V3.num_experts_per_tok} of {V3.n_routed_experts} for V3).") + f"""

**Activated parameters** are every weight one token's forward pass uses: embedding and head, all attention,
dense FFNs, shared experts, router, norms and the $K_r$ chosen experts per MoE layer. The MTP module (one extra
block used for multi-token prediction during training) is not counted; the published
"{billions(V3_CHECKPOINT_PARAMS)}" checkpoint adds it (with its own copies of embedding and head) to the
{billions(V3_TOTAL_PARAMS)} main model. DeepSeek does not state whether its activated figures count the input
embedding (a table lookup, not a matrix multiply), so Eva gives both conventions beside the published figures:

{activated_lines()}

""" + r"""**FLOPs per token.** Each weight is used once per token in a multiply-add (2 FLOPs), and attention adds
$QK^\top$ and $PV$ over the context. Training costs about three forward passes (the backward pass is about twice
the forward).

**Memory.** BF16 stores 2 bytes per weight. The released FP8 checkpoint stores attention and FFN/expert matrices
in E4M3 (1 byte) plus one FP32 scale per $128\times128$ block; embedding, head, router and norms stay in BF16.
The **KV cache** grows with every token of every sequence: MLA caches only the compressed latent
$c^{KV}$ ($d_c$ numbers) and the shared RoPE key $k^R$ ($d_h^R$ numbers) per token and layer.
"""

OVERVIEW_EQUATIONS = [
    r"N_{\text{act}} = N_{\text{total}} - (N_r - K_r)\cdot 3\,d\,d_e \cdot L_{\text{MoE}}",
    r"F_{\text{fwd}} \approx 2\,N'_{\text{act}} + 2\,L\,n_h\,(d_{qk} + d_v)\,T,\qquad F_{\text{train}} \approx 3\,F_{\text{fwd}}",
    r"M_{\text{FP8}} = 1\cdot N_{\text{lin}} + 2\cdot N_{\text{other}} + 4\cdot\lceil N_{\text{lin}}/128^2\rceil\ \text{bytes}",
    r"\text{KV}_{\text{MLA}} = (d_c + d_h^R)\cdot L \cdot T \cdot B \cdot \text{bytes}",
]

# Knob labels for the custom-architecture overrides (config field -> label); also used to name the knob in errors.
OVERRIDE_FIELDS = [
    ("num_hidden_layers", "Layers L", 1),
    ("hidden_size", "Hidden size d", 1),
    ("num_attention_heads", "Attention heads n_h", 1),
    ("kv_lora_rank", "KV latent dim d_c", 1),
    ("q_lora_rank", "Query latent dim d'_c", 1),
    ("qk_rope_head_dim", "RoPE key dim d_h^R", 2),
    ("intermediate_size", "Dense FFN width d_ff", 1),
    ("first_k_dense_replace", "Dense layers before MoE", 1),
    ("n_routed_experts", "Routed experts N_r", 1),
    ("n_shared_experts", "Shared experts N_s", 1),
    ("num_experts_per_tok", "Experts per token K_r", 1),
    ("moe_intermediate_size", "Expert width d_e", 1),
    ("n_group", "Expert groups", 1),
    ("topk_group", "Groups per token", 1),
    ("vocab_size", "Vocabulary V", 1),
    ("num_nextn_predict_layers", "MTP depth D", 1),
]
OVERRIDE_KEYS = {f: "ov_" + f for f, _, _ in OVERRIDE_FIELDS}
OVERRIDE_LABELS = {f: lbl for f, lbl, _ in OVERRIDE_FIELDS}

# ====================================================================== MLA & KV cache
MLA_TITLE = f"MLA & KV cache — why DeepSeek-V3 can afford {tokens(V3_CONTEXT_TOKENS)} tokens"
MLA_SUB = "Multi-head Latent Attention caches a small latent per token instead of every head's keys and values"

MLA_EXPLAIN = r"""
**Why there is a KV cache.** When a model generates text, each new token attends to the keys and values of every
earlier token. Recomputing them at every step would be quadratic, so they are **cached**: standard multi-head
attention (MHA) stores $2\,n_h d_h$ numbers per token per layer, and the cache grows linearly with context and batch.

**GQA and MQA** shrink the cache by letting groups of query heads share one K/V head: $2\,n_g d_h$ ($n_g$ groups)
or $2\,d_h$ (a single K/V head). They save memory by *removing* K/V capacity.

**MLA** (DeepSeek-V2 §2.1, V3 §2.1.1) instead *compresses*: a down-projection produces one latent vector
$c^{KV}_t$ of $d_c$ numbers per token (""" + f"{V3.kv_lora_rank}" + r""" in V3); every head's key and value are
reconstructed from it by up-projections $W^{UK}, W^{UV}$. At decode time $W^{UK}$ is folded into the query
projection (absorption, below) so the keys are never rebuilt. RoPE would break that: rotating $k^C_j$ puts a rotation
that depends on the positions of the query and of each cached token *between* $W^{Q}$ and $W^{UK}$, and matrix
products do not commute, so $W^{UK}$ could no longer be absorbed and every cached key would have to be recomputed
for each new token (V2 report §2.1.3). MLA therefore leaves $k^C$ unrotated and adds a small **decoupled RoPE key**
$k^R_t$ of $d_h^R$ numbers shared by all heads (with a matching per-head RoPE query $q^R_{t,i}$). Only $c^{KV}_t$
and $k^R_t$ are cached: """ + (f"$d_c + d_h^R = {math_int(V3_KV_MLA)}$ numbers per token per layer in V3, vs "
                               f"$2\\,n_h d_h = {math_int(V3_KV_MHA)}$ for MHA of the same shape.") + r"""

**Absorption.** The score of head $i$ is the sum of a content part and a RoPE part,
$q_{t,i}^\top k_{j,i} = (q^C_{t,i})^\top W^{UK}_i c^{KV}_j + (q^R_{t,i})^\top k^R_j$. In the content part
$W^{UK}_i$ can be folded into the query, and $W^{UV}$ into the output projection; the RoPE part uses the cached
$k^R_j$ directly. Decoding then attends over the latent cache — the **absorbed** path. The **naive** path
decompresses and caches every head's K (nope + rope) and V instead ($n_h(d_{qk} + d_v)$ numbers); both give the
same outputs, as the measured run below shows.

**Low rank.** Because every head's K and V come from the same $d_c + d_h^R$ numbers per token, the decompressed
K/V of all heads together (one row per token, $n_h(d_{qk} + d_v)$ columns) has rank at most $d_c + d_h^R$: a
rank-$r$ truncation with $r \ge d_c + d_h^R$ is exact. MHA's K/V have no such structure, so truncating them costs
error.
"""

MLA_EQUATIONS = [
    r"c^{KV}_t = W^{DKV} h_t,\quad k^C_t = W^{UK} c^{KV}_t,\quad v^C_t = W^{UV} c^{KV}_t,\quad "
    r"k^R_t = \operatorname{RoPE}(W^{KR} h_t)",
    r"k_{t,i} = [k^C_{t,i};\, k^R_t],\qquad "
    r"o_{t,i} = \sum_{j \le t} \operatorname{softmax}_j\!\Big(\tfrac{q_{t,i}^\top k_{j,i}}{\sqrt{d_h + d_h^R}}\Big)\, v^C_{j,i}",
    r"\text{KV bytes} = e \cdot L \cdot T \cdot B \cdot \text{bytes/elt},\quad "
    r"e = \begin{cases} 2 n_h d_h & \text{MHA} \\ 2 n_g d_h & \text{GQA} \\ 2 d_h & \text{MQA} \\ "
    r"d_c + d_h^R & \text{MLA} \end{cases}",
    r"q_{t,i}^\top k_{j,i} = \big((W^{UK}_i)^\top q^C_{t,i}\big)^\top c^{KV}_j + (q^R_{t,i})^\top k^R_j "
    r"\quad\text{(absorb } W^{UK}\text{ into the query; the RoPE part uses the cached } k^R_j\text{)}",
]

# ====================================================================== FP8 lab
FP8_TITLE = "FP8 lab — what 8-bit floats do to a tensor"
FP8_SUB = "Formats, scaling granularity, overflow, and why DeepSeek-V3 promotes FP8 GEMM partial sums to FP32"

def _pow2(x: float) -> str:
    """2.0 ** -9 -> '2^{-9}' (exact powers of two only)."""
    e = math.log2(x)
    assert e == int(e), x
    return f"2^{{{int(e)}}}"


FP8_EXPLAIN = f"""
**The formats.** An FP8 number has 1 sign bit, $e$ exponent bits and $m$ mantissa bits. **E4M3** (4+3) has more
precision (a step of ${_pow2(2.0 ** -E4M3.man_bits)}$ relative to a power of two) but a small range: max
${E4M3.max:g}$, smallest subnormal ${_pow2(E4M3.min_subnormal)}$. **E5M2** (5+2) has range (max
${math_int(int(E5M2.max))}$, down to ${_pow2(E5M2.min_subnormal)}$) but only {E5M2.man_bits} mantissa bits. BF16,
shown for contrast, keeps FP32's 8-bit exponent with 7 mantissa bits. Rounding is round-to-nearest-even: the
relative error of a normal value is at most $2^{{-(m+1)}}$ ({2.0 ** -(E4M3.man_bits + 1):.2%} for E4M3).
""" + r"""
**Scaling.** The range is tiny, so a tensor is divided by a scale $s$ before the cast and multiplied back after:
$s = \max|x| / \text{max}_{\text{fmt}}$ maps the largest value onto the format's max. One scale per **tensor** means a
single outlier sets the scale for everything, pushing ordinary values into the subnormals or to zero. DeepSeek-V3
uses one scale per **1×128 tile** of activations and per **128×128 block** of weights (V3 report §3.3.2), so an
outlier only affects its own group; **MX** formats use 1×32 groups with power-of-two (E8M0) scales.

**Current vs delayed scaling.** *Current* scaling measures $\max|x|$ of the tensor being cast (DeepSeek does this,
online). *Delayed* scaling (TransformerEngine) reuses the max of the last $H$ steps' amax history to avoid a second
pass; when values grow faster than the history, the scale is too small and values **overflow**: they are clamped
to the max (*saturate*) or become NaN/inf — both damage training.

""" + f"""
**Accumulation.** An FP8 GEMM sums $K$ products. H800 tensor cores accumulate with only ~{H800_FP8_ACCUM_BITS} bits,
so for $K={FP8_ACCUM_ERROR_K}$ the error reaches ~{FP8_ACCUM_ERROR:.0%}. DeepSeek-V3 copies the partial sum into an
FP32 register every $N_C = {V3_PROMOTION_INTERVAL}$ elements of $K$ ("promotion"), where the per-group scales are also
applied (V3 report §3.3.2).

**What V3 keeps in which precision** (V3 report §3.3.1, Fig. 6; §3.3.3). The operands of the three GEMMs of a
linear layer (forward, activation gradient, weight gradient) are FP8 in **E4M3** — the report uses E4M3 for these
instead of the usual E4M3/E5M2 split, relying on the fine-grained scales. Exceptions: the activations entering the
linear after attention are kept in a custom **E5M6** format with power-of-2 scales (they are re-tiled from 1×128
to 128×1 for the backward pass); the activations dispatched to the MoE up-projections and the activation gradients
before the MoE down-projections use power-of-2 scales; the MoE combine, and AdamW's first and second moments, are
**BF16**; embedding, output head, MoE gating, normalization and attention stay in BF16/FP32, as do master weights
and weight gradients (FP32). Which of these each of Eva's training recipes models is listed in the recipe table on
this page; the GEMMs themselves are emulated on the CPU (quantize, dequantize, multiply in FP32).
"""

FP8_EQUATIONS = [
    r"x = (-1)^{s}\cdot 2^{E - \text{bias}}\cdot 1.M\ \ (\text{normal}),\qquad "
    r"x = (-1)^{s}\cdot 2^{1-\text{bias}}\cdot 0.M\ \ (\text{subnormal})",
    r"s_g = \frac{\max(\max_{i \in g}|x_i|,\ 10^{-4})}{\text{max}_{\text{fmt}}},\qquad "
    r"q_i = \operatorname{RNE}\!\big(\operatorname{clamp}(x_i / s_g)\big),\qquad \hat{x}_i = q_i\, s_g",
    r"\text{SQNR} = 10\log_{10}\frac{\sum_i x_i^2}{\sum_i (x_i - \hat x_i)^2}\ \text{dB}",
    r"C_{mn} = \sum_{k_b} s^A_{m,k_b}\, s^B_{n,k_b} \sum_{k \in k_b} q^A_{mk}\, q^B_{nk}"
    r"\quad(\text{FP32 sum over blocks } k_b \text{ of } N_C = " + f"{V3_PROMOTION_INTERVAL})",
]

# ====================================================================== MoE routing
MOE_TITLE = f"MoE routing — how DeepSeek-V3 spreads tokens over {V3.n_routed_experts} experts"
MOE_SUB = "A real router on a multi-domain token stream, load-balance metrics, and the aux-loss-free bias controller"

MOE_EXPLAIN = r"""
**DeepSeekMoE.** Every MoE layer has $N_s$ *shared* experts that see every token and $N_r$ *routed* experts of which
each token uses $K_r$ """ + (f"(V3: {V3.n_shared_experts} shared, {V3.n_routed_experts} routed, "
                            f"{V3.num_experts_per_tok} per token)") + r""". The router scores each expert with a
sigmoid of the token's affinity $u_t^\top e_i$, picks the top-$K_r$ and weights their outputs by the normalized
scores, times a *route scale* (""" + f"{V3.routed_scaling_factor:g}" + r""" in V3).

**Node-limited routing.** Experts are split into groups (one per node: """ + f"{V3.n_group}" + r""" in V3). A group's
score is the sum of its two best (biased) expert scores; each token may only use its best `topk_group` groups
(""" + f"{V3.topk_group}" + r""" in V3), which caps cross-node traffic. Experts of the other groups are masked with
$-\infty$.

**Load balance.** If the router sends most tokens to a few experts, those experts are the bottleneck while others
idle; in training the favoured experts also get most of the gradient, improve, and attract still more tokens — the
self-reinforcing **routing collapse** (Shazeer et al. 2017 §4; V3 §2.1.2). Metrics: **MaxVio** $=\max_i c_i/\bar c - 1$ (0 = perfect), the
coefficient of variation of the loads, the normalized entropy of the load distribution (1 = perfect), dead experts
($c_i = 0$), and the share of token slots a capacity-limited router (capacity $= \text{CF}\cdot\bar c$) would drop.
DeepSeek-V3 itself has no capacity limit and drops nothing.

**Aux loss vs aux-loss-free.** The classic fix adds a balance loss $\alpha\sum_i f_i P_i$ whose gradient pushes the
router towards uniform loads — it also pulls against the language-modelling objective: an $\alpha$ large enough to
keep the loads balanced costs perplexity (LFB paper Fig. 2; V3 §2.1.2). DeepSeek-V3 instead adds a per-expert
**bias** $b_i$ to the scores *for the top-k choice only*, and after each batch moves it by $\gamma$ against the
expert's load error. Gate values still use the unbiased scores, so the bias balances without a gradient. V3 keeps a
complementary *sequence-wise* balance loss with an extremely small weight (""" + (
    f"$\\alpha = {V3_BALANCE_ALPHA:g}$") + r""", §4.2) against extreme imbalance within one sequence; as in eq. 18,
its $f_i$ counts the top-$K_r$ of the *unbiased* scores over all routed experts, not the biased, group-limited
choice (Eva's training and simulation compute it that way).
"""

MOE_EQUATIONS = [
    r"s_{i,t} = \sigma(u_t^\top e_i),\qquad g'_{i,t} = \begin{cases} s_{i,t} & s_{i,t} + b_i \in "
    r"\operatorname{Topk}(\{s_{j,t} + b_j\}, K_r)\\ 0 & \text{otherwise}\end{cases},\qquad "
    r"g_{i,t} = \frac{g'_{i,t}}{\sum_j g'_{j,t}}",
    r"h'_t = u_t + \sum_{i=1}^{N_s} \text{FFN}^{(s)}_i(u_t) + \sum_{i=1}^{N_r} g_{i,t}\,\text{FFN}^{(r)}_i(u_t)",
    r"b_i \leftarrow b_i + \gamma\,\operatorname{sign}(\bar c - c_i)",
    r"\mathcal{L}_{\text{Bal}} = \alpha \sum_{i=1}^{N_r} f_i P_i,\quad "
    r"f_i = \frac{N_r}{K_r T} \sum_{t=1}^{T} \mathbb{1}\big(s_{i,t} \in \operatorname{Topk}(\{s_{j,t} \mid 1 \le j \le N_r\}, K_r)\big),"
    r"\quad P_i = \frac{1}{T}\sum_{t=1}^{T} \frac{s_{i,t}}{\sum_j s_{j,t}}",
    r"\text{MaxVio} = \frac{\max_i c_i}{\bar c} - 1,\qquad \text{CV} = \frac{\operatorname{std}(c)}{\bar c},\qquad "
    r"H = -\frac{\sum_i p_i \log p_i}{\log N_r}",
]

# ====================================================================== Training lab
TRAIN_TITLE = "Training lab — watch a mini DeepSeek-V3 learn"
TRAIN_SUB = "Build a small model from the V3 ingredients, train it on this server's CPU, compare the runs"

_UNIFORM_NATS = math.log(MINI.vocab_size)

TRAIN_EXPLAIN = f"""
**What trains.** The lab trains the `mini` preset ({MINI.num_hidden_layers} layers, hidden size {MINI.hidden_size},
byte-level vocabulary of {MINI.vocab_size}) with your knobs: the attention (MLA as in V3, or MHA / GQA / MQA), the
feed-forward (DeepSeekMoE: {MINI.n_shared_experts} shared expert plus top-$k$ of $N_r$ routed experts in layers
{MINI.first_k_dense_replace + 1}–{MINI.num_hidden_layers}, or a dense SwiGLU), the balancing strategy, the number format of the
matrix multiplies, and the multi-token-prediction (MTP) module. Runs are tiny — a few seconds to a minute on one CPU
core — so the point is the *shape* of the curves, not the final quality.

**The loss.** Each step takes a batch of random windows of the dataset and minimises the next-byte cross-entropy
$\\mathcal{{L}}_{{\\text{{LM}}}}$ (nats per byte; a uniform guess over {MINI.vocab_size} bytes scores
$\\ln {MINI.vocab_size} = {_UNIFORM_NATS:.2f}$). With MTP on, a sequential module also predicts the byte after next
from the main model's hidden state and the next byte's embedding (V3 §2.2, eqs. 21–25); its loss is added with
weight $\\lambda = {APP_DEFAULT.mtp_lambda:g}$. The validation loss is the same cross-entropy on held-out text,
measured about six times per run.

**Load balancing.** *aux-loss-free* (V3 §2.1.2): after every step each router bias $b_i$ moves by $\\gamma$ against
its expert's load error; the bias only changes *which* experts are picked. *aux loss*: the sequence-wise balance
loss $\\alpha \\sum_i f_i P_i$ (eqs. 17–20, $f_i$ over the top-$K_r$ of the unbiased scores as eq. 18 reads) pulls
the router towards uniform loads through the gradient. *both*: V3's recipe — the bias plus an "extremely small"
aux loss. *none*: nothing counters the imbalance, and the router may drift onto a few experts.
MaxVio $= \\max_i c_i/\\bar c - 1$ measures the imbalance of each batch.

**Precision.** FP32; BF16 compute with FP32 master weights; or an **FP8 recipe**: the attention projections and
the FFN / expert GEMMs quantize their operands to FP8 with the recipe's formats and scaling (DeepSeek's 1×128
activation tiles and 128×128 weight blocks, per-tensor current or delayed scaling, MX 1×32 blocks, or one
power-of-two scale per row); the embedding, output head, router and norms stay in high precision, as in V3
(§3.3.1). The GEMMs are emulated on the CPU: each operand gets the FP8 cast's rounding, and the products are
summed in FP32 unless the recipe models a tensor core's limited accumulator. The recipe table on the FP8 page lists,
per tensor, what each recipe quantizes and how. The optimizer always keeps FP32 master weights.

**Optimizer.** AdamW ($\\beta = {APP_DEFAULT.betas[0]:g}, {APP_DEFAULT.betas[1]:g}$, weight decay
{APP_DEFAULT.weight_decay:g} on matrices and embeddings), gradient clipping at norm {APP_DEFAULT.grad_clip:g}, linear warm-up over
the first 10% of the steps, then cosine decay to {APP_DEFAULT.min_lr:g}.
"""

TRAIN_EQUATIONS = [
    r"\mathcal{L} = \underbrace{-\tfrac{1}{T}\textstyle\sum_t \log P(x_{t+1}\mid x_{\le t})}_{\mathcal{L}_{\text{LM}}}"
    r" + \frac{\lambda}{D}\sum_{k=1}^{D} \mathcal{L}^{k}_{\text{MTP}} + \alpha \sum_{\text{MoE layers}}\sum_{i=1}^{N_r} f_i P_i",
    r"b_i \leftarrow b_i + \gamma\,\operatorname{sign}(\bar c - c_i)\quad\text{(after every step, outside the gradient)},"
    r"\qquad \text{MaxVio} = \frac{\max_i c_i}{\bar c} - 1",
    r"\eta_s = \begin{cases} \eta\,\frac{s+1}{s_w} & s < s_w \\ \tfrac{\eta}{2}\big(1 + \cos\frac{\pi (s - s_w)}{S - s_w}\big)"
    r" & s \ge s_w \end{cases}",
]

# ====================================================================== Lessons
LESSONS_TITLE = "Lessons — the DeepSeek-V3 masterclass"
LESSONS_SUB = "Six guided sections; every step sets a dashboard's knobs and says what to look at"
