"""FP8 numerics for the explorer: formats, fine-grained scaling, an emulated FP8 GEMM and the
DeepSeek-V3 FP8 training recipe.

Pure PyTorch (+ the standard library). No GPU is needed: FP8 *storage* uses torch's float8 dtypes,
and FP8 *arithmetic* is emulated (quantize -> dequantize -> fp32 matmul), because ``torch._scaled_mm``
needs a CUDA GPU with SM89+ (reference/fp8-and-moe.md §1.7).

Sections
--------
1. Formats      ``FORMATS``, ``get_format``, ``cast_to_fp8``, ``round_to_format``, ``bit_layout``,
                ``code_table``, ``representable_values``, ``decode_code``.
2. Scaling      ``quantize`` / ``dequantize`` with granularity ``tensor | row | tile | block | mx``,
                ``group_amax``, ``compute_scale``, ``overflow_count``, ``AmaxHistory``/``DelayedScaler``.
3. Metrics      ``error_metrics``, ``quantize_and_measure``, ``make_test_tensor``.
4. GEMM         ``fp8_gemm`` (DeepSeek ``kernel.py`` / DeepGEMM semantics), ``fp8_gemm_quantized``,
                ``calc_diff``, ``round_mantissa``, ``limited_accumulation_gemm``,
                ``accumulation_error_curve``.
5. Training     ``FP8Recipe``/``RECIPES``, ``fake_quant``, ``quant_grad``, ``quant_act``,
                ``quant_weight``, ``quant_output_grad``, ``fp8_linear``, ``FP8Linear``, ``FP8Stats``,
                ``convert_to_fp8``, ``get_fp8_stats``.

Conventions (DeepSeek convention, inference/kernel.py ``act_quant``): the scale ``s`` is a
*dequantization* scale, ``s = amax / fmt_max``; ``q = cast(clamp(x / s))`` and ``x_hat = q * s``.
Every cast clamps explicitly first, because torch's own overflow behaviour changed between releases
(<= 2.11 eager: E4M3 overflow -> NaN; >= 2.12: saturate; reference/fp8-and-moe.md §1.2).
Everything here is deterministic on CPU.
"""

from __future__ import annotations

import fnmatch
import math
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.gemm import Linear, linear

__all__ = [
    "FP8Format", "FORMATS", "FP8_FORMATS", "GRANULARITIES", "OVERFLOW_MODES", "AMAX_FLOOR", "MX_BLOCK",
    "get_format", "cast_to_fp8", "round_to_format", "decode_code", "bit_layout", "code_table",
    "representable_values",
    "group_amax", "compute_scale", "scale_shape", "quantize", "dequantize", "overflow_count",
    "AmaxHistory", "DelayedScaler",
    "error_metrics", "quantize_and_measure", "make_test_tensor",
    "fp8_gemm", "fp8_gemm_quantized", "calc_diff", "round_mantissa", "limited_accumulation_gemm",
    "accumulation_error_curve",
    "FP8Recipe", "RECIPES", "get_recipe", "FP8Stats", "fake_quant", "quant_grad", "quant_act",
    "quant_weight", "quant_output_grad", "make_scalers", "fp8_linear", "FP8Ops", "FP8Linear", "DEFAULT_SKIP",
    "convert_to_fp8", "get_fp8_stats",
]

# ---------------------------------------------------------------------------------------------------
# 1. Formats
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FP8Format:
    """A small floating-point format (1 sign bit, ``exp_bits`` exponent bits, ``man_bits`` mantissa bits).

    ``ieee_specials``: the all-ones exponent is reserved for inf/NaN (E5M2, BF16). E4M3FN instead
    keeps that binade for numbers and has a single NaN pattern per sign (S.1111.111) and no inf,
    which is why its max is 448 and not 240 (reference/fp8-and-moe.md §1.1).
    """

    name: str
    dtype: torch.dtype
    exp_bits: int
    man_bits: int
    bias: int
    max: float
    min_normal: float
    min_subnormal: float
    has_inf: bool
    ieee_specials: bool
    description: str = ""

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def is_fp8(self) -> bool:
        return self.bits == 8

    @property
    def eps(self) -> float:
        """Gap between 1.0 and the next value (torch.finfo(...).eps)."""
        return 2.0 ** -self.man_bits

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite value."""
        return math.frexp(self.max)[1] - 1

    @property
    def overflow_threshold(self) -> float:
        """Magnitude at which round-to-nearest-even of an unclamped value leaves the finite range:
        max + half an ulp of the top binade (E4M3: 464, E5M2: 61440)."""
        return self.max + 0.5 * 2.0 ** (self.emax - self.man_bits)

    @property
    def tie_overflows(self) -> bool:
        """Whether a value exactly at ``overflow_threshold`` rounds *up* (out of range) under RNE.
        That happens when max's mantissa field is odd (E5M2 1.11b -> 61440 becomes inf); E4M3's max has
        mantissa 110b (even), so 464 rounds down to 448."""
        mant_field = round((self.max / 2.0 ** self.emax - 1.0) * 2 ** self.man_bits)
        return mant_field % 2 == 1


FORMATS: dict[str, FP8Format] = {
    "e4m3": FP8Format(
        "e4m3", torch.float8_e4m3fn, 4, 3, 7, 448.0, 2.0 ** -6, 2.0 ** -9, False, False,
        "OCP E4M3FN: max 448, no inf, NaN = S.1111.111 (torch.float8_e4m3fn)"),
    "e5m2": FP8Format(
        "e5m2", torch.float8_e5m2, 5, 2, 15, 57344.0, 2.0 ** -14, 2.0 ** -16, True, True,
        "OCP E5M2: IEEE-like, max 57344, ±inf, 6 NaNs (torch.float8_e5m2)"),
    "bf16": FP8Format(
        "bf16", torch.bfloat16, 8, 7, 127, float(torch.finfo(torch.bfloat16).max), 2.0 ** -126,
        2.0 ** -133, True, True, "bfloat16 for contrast (16 bits; not an FP8 format)"),
}
FP8_FORMATS = ("e4m3", "e5m2")
GRANULARITIES = ("tensor", "row", "tile", "block", "mx")
OVERFLOW_MODES = ("saturate", "nan")
#: amax floor used by DeepSeek inference/kernel.py ``act_quant`` (clamp added 2025-08-27) so an
#: all-zero group gives a finite scale instead of 0 (and 0/0 = NaN).
AMAX_FLOOR = 1e-4
#: OCP MX block size (1x32 along the last dim, one E8M0 scale per block).
MX_BLOCK = 32

_ALIASES = {
    "e4m3": "e4m3", "e4m3fn": "e4m3", "float8_e4m3fn": "e4m3", "fp8_e4m3": "e4m3", "fp8-e4m3": "e4m3",
    "e5m2": "e5m2", "float8_e5m2": "e5m2", "fp8_e5m2": "e5m2", "fp8-e5m2": "e5m2",
    "bf16": "bf16", "bfloat16": "bf16",
}


def get_format(fmt: str | FP8Format, *, allow_bf16: bool = True) -> FP8Format:
    """Resolve ``fmt`` ("e4m3", "e5m2", "bf16", aliases such as "float8_e4m3fn", or an FP8Format)."""
    if isinstance(fmt, FP8Format):
        spec = fmt
    else:
        key = _ALIASES.get(str(fmt).strip().lower()) if isinstance(fmt, str) else None
        if key is None:
            raise ValueError(f"fmt: unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
        spec = FORMATS[key]
    if not allow_bf16 and not spec.is_fp8:
        raise ValueError(f"fmt: {spec.name!r} is not an FP8 format here; expected one of {list(FP8_FORMATS)}")
    return spec


def _check_overflow(overflow: str) -> str:
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow: expected one of {list(OVERFLOW_MODES)}, got {overflow!r}")
    return overflow


def _overflow_mask(y: torch.Tensor, spec: FP8Format) -> torch.Tensor:
    """Elements that would round above ``max`` under RNE (or are ±inf). NaN is not counted."""
    ay = y.abs()
    over = ay > spec.overflow_threshold
    if spec.tie_overflows:
        over = over | (ay == spec.overflow_threshold)
    return over  # inf > threshold is True, NaN > threshold is False


def cast_to_fp8(x: torch.Tensor, fmt: str | FP8Format = "e4m3", overflow: str = "saturate") -> torch.Tensor:
    """Cast ``x`` (any float tensor, already scaled) to an FP8 dtype with round-to-nearest-even.

    overflow="saturate": clamp to ±max first (what TE/torchao do, and the CUDA ``__NV_SATFINITE``
    conversion), so every non-NaN value ends up finite; ±inf -> ±max.
    overflow="nan": what the raw OCP format does without saturation: values that would round above max
    become NaN (E4M3, which has no inf) or ±inf (E5M2). E4M3: |x| > 464 -> NaN, 464 -> 448 (tie to even);
    E5M2: |x| >= 61440 -> ±inf. NaN input stays NaN in both modes.
    We clamp explicitly in both modes rather than rely on torch's cast (torch <= 2.11 gave NaN, >= 2.12
    saturates; reference/fp8-and-moe.md §1.2).
    Returns a tensor of ``x``'s shape with dtype float8_e4m3fn / float8_e5m2.
    """
    spec = get_format(fmt, allow_bf16=False)
    _check_overflow(overflow)
    if not torch.is_floating_point(x):
        raise ValueError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        x = x.float()
    y = x.clamp(-spec.max, spec.max)  # clamp keeps NaN as NaN
    if overflow == "nan":
        over = _overflow_mask(x, spec)
        if spec.has_inf:
            special = torch.where(x > 0, torch.full_like(x, math.inf), torch.full_like(x, -math.inf))
        else:
            special = torch.full_like(x, math.nan)
        y = torch.where(over, special, y)
    return y.to(spec.dtype)


def round_to_format(x: torch.Tensor, fmt: str | FP8Format = "e4m3", overflow: str = "saturate") -> torch.Tensor:
    """Round ``x`` to the nearest value of ``fmt`` (no scaling) and return it as float32.

    Works for "e4m3", "e5m2" and the "bf16" contrast format (bf16: saturate clamps to ±max_bf16,
    "nan" lets the ordinary IEEE cast overflow to ±inf)."""
    spec = get_format(fmt)
    _check_overflow(overflow)
    if not torch.is_floating_point(x):
        raise ValueError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    if spec.is_fp8:
        return cast_to_fp8(x, spec, overflow).float()
    x = x.float()
    if overflow == "saturate":
        x = x.clamp(-spec.max, spec.max)
    return x.to(spec.dtype).float()


def _fields(code: int, spec: FP8Format) -> tuple[int, int, int]:
    m = spec.man_bits
    e = spec.exp_bits
    return (code >> (e + m)) & 1, (code >> m) & ((1 << e) - 1), code & ((1 << m) - 1)


def decode_code(code: int, fmt: str | FP8Format) -> float:
    """Decode a bit pattern by hand (no torch): sign * 2^(E-bias) * 1.M for normals,
    sign * 2^(1-bias) * 0.M for subnormals (E == 0); specials per the format's NaN/inf rules."""
    spec = get_format(fmt)
    s, e, m = _fields(int(code), spec)
    e_all = (1 << spec.exp_bits) - 1
    m_all = (1 << spec.man_bits) - 1
    sign = -1.0 if s else 1.0
    if spec.ieee_specials and e == e_all:
        return sign * math.inf if m == 0 else math.nan
    if not spec.ieee_specials and e == e_all and m == m_all:  # E4M3FN: S.1111.111 is NaN
        return math.nan
    if e == 0:
        return sign * (m / 2 ** spec.man_bits) * 2.0 ** (1 - spec.bias)
    return sign * (1 + m / 2 ** spec.man_bits) * 2.0 ** (e - spec.bias)


