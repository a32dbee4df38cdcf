"""Page texts: explanations (Markdown with $...$ math), display equations and knob labels."""
from __future__ import annotations

from core.calc import param_counts
from core.config import PRESETS
from core.published import (FP8_ACCUM_ERROR, FP8_ACCUM_ERROR_K, H800_FP8_ACCUM_BITS, V3_ACTIVATED_PARAMS,
                            V3_ACTIVATED_PARAMS_README, V3_CHECKPOINT_PARAMS, V3_CONTEXT_TOKENS, V3_PROMOTION_INTERVAL,
                            V3_TOTAL_PARAMS, billions)
from core.units import human_count, tokens

# Eva's activated count of DeepSeek-V3 (core.calc convention), quoted beside the published ones.
_V3_ACTIVATED_OURS = param_counts(PRESETS["deepseek-v3"])["activated"]

# ====================================================================== Overview
OVERVIEW_TITLE = "Overview — how big is DeepSeek-V3, really?"
OVERVIEW_SUB = "Parameters, FLOPs and memory of the whole model, computed from its config"

OVERVIEW_EXPLAIN = r"""
**Where the parameters are.** A DeepSeek-V3 block is pre-norm attention (MLA) followed by a feed-forward
network. The first $k$ blocks (`first_k_dense_replace`, 3 for V3) use a dense SwiGLU FFN; every later block uses
**DeepSeekMoE**: $N_s$ shared experts that every token uses, plus $N_r$ routed experts of which a router picks
$K_r$ per token. Each expert is a small SwiGLU ($3\,d\,d_e$ weights). So almost all weights sit in routed
experts, yet a token touches only $K_r/N_r$ of them (8 of 256 for V3).

""" + f"""
**Activated parameters** are every weight one token's forward pass multiplies: embedding and head, all attention,
dense FFNs, shared experts, router, norms and the $K_r$ chosen experts per MoE layer. The MTP module (one extra
block used for multi-token prediction during training) is not counted; the published
"{billions(V3_CHECKPOINT_PARAMS)}" checkpoint adds it (with its own copies of embedding and head) to the
{billions(V3_TOTAL_PARAMS)} main model. DeepSeek does not publish its exact activated convention; ours gives
{human_count(_V3_ACTIVATED_OURS)} against the paper's "{billions(V3_ACTIVATED_PARAMS)}" (README_WEIGHTS says
{billions(V3_ACTIVATED_PARAMS_README)}).

""" + r"""**FLOPs per token.** Each weight is used once per token in a multiply-add (2 FLOPs), and attention adds
$QK^\top$ and $PV$ over the context. Training costs about three forward passes (the backward pass is twice the
forward).

**Memory.** BF16 stores 2 bytes per weight. The released FP8 checkpoint stores attention and FFN/expert matrices
in E4M3 (1 byte) plus one FP32 scale per $128\times128$ block; embedding, head, router and norms stay BF16.
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
$c^{KV}_t$ of $d_c$ numbers per token (512 in V3); every head's key and value are reconstructed from it by
up-projections $W^{UK}, W^{UV}$. RoPE cannot be folded into those matrices (it depends on the position), so MLA adds
a small **decoupled RoPE key** $k^R_t$ of $d_h^R$ numbers shared by all heads. Only $c^{KV}_t$ and $k^R_t$ are
cached: $d_c + d_h^R = 576$ numbers per token per layer in V3, vs $2 \cdot 128 \cdot 128 = 32{,}768$ for MHA.

**Absorption.** Since $q^\top k = (q^C)^\top W^{UK} c^{KV}$, the up-projection $W^{UK}$ can be folded into the
query, and $W^{UV}$ into the output projection. Decoding then attends directly over the latent cache — the
**absorbed** path. The **naive** path decompresses and caches every head's K (nope + rope) and V instead
($n_h(d_{qk} + d_v)$ numbers); both give the same outputs, as the measured run below shows.

**Low rank.** Because every head's K and V come from the same $d_c + d_h^R$ numbers, the per-head K/V matrix of MLA
has rank at most $d_c + d_h^R$: a rank-$r$ truncation with $r \ge d_c + d_h^R$ is exact. MHA's K/V have no such
structure, so truncating them always costs error.
"""

