"""Overview dashboard: parameter table, memory, FLOPs and KV-cache numbers of one config (closed form, `core.calc`)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app.compute.common import BYTES_PER_ELEMENT, cfg_of
from core import calc

COMPONENT_LABELS = {
    "embedding": "Embedding", "attention": "Attention (MLA)", "dense_ffn": "Dense FFN",
    "shared_experts": "Shared experts", "routed_experts": "Routed experts", "router": "Router",
    "norms": "Norms", "head": "Output head", "mtp": "MTP module",
}


@st.cache_data(max_entries=64, show_spinner=False)
def overview(cfg_json: str, context: int, kv_dtype: str) -> dict:
    """Everything the Overview shows for one config: parameter table, memory, FLOPs and KV-cache numbers."""
    cfg = cfg_of(cfg_json)
    c = calc.param_counts(cfg)
    rows = calc.param_table(cfg)
    params = pd.DataFrame(rows)
    params["label"] = params["component"].map(COMPONENT_LABELS)
    if cfg.attention_type != "mla":
        params.loc[params["component"] == "attention", "label"] = f"Attention ({cfg.attention_type.upper()})"
    mtp = pd.DataFrame([{"component": "mtp", "total": c["mtp"], "activated": 0,
                         "formula": r"D\,[2d + 2d^2 + \text{block} + d]", "label": COMPONENT_LABELS["mtp"]}])
    params = pd.concat([params, mtp], ignore_index=True)
    params["share_of_total"] = params["total"] / max(c["total"], 1)
    bpe = BYTES_PER_ELEMENT[kv_dtype]
    fl = calc.flops_per_token(cfg, context)
    kv_kind = "mla" if cfg.attention_type == "mla" else cfg.attention_type
    mem = pd.DataFrame([
        {"item": "Weights, BF16", "bytes": calc.weight_bytes(cfg, "bf16"), "kind": "bf16"},
        {"item": "Weights, FP8 (+ scales)", "bytes": calc.weight_bytes(cfg, "fp8"), "kind": "fp8"},
        {"item": f"KV cache, {kv_kind.upper()}, 1 × {context:,} tokens", "bytes":
            calc.kv_cache_bytes(cfg, kv_kind, context, 1, bpe), "kind": "MLA" if kv_kind == "mla" else kv_kind.upper()},
        {"item": f"KV cache if MHA, 1 × {context:,} tokens", "bytes":
            calc.kv_cache_bytes(cfg, "mha", context, 1, bpe), "kind": "MHA"},
    ])
    ctxs = sorted({2**i for i in range(7, 21)} | {context})
    flops = pd.DataFrame([{"context": t, **calc.flops_per_token(cfg, t)} for t in ctxs])
    return {
        "counts": c, "params": params, "memory": mem, "flops": flops, "flops_at_context": fl,
        "kv_elements_per_token": calc.kv_elements_per_token(cfg, kv_kind),
        "kv_bytes_per_token": calc.kv_cache_bytes(cfg, kv_kind, 1, 1, bpe),
        "kv_kind": kv_kind,
        "weights_bf16": calc.weight_bytes(cfg, "bf16"), "weights_fp8": calc.weight_bytes(cfg, "fp8"),
        "weights_fp8_with_mtp": calc.weight_bytes(cfg, "fp8", include_mtp=True),
    }
