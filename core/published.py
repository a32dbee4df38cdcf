"""The published figures of DeepSeek-V3 / V2 / V2-Lite, each with its source: shown beside Eva's own numbers
and checked in tests. Pure data (no imports from core), so every layer can read it.

Sources: "V3 report" = DeepSeek-V3 Technical Report (arXiv 2412.19437); "V2 report" = DeepSeek-V2 (arXiv
2405.04434); "LFB paper" = Auxiliary-Loss-Free Load Balancing (arXiv 2408.15664); README_WEIGHTS = README_WEIGHTS.md
of the deepseek-ai/DeepSeek-V3 repository; config.json = the model repositories on Hugging Face.
"""
from __future__ import annotations

__all__ = [
    "PUBLISHED_CONFIGS", "PAPER_FIGURES",
    "V3_TOTAL_PARAMS", "V3_ACTIVATED_PARAMS", "V3_ACTIVATED_PARAMS_README", "V3_CHECKPOINT_PARAMS", "V3_MTP_PARAMS",
    "V2_TOTAL_PARAMS", "V2_ACTIVATED_PARAMS", "V2_LITE_TOTAL_PARAMS", "V2_LITE_ACTIVATED_PARAMS",
    "V3_CONTEXT_TOKENS", "V3_PRETRAIN_TOKENS", "V3_H800_GPU_HOURS",
    "H800_FP8_ACCUM_BITS", "FP8_ACCUM_ERROR_K", "FP8_ACCUM_ERROR", "V3_PROMOTION_INTERVAL", "V3_FP8_LOSS_REL_ERROR",
    "FP8_VALIDATION_RUNS", "V3_BIAS_UPDATE_SPEED", "V3_BALANCE_ALPHA", "V3_MTP_ACCEPTANCE", "billions", "trillions",
]

# ---------------------------------------------------------------------------------------------- parameters
V3_TOTAL_PARAMS = 671e9             # V3 report abstract and Table 1 ("671B total parameters")
V3_ACTIVATED_PARAMS = 37e9          # V3 report abstract ("37B activated for each token")
V3_ACTIVATED_PARAMS_README = 36.7e9  # README_WEIGHTS: 36.7B activated incl. 0.9B embedding + 0.9B head
V3_CHECKPOINT_PARAMS = 685e9        # README / README_WEIGHTS: 685B on Hugging Face = 671B main model + the MTP module
V3_MTP_PARAMS = 11.5e9              # README_WEIGHTS: MTP module, 11.5B unique parameters
V2_TOTAL_PARAMS = 236e9             # V2 report abstract ("236B total parameters")
V2_ACTIVATED_PARAMS = 21e9          # V2 report abstract ("21B are activated for each token")
V2_LITE_TOTAL_PARAMS = 15.7e9       # V2 report Appendix B (DeepSeek-V2-Lite: 15.7B total)
V2_LITE_ACTIVATED_PARAMS = 2.4e9    # V2 report Appendix B (2.4B activated)

# ---------------------------------------------------------------------------------------------- training
V3_CONTEXT_TOKENS = 128 * 1024      # V3 report §4.3: context extended to 128K with YaRN
V3_PRETRAIN_TOKENS = 14.8e12        # V3 report abstract and §4.2: 14.8T pre-training tokens
V3_H800_GPU_HOURS = 2.788e6         # V3 report Table 1: 2.788M H800 GPU hours for the full training
V3_BIAS_UPDATE_SPEED = 0.001        # V3 report §4.2: bias update speed gamma = 0.001 (first 14.3T tokens)
V3_MTP_ACCEPTANCE = (0.85, 0.90)    # V3 report §5.4.3: acceptance of the second (MTP-drafted) token 85%-90%
V3_BALANCE_ALPHA = 0.0001           # V3 report §4.2: sequence-wise balance loss alpha = 0.0001 ("extremely small")

# ---------------------------------------------------------------------------------------------- FP8
H800_FP8_ACCUM_BITS = 14            # V3 report §3.3.2: H800 FP8 GEMM accumulation keeps about 14 bits
FP8_ACCUM_ERROR_K = 4096            # V3 report §3.3.2: ... which for K = 4096 gives a max relative error of
FP8_ACCUM_ERROR = 0.02              #   "nearly 2%" (random matrices)
V3_PROMOTION_INTERVAL = 128         # V3 report §3.3.2: partial sums promoted to FP32 every N_C = 128 elements
V3_FP8_LOSS_REL_ERROR = 0.0025      # V3 report §3.3 / Appendix B.1: FP8 vs BF16 loss error below 0.25%, measured on
FP8_VALIDATION_RUNS = (             # ... two smaller MoE models, not on V3 itself (App. B.1): (total params, tokens)
    (16e9, 1.33e12),                #   "approximately 16B total parameters on 1.33T tokens"
    (230e9, 0.9e12),                #   "approximately 230B total parameters on around 0.9T tokens"
)

# KV-cache elements per token over all layers, (kv_lora_rank + qk_rope_head_dim) x layers, from each config.json
# (V2 report Table 1 gives the per-layer (d_c + d_h^R) form).
PAPER_FIGURES = {
    "deepseek-v3": {"total": V3_TOTAL_PARAMS, "activated": V3_ACTIVATED_PARAMS, "checkpoint_total": V3_CHECKPOINT_PARAMS,
                    "mtp": V3_MTP_PARAMS, "kv_elements_per_token": 35_136},
    "deepseek-v2": {"total": V2_TOTAL_PARAMS, "activated": V2_ACTIVATED_PARAMS, "kv_elements_per_token": 34_560},
    "deepseek-v2-lite": {"total": V2_LITE_TOTAL_PARAMS, "activated": V2_LITE_ACTIVATED_PARAMS,
                         "kv_elements_per_token": 15_552},
}


def billions(n: float) -> str:
    """A published count as it is quoted: 671e9 -> '671B', 36.7e9 -> '36.7B'."""
    return f"{n / 1e9:g}B"


def trillions(n: float) -> str:
    """A published token count as it is quoted: 1.33e12 -> '1.33T', 0.9e12 -> '0.9T'."""
    return f"{n / 1e12:g}T"


# ---------------------------------------------------------------------------------------------- config.json
def _published_v3() -> dict:
    """config.json of deepseek-ai/DeepSeek-V3 (model fields; `auto_map` omitted)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
        "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
        "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
    }


def _published_v2() -> dict:
    """config.json of deepseek-ai/DeepSeek-V2 (236B; model fields)."""
    return {
        "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
        "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 12288,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
        "moe_intermediate_size": 1536, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 160,
        "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 128, "num_experts_per_tok": 6,
        "num_hidden_layers": 60, "num_key_value_heads": 128, "pretraining_tp": 1, "q_lora_rank": 1536,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 16.0, "scoring_func": "softmax", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 3, "topk_method": "group_limited_greedy",
        "torch_dtype": "bfloat16", "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128,
        "vocab_size": 102400,
    }


def _published_v2_lite() -> dict:
    """config.json of deepseek-ai/DeepSeek-V2-Lite (16B; model fields)."""
    d = _published_v2()
    d.update({"hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
              "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "n_group": 1,
              "topk_group": 1, "n_routed_experts": 64, "q_lora_rank": None, "routed_scaling_factor": 1.0,
              "topk_method": "greedy", "transformers_version": "4.33.1"})
    return d


# The published config.json documents, for round-trip tests and the app's "paper" column.
PUBLISHED_CONFIGS: dict[str, dict] = {
    "deepseek-v3": _published_v3(),
    "deepseek-v2": _published_v2(),
    "deepseek-v2-lite": _published_v2_lite(),
}
