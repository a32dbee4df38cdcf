"""FP8 formats and their bit layouts: E4M3 / E5M2 (and BF16 for contrast), casts with an explicit
overflow policy, and the decoded table of all 256 codes.

Implements the format side of the V3 report §3.3.2 ("Mantissa over Exponents": E4M3 on all tensors,
made workable by fine-grained scaling). Every cast clamps explicitly first, because torch's own eager
overflow behaviour changed between releases (NaN before, saturation after; docs/performance.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "FP8Format", "FORMATS", "FP8_FORMATS", "OVERFLOW_MODES", "E5M6",
    "get_format", "cast_to_fp8", "round_to_format", "round_to_bits", "decode_code", "bit_layout", "code_table",
    "representable_values",
]


@dataclass(frozen=True)
class FP8Format:
    """A small floating-point format (1 sign bit, ``exp_bits`` exponent bits, ``man_bits`` mantissa bits).

    ``ieee_specials``: the all-ones exponent is reserved for inf/NaN (E5M2, BF16). E4M3FN instead
    keeps that binade for numbers and has a single NaN pattern per sign (S.1111.111) and no inf,
    which is why its max is 448 and not 240 (OCP OFP8 spec; FP8 paper arXiv 2209.05433, Table 1).
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
    def emulated(self) -> bool:
        """No torch dtype holds this format (E5M6): values are rounded by ``round_to_bits`` and kept in fp32."""
        return self.dtype == torch.float32

    @property
    def scaled(self) -> bool:
        """Quantized with a per-group scale (the FP8 formats and E5M6), unlike the bf16 contrast format."""
        return self.is_fp8 or self.emulated

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
#: DeepSeek's E5M6 (V3 report §3.3.3 "Low-Precision Activation": the inputs of the Linear after attention,
#: with power-of-2 scales). The report gives only the bit split; we assume the IEEE-style layout of E5M2 and
#: fp16 (bias 15, all-ones exponent for inf/NaN): max (2 - 2^-6)·2^15 = 65024, min normal 2^-14, min
#: subnormal 2^-20. Not in FORMATS: it is a training-recipe format with no torch dtype (stored as fp32).
E5M6 = FP8Format("e5m6", torch.float32, 5, 6, 15, (2 - 2.0 ** -6) * 2.0 ** 15, 2.0 ** -14, 2.0 ** -20, True, True,
                 "DeepSeek E5M6 (12 bits, emulated in fp32; IEEE-style specials assumed)")
OVERFLOW_MODES = ("saturate", "nan")

_ALIASES = {
    "e4m3": "e4m3", "e4m3fn": "e4m3", "float8_e4m3fn": "e4m3", "fp8_e4m3": "e4m3", "fp8-e4m3": "e4m3",
    "e5m2": "e5m2", "float8_e5m2": "e5m2", "fp8_e5m2": "e5m2", "fp8-e5m2": "e5m2",
    "bf16": "bf16", "bfloat16": "bf16", "e5m6": "e5m6",
}


def get_format(fmt: str | FP8Format, *, allow_bf16: bool = True) -> FP8Format:
    """Resolve ``fmt`` ("e4m3", "e5m2", "bf16", aliases such as "float8_e4m3fn", or an FP8Format)."""
    if isinstance(fmt, FP8Format):
        spec = fmt
    else:
        key = _ALIASES.get(str(fmt).strip().lower()) if isinstance(fmt, str) else None
        if key is None:
            raise ValueError(f"fmt: unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
        spec = E5M6 if key == "e5m6" else FORMATS[key]
    if not allow_bf16 and not spec.scaled:
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
    We clamp explicitly in both modes rather than rely on torch's cast, whose eager overflow behaviour
    changed between releases (docs/performance.md, "FP8 emulation").
    Returns a tensor of ``x``'s shape with dtype float8_e4m3fn / float8_e5m2.
    """
    spec = get_format(fmt, allow_bf16=False)
    _check_overflow(overflow)
    if not torch.is_floating_point(x):
        raise ValueError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    if spec.emulated:
        return round_to_bits(x, spec, overflow)
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
    if spec.scaled:
        return cast_to_fp8(x, spec, overflow).float()
    x = x.float()
    if overflow == "saturate":
        x = x.clamp(-spec.max, spec.max)
    return x.to(spec.dtype).float()


def round_to_bits(x: torch.Tensor, fmt: str | FP8Format, overflow: str = "saturate") -> torch.Tensor:
    """Round ``x`` to the grid of a float format given only by its bit split (no torch dtype needed), RNE,
    as float32: in the binade [2^e, 2^(e+1)) the step is 2^(e - man_bits), below the smallest normal it is
    the subnormal step. saturate: clamp to ±max first; "nan": values that round above max become ±inf
    (IEEE-style formats) or NaN. Matches torch's E4M3/E5M2 casts (tested), and is how E5M6 is emulated."""
    spec = get_format(fmt)
    _check_overflow(overflow)
    xf = x.float()
    y = xf.clamp(-spec.max, spec.max)
    _, e = torch.frexp(y)  # y = m·2^e with |m| in [0.5, 1): the binade's exponent is e - 1
    emin = math.frexp(spec.min_normal)[1] - 1
    step = torch.ldexp(torch.ones_like(y), (e - 1).clamp(min=emin) - spec.man_bits)
    y = torch.round(y / step) * step  # division by a power of two is exact; torch.round ties to even
    if overflow == "nan":
        over = _overflow_mask(xf, spec)
        special = torch.where(xf > 0, torch.full_like(xf, math.inf), torch.full_like(xf, -math.inf)) \
            if spec.has_inf else torch.full_like(xf, math.nan)
        y = torch.where(over, special, y)
    return y


def _not_emulated(spec: FP8Format) -> FP8Format:
    if spec.emulated:
        raise ValueError(f"fmt: {spec.name!r} has no torch dtype to decode; expected one of {sorted(FORMATS)}")
    return spec


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
    Counts: E4M3 254 finite / 2 NaN / 0 inf; E5M2 248 / 6 / 2 (OCP OFP8 spec).
    """
    spec = get_format(fmt, allow_bf16=False)
    if not spec.is_fp8:
        raise ValueError(f"fmt: {spec.name!r} has no 256-code table; expected one of {list(FP8_FORMATS)}")
    return [_describe_code(c, spec) for c in range(256)]


def representable_values(fmt: str | FP8Format) -> torch.Tensor:
    """Sorted distinct finite values of ``fmt`` (float32 1-D tensor; -0 and +0 merged).

    E4M3: 253 values, E5M2: 247, BF16: 65279. Decoded by torch from every bit pattern."""
    spec = _not_emulated(get_format(fmt))
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
    spec = _not_emulated(get_format(fmt))
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
