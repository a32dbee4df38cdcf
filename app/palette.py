"""One colour per concept, used by every chart on every page (Okabe-Ito: colour-blind safe).

The same thing always has the same colour: MLA is always blue, MHA vermillion, GQA orange, MQA green, ...
Heatmaps use perceptually uniform, colour-blind-safe sequential scales (viridis / cividis).
"""
from __future__ import annotations

# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision deficiencies.
OKABE_ITO = {
    "black": "#000000", "orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73",
    "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7", "grey": "#8C8C8C",
}
_O = OKABE_ITO

# Attention variants (KV cache charts, heatmaps, rank truncation, latency).
ATTENTION = {
    "MLA": _O["blue"],            # absorbed MLA: caches c_kv + k^R
    "MLA (naive)": _O["sky"],     # MLA with the decompressed per-head K/V cache
    "MHA": _O["vermillion"],
    "GQA": _O["orange"],
    "MQA": _O["green"],
}

# Parameter components (Overview).
COMPONENTS = {
    "embedding": _O["grey"],
    "attention": _O["blue"],
    "dense_ffn": _O["orange"],
    "shared_experts": _O["green"],
    "routed_experts": _O["purple"],
    "router": _O["yellow"],
    "norms": _O["black"],
    "head": _O["sky"],
    "mtp": _O["vermillion"],
}

# Number formats (FP8 lab, Overview memory).
FORMATS = {"e4m3": _O["blue"], "e5m2": _O["orange"], "bf16": _O["green"], "fp32": _O["grey"], "fp8": _O["blue"],
           "e5m6": _O["purple"]}

# Scaling granularities (FP8 lab).
GRANULARITY = {"tensor": _O["vermillion"], "row": _O["orange"], "tile": _O["blue"], "block": _O["green"],
               "mx": _O["purple"]}

# Load-balancing strategies (MoE page).
BALANCING = {"none": _O["grey"], "aux_loss": _O["orange"], "aux_free": _O["blue"], "both": _O["green"]}

# Current vs delayed (amax-history) scaling (FP8 lab).
SCALING = {"current": _O["blue"], "delayed": _O["orange"]}

# Bit fields (FP8 lab bit layout).
BITS = {"sign": _O["vermillion"], "exponent": _O["blue"], "mantissa": _O["green"]}

# GEMM accumulation (FP8 lab).
ACCUMULATION = {"promotion every 128": _O["blue"], "no promotion": _O["vermillion"]}

# Ours vs the published figure.
OURS, PAPER = _O["blue"], _O["grey"]
BALANCED_LINE = _O["black"]
HIGHLIGHT = _O["vermillion"]

HEATMAP = "Viridis"      # routing, attention
HEATMAP_ALT = "Cividis"  # second heatmap on a page (bias trajectories, ...)

# Training lab (loss curves) and run overlays: train loss blue, validation vermillion, MTP sky; runs in this order.
LOSS = {"train": _O["blue"], "val": _O["vermillion"], "mtp": _O["sky"]}
RUNS = [_O["blue"], _O["vermillion"], _O["green"], _O["orange"], _O["purple"], _O["sky"], _O["black"], _O["grey"]]
