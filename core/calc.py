"""Closed-form calculators: parameters, FLOPs, weight memory and KV-cache size of a `ModelConfig`.

Every function is pure arithmetic on the config (no tensors), so the app can call it on every rerun.
The counts follow the module structure of `core.model.DeepSeekV3` exactly (a test checks
`param_counts(cfg)["total"]` against `sum(p.numel())` of the built model).

Activated parameters (per token) — the definition used here:
    activated = total − (n_routed_experts − num_experts_per_tok) × (params of one routed expert) × MoE layers
i.e. every parameter a token's forward pass touches: embedding and head, all attention, dense FFNs, shared
experts, the router, norms, and the K chosen routed experts of each MoE layer; MTP is excluded (it is
dropped at inference). DeepSeek's exact convention is not published (the V3 report says "37B activated",
README_WEIGHTS 36.7B incl. 0.9B embedding + 0.9B head), so `activated_no_embedding` gives the other common
one (without the input embedding) and the app shows both beside the published figure.
"""
from __future__ import annotations

import math

from core.config import ConfigError, ModelConfig

KV_KINDS = ("mha", "gqa", "mqa", "mla", "mla_naive")


# ---------------------------------------------------------------------- per-module counts
def attention_params(cfg: ModelConfig) -> int:
    """Parameters of one attention layer, including MLA's latent RMSNorms.

    MLA (V3 report eqs. 1-11): q = W_UQ·norm(W_DQ h) (or one W_Q when q_lora_rank is None),
    [c_kv; k_pe] = W_DKV h, [k_nope; v] = W_UKV·norm(c_kv), u = W_O o.
    Baselines (MHA/GQA/MQA): q/k/v/o projections with head dim d_h = v_head_dim.
    """
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    bias = cfg.attention_bias
    if cfg.attention_type != "mla":
        dh, kvh = cfg.v_head_dim, cfg.kv_heads
        n = h * nh * dh + 2 * h * kvh * dh + nh * dh * h
        if bias:
            n += nh * dh + 2 * kvh * dh + h
        return n
    if cfg.q_lora_rank is None:
        q = h * nh * cfg.qk_head_dim
    else:
        q = h * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * nh * cfg.qk_head_dim
        if bias:
            q += cfg.q_lora_rank
    kv_a = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bias
    kv_norm = cfg.kv_lora_rank
    kv_b = cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    o = nh * cfg.v_head_dim * h + h * bias
    return q + kv_a + kv_norm + kv_b + o


def swiglu_params(hidden: int, inter: int) -> int:
    """gate_proj, up_proj (hidden x inter) and down_proj (inter x hidden)."""
    return 3 * hidden * inter


def expert_params(cfg: ModelConfig) -> int:
    """One routed (or shared) expert: a SwiGLU of width moe_intermediate_size."""
    return swiglu_params(cfg.hidden_size, cfg.moe_intermediate_size)


def router_params(cfg: ModelConfig) -> int:
    """Router weight [E, hidden]; plus the (non-trainable) e_score_correction_bias [E] for noaux_tc."""
    return cfg.n_routed_experts * cfg.hidden_size + (cfg.n_routed_experts if cfg.uses_bias_routing else 0)


def _block_params(cfg: ModelConfig, moe: bool) -> dict[str, int]:
    out = {"attention": attention_params(cfg), "norms": 2 * cfg.hidden_size,
           "dense_ffn": 0, "shared_experts": 0, "routed_experts": 0, "router": 0}
    if moe:
        out["shared_experts"] = cfg.n_shared_experts * expert_params(cfg)
        out["routed_experts"] = cfg.n_routed_experts * expert_params(cfg)
        out["router"] = router_params(cfg)
    else:
        out["dense_ffn"] = swiglu_params(cfg.hidden_size, cfg.intermediate_size)
    return out