def _describe_code(code: int, spec: FP8Format) -> dict:
    s, e, m = _fields(code, spec)
    value = decode_code(code, spec)
    kind = "nan" if math.isnan(value) else ("inf" if math.isinf(value) else "finite")
    eb = format(e, f"0{spec.exp_bits}b")
    mb = format(m, f"0{spec.man_bits}b")
    return {
        "code": code,
        "hex": f"0x{code:0{spec.bits // 4}X}",
        "bits": f"{s} {eb} {mb}",
        "sign": s,
        "exponent": eb,
        "mantissa": mb,
        "exponent_field": e,
        "mantissa_field": m,
        "unbiased_exponent": (None if kind != "finite" else (1 - spec.bias if e == 0 else e - spec.bias)),
        "value": value,
        "kind": kind,
        "subnormal": kind == "finite" and e == 0 and m != 0,
        "zero": kind == "finite" and e == 0 and m == 0,
    }


def code_table(fmt: str | FP8Format) -> list[dict]:
    """All 256 codes of an FP8 format, one dict per code (ascending code order).

    Keys: code, hex, bits ("s eeee mmm"), sign, exponent (bit string), mantissa (bit string),
    exponent_field, mantissa_field (ints), unbiased_exponent (None for NaN/inf; 1-bias for zero and
    subnormals), value (float; NaN/±inf for specials), kind ("finite"/"nan"/"inf"), subnormal, zero.
    Counts: E4M3 254 finite / 2 NaN / 0 inf; E5M2 248 / 6 / 2 (reference/fp8-and-moe.md §1.1).
    """
    spec = get_format(fmt, allow_bf16=False)
    return [_describe_code(c, spec) for c in range(256)]


def representable_values(fmt: str | FP8Format) -> torch.Tensor:
    """Sorted distinct finite values of ``fmt`` (float32 1-D tensor; -0 and +0 merged).

    E4M3: 253 values, E5M2: 247, BF16: 65279. Decoded by torch from every bit pattern."""
    spec = get_format(fmt)
    if spec.is_fp8:
        v = torch.arange(256, dtype=torch.uint8).view(spec.dtype).float()
    else:
        v = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(spec.dtype).float()
    v = v[torch.isfinite(v)]
    return torch.unique(v)  # sorted; -0.0 == 0.0 so they merge


def bit_layout(value: float, fmt: str | FP8Format = "e4m3", overflow: str = "saturate") -> dict:
    """Bit layout of ``value`` after rounding it to ``fmt`` (RNE, no scaling).

    Returns: input, value (the rounded value), code, hex, bits, sign, exponent (bit string),
    mantissa (bit string), exponent_field, mantissa_field, unbiased_exponent, is_subnormal, is_zero,
    is_nan, is_inf, overflowed (|input| beyond the format's range), abs_error, rel_error
    (|value-input|/|input|; 0 when both are 0, inf when input is 0 but value is not).
    """
    spec = get_format(fmt)
    x = float(value)
    t = torch.tensor([x], dtype=torch.float64)
    if spec.is_fp8:
        code = int(cast_to_fp8(t, spec, overflow).view(torch.uint8).item())
    else:
        code = int(round_to_format(t, spec, overflow).to(torch.bfloat16).view(torch.int16).item()) & 0xFFFF
    d = _describe_code(code, spec)
    rounded = d["value"]
    if math.isnan(x) or math.isnan(rounded) or math.isinf(rounded) or math.isinf(x):
        abs_err = 0.0 if (x == rounded or (math.isnan(x) and math.isnan(rounded))) else math.inf
        rel_err = abs_err
    else:
        abs_err = abs(rounded - x)
        rel_err = abs_err / abs(x) if x != 0 else (0.0 if abs_err == 0 else math.inf)
    return {
        "input": x,
        "value": rounded,
        "code": d["code"],
        "hex": d["hex"],
        "bits": d["bits"],
        "sign": d["sign"],
        "exponent": d["exponent"],
        "mantissa": d["mantissa"],
        "exponent_field": d["exponent_field"],
        "mantissa_field": d["mantissa_field"],
        "unbiased_exponent": d["unbiased_exponent"],
        "is_subnormal": d["subnormal"],
        "is_zero": d["zero"],
        "is_nan": d["kind"] == "nan",
        "is_inf": d["kind"] == "inf",
        "overflowed": bool(math.isfinite(x) and abs(x) > spec.max and
                           bool(_overflow_mask(t, spec).item())),
        "abs_error": abs_err,
        "rel_error": rel_err,
        "format": spec.name,
    }


# ---------------------------------------------------------------------------------------------------
# 2. Scaling granularities
# ---------------------------------------------------------------------------------------------------


