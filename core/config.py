"""Model configuration: `ModelConfig`, validation and presets.

Field names follow transformers' `DeepseekV3Config` (and the published `config.json` files of
DeepSeek-V3, V2 and V2-Lite), so a Hugging Face config dict maps onto this dataclass 1:1. The mapping to
the official `inference/model.py` `ModelArgs` is documented in `docs/architecture.md`.

Eva-only extension: `attention_type` ("mla" default; "mha" / "gqa" / "mqa" baselines for the training lab).
It is written to `to_hf()` only when it differs from "mla", so published configs round-trip unchanged.

Every impossible combination raises `ConfigError` (a `ValueError`) naming the field and the rule.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import reprlib
from dataclasses import dataclass, field
from typing import Any

from core.published import PUBLISHED_CONFIGS

MAX_INT = 2**31 - 1
MAX_LAYERS = 10_000


def _show(v) -> str:
    """A short repr for error messages (bounded; safe for ints of any size)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"an integer of ~{int(v.bit_length() * 0.30103)} digits"
    r = reprlib.Repr()
    r.maxstring = r.maxother = 80
    return r.repr(v)


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


class ConfigError(ValueError):
    """An invalid model configuration. The message names the field and the rule it breaks."""

    def __init__(self, field_name: str, rule: str):
        self.field = field_name
        self.rule = rule
        super().__init__(f"{field_name}: {rule}")


SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
ROPE_TYPES = ("default", "yarn")
ATTENTION_TYPES = ("mla", "mha", "gqa", "mqa")


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture hyper-parameters (defaults = the 671B DeepSeek-V3 config.json).

    Derived quantities: `qk_head_dim = qk_nope_head_dim + qk_rope_head_dim` (192 for V3), number of MoE layers
    `num_hidden_layers - first_k_dense_replace`.
    """

    # Grouped like the official inference/model.py `ModelArgs`; the name after "#" is its field where it differs.
    # ---- model-wide
    vocab_size: int = 129280
    hidden_size: int = 7168                       # dim
    intermediate_size: int = 18432                # inter_dim (dense FFN of the first layers)
    num_hidden_layers: int = 61                   # n_layers
    max_position_embeddings: int = 163840         # (max_seq_len is a serving limit there, default 16384)
    rms_norm_eps: float = 1e-6                    # (fixed 1e-6 in RMSNorm)
    hidden_act: str = "silu"                      # (SiLU hard-coded)
    initializer_range: float = 0.02               # (no training code there)
    tie_word_embeddings: bool = False             # (never tied there)
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # ---- MLA (V3 report §2.1.1)
    num_attention_heads: int = 128                # n_heads
    num_key_value_heads: int = 128                # (none; MLA ignores it, GQA baselines use it)
    q_lora_rank: int | None = 1536                # q_lora_rank (0 there <-> None here: no query compression)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False                  # (no biases there)
    # Eva extension (not a transformers field): attention variant for baselines.
    attention_type: str = "mla"
    # ---- MoE (V3 report §2.1.2)
    first_k_dense_replace: int = 3                # n_dense_layers
    moe_layer_freq: int = 1                       # (every layer after the dense ones)
    moe_intermediate_size: int = 2048             # moe_inter_dim
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8                  # n_activated_experts
    n_group: int = 8                              # n_expert_groups
    topk_group: int = 4                           # n_limited_groups
    routed_scaling_factor: float = 2.5            # route_scale
    scoring_func: str = "sigmoid"                 # score_func
    topk_method: str = "noaux_tc"                 # (the gate has a bias iff dim == 7168, i.e. V3)
    norm_topk_prob: bool = True                   # (renormalizes iff score_func == "sigmoid")
    aux_loss_alpha: float = 0.001                 # (training only; V3 report §4.2 says alpha = 0.0001)
    seq_aux: bool = True                          # (training only)
    # ---- RoPE / YaRN (V3 report §4.3)
    rope_theta: float = 10000.0
    # YaRN keys -> official: factor -> rope_factor, original_max_position_embeddings -> original_seq_len,
    # beta_fast, beta_slow, mscale (same names); mscale_all_dim has no counterpart there.
    rope_scaling: dict | None = field(default_factory=lambda: {
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    rope_interleave: bool = True                  # (always interleaved pairs there)
    # ---- MTP (V3 report §2.2)
    num_nextn_predict_layers: int = 1             # (none: the official inference code drops the MTP module)
    # Keys of a loaded config.json that this dataclass does not model (kept verbatim for to_hf()).
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: nope + rope (V3: 128 + 64 = 192)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Dense FFN for the first `first_k_dense_replace` layers, MoE after (V3 report §4.2)."""
        return (layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def uses_bias_routing(self) -> bool:
        """`noaux_tc` routing carries `e_score_correction_bias` (aux-loss-free balancing, V3 eq. 16)."""
        return self.topk_method == "noaux_tc"

    def rope_param(self, key: str, default=None):
        return (self.rope_scaling or {}).get(key, default)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def kv_heads(self) -> int:
        """Number of K/V heads of the attention variant (MLA and MHA: all heads; MQA: 1)."""
        if self.attention_type == "mqa":
            return 1
        if self.attention_type == "gqa":
            return self.num_key_value_heads
        return self.num_attention_heads

    def replace(self, **changes) -> "ModelConfig":
        """A validated copy with `changes` applied (raises ConfigError on an impossible result)."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d.update(changes)
        return ModelConfig(**d)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the field and the rule for every impossible combination."""
        positive_ints = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "num_key_value_heads", "kv_lora_rank", "qk_rope_head_dim",
                         "v_head_dim", "max_position_embeddings", "moe_layer_freq"]
        nonneg_ints = ["n_shared_experts", "n_routed_experts", "qk_nope_head_dim", "first_k_dense_replace",
                       "num_nextn_predict_layers", "moe_intermediate_size", "n_group", "topk_group",
                       "num_experts_per_tok"]
        for name in positive_ints + nonneg_ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                if isinstance(v, float) and math.isfinite(v) and v.is_integer():
                    setattr(self, name, int(v))  # JSON may carry 4096.0
                    v = int(v)
                else:
                    raise ConfigError(name, f"must be an integer, got {_show(v)}")
            if name in positive_ints and v <= 0:
                raise ConfigError(name, f"must be a positive integer, got {_show(v)}")
            if v > (MAX_LAYERS if name == "num_hidden_layers" else MAX_INT):
                raise ConfigError(name, f"is too large, got {_show(v)}")
            if v < 0:
                raise ConfigError(name, f"must be >= 0, got {_show(v)}")
        if self.q_lora_rank is not None:
            v = self.q_lora_rank
            if isinstance(v, float) and math.isfinite(v) and v.is_integer():
                self.q_lora_rank = v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError("q_lora_rank", f"must be a positive integer or null (no query compression), got {_show(v)}")
            if v <= 0 or v > MAX_INT:
                raise ConfigError("q_lora_rank", f"must be a positive integer or null (no query compression), got {v}")
        for name in ["routed_scaling_factor", "initializer_range", "rms_norm_eps", "rope_theta", "aux_loss_alpha"]:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(name, f"must be a number, got {_show(v)}")
            if not _finite(v):
                raise ConfigError(name, f"must be finite, got {_show(v)}")
            setattr(self, name, float(v))
        if self.routed_scaling_factor > 1e4:
            raise ConfigError("routed_scaling_factor", "must be <= 1e4")
        if self.rms_norm_eps < 1e-30:
            raise ConfigError("rms_norm_eps", "must be >= 1e-30")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(name, f"must be a token id >= 0 or null, got {_show(v)}")
        if self.routed_scaling_factor <= 0:
            raise ConfigError("routed_scaling_factor", f"must be > 0, got {self.routed_scaling_factor}")
        if self.rms_norm_eps <= 0:
            raise ConfigError("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 1:
            raise ConfigError("rope_theta", f"must be > 1, got {self.rope_theta}")
        if self.initializer_range < 0:
            raise ConfigError("initializer_range", f"must be >= 0, got {self.initializer_range}")
        if self.aux_loss_alpha < 0:
            raise ConfigError("aux_loss_alpha", f"must be >= 0, got {self.aux_loss_alpha}")
        for name in ["norm_topk_prob", "rope_interleave", "attention_bias", "tie_word_embeddings", "seq_aux"]:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError("scoring_func", f"must be one of {SCORING_FUNCS}, got {_show(self.scoring_func)}")
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError("topk_method", f"must be one of {TOPK_METHODS}, got {_show(self.topk_method)}")
        if self.hidden_act != "silu":
            raise ConfigError("hidden_act", f"only 'silu' (SwiGLU) is supported, got {_show(self.hidden_act)}")
        if self.attention_type not in ATTENTION_TYPES:
            raise ConfigError("attention_type", f"must be one of {ATTENTION_TYPES}, got {_show(self.attention_type)}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError("qk_rope_head_dim", f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.attention_type != "mla" and self.v_head_dim % 2:
            raise ConfigError("v_head_dim", "must be even for mha/gqa/mqa")
        if self.attention_type == "gqa" and self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_key_value_heads", f"must divide num_attention_heads ({self.num_attention_heads}) "
                                                     f"for GQA, got {self.num_key_value_heads}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError("first_k_dense_replace", f"must be <= num_hidden_layers ({self.num_hidden_layers}), "
                                                       f"got {self.first_k_dense_replace}")
        if (self.num_moe_layers > 0 or self.num_nextn_predict_layers > 0) and self.n_routed_experts > 0:
            if self.moe_intermediate_size <= 0:
                raise ConfigError("moe_intermediate_size", "must be positive when the model has MoE layers")
            if self.num_experts_per_tok < 1:
                raise ConfigError("num_experts_per_tok", "must be >= 1 when the model has routed experts")
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ConfigError("num_experts_per_tok", f"top-k ({self.num_experts_per_tok}) must be <= "
                                                         f"n_routed_experts ({self.n_routed_experts})")
            if self.n_group < 1:
                raise ConfigError("n_group", f"must be >= 1, got {self.n_group}")
            if self.n_routed_experts % self.n_group:
                raise ConfigError("n_group", f"n_routed_experts ({self.n_routed_experts}) must be divisible by "
                                             f"n_group ({self.n_group})")
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError("topk_group", f"must be between 1 and n_group ({self.n_group}), got {self.topk_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise ConfigError("num_experts_per_tok", f"top-k ({self.num_experts_per_tok}) must be <= topk_group x "
                                                         f"experts per group ({self.topk_group} x {per_group})")
            if self.uses_bias_routing and self.n_group > 1 and per_group < 2:
                raise ConfigError("n_group", "noaux_tc routing ranks groups by their top-2 scores, so each group "
                                             f"needs >= 2 experts (n_routed_experts / n_group = {per_group})")
        self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise ConfigError("rope_scaling", f"must be an object or null, got {type(rs).__name__}")
        rtype = rs.get("rope_type", rs.get("type"))
        if rtype not in ROPE_TYPES:
            raise ConfigError("rope_scaling.type", f"unknown rope type {_show(rtype)}; supported: {ROPE_TYPES}")
        if rtype == "default":
            return
        for key, default, lo in [("factor", None, 1.0), ("original_max_position_embeddings", None, 1),
                                 ("beta_fast", 32, 0.0), ("beta_slow", 1, 0.0),
                                 ("mscale", 1.0, 0.0), ("mscale_all_dim", 0.0, 0.0)]:
            v = rs.get(key, default)
            if v is None:
                raise ConfigError(f"rope_scaling.{key}", "is required for yarn")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v) or v > 1e6:
                raise ConfigError(f"rope_scaling.{key}", f"must be a finite number <= 1e6, got {_show(v)}")
            if v < lo:
                raise ConfigError(f"rope_scaling.{key}", f"must be >= {lo}, got {v}")
        af = rs.get("attention_factor")
        if af is not None and (isinstance(af, bool) or not isinstance(af, (int, float)) or not _finite(af) or af <= 0):
            raise ConfigError("rope_scaling.attention_factor", f"must be a positive number, got {_show(af)}")
        if rs.get("mscale", 1.0) > 100 or rs.get("mscale_all_dim", 0.0) > 100:
            raise ConfigError("rope_scaling.mscale", "must be <= 100")
        if rs.get("beta_fast", 32) <= rs.get("beta_slow", 1):
            raise ConfigError("rope_scaling.beta_fast", "must be greater than beta_slow")

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any]) -> "ModelConfig":
        """Build from a transformers `config.json` (a dict, a file path or a folder holding config.json).

        Unknown keys are kept in `extra` so `to_hf()` reproduces the document. A V5-style `rope_parameters`
        dict is accepted as `rope_scaling`.
        """
        if isinstance(path_or_dict, dict):
            try:
                d = copy.deepcopy(path_or_dict)
            except RecursionError:
                raise ConfigError("config.json", "is nested too deeply") from None
        else:
            p = os.fspath(path_or_dict)
            if os.path.isdir(p):
                p = os.path.join(p, "config.json")
            try:
                with open(p, encoding="utf-8") as f:
                    d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError("config.json", f"is not valid JSON ({e.msg} at line {e.lineno})") from None
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise ConfigError("config.json", f"is not a readable JSON document ({type(e).__name__})") from None
        if not isinstance(d, dict):
            raise ConfigError("config.json", f"must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if "rope_scaling" not in d and isinstance(d.get("rope_parameters"), dict):
            rp = dict(d["rope_parameters"])
            if "rope_theta" in rp and "rope_theta" not in d:
                d["rope_theta"] = rp["rope_theta"]
            rtype = rp.get("rope_type", rp.get("type", "default"))
            d["rope_scaling"] = None if rtype == "default" else {k: v for k, v in rp.items() if k != "rope_theta"}
        # A config.json without the key has no MTP module (V2 / V2-Lite); transformers' default of 1 is
        # ignored by its own model, so "absent" is read as "none".
        d.setdefault("num_nextn_predict_layers", 0)
        kwargs = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        cfg = cls(**kwargs)
        cfg.extra = extra
        return cfg

    def to_hf(self) -> dict[str, Any]:
        """The transformers `config.json` dict (DeepseekV3Config field names)."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in ("extra", "attention_type")}
        if self.attention_type != "mla":
            out["attention_type"] = self.attention_type
        out.update(copy.deepcopy(self.extra))
        out.setdefault("model_type", "deepseek_v3")
        out.setdefault("architectures", ["DeepseekV3ForCausalLM"])
        return out

    def to_dict(self) -> dict[str, Any]:
        return self.to_hf()


# `mini`: a CPU-trainable scale model keeping V3's structure (MLA with query and KV compression, decoupled
# RoPE, a dense first layer, 1 shared + 16 routed experts, sigmoid group-limited noaux_tc routing, one MTP
# module). Byte vocabulary (256). Same shape as the training-throughput benchmark config.
_MINI = dict(
    vocab_size=256, hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16,
    routed_scaling_factor=2.5, kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=16, v_head_dim=32,
    qk_nope_head_dim=32, n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1,
    max_position_embeddings=1024, rope_scaling=None, num_nextn_predict_layers=1, bos_token_id=None,
    eos_token_id=None,
)

# `tiny`: smallest config with every feature, for fast unit tests.
_TINY = dict(_MINI, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, kv_lora_rank=32,
             q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, num_experts_per_tok=2,
             max_position_embeddings=256)


def _presets() -> dict[str, ModelConfig]:
    out = {name: ModelConfig.from_hf(d) for name, d in PUBLISHED_CONFIGS.items()}
    out["mini"] = ModelConfig(**_MINI)
    out["tiny"] = ModelConfig(**_TINY)
    return out


PRESETS: dict[str, ModelConfig] = _presets()


def get_preset(name: str) -> ModelConfig:
    """A fresh (mutable) copy of a preset; raises ConfigError for an unknown name."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {_show(name)}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