def mtp_module_params(cfg: ModelConfig) -> int:
    """One MTP module without the shared embedding and head (V3 report eqs. 21-23).

    enorm + hnorm (2·d), eh_proj M_k (d x 2d), one Transformer block (attention + MoE FFN, as layer index
    >= first_k_dense_replace), and shared_head.norm (d).
    """
    block = sum(_block_params(cfg, moe=cfg.n_routed_experts > 0).values())
    return 2 * cfg.hidden_size + 2 * cfg.hidden_size * cfg.hidden_size + block + cfg.hidden_size


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by component (ints).

    Keys: embedding, attention, dense_ffn, shared_experts, routed_experts, router, norms (block norms + final
    norm), head, total (main model, MTP excluded), activated (see module docstring), activated_no_embedding
    (the same without the input embedding), routed_experts_activated,
    mtp (unique MTP params, shared embedding/head excluded), total_with_mtp, checkpoint_total (what a
    published checkpoint stores: the MTP layer carries its own copies of embedding and head, so V3's 671B
    main + MTP tensors = the "685B" on the model card).
    """
    out = dict(embedding=cfg.vocab_size * cfg.hidden_size, attention=0, dense_ffn=0, shared_experts=0,
               routed_experts=0, router=0, norms=cfg.hidden_size,
               head=0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    n_moe = 0
    for i in range(cfg.num_hidden_layers):
        moe = cfg.is_moe_layer(i)
        n_moe += moe
        for k, v in _block_params(cfg, moe).items():
            out[k] += v
    out["total"] = sum(out.values())
    unused = (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert_params(cfg) * n_moe
    out["routed_experts_activated"] = out["routed_experts"] - unused
    out["activated"] = out["total"] - unused
    # The other common convention: without the input embedding (a table lookup, not a matmul); the output head
    # stays in. Both are shown beside the published figures, whose convention is not stated.
    out["activated_no_embedding"] = out["activated"] - out["embedding"]
    out["mtp"] = cfg.num_nextn_predict_layers * mtp_module_params(cfg)
    out["total_with_mtp"] = out["total"] + out["mtp"]
    out["checkpoint_total"] = out["total_with_mtp"] + cfg.num_nextn_predict_layers * (
        out["embedding"] + cfg.vocab_size * cfg.hidden_size)
    out["moe_layers"] = n_moe
    return out


COMPONENTS = ("embedding", "attention", "dense_ffn", "shared_experts", "routed_experts", "router", "norms", "head")


def param_table(cfg: ModelConfig) -> list[dict]:
    """Rows (component, total, activated, formula) for the app's breakdown chart and table."""
    c = param_counts(cfg)
    L, n_moe = cfg.num_hidden_layers, c["moe_layers"]
    n_dense = L - n_moe
    formulas = {
        "embedding": r"V \cdot d",
        "attention": (r"L\,[d\,d'_c + d'_c + d'_c\,n_h (d_h^{nope}+d_h^R) + d (d_c + d_h^R) + d_c"
                      r" + d_c\, n_h (d_h^{nope} + d_h^{v}) + n_h d_h^{v} d]") if cfg.attention_type == "mla"
        else r"L\,[d\,n_h d_h + 2 d\, n_{kv} d_h + n_h d_h d]",
        "dense_ffn": rf"{n_dense} \cdot 3\, d\, d_{{ff}}",
        "shared_experts": rf"{n_moe} \cdot N_s \cdot 3\, d\, d_{{e}}",
        "routed_experts": rf"{n_moe} \cdot N_r \cdot 3\, d\, d_{{e}}",
        "router": rf"{n_moe} \cdot N_r (d + 1)" if cfg.uses_bias_routing else rf"{n_moe} \cdot N_r\, d",
        "norms": r"(2L + 1)\, d",
        "head": r"V \cdot d",
    }
    rows = []
    for k in COMPONENTS:
        act = c["routed_experts_activated"] if k == "routed_experts" else c[k]
        rows.append({"component": k, "total": c[k], "activated": act, "formula": formulas[k]})
    return rows


# ---------------------------------------------------------------------- FLOPs
def flops_per_token(cfg: ModelConfig, context: int = 4096) -> dict[str, float]:
    """Forward FLOPs for one token attending to `context` previous tokens (multiply-add = 2 FLOPs).

    matmul = 2 × (activated params − embedding − norms − router bias) (each weight used once per token;
    the embedding is a lookup); attention = Σ_layers 2·n_h·(d_qk + d_v)·context (QKᵀ and PV; MLA's scores
    use qk_head_dim, its values v_head_dim). Training ≈ 3 × forward (backward = 2 × forward).
    """
    c = param_counts(cfg)
    if context < 0:
        raise ConfigError("context", f"must be >= 0, got {context}")
    router_bias = c["moe_layers"] * cfg.n_routed_experts if cfg.uses_bias_routing else 0
    weights = c["activated"] - c["embedding"] - c["norms"] - router_bias
    # Latent norms inside MLA are not matmuls either.
    if cfg.attention_type == "mla":
        weights -= cfg.num_hidden_layers * (cfg.kv_lora_rank + (cfg.q_lora_rank or 0))
        d_qk = cfg.qk_head_dim
    else:
        d_qk = cfg.v_head_dim
    matmul = 2.0 * weights
    attention = 2.0 * cfg.num_hidden_layers * cfg.num_attention_heads * (d_qk + cfg.v_head_dim) * context
    return {"matmul": matmul, "attention": attention, "forward": matmul + attention,
            "training": 3.0 * (matmul + attention)}