def _check_gran(granularity: str, block_size: int) -> tuple[str, int]:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {list(GRANULARITIES)}, got {granularity!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    return granularity, (MX_BLOCK if granularity == "mx" else block_size)


def _check_x(x: torch.Tensor, granularity: str, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
        dt = getattr(x, "dtype", type(x).__name__)
        raise ValueError(f"{name}: expected a floating-point tensor, got {dt}")
    if x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(x.shape)}")
    if granularity in ("row", "tile", "mx") and x.dim() < 1:
        raise ValueError(f"granularity={granularity!r} needs {name} with at least 1 dim, got a 0-d tensor")
    if granularity == "block" and x.dim() < 2:
        raise ValueError(f"granularity='block' needs {name} with at least 2 dims (…, M, K), "
                         f"got shape {tuple(x.shape)}")


def scale_shape(shape: Sequence[int], granularity: str, block_size: int = 128) -> tuple[int, ...]:
    """Shape of the scale tensor for an input of ``shape`` (documented contract):
    tensor: () ; row: shape[:-1]+(1,) ; tile/mx: shape[:-1]+(ceil(K/bs),) ;
    block: shape[:-2]+(ceil(M/bs), ceil(K/bs)). For mx, bs is always 32."""
    granularity, bs = _check_gran(granularity, block_size)
    shape = tuple(int(s) for s in shape)
    if granularity == "tensor":
        return ()
    if granularity == "row":
        return shape[:-1] + (1,)
    if granularity in ("tile", "mx"):
        return shape[:-1] + (-(-shape[-1] // bs),)
    return shape[:-2] + (-(-shape[-2] // bs), -(-shape[-1] // bs))


def _grouped(x: torch.Tensor, granularity: str, bs: int) -> torch.Tensor:
    """Zero-pad and view ``x`` so that every scale group is reduced by ``_reduce_dims``.
    tile/mx: [..., nK, bs]; block: [..., nM, bs, nK, bs]; tensor/row: x itself."""
    if granularity in ("tile", "mx"):
        K = x.shape[-1]
        nK = -(-K // bs)
        xp = F.pad(x, (0, nK * bs - K)) if nK * bs != K else x
        return xp.reshape(*x.shape[:-1], nK, bs)
    if granularity == "block":
        M, K = x.shape[-2], x.shape[-1]
        nM, nK = -(-M // bs), -(-K // bs)
        xp = F.pad(x, (0, nK * bs - K, 0, nM * bs - M)) if (nM * bs != M or nK * bs != K) else x
        return xp.reshape(*x.shape[:-2], nM, bs, nK, bs)
    return x


def _ungroup(g: torch.Tensor, shape: torch.Size, granularity: str, bs: int) -> torch.Tensor:
    if granularity in ("tile", "mx"):
        return g.reshape(*g.shape[:-2], g.shape[-2] * bs)[..., : shape[-1]]
    if granularity == "block":
        lead = g.shape[:-4]
        full = g.reshape(*lead, g.shape[-4] * bs, g.shape[-2] * bs)
        return full[..., : shape[-2], : shape[-1]]
    return g


def _scale_broadcast(scale: torch.Tensor, granularity: str) -> torch.Tensor:
    """Documented scale shape -> a shape that broadcasts against ``_grouped`` output."""
    if granularity in ("tile", "mx"):
        return scale.unsqueeze(-1)
    if granularity == "block":
        return scale.unsqueeze(-1).unsqueeze(-3)
    return scale  # tensor: [] ; row: [..., 1]


def group_amax(x: torch.Tensor, granularity: str = "tensor", block_size: int = 128) -> torch.Tensor:
    """max|x| per scale group, float32, shaped like the scale (see ``scale_shape``). Padding is zero so
    it never raises a group's amax. NaN in a group propagates to that group's amax."""
    granularity, bs = _check_gran(granularity, block_size)
    _check_x(x, granularity)
    ax = x.detach().float().abs()
    if granularity == "tensor":
        return ax.amax()
    if granularity == "row":
        return ax.amax(dim=-1, keepdim=True)
    g = _grouped(ax, granularity, bs)
    if granularity in ("tile", "mx"):
        return g.amax(dim=-1)
    return g.amax(dim=(-3, -1))


def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s (exact, via frexp; s > 0)."""
    mant, exp = torch.frexp(s)
    exp = torch.where(mant == 0.5, exp - 1, exp)
    return torch.ldexp(torch.ones_like(s), exp)


def compute_scale(amax: torch.Tensor | float, fmt: str | FP8Format = "e4m3", granularity: str = "tensor",
                  scale_fmt: str | None = None, margin: int = 0) -> torch.Tensor:
    """Dequantization scale from amax (DeepSeek kernel.py ``act_quant``):
    s = max(amax, 1e-4) / fmt_max * 2^margin (margin as in TE DelayedScaling, default 0).
    scale_fmt="ue8m0" (DeepSeek V3.1) and granularity "mx" round s UP to a power of two, so
    |x / s| <= fmt_max still holds (TE MXFP8 / DeepGEMM: ceil of amax/max). MX scales are also kept in
    the E8M0 range 2^-127..2^127. For "bf16" the scale is 1 (bf16 needs no scaling; cast only)."""
    spec = get_format(fmt)
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"scale_fmt: expected None or 'ue8m0', got {scale_fmt!r}")
    amax = torch.as_tensor(amax, dtype=torch.float32)
    if not spec.is_fp8:
        return torch.ones_like(amax)
    s = amax.clamp(min=AMAX_FLOOR) / spec.max
    if margin:
        s = s * 2.0 ** margin
    if scale_fmt == "ue8m0" or granularity == "mx":
        s = _pow2_ceil(s)
        if granularity == "mx":
            s = s.clamp(2.0 ** -127, 2.0 ** 127)
    return s


def quantize(x: torch.Tensor, fmt: str | FP8Format = "e4m3", granularity: str = "tensor",
             block_size: int = 128, overflow: str = "saturate", scale_fmt: str | None = None,
             scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and cast ``x`` to FP8 with one fp32 scale per group.

    Args:
        x: float tensor (computed in fp32).
        fmt: "e4m3" | "e5m2" | "bf16" (bf16: scale 1, plain cast; for contrast in the FP8 lab).
        granularity:
            "tensor" one scale; scale shape [].
            "row"    one per row of the last dim (per token / per output channel); x.shape[:-1]+(1,).
            "tile"   1 x block_size along the last dim (DeepSeek activations, V3 report §3.3.2);
                     x.shape[:-1]+(ceil(K/bs),).
            "block"  block_size x block_size over the last two dims (DeepSeek weights; leading dims such
                     as experts in [E, out, in] get their own blocks); x.shape[:-2]+(ceil(M/bs), ceil(K/bs)).
            "mx"     1 x 32 along the last dim with power-of-two (E8M0) scales rounded UP:
                     s = 2^ceil(log2(amax/fmt_max)) (OCP MX / TE MXFP8); block_size is ignored.
        block_size: group edge for tile/block. Ragged shapes are zero-padded internally, never refused.
        overflow: "saturate" or "nan" (see ``cast_to_fp8``); matters with a given/delayed ``scale``.
        scale_fmt: None (fp32 scales) or "ue8m0" (scale rounded up to a power of two; DeepSeek V3.1).
        scale: optional precomputed scale of the documented shape (e.g. from ``DelayedScaler``).

    Returns:
        (q, scale): q has x's shape and a float8 dtype (bfloat16 for "bf16"); scale is float32.
    Source: DeepSeek-V3 inference/kernel.py ``act_quant`` (s = amax/448, amax >= 1e-4, y = x/s).
    """
    spec = get_format(fmt)
    granularity, bs = _check_gran(granularity, block_size)
    _check_overflow(overflow)
    _check_x(x, granularity)
    xf = x.detach().float()
    if scale is None:
        scale = compute_scale(group_amax(xf, granularity, bs), spec, granularity, scale_fmt)
    else:
        scale = torch.as_tensor(scale, dtype=torch.float32)
        want = scale_shape(x.shape, granularity, bs)
        if tuple(scale.shape) != want:
            raise ValueError(f"scale: expected shape {want} for x {tuple(x.shape)} and "
                             f"granularity={granularity!r}, got {tuple(scale.shape)}")
    y = _ungroup(_grouped(xf, granularity, bs) / _scale_broadcast(scale, granularity), x.shape, granularity, bs)
    if not spec.is_fp8:  # bf16 contrast: scale is 1 unless one was passed in
        return round_to_format(y, spec, overflow).to(spec.dtype), scale
    return cast_to_fp8(y, spec, overflow), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, granularity: str = "tensor",
               block_size: int = 128) -> torch.Tensor:
    """x_hat = q * s per group (DeepSeek ``weight_dequant`` generalised); float32 of q's shape.
    ``scale`` must have the shape ``quantize`` returned for ``q``'s shape (ValueError otherwise)."""
    granularity, bs = _check_gran(granularity, block_size)
    _check_x(q, granularity, name="q")
    scale = torch.as_tensor(scale, dtype=torch.float32)
    want = scale_shape(q.shape, granularity, bs)
    if tuple(scale.shape) != want:
        raise ValueError(f"scale: expected shape {want} for q {tuple(q.shape)} and "
                         f"granularity={granularity!r}, got {tuple(scale.shape)}")
    qf = q.float()
    return _ungroup(_grouped(qf, granularity, bs) * _scale_broadcast(scale, granularity), q.shape, granularity, bs)


def overflow_count(x: torch.Tensor, scale: torch.Tensor, fmt: str | FP8Format = "e4m3",
                   granularity: str = "tensor", block_size: int = 128) -> int:
    """Number of elements whose scaled value x/s would round beyond the format's max under RNE (or is
    ±inf): these are clamped to ±max in saturate mode and become NaN/inf in "nan" mode. With current
    scaling this is 0 by construction; with delayed scaling it counts the damage of a stale scale.
    NaN inputs are not counted. Returns 0 for "bf16" unless values exceed the bf16 range."""
    spec = get_format(fmt)
    granularity, bs = _check_gran(granularity, block_size)
    _check_x(x, granularity)
    scale = torch.as_tensor(scale, dtype=torch.float32)
    y = _ungroup(_grouped(x.detach().float(), granularity, bs) / _scale_broadcast(scale, granularity),
                 x.shape, granularity, bs)
    return int(_overflow_mask(y, spec).sum().item())


class AmaxHistory:
    """Rolling window of amax observations (TransformerEngine ``DelayedScaling`` style).

    ``algo="max"``: the window max (TE default); ``"most_recent"``: the last pushed amax.
    Each entry is a float32 tensor (a scalar for per-tensor scaling, or the group shape).
    """

    def __init__(self, history_len: int = 16, algo: str = "max"):
        if isinstance(history_len, bool) or not isinstance(history_len, int) or history_len < 1:
            raise ValueError(f"history_len: expected an int >= 1, got {history_len!r}")
        if algo not in ("max", "most_recent"):
            raise ValueError(f"algo: expected 'max' or 'most_recent', got {algo!r}")
        self.history_len = history_len
        self.algo = algo
        self._buf: deque[torch.Tensor] = deque(maxlen=history_len)

    def __len__(self) -> int:
        return len(self._buf)

    def push(self, amax: torch.Tensor | float) -> None:
        a = torch.as_tensor(amax, dtype=torch.float32).detach().clone()
        if self._buf and self._buf[-1].shape != a.shape:
            self._buf.clear()  # group shape changed (e.g. new batch size): old amaxes don't apply
        self._buf.append(a)

    def reduced(self) -> torch.Tensor | None:
        """The amax the next scale is computed from, or None if the history is empty."""
        if not self._buf:
            return None
        if self.algo == "most_recent":
            return self._buf[-1]
        return torch.stack(list(self._buf)).amax(dim=0)

    def values(self) -> list[float]:
        """History as python floats (max over groups for non-scalar entries), oldest first."""
        return [float(a.max()) for a in self._buf]

    def reset(self) -> None:
        self._buf.clear()


class DelayedScaler:
    """Delayed scaling: the scale for step t comes from the amax history of steps < t.

    ``scale_for(x)`` follows TE semantics: compute the scale from the history *first*, then push the
    current amax. The very first call has no history and falls back to the current amax (= current
    scaling). Current scaling is simply ``quantize`` (amax of the tensor being cast).
    Source: TE docs, ``DelayedScaling(amax_history_len, amax_compute_algo, margin)``.
    """

    def __init__(self, fmt: str | FP8Format = "e4m3", granularity: str = "tensor", block_size: int = 128,
                 history_len: int = 16, algo: str = "max", margin: int = 0, scale_fmt: str | None = None):
        self.fmt = get_format(fmt).name
        self.granularity, self.block_size = _check_gran(granularity, block_size)
        self.history = AmaxHistory(history_len, algo)
        self.margin = int(margin)
        self.scale_fmt = scale_fmt
        self.last_amax: torch.Tensor | None = None
        self.last_scale: torch.Tensor | None = None

    def scale_for(self, x: torch.Tensor) -> torch.Tensor:
        cur = group_amax(x, self.granularity, self.block_size)
        hist = self.history.reduced()
        amax = cur if (hist is None or hist.shape != cur.shape) else hist
        self.history.push(cur)
        self.last_amax = cur
        self.last_scale = compute_scale(amax, self.fmt, self.granularity, self.scale_fmt, self.margin)
        return self.last_scale

    def quantize(self, x: torch.Tensor, overflow: str = "saturate") -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scale_for(x)
        return quantize(x, self.fmt, self.granularity, self.block_size, overflow, scale=s)

    def reset(self) -> None:
        self.history.reset()
        self.last_amax = self.last_scale = None


# ---------------------------------------------------------------------------------------------------
# 3. Error metrics and test tensors
# ---------------------------------------------------------------------------------------------------


def _sqnr_db(sig: float, err: float) -> float:
    if err == 0:
        return math.inf
    if sig == 0:
        return -math.inf
    if math.isnan(err) or math.isinf(err):
        return math.nan if math.isnan(err) else -math.inf
    return 10.0 * math.log10(sig / err)


def error_metrics(x: torch.Tensor, x_hat: torch.Tensor, outlier_mask: torch.Tensor | None = None, *,
                  scale: torch.Tensor | None = None, fmt: str | FP8Format | None = None,
                  granularity: str | None = None, block_size: int = 128) -> dict:
    """Quantization error of ``x_hat`` against ``x`` (computed in float64).

    Keys: sqnr_db = 10·log10(Σx²/Σ(x-x̂)²), rel_error = ||x-x̂||_F/||x||_F, max_abs_error, mse,
    flushed_to_zero_count / _fraction (nonzero x that became exactly 0; fraction of nonzero x),
    nonfinite_count (finite x whose x̂ is NaN/inf), overflow_count, numel.
    overflow_count: if ``scale``, ``fmt`` and ``granularity`` are given it is ``overflow_count(x, scale,
    ...)`` (values clamped or turned NaN/inf); otherwise it equals nonfinite_count (visible overflows).
    With ``outlier_mask`` (bool, broadcastable to x, True = outlier) the same sqnr/rel/max/flush figures
    are added for the non-outlier part with suffix ``_non_outlier`` (whole-tensor SQNR is dominated by
    the outliers' energy and hides the damage done to everything else; reference §1.6).
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"x_hat: shape {tuple(x_hat.shape)} differs from x {tuple(x.shape)}")
    xd = x.detach().double()
    hd = x_hat.detach().double()
    err = hd - xd

    def part(sel: torch.Tensor | None) -> dict:
        xs = xd if sel is None else xd[sel]
        es = err if sel is None else err[sel]
        hs = hd if sel is None else hd[sel]
        sig = float((xs * xs).sum())
        e2 = float((es * es).sum())
        nz = xs != 0
        flushed = int((nz & (hs == 0)).sum())
        n_nz = int(nz.sum())
        return {
            "sqnr_db": _sqnr_db(sig, e2),
            "rel_error": (math.sqrt(e2 / sig) if sig > 0 else (0.0 if e2 == 0 else math.inf)),
            "max_abs_error": float(es.abs().max()) if es.numel() else 0.0,
            "mse": e2 / max(1, es.numel()),
            "flushed_to_zero_count": flushed,
            "flushed_to_zero_fraction": flushed / n_nz if n_nz else 0.0,
        }

    out = part(None)
    nonfinite = int((torch.isfinite(xd) & ~torch.isfinite(hd)).sum())
    out["nonfinite_count"] = nonfinite
    if scale is not None and fmt is not None and granularity is not None:
        out["overflow_count"] = overflow_count(x, scale, fmt, granularity, block_size)
    else:
        out["overflow_count"] = nonfinite
    out["numel"] = x.numel()
    if outlier_mask is not None:
        mask = torch.as_tensor(outlier_mask, dtype=torch.bool).expand(x.shape)
        for k, v in part(~mask).items():
            out[f"{k}_non_outlier"] = v
        out["outlier_count"] = int(mask.sum())
    return out


def quantize_and_measure(x: torch.Tensor, fmt: str | FP8Format = "e4m3", granularity: str = "tensor",
                         block_size: int = 128, overflow: str = "saturate", scale_fmt: str | None = None,
                         scale: torch.Tensor | None = None, outlier_mask: torch.Tensor | None = None) -> dict:
    """One call for the FP8 lab: quantize, dequantize and measure. Returns a dict with q, scale, x_hat
    (tensors), the ``error_metrics`` figures (overflow_count from x and the scale) and n_scales."""
    q, s = quantize(x, fmt, granularity, block_size, overflow, scale_fmt, scale)
    x_hat = dequantize(q, s, granularity, block_size)
    m = error_metrics(x, x_hat, outlier_mask, scale=s, fmt=fmt, granularity=granularity, block_size=block_size)
    m.update(q=q, scale=s, x_hat=x_hat, n_scales=s.numel())
    return m


def make_test_tensor(kind: str = "gaussian", shape: Sequence[int] = (1024, 1024), seed: int = 0,
                     outlier_channels: int = 4, outlier_scale: float = 1e4) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic float32 test data and its outlier mask (bool, x's shape).

    kind="gaussian": N(0,1). "heavy_tail": Student-t with 3 degrees of freedom (z / sqrt(chi²_3/3)).
    "outliers": N(0,1) with ``outlier_channels`` columns of the last dim (chosen by the seeded
    generator, like the few fixed hidden channels that carry LLM activation outliers) multiplied by
    ``outlier_scale``; the mask marks those columns. For the other kinds the mask is all False.
    """
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"shape: expected a non-empty tuple of positive ints, got {shape!r}")
    g = torch.Generator().manual_seed(int(seed))
    mask = torch.zeros(shape, dtype=torch.bool)
    if kind == "gaussian":
        x = torch.randn(shape, generator=g)
    elif kind == "heavy_tail":
        z = torch.randn(shape, generator=g)
        chi2 = torch.randn((3,) + shape, generator=g).pow(2).sum(0)
        x = z / torch.sqrt(chi2 / 3.0)
    elif kind == "outliers":
        K = shape[-1]
        if not 0 <= outlier_channels <= K:
            raise ValueError(f"outlier_channels: expected 0..{K} (the last dim), got {outlier_channels}")
        x = torch.randn(shape, generator=g)
        cols = torch.randperm(K, generator=g)[:outlier_channels]
        x[..., cols] *= float(outlier_scale)
        mask[..., cols] = True
    else:
        raise ValueError(f"kind: expected 'gaussian', 'heavy_tail' or 'outliers', got {kind!r}")
    return x, mask


# ---------------------------------------------------------------------------------------------------
# 4. Emulated FP8 GEMM and accumulation precision
# ---------------------------------------------------------------------------------------------------


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity metric: 1 - 2·Σxy / (Σx² + Σy²) (0 for identical tensors; FP8 GEMMs must
    be < 1e-3 against the reference, DeepGEMM tests/generators.py). Computed in float64."""
    xd, yd = x.detach().double(), y.detach().double()
    denom = float((xd * xd + yd * yd).sum())
    if denom == 0:
        return 0.0
    return 1.0 - 2.0 * float((xd * yd).sum()) / denom


def fp8_gemm_quantized(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                       block_size: int = 128) -> torch.Tensor:
    """C = A @ B^T from pre-quantized operands (DeepSeek inference/kernel.py ``fp8_gemm(a, a_s, b, b_s)``).

    a_q [M, K] fp8 with a_s [M, ceil(K/bs)] (1 x bs tiles); b_q [N, K] fp8 (weight, out x in) with
    b_s [ceil(N/bs), ceil(K/bs)] (bs x bs blocks). For every K-block kb the FP8 products are summed in fp32
    and then scaled: C[m,n] = Σ_kb (A_q[m,kb]·B_q[n,kb]) · a_s[m,kb] · b_s[n//bs, kb] — the scales are
    applied per K-block, as in the kernel and DeepGEMM (promotion every 128 = the K-block).
    Ragged K/M/N are zero-padded. Returns float32 [M, N].
    """
    if a_q.dim() != 2 or b_q.dim() != 2 or a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"a_q/b_q: expected [M,K] and [N,K], got {tuple(a_q.shape)} and {tuple(b_q.shape)}")
    M, K = a_q.shape
    N = b_q.shape[0]
    bs = block_size
    nK = -(-K // bs)
    if tuple(a_s.shape) != (M, nK) or tuple(b_s.shape) != (-(-N // bs), nK):
        raise ValueError(f"a_s/b_s: expected {(M, nK)} and {(-(-N // bs), nK)}, "
                         f"got {tuple(a_s.shape)} and {tuple(b_s.shape)}")
    A = _grouped(a_q.float(), "tile", bs).transpose(0, 1)  # [nK, M, bs]
    B = _grouped(b_q.float(), "tile", bs).permute(1, 2, 0)  # [nK, bs, N]
    a_sT = a_s.float().T.unsqueeze(-1)  # [nK, M, 1]
    b_sT = b_s.float().repeat_interleave(bs, dim=0)[:N].T.unsqueeze(1)  # [nK, 1, N]: row n uses block n//bs
    C = torch.zeros(M, N, dtype=torch.float32)
    step = max(1, (1 << 24) // max(1, M * N))  # K-blocks per batched matmul: caps the [k, M, N] buffer at 64 MiB
    for s in range(0, nK, step):
        e = min(nK, s + step)
        partial = torch.bmm(A[s:e], B[s:e])  # exact fp32 sums of FP8 products, one per K-block
        partial.mul_(a_sT[s:e]).mul_(b_sT[s:e])  # scales applied per K-block (promotion)
        C += partial.sum(0)
    return C


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, fmt: str | FP8Format = "e4m3", block_size: int = 128) -> torch.Tensor:
    """Emulated DeepSeek FP8 GEMM: C = A @ B^T with A [..., K] (activations, quantized per 1 x bs tile)
    and B [N, K] (weight, out x in, quantized per bs x bs block). Leading dims of A are flattened and
    restored: returns float32 [..., N]. See ``fp8_gemm_quantized`` for the accumulation semantics."""
    get_format(fmt, allow_bf16=False)
    if a.dim() < 1 or b.dim() != 2 or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"a/b: expected a [..., K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])
    a_q, a_s = quantize(a2, fmt, "tile", block_size)
    b_q, b_s = quantize(b, fmt, "block", block_size)
    return fp8_gemm_quantized(a_q, a_s, b_q, b_s, block_size).reshape(*lead, b.shape[0])


def round_mantissa(x: torch.Tensor, mantissa_bits: int, rounding: str = "rne") -> torch.Tensor:
    """Round float32 ``x`` to ``mantissa_bits`` explicit mantissa bits (exponent range unchanged),
    by integer operations on the IEEE bit pattern. rounding: "rne" (nearest, ties to even) or
    "truncate" (toward zero, i.e. the low bits are dropped)."""
    if not 0 <= mantissa_bits <= 23:
        raise ValueError(f"mantissa_bits: expected 0..23, got {mantissa_bits}")
    if rounding not in ("rne", "truncate"):
        raise ValueError(f"rounding: expected 'rne' or 'truncate', got {rounding!r}")
    drop = 23 - mantissa_bits
    if drop == 0:
        return x.float().clone()
    bits = x.float().contiguous().view(torch.int32)
    if rounding == "rne":
        lsb = (bits >> drop) & 1
        bits = bits + ((1 << (drop - 1)) - 1) + lsb  # carry into the exponent is the correct rounding
    bits = bits & -(1 << drop)  # sign-magnitude: masking the magnitude bits rounds toward zero
    return bits.view(torch.float32)


def limited_accumulation_gemm(a: torch.Tensor, b: torch.Tensor, acc_mantissa_bits: int = 13,
                              promote_every: int | None = None, fmt: str | FP8Format | None = "e4m3",
                              chunk: int = 4, rounding: str = "truncate",
                              return_reference: bool = False):
    """Simulate an H800-style FP8 tensor-core accumulator with limited precision (V3 report §3.3.2).

    A [M, K] and B [N, K] are quantized per tensor to ``fmt`` (None: use them as they are), so both
    variants below multiply the *same* operands and differ only in how they accumulate:
    - The K dimension is consumed in steps of ``chunk`` elements (default 4). Each step's ``chunk``
      products are summed exactly (fp32), added to the running partial sum, and that sum is rounded to a
      float with ``acc_mantissa_bits`` explicit mantissa bits (13 ≈ "about 14 bits" incl. the implicit
      one). ``rounding="truncate"`` (default) drops the low bits, modelling alignment of addends to the
      accumulator's exponent with a fixed-width adder; "rne" is also offered.
    - ``promote_every=N_C`` (e.g. 128 = 4 WGMMAs): every N_C elements the limited partial sum is added
      into an fp32 accumulator and reset (DeepSeek's promotion to CUDA cores). None: no promotion.
    This is a model chosen to reproduce the report's figure, not a bit-exact replica of the hardware:
    with chunk=4 + truncation, K=4096 random inputs give ≈2% max relative error without promotion and
    ≈0.05% with N_C=128.

    Returns C (float32 [M, N], per-tensor scales applied), or (C, C_ref) with C_ref the float64 exact
    product of the same quantized operands if ``return_reference``.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a/b: expected [M,K] and [N,K], got {tuple(a.shape)} and {tuple(b.shape)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    if promote_every is not None and (promote_every <= 0 or promote_every % chunk):
        raise ValueError(f"promote_every: expected None or a positive multiple of chunk={chunk}, got {promote_every!r}")
    M, K = a.shape
    N = b.shape[0]
    if fmt is not None:
        a_q, a_s = quantize(a, fmt, "tensor")
        b_q, b_s = quantize(b, fmt, "tensor")
        A, B, s = a_q.float(), b_q.float(), float(a_s) * float(b_s)
    else:
        A, B, s = a.detach().float(), b.detach().float(), 1.0
    nC = -(-K // chunk)
    if nC * chunk != K:
        A = F.pad(A, (0, nC * chunk - K))
        B = F.pad(B, (0, nC * chunk - K))
    # All chunk partial products at once: [nC, M, N] (vectorised; only the running sum is sequential).
    P = torch.bmm(A.reshape(M, nC, chunk).transpose(0, 1), B.reshape(N, nC, chunk).permute(1, 2, 0))
    steps_per_promo = None if promote_every is None else promote_every // chunk
    if not 0 <= acc_mantissa_bits <= 23 or rounding not in ("rne", "truncate"):
        round_mantissa(P[:0], acc_mantissa_bits, rounding)  # raises the ValueError naming the argument
    drop = 23 - acc_mantissa_bits
    keep = -(1 << drop)
    half_m1 = (1 << (drop - 1)) - 1 if drop else 0
    acc = torch.zeros(M, N, dtype=torch.float32)
    bits = acc.view(torch.int32)  # in-place integer view of the running sum (same rounding as round_mantissa)
    out = torch.zeros(M, N, dtype=torch.float32)
    for i in range(nC):
        acc.add_(P[i])
        if drop:
            if rounding == "rne":
                bits.add_(((bits >> drop) & 1) + half_m1)
            bits.bitwise_and_(keep)
        if steps_per_promo is not None and (i + 1) % steps_per_promo == 0:
            out += acc  # promotion: add the limited partial sum into the fp32 accumulator and reset it
            acc.zero_()
    out = (out + acc) * s
    if return_reference:
        ref = (A.double() @ B.double().T) * s
        return out, ref
    return out


def accumulation_error_curve(Ks: Iterable[int] = (256, 512, 1024, 2048, 4096, 8192), M: int = 64, N: int = 64,
                             acc_mantissa_bits: int = 13, promote_every: int = 128,
                             fmt: str | FP8Format | None = "e4m3", chunk: int = 4, rounding: str = "truncate",
                             dist: str = "uniform", seed: int = 0) -> dict:
    """Relative error of ``limited_accumulation_gemm`` vs the exact product, per K, with and without
    promotion (for the FP8 lab's "GEMM error vs K" chart; V3 report §3.3.2: ≈2% at K=4096 without).

    dist: "uniform" (U[0,1), positive so partial sums grow with K, as in accumulation studies) or
    "gaussian". Errors: max_rel = max|C-C_ref| / max|C_ref| (equals the elementwise max relative
    error for positive data, and stays meaningful for signed data); fro_rel = ||C-C_ref||_F/||C_ref||_F.
    Returns {"K": [...], "max_rel_no_promotion": [...], "max_rel_promotion": [...],
    "fro_rel_no_promotion": [...], "fro_rel_promotion": [...], "promote_every": N_C, ...}.
    """
    if dist not in ("uniform", "gaussian"):
        raise ValueError(f"dist: expected 'uniform' or 'gaussian', got {dist!r}")
    res: dict = {"K": [], "max_rel_no_promotion": [], "max_rel_promotion": [],
                 "fro_rel_no_promotion": [], "fro_rel_promotion": [], "promote_every": promote_every,
                 "acc_mantissa_bits": acc_mantissa_bits, "chunk": chunk, "rounding": rounding, "dist": dist}
    for K in Ks:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(K))
        draw = torch.rand if dist == "uniform" else torch.randn
        a = draw((M, int(K)), generator=g)
        b = draw((N, int(K)), generator=g)
        res["K"].append(int(K))
        for tag, pe in (("no_promotion", None), ("promotion", promote_every)):
            c, ref = limited_accumulation_gemm(a, b, acc_mantissa_bits, pe, fmt, chunk, rounding, return_reference=True)
            d = (c.double() - ref).abs()
            res[f"max_rel_{tag}"].append(float(d.max() / ref.abs().max()))
            res[f"fro_rel_{tag}"].append(float(d.norm() / ref.norm()))
    return res


# ---------------------------------------------------------------------------------------------------
# 5. FP8 training primitives
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FP8Recipe:
    """Which format, granularity and scaling each operand of a Linear GEMM uses in FP8 training.

    act_*: the Linear input x (Fprop/Wgrad operand); weight_*: W; grad_*: dL/dy (Dgrad/Wgrad operand).
    scaling: "current" (amax of the tensor being cast, a.k.a. online/dynamic) or "delayed" (amax history
    of previous steps; ``history_len``, ``amax_algo`` "max"|"most_recent").
    """

    name: str = "deepseek"
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

    def __post_init__(self):
        for f_ in ("act_fmt", "weight_fmt", "grad_fmt"):
            get_format(getattr(self, f_), allow_bf16=False)
        for g_ in ("act_gran", "weight_gran", "grad_gran"):
            _check_gran(getattr(self, g_), self.block_size)
        if self.scaling not in ("current", "delayed"):
            raise ValueError(f"scaling: expected 'current' or 'delayed', got {self.scaling!r}")
        AmaxHistory(self.history_len, self.amax_algo)  # validates both
        _check_overflow(self.overflow)
        if self.scale_fmt not in (None, "ue8m0"):
            raise ValueError(f"scale_fmt: expected None or 'ue8m0', got {self.scale_fmt!r}")


RECIPES: dict[str, FP8Recipe] = {
    # DeepSeek-V3 report §3.3: E4M3 on all tensors, 1x128 activation tiles, 128x128 weight blocks,
    # 1x128 gradient tiles (block-wise activation-gradient quantization diverged, App. B.2), online scales.
    "deepseek": FP8Recipe(
        "deepseek", description="DeepSeek-V3: E4M3 everywhere; act 1x128, weight 128x128, grad 1x128; current scaling"),
    # TE Float8CurrentScaling(fp8_format=HYBRID): per-tensor current scaling, E4M3 forward, E5M2 gradients.
    "tensor-current": FP8Recipe(
        "tensor-current", grad_fmt="e5m2", act_gran="tensor", weight_gran="tensor", grad_gran="tensor",
        description="TE Float8CurrentScaling (HYBRID): per-tensor current scaling, E4M3 fwd / E5M2 grads"),
    # TE DelayedScaling(fp8_format=HYBRID, amax_compute_algo="max"), with a short history of 16 (TE #1169).
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


def get_recipe(recipe: str | FP8Recipe) -> FP8Recipe:
    if isinstance(recipe, FP8Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"recipe: unknown recipe {recipe!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[recipe]


class FP8Stats:
    """Per-step FP8 statistics collector shared by FP8Linear modules (read and reset by the trainer).

    ``record`` is called for every quantized operand; entries are keyed "<module name>.<role>" with role
    act / weight / grad. ``snapshot()`` returns {"tensors": {key: {...}}, "overflow_count",
    "flushed_to_zero_count", "numel", "flushed_to_zero_fraction", "amax_max", "scale_min", "scale_max"}.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._entries: dict[str, dict] = {}

    def record(self, name: str, role: str, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
               fmt: str, granularity: str, block_size: int = 128, overflow: int | None = None) -> None:
        """Add one quantization of ``x`` (-> ``q`` with ``scale``). ``overflow``: the overflow count if the
        caller knows it (0 for current scaling, by construction); computed from x and scale otherwise."""
        if not self.enabled:
            return
        with torch.no_grad():
            xd = x.detach()
            amax = float(xd.abs().amax())
            ovf = overflow_count(xd, scale, fmt, granularity, block_size) if overflow is None else int(overflow)
            flushed = int(((q == 0) & (xd != 0)).sum())
            s_min, s_max = float(scale.min()), float(scale.max())
        key = f"{name}.{role}" if name else role
        e = self._entries.get(key)
        if e is None:
            e = self._entries[key] = {"calls": 0, "numel": 0, "amax": 0.0, "last_amax": 0.0, "overflow_count": 0,
                                      "flushed_to_zero_count": 0, "scale_min": math.inf, "scale_max": 0.0,
                                      "fmt": fmt, "granularity": granularity}
        e["calls"] += 1
        e["numel"] += xd.numel()
        e["amax"] = max(e["amax"], amax)
        e["last_amax"] = amax
        e["overflow_count"] += ovf
        e["flushed_to_zero_count"] += flushed
        e["scale_min"] = min(e["scale_min"], s_min)
        e["scale_max"] = max(e["scale_max"], s_max)

    def snapshot(self) -> dict:
        tensors = {k: dict(v) for k, v in self._entries.items()}
        numel = sum(v["numel"] for v in tensors.values())
        flushed = sum(v["flushed_to_zero_count"] for v in tensors.values())
        return {
            "tensors": tensors,
            "overflow_count": sum(v["overflow_count"] for v in tensors.values()),
            "flushed_to_zero_count": flushed,
            "numel": numel,
            "flushed_to_zero_fraction": flushed / numel if numel else 0.0,
            "amax_max": max((v["amax"] for v in tensors.values()), default=0.0),
            "scale_min": min((v["scale_min"] for v in tensors.values()), default=math.inf),
            "scale_max": max((v["scale_max"] for v in tensors.values()), default=0.0),
        }

    def reset(self) -> None:
        self._entries.clear()


def _qdq(x: torch.Tensor, fmt, granularity, block_size, overflow, scale_fmt, scale, scaler, stats, name, role):
    """quantize -> dequantize (in x's dtype), optionally recording stats. Shared by the autograd functions."""
    current = scaler is None and scale is None
    if scaler is not None:
        scale = scaler.scale_for(x)
    q, s = quantize(x, fmt, granularity, block_size, overflow, scale_fmt, scale)
    if stats is not None:  # current scaling cannot overflow (s >= amax/max), so skip that count
        stats.record(name, role, x, q, s, get_format(fmt).name, granularity, block_size,
                     overflow=0 if current else None)
    return dequantize(q, s, granularity, block_size).to(x.dtype)


class _FakeQuant(torch.autograd.Function):
    """Forward: quantize -> dequantize. Backward: identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, fmt, granularity, block_size, overflow, scale_fmt, scale, scaler, stats, name, role):
        return _qdq(x, fmt, granularity, block_size, overflow, scale_fmt, scale, scaler, stats, name, role)

    @staticmethod
    def backward(ctx, g):
        return (g,) + (None,) * 10


class _QuantGrad(torch.autograd.Function):
    """Forward: identity. Backward: quantize -> dequantize the incoming gradient."""

    @staticmethod
    def forward(ctx, y, fmt, granularity, block_size, overflow, scale_fmt, scaler, stats, name):
        ctx.args = (fmt, granularity, block_size, overflow, scale_fmt, scaler, stats, name)
        return y.clone()  # not a view: callers may modify the GEMM output in place

    @staticmethod
    def backward(ctx, g):
        fmt, granularity, block_size, overflow, scale_fmt, scaler, stats, name = ctx.args
        gq = _qdq(g.contiguous(), fmt, granularity, block_size, overflow, scale_fmt, None, scaler, stats, name, "grad")
        return (gq,) + (None,) * 8


def fake_quant(x: torch.Tensor, fmt: str = "e4m3", granularity: str = "tile", block_size: int = 128,
               overflow: str = "saturate", scale_fmt: str | None = None, scale: torch.Tensor | None = None, *,
               scaler: DelayedScaler | None = None, stats: FP8Stats | None = None, name: str = "",
               role: str = "act") -> torch.Tensor:
    """FP8 fake quantization with a straight-through gradient: forward returns dequantize(quantize(x))
    in x's dtype and shape; backward passes the gradient unchanged. ``scaler`` (delayed scaling) or
    ``scale`` override the current-amax scale. Works on 3-D expert weights [E, out, in] with "block"
    (one set of 128x128 blocks per expert)."""
    get_format(fmt)
    _check_gran(granularity, block_size)
    _check_overflow(overflow)
    return _FakeQuant.apply(x, fmt, granularity, block_size, overflow, scale_fmt, scale, scaler, stats, name, role)


def quant_grad(y: torch.Tensor, fmt: str = "e4m3", granularity: str = "tile", block_size: int = 128,
               overflow: str = "saturate", scale_fmt: str | None = None, *, scaler: DelayedScaler | None = None,
               stats: FP8Stats | None = None, name: str = "") -> torch.Tensor:
    """Identity forward; in backward the incoming gradient dL/dy is quantized -> dequantized with
    ``fmt``/``granularity`` (tiles along y's last dim, i.e. per token per 128 output channels), so
    the Dgrad (dX = dY·W) and Wgrad (dW = dYᵀ·X) GEMMs see an FP8 dY."""
    get_format(fmt)
    _check_gran(granularity, block_size)
    _check_overflow(overflow)
    return _QuantGrad.apply(y, fmt, granularity, block_size, overflow, scale_fmt, scaler, stats, name)


def make_scalers(recipe: str | FP8Recipe) -> dict[str, DelayedScaler] | None:
    """Delayed-scaling state for one GEMM: {"act", "weight", "grad"} scalers, or None for current scaling."""
    r = get_recipe(recipe)
    if r.scaling != "delayed":
        return None
    mk = lambda f, g: DelayedScaler(f, g, r.block_size, r.history_len, r.amax_algo, scale_fmt=r.scale_fmt)  # noqa: E731
    return {"act": mk(r.act_fmt, r.act_gran), "weight": mk(r.weight_fmt, r.weight_gran),
            "grad": mk(r.grad_fmt, r.grad_gran)}


def _scaler(scalers, role):
    return None if scalers is None else scalers.get(role)


def quant_act(x: torch.Tensor, recipe: str | FP8Recipe = "deepseek", *, stats: FP8Stats | None = None,
              name: str = "", scalers: dict | None = None) -> torch.Tensor:
    """Fake-quantize a GEMM input activation per the recipe (STE backward)."""
    r = get_recipe(recipe)
    return fake_quant(x, r.act_fmt, r.act_gran, r.block_size, r.overflow, r.scale_fmt,
                      scaler=_scaler(scalers, "act"), stats=stats, name=name, role="act")


def quant_weight(w: torch.Tensor, recipe: str | FP8Recipe = "deepseek", *, stats: FP8Stats | None = None,
                 name: str = "", scalers: dict | None = None) -> torch.Tensor:
    """Fake-quantize a weight [out, in] or expert weights [E, out, in] per the recipe (STE backward)."""
    r = get_recipe(recipe)
    return fake_quant(w, r.weight_fmt, r.weight_gran, r.block_size, r.overflow, r.scale_fmt,
                      scaler=_scaler(scalers, "weight"), stats=stats, name=name, role="weight")


def quant_output_grad(y: torch.Tensor, recipe: str | FP8Recipe = "deepseek", *, stats: FP8Stats | None = None,
                      name: str = "", scalers: dict | None = None) -> torch.Tensor:
    """Mark a GEMM output so its incoming gradient is quantized per the recipe."""
    r = get_recipe(recipe)
    return quant_grad(y, r.grad_fmt, r.grad_gran, r.block_size, r.overflow, r.scale_fmt,
                      scaler=_scaler(scalers, "grad"), stats=stats, name=name)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               recipe: str | FP8Recipe = "deepseek", *, stats: FP8Stats | None = None, name: str = "",
               scalers: dict | None = None) -> torch.Tensor:
    """y = quant_grad(F.linear(fake_quant(x), fake_quant(w)) + b): Fprop, Dgrad and Wgrad all see FP8
    operands (V3 report §3.3.1, Fig. 6); accumulation and outputs stay fp32/bf16. The bias (DeepSeek has
    none) is added in high precision. Delayed recipes need ``scalers`` (see ``make_scalers``).
    For expert weights [E, out, in] use ``quant_act``/``quant_weight``/``quant_output_grad`` around the
    grouped matmul. Emulation note: each operand is quantized once; DeepSeek re-tiles dY and X for Wgrad
    (1x128 -> 128x1), which this emulation does not model."""
    r = get_recipe(recipe)
    if r.scaling == "delayed" and scalers is None:
        raise ValueError(f"scalers: recipe {r.name!r} uses delayed scaling; pass scalers=make_scalers(recipe)")
    xq = quant_act(x, r, stats=stats, name=name, scalers=scalers)
    wq = quant_weight(weight, r, stats=stats, name=name, scalers=scalers)
    y = linear(xq, wq, bias)
    return quant_output_grad(y, r, stats=stats, name=name, scalers=scalers)


class FP8Ops:
    """FP8 hook object for GEMMs that are not nn.Linear, e.g. the 3-D expert weights of core.moe.Experts
    (its ``fp8`` attribute): ``quant_act(x)``, ``quant_weight(w)``, ``quant_grad(y)`` apply the recipe to
    x, to w [out, in] or [E, out, in] (blocks per expert) and to the gradient of y.

    Delayed scaling needs one history per operand: scalers are keyed by (role, shape without the token
    dim) — act [S, K] -> (K,), grad [S, N] -> (N,), weight -> its full shape — so the two expert GEMMs
    (gate_up and down) keep separate histories unless their dims coincide (then they share one window,
    which with algo "max" only makes the scale more conservative). Stats are recorded per role under
    ``name`` (both expert GEMMs add to the same "<name>.act" / ".weight" / ".grad" entries).
    """

    def __init__(self, recipe: str | FP8Recipe = "deepseek", stats: FP8Stats | None = None, name: str = ""):
        self.recipe = get_recipe(recipe)
        self.stats = stats
        self.name = name
        self._scalers: dict[tuple, DelayedScaler] = {}

    def _scaler(self, role: str, t: torch.Tensor) -> DelayedScaler | None:
        r = self.recipe
        if r.scaling != "delayed":
            return None
        key = (role, tuple(t.shape) if role == "weight" else tuple(t.shape[1:]))
        if key not in self._scalers:
            f, g = {"act": (r.act_fmt, r.act_gran), "weight": (r.weight_fmt, r.weight_gran),
                    "grad": (r.grad_fmt, r.grad_gran)}[role]
            self._scalers[key] = DelayedScaler(f, g, r.block_size, r.history_len, r.amax_algo, scale_fmt=r.scale_fmt)
        return self._scalers[key]

    def quant_act(self, x: torch.Tensor) -> torch.Tensor:
        return quant_act(x, self.recipe, stats=self.stats, name=self.name, scalers={"act": self._scaler("act", x)})

    def quant_weight(self, w: torch.Tensor) -> torch.Tensor:
        return quant_weight(w, self.recipe, stats=self.stats, name=self.name,
                            scalers={"weight": self._scaler("weight", w)})

    def quant_grad(self, y: torch.Tensor) -> torch.Tensor:
        return quant_output_grad(y, self.recipe, stats=self.stats, name=self.name,
                                 scalers={"grad": self._scaler("grad", y)})

    def __repr__(self) -> str:
        return f"FP8Ops(recipe={self.recipe.name!r}, name={self.name!r})"


#: Linears whose forward is the plain GEMM (`convert_to_fp8` replaces only these: a subclass with its own
#: forward would lose its behaviour).
_STOCK_FORWARDS = (nn.Linear.forward, Linear.forward)


class FP8Linear(nn.Linear):
    """nn.Linear whose forward and backward GEMMs use FP8 operands (emulated) per an ``FP8Recipe``.

    Same parameters and state_dict as nn.Linear (weights stay fp32/bf16 master copies; delayed-scaling
    amax histories are runtime state, not saved). Optional ``stats`` (FP8Stats) records per-step amax,
    scales, overflows and flushes under ``fp8_name``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 recipe: str | FP8Recipe = "deepseek", stats: FP8Stats | None = None, name: str = ""):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = get_recipe(recipe)
        self.stats = stats
        self.fp8_name = name
        self.scalers = make_scalers(self.recipe)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: str | FP8Recipe = "deepseek", stats: FP8Stats | None = None,
                    name: str = "") -> "FP8Linear":
        """Wrap an existing nn.Linear, sharing its Parameter objects (no re-initialisation, and an
        optimizer built before the conversion still points at the same tensors)."""
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta",
                  recipe=recipe, stats=stats, name=name)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.recipe, stats=self.stats, name=self.fp8_name,
                          scalers=self.scalers)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", recipe={self.recipe.name}"


#: Qualified-name patterns kept in high precision (V3 report §3.3.1: embedding, output head, MoE
#: gating/router, normalization; attention score/softmax operators are not nn.Linear and never
#: converted). Matching: a pattern without "." is fnmatch'ed against each dot-separated component
#: ("gate" matches "layers.3.mlp.gate" but NOT "gate_proj"); a pattern with "." against the full name.
DEFAULT_SKIP: tuple[str, ...] = ("lm_head", "head", "embed*", "gate", "router", "*norm*", "score*")


def _skipped(name: str, patterns: Sequence[str]) -> bool:
    parts = name.split(".") if name else []
    for p in patterns:
        if "." in p:
            if fnmatch.fnmatchcase(name, p):
                return True
        elif any(fnmatch.fnmatchcase(c, p) for c in parts):
            return True
    return False


def convert_to_fp8(model: nn.Module, recipe: str | FP8Recipe = "deepseek", skip: Sequence[str] = DEFAULT_SKIP,
                   stats: FP8Stats | None = None, hooks: bool = True) -> nn.Module:
    """Put a model's GEMMs in FP8 (emulated), in place.

    - Every nn.Linear (with the stock forward) whose qualified name does not match ``skip`` (see
      DEFAULT_SKIP) becomes an FP8Linear sharing the same Parameter objects (no re-init; an optimizer built
      before still works; state_dict unchanged).
    - ``hooks``: every unskipped submodule with an ``fp8`` attribute set to None (the FP8 hook of
      core.moe.Experts, whose weights are 3-D Parameters, not Linears) gets an ``FP8Ops``.
    Attention projections (q/kv/o) and FFN/expert GEMMs go FP8; embedding, output head, MoE router and
    norms stay high precision, as do the attention score/softmax operators, which are not Linears
    (V3 report §3.3.1). All converted modules share one FP8Stats (created if not given; read it with
    ``get_fp8_stats``). Returns the model (a new FP8Linear if ``model`` itself is an unskipped nn.Linear).
    """
    r = get_recipe(recipe)
    if isinstance(skip, str):
        skip = (skip,)
    stats = stats if stats is not None else FP8Stats()
    if isinstance(model, nn.Linear) and not isinstance(model, FP8Linear) and type(model).forward in _STOCK_FORWARDS:
        return FP8Linear.from_linear(model, r, stats, "")
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, FP8Linear)
               and type(m).forward in _STOCK_FORWARDS and n and not _skipped(n, skip)]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear.from_linear(lin, r, stats, name))
    if hooks:
        for name, m in model.named_modules():
            if not isinstance(m, FP8Linear) and hasattr(m, "fp8") and getattr(m, "fp8") is None \
                    and not _skipped(name, skip):
                m.fp8 = FP8Ops(r, stats, name)
    return model


def get_fp8_stats(model: nn.Module) -> FP8Stats | None:
    """The FP8Stats shared by the model's FP8Linear modules / FP8Ops hooks (None if nothing was converted)."""
    for m in model.modules():
        if isinstance(m, FP8Linear) and m.stats is not None:
            return m.stats
        ops = getattr(m, "fp8", None)
        if isinstance(ops, FP8Ops) and ops.stats is not None:
            return ops.stats
    return None