MLA_EQUATIONS = [
    r"c^{KV}_t = W^{DKV} h_t,\quad k^C_t = W^{UK} c^{KV}_t,\quad v^C_t = W^{UV} c^{KV}_t,\quad "
    r"k^R_t = \operatorname{RoPE}(W^{KR} h_t)",
    r"k_{t,i} = [k^C_{t,i};\, k^R_t],\qquad "
    r"o_{t,i} = \sum_{j \le t} \operatorname{softmax}_j\!\Big(\tfrac{q_{t,i}^\top k_{j,i}}{\sqrt{d_h + d_h^R}}\Big)\, v^C_{j,i}",
    r"\text{KV bytes} = e \cdot L \cdot T \cdot B \cdot \text{bytes/elt},\quad "
    r"e = \begin{cases} 2 n_h d_h & \text{MHA} \\ 2 n_g d_h & \text{GQA} \\ 2 d_h & \text{MQA} \\ "
    r"d_c + d_h^R & \text{MLA} \end{cases}",
    r"(q^C_{t,i})^\top k^C_{j,i} = \big((W^{UK}_i)^\top q^C_{t,i}\big)^\top c^{KV}_j "
    r"\quad\text{(absorb } W^{UK}\text{ into the query)}",
]

# ====================================================================== FP8 lab
FP8_TITLE = "FP8 lab — what 8-bit floats do to a tensor"
FP8_SUB = "Formats, scaling granularity, overflow, and why DeepSeek-V3 promotes FP8 GEMM partial sums to FP32"

FP8_EXPLAIN = r"""
**The formats.** An FP8 number has 1 sign bit, $e$ exponent bits and $m$ mantissa bits. **E4M3** (4+3) has more
precision (a step of $2^{-3}$ relative to a power of two) but a small range: max $448$, smallest subnormal $2^{-9}$.
**E5M2** (5+2) has range (max $57{,}344$, down to $2^{-16}$) but only 2 mantissa bits. BF16, shown for contrast,
keeps FP32's 8-bit exponent with 7 mantissa bits. Rounding is round-to-nearest-even: the relative error of a normal
value is at most $2^{-(m+1)}$ (6.25% for E4M3).

**Scaling.** The range is tiny, so a tensor is divided by a scale $s$ before the cast and multiplied back after:
$s = \max|x| / \text{max}_{\text{fmt}}$ maps the largest value onto the format's max. One scale per **tensor** means a
single outlier sets the scale for everything, pushing ordinary values into the subnormals or to zero. DeepSeek-V3
uses one scale per **1×128 tile** of activations and per **128×128 block** of weights (§3.3.2), so an outlier only
affects its own group; **MX** formats use 1×32 groups with power-of-two (E8M0) scales.

**Current vs delayed scaling.** *Current* scaling measures $\max|x|$ of the tensor being cast (DeepSeek does this,
online). *Delayed* scaling (TransformerEngine) reuses the max of the last $H$ steps' amax history to avoid a second
pass; when values grow faster than the history, the scale is too small and values **overflow**: they are clamped
to the max (*saturate*) or become NaN/inf — both damage training.

""" + f"""
**Accumulation.** An FP8 GEMM sums $K$ products. H800 tensor cores accumulate with only ~{H800_FP8_ACCUM_BITS} bits,
so for $K={FP8_ACCUM_ERROR_K}$ the error reaches ~{FP8_ACCUM_ERROR:.0%}. DeepSeek-V3 copies the partial sum into an
FP32 register every $N_C = {V3_PROMOTION_INTERVAL}$ products ("promotion"), where the per-group scales are also
applied.
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
MOE_TITLE = "MoE routing — how DeepSeek-V3 spreads tokens over 256 experts"
MOE_SUB = "A real router on a multi-domain token stream, load-balance metrics, and the aux-loss-free bias controller"

MOE_EXPLAIN = r"""
**DeepSeekMoE.** Every MoE layer has $N_s$ *shared* experts that see every token and $N_r$ *routed* experts of which
each token uses $K_r$ (V3: 1 shared, 256 routed, 8 per token). The router scores each expert with a sigmoid of the
token's affinity $u_t^\top e_i$, picks the top-$K_r$ and weights their outputs by the normalized scores, times a
*route scale* (2.5 in V3).

**Node-limited routing.** Experts are split into groups (one per node: 8 in V3). A group's score is the sum of its
two best (biased) expert scores; each token may only use its best `topk_group` groups (4 in V3), which caps
cross-node traffic. Experts of the other groups are masked with $-\infty$.

**Load balance.** If the router sends most tokens to a few experts, those experts are the bottleneck while others
idle or never learn ("routing collapse"). Metrics: **MaxVio** $=\max_i c_i/\bar c - 1$ (0 = perfect), the
coefficient of variation of the loads, the normalized entropy of the load distribution (1 = perfect), dead experts
($c_i = 0$), and the share of token slots a capacity-limited router (capacity $= \text{CF}\cdot\bar c$) would drop.
DeepSeek-V3 itself has no capacity limit and drops nothing.