# ---------------------------------------------------------------------- memory
def weight_bytes(cfg: ModelConfig, dtype: str = "bf16", include_mtp: bool = False, block_size: int = 128) -> int:
    """Bytes of the weights in `dtype` ("fp32", "bf16" or "fp8").

    fp8 follows the released DeepSeek-V3 checkpoint: every Linear weight of attention and the FFNs/experts is
    E4M3 (1 byte) plus one fp32 scale per 128×128 block (`weight_scale_inv`); embedding, head, router and
    norms stay BF16 (V3 report §3.3; README_WEIGHTS).
    """
    c = param_counts(cfg)
    total = c["total_with_mtp"] if include_mtp else c["total"]
    if dtype in ("fp32", "bf16"):
        return total * (4 if dtype == "fp32" else 2)
    if dtype != "fp8":
        raise ConfigError("dtype", f"must be fp32, bf16 or fp8, got {dtype!r}")
    high = c["embedding"] + c["head"] + c["router"] + c["norms"]
    n_layers_m = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    # norms inside blocks and MLA latent norms are tiny and kept bf16
    high += n_layers_m * (cfg.kv_lora_rank + (cfg.q_lora_rank or 0) if cfg.attention_type == "mla" else 0)
    if include_mtp:
        high += cfg.num_nextn_predict_layers * (router_params(cfg) + 5 * cfg.hidden_size)
    low = total - high
    # Scales: approximate ceil per matrix by the element count / block² (exact for 128-multiples).
    scales = math.ceil(low / (block_size * block_size))
    return 2 * high + low + 4 * scales


def kv_cache_bytes(cfg: ModelConfig, kind: str, seq_len: int, batch: int = 1, bytes_per_element: float = 2,
                   num_kv_heads: int | None = None) -> int:
    """KV-cache bytes of the whole model (all layers) for `batch` sequences of `seq_len` tokens.

    Elements per token per layer (V2 report Table 1), with n_h heads, d_h = v_head_dim:
      mha:       2 · n_h · d_h
      gqa:       2 · n_g · d_h     (n_g = num_kv_heads, default cfg.num_key_value_heads)
      mqa:       2 · d_h
      mla:       d_c + d_h^R       (kv_lora_rank + qk_rope_head_dim: the normalized latent and the shared
                                   rotated RoPE key, what the absorbed path caches)
      mla_naive: n_h · (d_qk + d_v) (decompressed per-head K (nope+rope) and V, what transformers caches)
    bytes = elements · layers · seq_len · batch · bytes_per_element (rounded to an int).
    V3: mla = (512 + 64) · 61 = 35,136 elements per token.
    """
    if kind not in KV_KINDS:
        raise ConfigError("kind", f"must be one of {KV_KINDS}, got {kind!r}")
    for name, v in (("seq_len", seq_len), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(name, f"must be an integer >= 0, got {v!r}")
    if not (isinstance(bytes_per_element, (int, float)) and bytes_per_element > 0):
        raise ConfigError("bytes_per_element", f"must be > 0, got {bytes_per_element!r}")
    return int(round(kv_elements_per_token(cfg, kind, num_kv_heads) * seq_len * batch * bytes_per_element))


def kv_elements_per_token(cfg: ModelConfig, kind: str, num_kv_heads: int | None = None) -> int:
    """Cached elements per token summed over layers (see `kv_cache_bytes`)."""
    nh, dh, L = cfg.num_attention_heads, cfg.v_head_dim, cfg.num_hidden_layers
    if kind == "mha":
        per = 2 * nh * dh
    elif kind == "gqa":
        g = cfg.num_key_value_heads if num_kv_heads is None else num_kv_heads
        if isinstance(g, bool) or not isinstance(g, int) or g < 1 or nh % g:
            raise ConfigError("num_kv_heads", f"must be a divisor of num_attention_heads ({nh}), got {g!r}")
        per = 2 * g * dh
    elif kind == "mqa":
        per = 2 * dh
    elif kind == "mla":
        per = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    elif kind == "mla_naive":
        per = nh * (cfg.qk_head_dim + cfg.v_head_dim)
    else:
        raise ConfigError("kind", f"must be one of {KV_KINDS}, got {kind!r}")
    return per * L


def max_context(cfg: ModelConfig, kind: str, memory_bytes: float, batch: int = 1, bytes_per_element: float = 2,
                weights_dtype: str = "bf16", num_kv_heads: int | None = None) -> int:
    """Longest context (tokens per sequence) whose KV cache fits `memory_bytes` after the weights.

    Returns 0 when the weights alone do not fit.
    """
    free = memory_bytes - weight_bytes(cfg, weights_dtype)
    per_token = kv_elements_per_token(cfg, kind, num_kv_heads) * batch * bytes_per_element
    if free <= 0 or per_token <= 0:
        return 0
    return int(free // per_token)
