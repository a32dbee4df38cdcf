"""The FP8 training recipe as data: ``FP8Recipe`` (formats, granularities, scaling and the switches of the
V3 report §3.3), the named ``RECIPES``, and what a recipe does to every tensor of a layer (``operand_specs``,
``recipe_table``) with the lines that say what the emulation still approximates (``recipe_notes``).

The training code (core/fp8/training.py) quantizes each tensor with exactly the ``QuantSpec`` that
``operand_specs`` gives, and the FP8 page's table is ``recipe_table``: one definition for both.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from core.fp8.formats import _check_overflow, get_format
from core.fp8.scaling import AmaxHistory, _check_gran

__all__ = [
    "SITES", "WGRAD_TILINGS", "ACCUMULATIONS", "MOMENT_DTYPES", "FP8Recipe", "RECIPES", "RECIPE_ALIASES",
    "get_recipe", "SWITCHES", "with_switches", "switches_of", "flip_switch", "QuantSpec", "operand_specs", "swiglu_cache_spec", "recipe_table", "recipe_notes",
    "granularity_label",
]

#: Where an FP8 GEMM sits in a layer; each site can get its own switches (V3 report §3.3.3).
SITES: dict[str, str] = {
    "linear": "q/kv projections, dense and shared-expert FFN",
    "attn_out": "attention output projection o_proj (its input is the attention output)",
    "expert_up": "routed experts' gate/up projection (its input is dispatched)",
    "expert_down": "routed experts' down projection (its output is combined)",
}
WGRAD_TILINGS = ("1x128", "128x1")
ACCUMULATIONS = ("fp32", "limited")
MOMENT_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class FP8Recipe:
    """Which format, granularity and scaling each tensor of a layer uses in FP8 training.

    act_*: a GEMM input x (Fprop/Wgrad operand); weight_*: W; grad_*: dL/dy (Dgrad/Wgrad operand).
    scaling: "current" (amax of the tensor being cast, a.k.a. online/dynamic) or "delayed" (amax history
    of previous steps; ``history_len``, ``amax_algo`` "max"|"most_recent"). scale_fmt "ue8m0": every scale an
    integral power of 2.

    The switches of V3 report §3.3 (all off by default, so a recipe built without them behaves as before):
      wgrad_tiling     "1x128": Wgrad reuses the Fprop/Dgrad operands (x and dY in 1x128 tiles); "128x1": x (its
                       stored FP8 copy, dequantized) and dY are re-quantized in 128x1 tiles, so the scale groups
                       run along the Wgrad GEMM's reduction dim, the tokens (§3.3.4 "transposed GEMM").
      attn_out_fmt     format of the input of the Linear after attention (None: act_fmt; "e5m6", §3.3.3).
      attn_out_pow2    power-of-2 scales for that input (§3.3.3).
      dispatch_pow2    power-of-2 scales for the routed experts' up-projection input (FP8 dispatch) and for the
                       activation gradient before their down-projection (§3.3.3 "Low-Precision Communication").
      swiglu_recompute the MoE SwiGLU input is cached in FP8 (act_fmt, act_gran) and its output recomputed in
                       backward (also for the down-projection's Wgrad operand) (§3.3.3).
      combine_bf16     routed experts' outputs (forward combine) and their input gradients (backward combine)
                       rounded to BF16 (§3.3.3).
      optimizer_moments "bf16": AdamW first/second moments stored in BF16, master weights stay fp32 (§3.3.3).
      accumulation     "fp32": exact; "limited": Fprop GEMMs accumulate in a ~14-bit accumulator
                       (``acc_mantissa_bits``) promoted to fp32 every ``promote_every`` = N_C elements (§3.3.2).
    ``notes``: recipe-specific lines on what is still approximated (``recipe_notes`` adds the generic ones).
    """

    name: str = "deepseek-gemm"
    act_fmt: str = "e4m3"
    weight_fmt: str = "e4m3"
    grad_fmt: str = "e4m3"
    act_gran: str = "tile"
    weight_gran: str = "block"
    grad_gran: str = "tile"
    scaling: str = "current"
    history_len: int = 16
    amax_algo: str = "max"
    block_size: int = 128
    scale_fmt: str | None = None
    overflow: str = "saturate"
    description: str = ""
    wgrad_tiling: str = "1x128"
    attn_out_fmt: str | None = None
    attn_out_pow2: bool = False
    dispatch_pow2: bool = False
    swiglu_recompute: bool = False
    combine_bf16: bool = False
    optimizer_moments: str = "fp32"
    accumulation: str = "fp32"
    acc_mantissa_bits: int = 13
    promote_every: int = 128
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        for f_ in ("act_fmt", "weight_fmt", "grad_fmt"):
            get_format(getattr(self, f_), allow_bf16=False)
        if self.attn_out_fmt is not None:
            get_format(self.attn_out_fmt, allow_bf16=False)
        for g_ in ("act_gran", "weight_gran", "grad_gran"):
            _check_gran(getattr(self, g_), self.block_size)
        if self.scaling not in ("current", "delayed"):
            raise ValueError(f"scaling: expected 'current' or 'delayed', got {self.scaling!r}")
        AmaxHistory(self.history_len, self.amax_algo)  # validates both
        _check_overflow(self.overflow)
        if self.scale_fmt not in (None, "ue8m0"):
            raise ValueError(f"scale_fmt: expected None or 'ue8m0', got {self.scale_fmt!r}")
        for f_, ok in (("wgrad_tiling", WGRAD_TILINGS), ("accumulation", ACCUMULATIONS),
                       ("optimizer_moments", MOMENT_DTYPES)):
            if getattr(self, f_) not in ok:
                raise ValueError(f"{f_}: expected one of {list(ok)}, got {getattr(self, f_)!r}")
        for f_ in ("attn_out_pow2", "dispatch_pow2", "swiglu_recompute", "combine_bf16"):
            if not isinstance(getattr(self, f_), bool):
                raise ValueError(f"{f_}: expected true or false, got {getattr(self, f_)!r}")
        if self.wgrad_tiling == "128x1" and (self.act_gran, self.grad_gran) != ("tile", "tile"):
            raise ValueError(f"wgrad_tiling: '128x1' re-tiles 1x{self.block_size} tiles; it needs act_gran and "
                             f"grad_gran 'tile', got {self.act_gran!r} and {self.grad_gran!r}")
        if self.wgrad_tiling == "128x1" and self.scaling == "delayed":
            raise ValueError("wgrad_tiling: '128x1' re-quantizes with current scales; it needs scaling='current'")
        if self.accumulation == "limited":
            if (self.act_gran, self.weight_gran) != ("tile", "block"):
                raise ValueError(f"accumulation: 'limited' models the 1x{self.block_size}-by-{self.block_size}x"
                                 f"{self.block_size} GEMM; it needs act_gran 'tile' and weight_gran 'block', got "
                                 f"{self.act_gran!r} and {self.weight_gran!r}")
            if not 0 <= self.acc_mantissa_bits <= 23:
                raise ValueError(f"acc_mantissa_bits: expected 0..23, got {self.acc_mantissa_bits!r}")
            if self.promote_every <= 0 or self.block_size % self.promote_every or self.promote_every % 4:
                raise ValueError(f"promote_every: expected a divisor of block_size={self.block_size} and a multiple "
                                 f"of 4, got {self.promote_every!r}")


_EMULATED_NOTE = ("Every FP8 GEMM is emulated: operands are quantized, dequantized and multiplied in fp32; the "
                  "rest of the model (attention core, norms, SwiGLU, residuals) runs in fp32, not BF16.")


RECIPES: dict[str, FP8Recipe] = {
    # DeepSeek-V3 report §3.3 to the letter: E4M3 operands in 1x128 / 128x128 / 1x128 groups with online
    # scales (§3.3.2), Wgrad on 128x1 re-tiled operands (§3.3.4), E5M6 with power-of-2 scales for the input of
    # the Linear after attention, FP8 dispatch / BF16 combine with power-of-2 scales, SwiGLU recomputed from an
    # FP8 cache, BF16 AdamW moments (§3.3.3), ~14-bit accumulation promoted every N_C = 128 (§3.3.2).
    "deepseek-v3": FP8Recipe(
        "deepseek-v3", wgrad_tiling="128x1", attn_out_fmt="e5m6", attn_out_pow2=True, dispatch_pow2=True,
        swiglu_recompute=True, combine_bf16=True, optimizer_moments="bf16", accumulation="limited",
        description="DeepSeek-V3 report §3.3 in full: E4M3 1x128/128x128/1x128, 128x1 Wgrad, E5M6 + 2^k after "
                    "attention, FP8 dispatch / BF16 combine, SwiGLU recompute, BF16 moments, 14-bit accumulator",
        notes=("E5M6 has no hardware dtype here: values are rounded to 5 exponent / 6 mantissa bits in fp32 "
               "(IEEE-style specials assumed, max 65024).",)),
    # The same without the limited accumulator (several times faster on a CPU; promotion every 128 makes the
    # accumulation error ~0.05%, docs/performance.md).
    "deepseek-v3-fp32acc": FP8Recipe(
        "deepseek-v3-fp32acc", wgrad_tiling="128x1", attn_out_fmt="e5m6", attn_out_pow2=True, dispatch_pow2=True,
        swiglu_recompute=True, combine_bf16=True, optimizer_moments="bf16",
        description="deepseek-v3 with exact fp32 accumulation instead of the 14-bit accumulator"),
    # The FP8 GEMM operands of §3.3.2 only (what "deepseek" meant before the rest of the recipe existed).
    "deepseek-gemm": FP8Recipe(
        "deepseek-gemm",
        description="DeepSeek's FP8 GEMM operands only: E4M3 act 1x128, weight 128x128, grad 1x128, current "
                    "scaling; no other part of the report's recipe"),
    # TE Float8CurrentScaling(fp8_format=HYBRID): per-tensor current scaling, E4M3 forward, E5M2 gradients.
    "tensor-current": FP8Recipe(
        "tensor-current", grad_fmt="e5m2", act_gran="tensor", weight_gran="tensor", grad_gran="tensor",
        description="TE Float8CurrentScaling (HYBRID): per-tensor current scaling, E4M3 fwd / E5M2 grads"),
    # TE DelayedScaling(fp8_format=HYBRID, amax_compute_algo="max"), with a short history of 16:
    # TE's default 1024 favours stability, a 16-32 window adapts faster (TransformerEngine issue #1169).
    "tensor-delayed": FP8Recipe(
        "tensor-delayed", grad_fmt="e5m2", act_gran="tensor", weight_gran="tensor", grad_gran="tensor",
        scaling="delayed", history_len=16, amax_algo="max",
        description="TE DelayedScaling (HYBRID): per-tensor, amax history 16, algo max, E4M3 fwd / E5M2 grads"),
    # DeepSeek's fine-grained scaling with the classic HYBRID formats.
    "hybrid": FP8Recipe(
        "hybrid", grad_fmt="e5m2",
        description="Fine-grained like DeepSeek (1x128 / 128x128 / 1x128) but E5M2 gradients"),
    # Extra contrasts: TE MXFP8BlockScaling (E4M3, 1x32, E8M0 scales) and torchao "rowwise"
    # (E4M3, per-row scales rounded to powers of two).
    "mxfp8": FP8Recipe(
        "mxfp8", act_gran="mx", weight_gran="mx", grad_gran="mx",
        description="MXFP8 (TE MXFP8BlockScaling): E4M3, 1x32 blocks with E8M0 scales"),
    "rowwise": FP8Recipe(
        "rowwise", act_gran="row", weight_gran="row", grad_gran="row", scale_fmt="ue8m0",
        description="torchao rowwise: E4M3, one power-of-two scale per row"),
}
#: Older names still accepted by ``get_recipe`` (share links, other branches): "deepseek" was the GEMM-only recipe.
RECIPE_ALIASES = {"deepseek": "deepseek-gemm"}


def get_recipe(recipe: str | FP8Recipe) -> FP8Recipe:
    if isinstance(recipe, FP8Recipe):
        return recipe
    recipe = RECIPE_ALIASES.get(recipe, recipe)
    if recipe not in RECIPES:
        raise ValueError(f"recipe: unknown recipe {recipe!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[recipe]


#: The report's switches by name (V3 report §3.3.2-3.3.4): name -> (what it does, fields when on, fields when off).
SWITCHES: dict[str, tuple[str, dict, dict]] = {
    "wgrad_128x1": ("Wgrad on x and dY re-tiled 1x128 -> 128x1", {"wgrad_tiling": "128x1"}, {"wgrad_tiling": "1x128"}),
    "e5m6_attn_out": ("E5M6 for the input of the Linear after attention", {"attn_out_fmt": "e5m6"},
                      {"attn_out_fmt": None}),
    "pow2_attn_out": ("power-of-2 scales for that input", {"attn_out_pow2": True}, {"attn_out_pow2": False}),
    "pow2_dispatch": ("power-of-2 scales for the FP8 dispatch and the gradient before the down-projection",
                      {"dispatch_pow2": True}, {"dispatch_pow2": False}),
    "swiglu_recompute": ("MoE SwiGLU input cached in FP8, output recomputed in backward", {"swiglu_recompute": True},
                         {"swiglu_recompute": False}),
    "bf16_combine": ("BF16 combine (expert outputs, input gradients)", {"combine_bf16": True}, {"combine_bf16": False}),
    "bf16_moments": ("BF16 AdamW moments, FP32 master weights", {"optimizer_moments": "bf16"},
                     {"optimizer_moments": "fp32"}),
    "acc14": ("14-bit accumulator promoted every N_C = 128 (Fprop)", {"accumulation": "limited"},
              {"accumulation": "fp32"}),
}


def switches_of(recipe: str | FP8Recipe) -> tuple[str, ...]:
    """The SWITCHES that are on in ``recipe`` (in SWITCHES order)."""
    r = get_recipe(recipe)
    return tuple(k for k, (_, on, _) in SWITCHES.items() if all(getattr(r, f) == v for f, v in on.items()))


def with_switches(recipe: str | FP8Recipe, switches) -> FP8Recipe:
    """``recipe`` with exactly ``switches`` on (the others off); formats, granularities and scaling are kept.
    Named "<recipe>+<switch>+..." or "<recipe>-<switch>..." by the shorter description of the change."""
    r = get_recipe(recipe)
    switches = tuple(switches)
    bad = [s for s in switches if s not in SWITCHES]
    if bad:
        raise ValueError(f"fp8_switches: unknown switch {bad[0]!r}; expected some of {list(SWITCHES)}")
    fields = {}
    for k, (_, on, off) in SWITCHES.items():
        fields.update(on if k in switches else off)
    have = switches_of(r)
    added = [k for k in SWITCHES if k in switches and k not in have]
    dropped = [k for k in SWITCHES if k in have and k not in switches]
    if not added and not dropped:
        return r
    name = r.name + "".join(f"+{k}" for k in added) + "".join(f"-{k}" for k in dropped)
    try:
        return replace(r, name=name, **fields)
    except ValueError as e:
        raise ValueError(f"fp8_switches: {e}") from None


def flip_switch(recipe: str | FP8Recipe, change: str) -> FP8Recipe:
    """``recipe`` with one switch turned off ("-<switch>") or on ("+<switch>"); "" leaves it as named."""
    r = get_recipe(recipe)
    if not change:
        return r
    if change[0] not in "+-" or change[1:] not in SWITCHES:
        raise ValueError(f"fp8_switches: expected '', '-<switch>' or '+<switch>' with a switch of {list(SWITCHES)}, "
                         f"got {change!r}")
    on = set(switches_of(r))
    on = on - {change[1:]} if change[0] == "-" else on | {change[1:]}
    return with_switches(r, [s for s in SWITCHES if s in on])


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: format, scale granularity ("tile_t" = 1 x block_size tiles of the transposed
    operand, i.e. block_size x 1 along the tokens), and whether every scale is an integral power of 2."""

    fmt: str
    granularity: str
    pow2: bool
    block_size: int = 128

    @property
    def scale_fmt(self) -> str | None:
        return "ue8m0" if self.pow2 else None


def granularity_label(granularity: str, block_size: int = 128) -> str:
    """"tile" -> "1x128", "tile_t" -> "128x1", "block" -> "128x128", ... (for tables)."""
    b = block_size
    return {"tensor": "per tensor", "row": "per row", "tile": f"1x{b}", "tile_t": f"{b}x1",
            "block": f"{b}x{b}", "mx": "1x32 (E8M0 scales)"}.get(granularity, granularity)


def operand_specs(recipe: str | FP8Recipe, site: str = "linear") -> dict[str, QuantSpec]:
    """The QuantSpec of each FP8 operand of the GEMMs at ``site`` (a key of SITES) under ``recipe``:
    "x", "w" (Fprop; W is reused transposed in Dgrad: 128x128 blocks are square), "dy" (Dgrad),
    "x_wgrad", "dy_wgrad" (Wgrad: the same as x / dy unless wgrad_tiling is "128x1"). V3 report §3.3.2-3.3.4."""
    r = get_recipe(recipe)
    if site not in SITES:
        raise ValueError(f"site: expected one of {list(SITES)}, got {site!r}")
    base = r.scale_fmt == "ue8m0"
    pow2 = lambda gran: base or gran == "mx"  # noqa: E731  (MX scales are E8M0: powers of 2)
    x_fmt = r.attn_out_fmt if (site == "attn_out" and r.attn_out_fmt) else r.act_fmt
    x_pow2 = pow2(r.act_gran) or (site == "attn_out" and r.attn_out_pow2) or (site == "expert_up" and r.dispatch_pow2)
    dy_pow2 = pow2(r.grad_gran) or (site == "expert_down" and r.dispatch_pow2)
    b = r.block_size
    x = QuantSpec(get_format(x_fmt).name, r.act_gran, x_pow2, b)
    dy = QuantSpec(get_format(r.grad_fmt).name, r.grad_gran, dy_pow2, b)
    # Re-tiled copies keep their source's format and power-of-2 rule (§3.3.3: round scales so that re-tiling the
    # post-attention input adds no extra error; we apply the same to the dispatched tensors).
    retile = r.wgrad_tiling == "128x1"
    return {
        "x": x,
        "w": QuantSpec(get_format(r.weight_fmt).name, r.weight_gran, pow2(r.weight_gran), b),
        "dy": dy,
        "x_wgrad": QuantSpec(x.fmt, "tile_t", x.pow2, b) if retile else x,
        "dy_wgrad": QuantSpec(dy.fmt, "tile_t", dy.pow2, b) if retile else dy,
    }


def swiglu_cache_spec(recipe: str | FP8Recipe) -> QuantSpec | None:
    """How the MoE SwiGLU input is cached for backward (None: kept as computed, no recompute)."""
    r = get_recipe(recipe)
    if not r.swiglu_recompute:
        return None
    return QuantSpec(get_format(r.act_fmt).name, r.act_gran, r.scale_fmt == "ue8m0" or r.act_gran == "mx",
                     r.block_size)


#: (site, pass, GEMM, tensor, operand key) rows of ``recipe_table``, in layer order.
_GEMM_ROWS = (("forward", "Fprop", "input x", "x"), ("forward", "Fprop", "weight W", "w"),
              ("backward", "Dgrad", "output gradient dY", "dy"), ("backward", "Dgrad", "weight W (transposed)", "w"),
              ("backward", "Wgrad", "input x", "x_wgrad"), ("backward", "Wgrad", "output gradient dY", "dy_wgrad"))


def _row(site: str, pass_: str, gemm: str, tensor: str, spec: QuantSpec | None, plain: str = "fp32") -> dict:
    if spec is None:
        return {"site": site, "pass": pass_, "gemm": gemm, "tensor": tensor, "format": plain.upper(),
                "granularity": "-", "pow2_scale": None}
    return {"site": site, "pass": pass_, "gemm": gemm, "tensor": tensor, "format": spec.fmt.upper(),
            "granularity": granularity_label(spec.granularity, spec.block_size), "pow2_scale": spec.pow2}


def recipe_table(recipe: str | FP8Recipe) -> list[dict]:
    """One row per tensor of a layer, forward and backward, under ``recipe``: {site, pass, gemm, tensor, format,
    granularity, pow2_scale (None when the tensor is not scaled)}. Built from ``operand_specs`` /
    ``swiglu_cache_spec`` and the recipe's switches, i.e. what the training code does."""
    r = get_recipe(recipe)
    rows = []
    for site in SITES:
        specs = operand_specs(r, site)
        rows += [_row(site, p, g, t, specs[k]) for p, g, t, k in _GEMM_ROWS]
        if site == "expert_up":
            rows.append(_row(site, "forward", "-", "SwiGLU input (kept for backward)", swiglu_cache_spec(r)))
            rows.append(_row(site, "backward", "-", "input gradient to the tokens (combine of dX)", None,
                             "bf16" if r.combine_bf16 else "fp32"))
        if site == "expert_down":
            rows.append(_row(site, "forward", "-", "expert output (combine)", None,
                             "bf16" if r.combine_bf16 else "fp32"))
    rows.append(_row("optimizer", "update", "-", "master weights", None, "fp32"))
    rows.append(_row("optimizer", "update", "-", "weight gradients", None, "fp32"))
    rows.append(_row("optimizer", "update", "-", "AdamW moments m, v", None, r.optimizer_moments))
    return rows


def recipe_notes(recipe: str | FP8Recipe) -> list[str]:
    """One line per thing this emulation of ``recipe`` still approximates or leaves out (shown on the page)."""
    r = get_recipe(recipe)
    notes = [_EMULATED_NOTE, "Embedding, output head, router and norms stay high precision (fp32 here), as in "
             "the report (§3.3.1); so does the attention core (scores, softmax, values)."]
    if r.accumulation == "fp32":
        notes.append("Accumulation is exact fp32 (the H800's ~14-bit accumulator promoted every N_C = 128 is "
                     "accumulation='limited').")
    else:
        notes.append(f"The {r.acc_mantissa_bits + 1}-bit accumulator with promotion every {r.promote_every} runs "
                     "in Fprop GEMMs only (a CPU cost limit); Dgrad and Wgrad accumulate exactly in fp32.")
    if r.dispatch_pow2 or r.combine_bf16:
        notes.append("Dispatch and combine are not communication here (one process): their FP8 / BF16 "
                     "rounding is applied where the all-to-all would be.")
    notes += list(r.notes)
    return notes
