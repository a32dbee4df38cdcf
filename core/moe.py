"""DeepSeekMoE: the V3 router, fused routed experts, load balancing and load metrics.

What is here (names follow transformers' `DeepseekV3MoE`, so state dicts load 1:1):

- `Router` (`mlp.gate`): sigmoid (V3) or softmax (V2) affinities, aux-loss-free bias used for expert *selection
  only*, group-limited ("node-limited") routing, top-k, gate values from the unbiased scores (V3 report eqs. 13-16).
- `Experts` (`mlp.experts`): all routed experts as two 3-D tensors in transformers v5's in-memory layout;
  token slots are sorted by expert and pushed through `torch._grouped_mm` (or a per-expert loop).
- `MoE` (`mlp`): routed + shared experts (V3 eq. 12); records `last_routing` for losses, metrics and plots.
- Balancing: `update_bias` (aux-loss-free rule, LFB paper Alg. 1), `sequence_balance_loss` (V3 eqs. 17-20),
  `switch_aux_loss`, `router_z_loss`.
- `load_metrics` (MaxVio, CV, normalized entropy, dead experts, dropped fraction, relative load).
  The MoE page's bias-controller simulation lives in `core/moe_sim.py`.

Shapes: T = tokens (batch x sequence, flattened), H = hidden_size, E = n_routed_experts, K = num_experts_per_tok,
I = moe_intermediate_size, G = n_group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from core.config import ModelConfig
from core.gemm import grouped_linear, linear, segment_granule
from core.layers import MLP, swiglu_packed

__all__ = [
    "RouterOutput", "MoERouting", "Router", "Experts", "MoE", "EXPERT_IMPLS",
    "slot_positions", "token_sum", "dispatch", "combine",
    "update_bias", "sequence_balance_loss", "switch_aux_loss", "router_z_loss", "expert_loads",
    "load_metrics",
]

EXPERT_IMPLS = ("grouped_mm", "loop")


# ----------------------------------------------------------------------------------------------------- router
@dataclass
class RouterOutput:
    """What the router decided for T tokens.

    weights:    [T, K] gate values g_{i,t} (fp32, differentiable w.r.t. the router weight): the UNBIASED scores of
                the chosen experts, renormalized if `norm_topk_prob`, times `routed_scaling_factor`.
    indices:    [T, K] int64 chosen experts (sorted by biased score, best first).
    scores:     [T, E] fp32 unbiased affinities s_{i,t} (sigmoid or softmax of the logits; differentiable).
    logits:     [T, E] fp32 router logits u_t^T e_i (for the z-loss).
    group_mask: [T, G] bool, True for the groups a token may use (None without group-limited routing).
    """

    weights: torch.Tensor
    indices: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor
    group_mask: torch.Tensor | None


@dataclass
class MoERouting(RouterOutput):
    """`MoE.last_routing`: the `RouterOutput` of the last forward plus what the trainer and the app need.

    loads:      [E] int64 token-slot counts per expert c_i (sum = T*K) in this forward, for `update_bias`
                and `load_metrics`.
    batch_size, seq_len: the input's leading shape (`[B, S, H]` input; a 2-D `[T, H]` input gives B=1, S=T),
                so per-sequence losses can reshape `scores`/`indices` to [B, S, ...].
    The tensors are the live autograd tensors (not detached) so balance losses can be backpropagated; call
    `.detach()` before keeping them across steps.
    """

    loads: torch.Tensor
    batch_size: int
    seq_len: int


class Router(nn.Module):
    """DeepSeek-V3 gate (transformers `DeepseekV3TopkRouter`, official `Gate`); V2 softmax routing too.

    V3 report §2.1.2, eqs. 13-16 (K_r = `num_experts_per_tok`, b_i = `e_score_correction_bias`; eq. 14 is the
    same top-k without the bias, which is what a zero bias or `topk_method != "noaux_tc"` gives):
        s_{i,t}  = Sigmoid(u_t^T e_i)                                                   (15)
        g'_{i,t} = s_{i,t}  if  s_{i,t} + b_i  in  Topk({s_{j,t} + b_j}, K_r)  else 0   (16)
        g_{i,t}  = g'_{i,t} / sum_j g'_{j,t}                                            (13)
    then g *= `routed_scaling_factor`. The bias only decides WHICH experts are picked; the gate values are the
    original scores (kept as a separate tensor, never recovered as (s+b)-b, which loses s when |b| >> s).

    Group-limited (node-limited) routing with G = `n_group` > 1 (not for `topk_method="greedy"`): experts are split
    into G contiguous groups; a group's score is the sum of its top-2 BIASED scores when the router has a bias
    (`noaux_tc`, V3: "sum of the highest K_r/M affinity scores", K_r/M = 8/4) or its max score otherwise (V2
    `group_limited_greedy`, official code with bias=None); the `topk_group` best groups are kept and all other
    experts are masked with -inf (not 0.0: with negative biased scores a 0.0 mask can select masked experts;
    official fix 1398800, transformers #45441).

    Renormalization follows `norm_topk_prob` with transformers' denominator `sum + 1e-20` (published configs pair
    sigmoid with True and softmax with False, which is also what the official code does).

    Parameters (kept fp32 even after `.to(bfloat16)`: router precision matters, Switch §2.4 "selective precision";
    official bias fp32 since 4592be4):
        weight                   [E, H]  nn.Parameter
        e_score_correction_bias  [E]     buffer, zeros, only when `topk_method == "noaux_tc"`; never gets a
                                         gradient (topk is not differentiable); changed by `update_bias` only.

    forward(x [..., H]) -> RouterOutput over the T = x.numel() // H flattened tokens.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.hidden_size = config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.scoring_func = config.scoring_func
        self.topk_method = config.topk_method
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = float(config.routed_scaling_factor)
        self.group_limited = self.n_group > 1 and self.topk_method != "greedy"
        self.weight = nn.Parameter(torch.empty(self.n_experts, self.hidden_size, dtype=torch.float32))
        if config.uses_bias_routing:
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.register_buffer("e_score_correction_bias", None)
        self.init_weights(config.initializer_range)

    def init_weights(self, std: float = 0.02) -> None:
        """weight ~ N(0, std) (transformers `_init_weights`), bias = 0."""
        with torch.no_grad():
            self.weight.normal_(0.0, std)
            if self.e_score_correction_bias is not None:
                self.e_score_correction_bias.zero_()

    def _apply(self, fn, recurse=True):
        # `.to(bf16)` / `.half()` must not lower the router's precision: cast back to fp32 after any conversion.
        super()._apply(fn, recurse)
        if self.weight.is_floating_point() and self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.float()
        b = self.e_score_correction_bias
        if b is not None and b.dtype != torch.float32:
            self.e_score_correction_bias = b.float()
        return self

    def forward(self, x: torch.Tensor) -> RouterOutput:
        x = x.reshape(-1, self.hidden_size)
        logits = linear(x.float(), self.weight.float())  # fp32 logits whatever the model dtype
        if self.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        # Selection runs on a detached copy: indices carry no gradient, so no graph is needed for it.
        choice = scores.detach()
        bias = self.e_score_correction_bias
        if bias is not None:
            choice = choice + bias  # biased scores for SELECTION only; `scores` stay unbiased
        group_mask = None
        if self.group_limited:
            t = choice.shape[0]
            grouped = choice.view(t, self.n_group, self.n_experts // self.n_group)
            if bias is not None:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # V3: sum of top-2 biased scores
            else:
                group_scores = grouped.amax(dim=-1)  # V2 / no bias: best expert of the group
            group_idx = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros(t, self.n_group, dtype=torch.bool, device=x.device)
            group_mask.scatter_(1, group_idx, True)
            choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(t, self.n_experts)
        indices = choice.topk(self.top_k, dim=-1, sorted=True).indices
        weights = scores.gather(1, indices)  # unbiased s_{i,t} of the chosen experts (eq. 16)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # eq. 13 (transformers' epsilon)
        weights = weights * self.routed_scaling_factor
        return RouterOutput(weights=weights, indices=indices, scores=scores, logits=logits, group_mask=group_mask)

    def extra_repr(self) -> str:
        return (f"experts={self.n_experts}, top_k={self.top_k}, groups={self.n_group}/{self.topk_group}, "
                f"scoring={self.scoring_func}, method={self.topk_method}")


# ---------------------------------------------------------------------------------------------------- experts
def _grouped_mm_supported(device: torch.device, dtype: torch.dtype, *widths: int) -> bool:
    """`torch._grouped_mm` needs 16-byte aligned row strides (fp32: widths % 4, bf16: % 8); off CPU only bf16."""
    if not hasattr(torch, "_grouped_mm") or dtype not in (torch.float32, torch.bfloat16):
        return False
    if device.type != "cpu" and dtype != torch.bfloat16:
        return False
    size = torch.finfo(dtype).bits // 8
    return all((w * size) % 16 == 0 for w in widths)


def _pad_segments(perm: torch.Tensor, counts: torch.Tensor, granule: int, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad each expert's segment of the sorted slot order to a multiple of `granule` rows.

    perm [S] slot ids sorted by expert, counts [E] -> (padded perm [S'] with pad entries = `fill`, padded counts [E]).
    """
    padded = (counts + granule - 1) // granule * granule
    expert = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)  # [S]
    rank = torch.arange(perm.numel(), device=perm.device) - (torch.cumsum(counts, 0) - counts)[expert]
    dest = (torch.cumsum(padded, 0) - padded)[expert] + rank
    out = perm.new_full((int(padded.sum()),), fill)
    out[dest] = perm
    return out, padded


def slot_positions(perm: torch.Tensor, n_slots: int, top_k: int) -> torch.Tensor:
    """Where each token's K slots sit in the sorted (possibly padded) slot order: [T, K] int64, ascending per token.

    perm [S'] slot ids t*K + k sorted by expert, pad entries >= n_slots (`_pad_segments`); T = n_slots // K.
    Ascending positions = the token's experts in ascending id, the order `index_add` over the sorted rows sums in.
    """
    pos = torch.empty(n_slots, dtype=torch.long, device=perm.device)
    rows = torch.arange(perm.numel(), device=perm.device)
    if perm.numel() != n_slots:  # padded: drop the pad entries first
        real = perm < n_slots
        perm, rows = perm[real], rows[real]
    pos[perm] = rows
    return pos.view(-1, top_k).sort(dim=1).values


def token_sum(rows: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor, gather: bool | None = None) -> torch.Tensor:
    """Sum every token's K slot rows: rows [S', H] in sorted slot order -> [T, H] (fp32 for bf16/fp16 rows: one
    rounding to the model dtype later instead of K). Each token's slots are added in ascending expert order.

    tok [S'] token of each sorted row (pad rows: any token; their rows must be exactly 0), pos [T, K] from
    `slot_positions`. CPU: `index_add` (sequential, so deterministic, and faster there than gather + sum).
    CUDA: a gather by the inverse permutation and `.view(T, K, H).sum(1)`, deterministic, where `index_add` runs
    atomics (nondeterministic; ~10% of a bf16 GPU step, docs/performance.md "GPU (H200)"); it also skips the
    pad rows. Both add a token's slots in the same order; `gather` forces one (None: by device).
    """
    acc = torch.float32 if rows.dtype in (torch.bfloat16, torch.float16) else rows.dtype
    n_tokens, top_k = pos.shape
    if rows.is_cuda if gather is None else gather:
        return rows.index_select(0, pos.reshape(-1)).view(n_tokens, top_k, rows.shape[-1]).sum(1, dtype=acc)
    return rows.new_zeros(n_tokens, rows.shape[-1], dtype=acc).index_add_(0, tok, rows.to(acc))


class _Dispatch(torch.autograd.Function):
    """xs = x[tok]: token rows [T, H] -> sorted slot rows [S', H]. Backward: each token's K slot gradients summed
    by `token_sum` (fp32 accumulation, cast back to x's dtype), not autograd's `index_add_` in x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(tok, pos)
        return x.index_select(0, tok)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        tok, pos = ctx.saved_tensors
        return token_sum(g, tok, pos).to(g.dtype), None, None


class _Combine(torch.autograd.Function):
    """y[t] = sum_k rows[pos[t, k]]: sorted slot rows [S', H] -> tokens [T, H] (`token_sum`). Backward: the
    gather dy[tok] in the rows' dtype (cast first: bf16 rows gather half the bytes of the fp32 sum's gradient; a
    pad row's gradient is then some token's, which meets a zero routing weight and adds nothing)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(tok)
        ctx.dtype = rows.dtype
        return token_sum(rows, tok, pos)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (tok,) = ctx.saved_tensors
        return dy.to(ctx.dtype).index_select(0, tok), None, None


def dispatch(x: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [T, H] -> x[tok] [S', H] (see `_Dispatch`)."""
    return _Dispatch.apply(x, tok, pos)


def combine(rows: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """rows [S', H] -> per-token sums [T, H] (see `_Combine`, `token_sum`)."""
    return _Combine.apply(rows, tok, pos)


class Experts(nn.Module):
    """The N_r routed SwiGLU experts as fused 3-D weights (transformers v5 `DeepseekV3Experts` layout).

    gate_up_proj: [E, 2*I, H]  rows 0..I-1 = gate_proj (w1), rows I..2I-1 = up_proj (w3) of each expert
    down_proj:    [E, H, I]    (w2)
    FFN_i(x) = down_i(silu(gate_i x) * up_i x).

    forward(hidden_states [T, H], top_k_index [T, K] int, top_k_weights [T, K]) -> [T, H]
        = sum_k w_{t,k} FFN_{idx_{t,k}}(x_t)   (the routed sum of V3 eq. 12)

    Dispatch (no capacity, no dropping, as V3): the T*K token slots are sorted by expert with a stable argsort;
    the rows are gathered once (`dispatch`), each expert's contiguous segment is multiplied by its weights, and
    the outputs are summed back per token (`combine`; both are autograd Functions whose backward is the other's
    forward, the per-token sum deterministic on every device and in fp32 for bf16, see `token_sum`). When the
    expert GEMMs run on oneDNN (CPU bf16/fp16, and fp32 on core.gemm's oneDNN backend) each segment is padded to
    a multiple of 32 rows (pad rows carry routing weight 0) so that oneDNN sees a bounded set of GEMM shapes
    (`core.gemm.segment_granule`); an FP8 hook with a `granule` attribute (core.cuda.fp8_linear.ExpertsFP8: cuBLAS's
    FP8 GEMM takes row counts in multiples of 16) gets at least that.
    `impl`:
      "grouped_mm" (default): two grouped GEMMs (`core.gemm.grouped_linear`: oneDNN per segment for fp32 on the
                   oneDNN backend, else `torch._grouped_mm` with int32 offsets = cumsum(bincount)). Falls back to
                   "loop" when the shapes/dtype are not supported (rows must be 16-byte aligned).
      "loop":      the same sorted layout, one `core.gemm.linear` per expert with >= 1 token (official/HF style).
    Never a per-token gather of weights + bmm (it copies K expert matrices per token; docs/performance.md).
    The routing weight multiplies the SwiGLU output before the (linear) down projection: same result as
    weighting the expert output, but on I instead of H columns.

    FP8 hook: `self.fp8 = None` (no-op). A `core.fp8.FP8Ops` (it has `gemm`) runs both expert GEMMs with FP8
    operands in Fprop/Dgrad/Wgrad, the SwiGLU and the combine per its recipe. Any other object with callables
    `quant_act(x)`, `quant_weight(w)`,
    `quant_grad(y)` (fake quantization, same shape and dtype out) and every expert GEMM y = x @ w^T becomes
    y = quant_grad(x' @ w'^T) with x' = quant_act(x) on the whole sorted [S, K_in] operand and
    w' = quant_weight(w) on the whole 3-D weight [E, N, K_in]; `quant_grad` is expected to be identity in the
    forward and to quantize the incoming gradient in the backward. Both impls apply it identically.
    """

    def __init__(self, config: ModelConfig, impl: str = "grouped_mm"):
        super().__init__()
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"impl must be one of {EXPERT_IMPLS}, got {impl!r}")
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.impl = impl
        self.fp8 = None
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.init_weights(config.initializer_range)

    def init_weights(self, std: float = 0.02) -> None:
        """Both weights ~ N(0, std) (transformers `_init_weights`)."""
        with torch.no_grad():
            self.gate_up_proj.normal_(0.0, std)
            self.down_proj.normal_(0.0, std)

    def resolved_impl(self) -> str:
        """The implementation a forward actually uses ("grouped_mm" falls back to "loop" if unsupported)."""
        w = self.gate_up_proj
        if self.impl == "grouped_mm" and _grouped_mm_supported(w.device, w.dtype, self.hidden_dim,
                                                                self.intermediate_dim):
            return "grouped_mm"
        return "loop"

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        n_tokens = hidden_states.shape[0]
        top_k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        perm = torch.argsort(flat, stable=True)  # slot order grouped by expert, token order within an expert
        counts = torch.bincount(flat, minlength=self.num_experts)
        dtype = self.gate_up_proj.dtype
        slot_weights = top_k_weights.reshape(-1)
        granule = max(segment_granule(dtype, hidden_states.device), getattr(self.fp8, "granule", 1))
        if granule > 1:
            # pad rows point at an extra zero weight (and at the last token): they add exactly 0 to outputs and grads
            perm, counts = _pad_segments(perm, counts, granule, fill=flat.numel())
            slot_weights = torch.cat([slot_weights, slot_weights.new_zeros(1)])
        tok = torch.div(perm, top_k, rounding_mode="floor").clamp_(max=n_tokens - 1)  # token of each sorted slot
        pos = slot_positions(perm, flat.numel(), top_k)  # [T, K] sorted row of each slot
        xs = dispatch(hidden_states, tok, pos).to(dtype)  # [S, H]
        real = None
        if granule > 1 and self.fp8 is not None:
            # FP8: pad rows zero both ways, as DeepSeek's zero-padded expert alignment: a pad row's copied token (and,
            # backward, its copied gradient) would enter the amax of Wgrad's token tiles and change how the
            # segment's real rows are quantized
            real = (perm < flat.numel()).unsqueeze(-1).to(dtype)  # [S', 1]
            xs = xs * real
        ws = slot_weights.index_select(0, perm).to(dtype).unsqueeze(-1)  # [S, 1]

        if self.resolved_impl() == "grouped_mm":
            def mm(a, w):  # a [S, K_in] sorted, w [E, N, K_in] -> [S, N]
                return grouped_linear(a, w, counts)
        else:
            sizes = counts.tolist()

            def mm(a, w):
                outs = [linear(a_e, w[e]) for e, a_e in enumerate(a.split(sizes)) if sizes[e]]
                return torch.cat(outs) if outs else a.new_zeros(0, w.shape[1])

        fp8 = self.fp8
        w_gu, w_d = self.gate_up_proj, self.down_proj
        if fp8 is not None and hasattr(fp8, "gemm"):  # core.fp8.FP8Ops: the recipe's dispatch/SwiGLU/combine rules
            sizes = counts.tolist()
            gu = fp8.gemm(fp8.combine_grad(xs), w_gu, sizes, mm, "expert_up")  # [S, 2I]
            h, recompute = fp8.swiglu(gu, ws)  # [S, I]
            out = fp8.combine(fp8.gemm(h, w_d, sizes, mm, "expert_down", x_recompute=recompute))  # [S, H]
            return combine(out if real is None else out * real, tok, pos).to(hidden_states.dtype)
        if fp8 is not None:
            xs, w_gu = fp8.quant_act(xs), fp8.quant_weight(w_gu)
        gu = mm(xs, w_gu)  # [S, 2I]
        if fp8 is not None:
            gu = fp8.quant_grad(gu)
        h = swiglu_packed(gu, ws)  # [S, I] = silu(gate) * up * routing weight
        if fp8 is not None:
            h, w_d = fp8.quant_act(h), fp8.quant_weight(w_d)
        out = mm(h, w_d)  # [S, H]
        if fp8 is not None:
            out = fp8.quant_grad(out if real is None else out * real)
        return combine(out, tok, pos).to(hidden_states.dtype)  # the K slots of every token summed (fp32 for bf16)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, impl={self.impl}"


# -------------------------------------------------------------------------------------------------------- MoE
class MoE(nn.Module):
    """DeepSeekMoE layer (transformers `DeepseekV3MoE`): y = sum_i g_{i,t} FFN^r_i(u_t) + sum FFN^s(u_t).

    V3 report eq. 12 without the residual u_t (the decoder block adds it). Submodules (state-dict names):
      gate           Router           mlp.gate.weight, mlp.gate.e_score_correction_bias
      experts        Experts          mlp.experts.gate_up_proj, mlp.experts.down_proj
      shared_experts MLP(H, N_s * I)  mlp.shared_experts.{gate,up,down}_proj.weight  (absent when N_s = 0;
                                      the N_s shared experts are fused into one wide MLP, as official/HF)

    forward(x [B, S, H] or [T, H]) -> same shape. After each forward `self.last_routing` is a `MoERouting`
    (router weights/indices/scores/logits/group_mask + per-expert `loads` [E] + batch_size, seq_len), used by
    the trainer (sequence_balance_loss, update_bias after the optimizer step, metrics) and by the app's routing
    heatmap; it is None before the first forward.
    """

    def __init__(self, config: ModelConfig, impl: str = "grouped_mm"):
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.experts = Experts(config, impl=impl)
        n_shared = config.n_shared_experts
        self.shared_experts = (MLP(config.hidden_size, n_shared * config.moe_intermediate_size)
                               if n_shared > 0 else None)
        self.last_routing: MoERouting | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        r = self.gate(x)
        y = self.experts(x, r.indices, r.weights)
        loads = expert_loads(r.indices, self.gate.n_experts)
        b, s = (shape[0], shape[1]) if len(shape) == 3 else (1, x.shape[0])
        self.last_routing = MoERouting(weights=r.weights, indices=r.indices, scores=r.scores, logits=r.logits,
                                       group_mask=r.group_mask, loads=loads, batch_size=b, seq_len=s)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)


# -------------------------------------------------------------------------------------------------- balancing
def expert_loads(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """c_i: how many token slots picked expert i. indices [..., K] -> [E] int64 (sum = T*K).

    A scatter-add into E counters rather than `bincount`, whose output length depends on the data: this one has a
    fixed shape, so a compiled block (core.compile) keeps it inside its graph."""
    flat = indices.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


@torch.no_grad()
def update_bias(router: Router, loads: torch.Tensor, gamma: float) -> torch.Tensor:
    """Aux-loss-free balancing (V3 report §2.1.2; LFB paper arXiv 2408.15664, Algorithm 1).

    b_i <- b_i + gamma * sign(mean_j c_j - c_i): an overloaded expert's bias goes down by gamma, an underloaded
    one's goes up, an expert exactly at the mean is unchanged. Rule-based, in fp32, outside autograd (the bias
    never receives a gradient). Use the loads of the batch just trained on (never the batch about to be routed:
    that would leak future tokens). loads: [E] counts -> returns the applied step [E] (fp32).
    """
    bias = router.e_score_correction_bias
    if bias is None:
        raise ValueError(f"router has no e_score_correction_bias (topk_method={router.topk_method!r}); "
                         "aux-loss-free balancing needs topk_method='noaux_tc'")
    c = loads.detach().to(device=bias.device, dtype=torch.float32).reshape(-1)
    if c.numel() != bias.numel():
        raise ValueError(f"loads has {c.numel()} entries, router has {bias.numel()} experts")
    step = float(gamma) * torch.sign(c.mean() - c)
    bias.add_(step)
    return step


def sequence_balance_loss(scores: torch.Tensor, n_experts: int, top_k: int, seq_len: int) -> torch.Tensor:
    """Complementary sequence-wise balance loss, V3 report §2.1.2 eqs. 17-20 (multiply by alpha yourself).

        L    = sum_i f_i P_i, per sequence, averaged over sequences                  (17)
        f_i  = N_r / (K_r T) * sum_t 1( s_{i,t} in Topk({s_{j,t} | 1 <= j <= N_r}, K_r) )   (18)
        s'_{i,t} = s_{i,t} / sum_j s_{j,t}                                            (19)
        P_i  = (1/T) sum_t s'_{i,t}                                                   (20)

    scores [B*T, E] (or [B, T, E]): the UNBIASED affinities s_{i,t} (`RouterOutput.scores`, differentiable);
    T = seq_len. f_i counts eq. 18 as written: the top-K_r of the unbiased scores over ALL routed experts,
    not the experts the router actually picked (those come from the biased scores s + b and, with
    group-limited routing, only from the kept groups; eq. 16). So the loss measures how the router's own
    affinities would spread tokens, and its gradient (through P_i only; f_i is an indicator) does not chase
    the bias. Perfect balance gives L = 1. With seq_len = all tokens of the batch this is the batch-wise
    variant (V3 §4.5.3).
    """
    s = scores.reshape(-1, seq_len, n_experts)
    n_seq = s.shape[0]
    idx = s.detach().topk(top_k, dim=-1).indices.reshape(n_seq, seq_len * top_k)  # eq. 18: Topk of unbiased s
    counts = torch.zeros(n_seq, n_experts, dtype=s.dtype, device=s.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=s.dtype))
    f = counts * (n_experts / (top_k * seq_len))  # no gradient: an indicator
    p = (s / s.sum(dim=-1, keepdim=True)).mean(dim=1)
    return (f * p).sum(dim=-1).mean()


def switch_aux_loss(probs: torch.Tensor, indices: torch.Tensor, n_experts: int, top_k: int) -> torch.Tensor:
    """Switch Transformer load-balancing loss N * sum_i f_i P_i over all tokens (Fedus et al. 2022, eq. 4).

    f_i = c_i / (T*K) (fraction of token slots, normalized by K so uniform routing gives 1 for any top-k),
    P_i = mean_t p_{i,t} with p normalized per token to sum to 1 (a no-op for softmax probabilities; makes
    sigmoid scores usable). probs [T, E], indices [T, K]. Uniform -> 1; multiply by alpha yourself.
    """
    p = probs.reshape(-1, n_experts)
    p = p / p.sum(dim=-1, keepdim=True)
    counts = torch.bincount(indices.reshape(-1), minlength=n_experts).to(p.dtype)
    f = counts / (p.shape[0] * top_k)
    return n_experts * (f * p.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (1/T) sum_t (logsumexp_j x_{t,j})^2 (Zoph et al. 2022, eq. 5). logits [T, E] -> scalar."""
    return torch.logsumexp(logits.float().reshape(-1, logits.shape[-1]), dim=-1).pow(2).mean()


# ---------------------------------------------------------------------------------------------------- metrics
def load_metrics(loads, top_k: int | None = None, capacity_factor: float | None = None) -> dict:
    """Load-balance metrics of per-expert counts c_i (MaxVio: LFB paper eq. 4; relative load: V3 report Fig. 9).

    loads: [E] counts (tensor, array or list; sum = T*K). Returns a dict:
      max_vio            max_i c_i / c̄ - 1 with c̄ = sum c / E (LFB eq. 4); 0 = balanced, E-1 = one expert.
      cv                 population std(c) / mean(c); 0 = balanced, sqrt(E-1) = one expert.
      normalized_entropy -sum f log f / log E with f = c / sum c; 1 = balanced, 0 = one expert.
      dead_experts       number of experts with c_i = 0 (int).
      relative_load      [E] list c_i / c̄ (V3 Fig. 9 "relative expert load").
      capacity           C = ceil(CF * T*K / E) slots per expert, or None without `capacity_factor`.
      dropped_fraction   sum_i max(0, c_i - C) / (T*K): slots a capacity-limited router (Switch/GShard/V2)
                         would drop; None without `capacity_factor`. (V3 itself drops nothing.)
      tokens             T = sum c / top_k, or None without `top_k`.
    All-zero loads give zeros (entropy 0) rather than NaN.
    """
    c = torch.as_tensor(loads).detach().to("cpu", torch.float64).reshape(-1)
    n = c.numel()
    total = float(c.sum())
    out: dict = {"tokens": (total / top_k) if top_k else None, "capacity": None, "dropped_fraction": None}
    if n == 0 or total <= 0:
        out.update(max_vio=0.0, cv=0.0, normalized_entropy=0.0, dead_experts=n, relative_load=[0.0] * n)
        return out
    mean = total / n
    f = c / total
    nz = f[f > 0]
    entropy = float(-(nz * nz.log()).sum())
    out.update(
        max_vio=float(c.max()) / mean - 1.0,
        cv=float(c.std(unbiased=False)) / mean,
        normalized_entropy=entropy / math.log(n) if n > 1 else 1.0,
        dead_experts=int((c == 0).sum()),
        relative_load=(c / mean).tolist(),
    )
    if capacity_factor is not None:
        cap = math.ceil(capacity_factor * total / n - 1e-9)  # T*K/N slots per expert at CF = 1
        out["capacity"] = cap
        out["dropped_fraction"] = float((c - cap).clamp(min=0).sum()) / total
    return out