**Aux loss vs aux-loss-free.** The classic fix adds a balance loss $\alpha\sum_i f_i P_i$ whose gradient pushes the
router towards uniform loads — it also pulls against the language-modelling objective. DeepSeek-V3 instead adds a
per-expert **bias** $b_i$ to the scores *for the top-k choice only*, and after each batch moves it by $\gamma$ against
the expert's load error. Gate values still use the unbiased scores, so the bias balances without a gradient.
"""

MOE_EQUATIONS = [
    r"s_{i,t} = \sigma(u_t^\top e_i),\qquad g'_{i,t} = \begin{cases} s_{i,t} & s_{i,t} + b_i \in "
    r"\operatorname{Topk}(\{s_{j,t} + b_j\}, K_r)\\ 0 & \text{otherwise}\end{cases},\qquad "
    r"g_{i,t} = \frac{g'_{i,t}}{\sum_j g'_{j,t}}",
    r"h'_t = u_t + \sum_{i=1}^{N_s} \text{FFN}^{(s)}_i(u_t) + \sum_{i=1}^{N_r} g_{i,t}\,\text{FFN}^{(r)}_i(u_t)",
    r"b_i \leftarrow b_i + \gamma\,\operatorname{sign}(\bar c - c_i)\qquad"
    r"\mathcal{L}_{\text{Bal}} = \alpha \sum_{i=1}^{N_r} f_i P_i",
    r"\text{MaxVio} = \frac{\max_i c_i}{\bar c} - 1,\qquad \text{CV} = \frac{\operatorname{std}(c)}{\bar c},\qquad "
    r"H = -\frac{\sum_i p_i \log p_i}{\log N_r}",
]

# ====================================================================== Training lab
TRAIN_TITLE = "Training lab — watch a mini DeepSeek-V3 learn"
TRAIN_SUB = "Build a small model from the V3 ingredients, train it on this server's CPU, compare the runs"

TRAIN_EXPLAIN = r"""
**What trains.** The lab trains the `mini` preset (4 layers, hidden size 256, byte-level vocabulary of 256) with
your knobs: the attention (MLA as in V3, or MHA / GQA / MQA), the feed-forward (DeepSeekMoE: 1 shared expert plus
top-$k$ of $N_r$ routed experts in every layer after the first, or a dense SwiGLU), the balancing strategy, the
number format of every matrix multiply, and the multi-token-prediction (MTP) module. Runs are tiny — a few
seconds to a minute on one CPU core — so the point is the *shape* of the curves, not the final quality.

**The loss.** Each step takes a batch of random windows of the dataset and minimises the next-byte cross-entropy
$\mathcal{L}_{\text{LM}}$ (nats per byte; a uniform guess over 256 bytes scores $\ln 256 = 5.55$). With MTP on, a
sequential module also predicts the byte after next from the main model's hidden state and the next byte's
embedding (V3 §2.2, eqs. 21–25); its loss is added with weight $\lambda = 0.3$. The validation loss is the same
cross-entropy on held-out text, measured every ~1/6 of the run.

**Load balancing.** *aux-loss-free* (V3 §2.1.2): after every step each router bias $b_i$ moves by $\gamma$ against
its expert's load error; the bias only changes *which* experts are picked. *aux loss*: a sequence-wise balance
loss $\alpha \sum_i f_i P_i$ (eqs. 17–20) pulls the router towards uniform loads through the gradient. *both*:
V3's recipe — the bias plus an "extremely small" aux loss. *none*: watch the router collapse onto a few experts.
MaxVio $= \max_i c_i/\bar c - 1$ measures the imbalance of each batch.

**Precision.** FP32; BF16 compute with FP32 master weights; or an **FP8 recipe**: every linear layer quantizes its
input and weight to FP8 before the GEMM (emulated on the CPU, same rounding as the GPU), with the scaling of the
recipe — DeepSeek's 1×128 activation tiles and 128×128 weight blocks, per-tensor current or delayed scaling,
MX 1×32 blocks or one power-of-two scale per row. The optimizer always keeps FP32 master weights.

**Optimizer.** AdamW ($\beta = 0.9, 0.95$, weight decay 0.1 on matrices), gradient clipping at norm 1, linear
warm-up over the first 10% of the steps, then cosine decay to 0.
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
