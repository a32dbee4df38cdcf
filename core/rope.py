"""Rotary position embedding (interleaved pairs) with YaRN context extension, as in DeepSeek-V2/V3.

Conventions (official `inference/model.py` `precompute_freqs_cis` / `apply_rotary_emb`; transformers'
`_compute_yarn_parameters`, `yarn_apply_mscale`, `apply_rotary_pos_emb_interleave`):

* **Interleaved RoPE** (official `inference/model.py` `apply_rotary_emb`): the last dim of a rotary slice is viewed
  as d/2 pairs (x[2i], x[2i+1]) = one complex number each and multiplied by `freqs_cis[pos, i]`. transformers
  instead de-interleaves ([x0, x2, ...| x1, x3, ...]) and applies `rotate_half`; that is the same rotation followed by
  one fixed permutation of the channels, applied identically to q_pe and k_pe, so q·k scores are identical.
* **YaRN** (V2 report §3.1.4, V3 report §4.3; "NTK-by-parts"): inverse frequencies are blended between the original
  (extrapolation, fast-rotating dims) and the interpolated `/factor` ones (slow dims) with a linear ramp between the
  correction dims of `beta_fast` and `beta_slow`. The official code and transformers' `_compute_yarn_parameters`
  agree: correction range = (floor(cd(beta_fast)), ceil(cd(beta_slow))) clipped to [0, dim-1] (transformers'
  `truncate=True`, its default; `truncate=False` skips floor/ceil and is honoured when present in rope_scaling).
* **Two mscale corrections** (follow transformers):
  1. cos/sin are multiplied by `attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)`
     when both keys are set and non-zero, else by `get_mscale(factor)` (= 0.1 ln s + 1); an explicit
     `attention_factor` key wins. For V3 / V2 / V2-Lite (mscale == mscale_all_dim) this is exactly 1.
  2. the softmax scale becomes `qk_head_dim**-0.5 * yarn_get_mscale(factor, mscale_all_dim)**2` whenever yarn
     rope_scaling is configured and `mscale_all_dim` is non-zero (transformers `yarn_apply_mscale`). The official
     code applies it only when `max_seq_len > original_seq_len` (its default 16384 > 4096, so in practice always).

Angles are computed in fp32 (`position * inv_freq`) exactly like both references, so loaded checkpoints reproduce
their numbers; fp32 angles lose precision at very large positions (~1e-2 rad at 160K), as in the references.

This module never imports transformers.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "yarn_get_mscale", "find_correction_dim", "find_correction_range", "linear_ramp_factor", "yarn_parameters",
    "rope_inv_freq", "rope_attention_factor", "softmax_scale", "RotaryEmbedding", "apply_rotary_interleaved",
    "interleaved_to_half",
]


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN magnitude correction sqrt(t) = 0.1 * mscale * ln(s) + 1 for s > 1, else 1 (V2 report §3.1.4)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def find_correction_dim(num_rotations: float, dim: int, base: float, max_position_embeddings: int) -> float:
    """The (fractional) rotary pair index whose wavelength fits `num_rotations` times into the original context.

    cd(r) = dim * ln(L_orig / (2 pi r)) / (2 ln base). V3 (dim 64, base 1e4, L 4096): cd(32) = 10.47, cd(1) = 22.51.
    """
    return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def find_correction_range(low_rot: float, high_rot: float, dim: int, base: float, max_position_embeddings: int,
                          truncate: bool = True) -> tuple[float, float]:
    """(low, high) pair indices of the YaRN ramp: floor/ceil when `truncate`, clipped to [0, dim - 1]."""
    low = find_correction_dim(low_rot, dim, base, max_position_embeddings)
    high = find_correction_dim(high_rot, dim, base, max_position_embeddings)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def linear_ramp_factor(lo: float, hi: float, n: int) -> torch.Tensor:
    """clamp((i - lo) / (hi - lo), 0, 1) for i in 0..n-1 (hi += 0.001 if equal, to avoid 0/0). fp32 [n]."""
    if lo == hi:
        hi += 0.001
    return torch.clamp((torch.arange(n, dtype=torch.float32, device="cpu") - lo) / (hi - lo), 0, 1)


def yarn_parameters(cfg) -> dict | None:
    """The resolved YaRN parameters of `cfg.rope_scaling` with transformers' fallbacks, or None if not yarn.

    Keys: factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim (None if absent),
    attention_factor (None if absent), truncate.
    """
    rs = getattr(cfg, "rope_scaling", None)
    if not rs:
        return None
    rtype = rs.get("rope_type", rs.get("type", "default"))
    if rtype == "default":
        return None
    if rtype != "yarn":
        raise ValueError(f"rope_scaling.type: unsupported rope type {rtype!r} (supported: default, yarn)")
    orig = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = rs.get("factor")
    if factor is None:  # transformers: DeepSeek-style configs may derive the factor from the two lengths
        factor = cfg.max_position_embeddings / orig
    return {
        "factor": float(factor),
        "original_max_position_embeddings": int(orig),
        "beta_fast": rs.get("beta_fast") or 32,  # `or`: transformers treats 0/None as "use the default"
        "beta_slow": rs.get("beta_slow") or 1,
        "mscale": rs.get("mscale"),
        "mscale_all_dim": rs.get("mscale_all_dim"),
        "attention_factor": rs.get("attention_factor"),
        "truncate": rs.get("truncate", True),
    }


def rope_inv_freq(cfg, dim: int | None = None) -> torch.Tensor:
    """Inverse frequencies theta_i, fp32 [dim/2], with the YaRN blend when `cfg.rope_scaling` is yarn.

    Default: theta_i = base^(-2i/dim). YaRN (transformers `_compute_yarn_parameters` == official
    `precompute_freqs_cis`): theta_i = theta_i/s * (1 - m_i) + theta_i * m_i with m_i = 1 - ramp(low, high)_i, so pair
    indices <= low keep their frequency (extrapolate) and indices >= high are divided by the factor (interpolate).
    `dim` defaults to `cfg.qk_rope_head_dim` (MLA's decoupled RoPE width); baselines pass their head dim.
    """
    dim = int(dim if dim is not None else cfg.qk_rope_head_dim)
    if dim % 2:
        raise ValueError(f"rope dim must be even (RoPE rotates pairs), got {dim}")
    base = float(cfg.rope_theta)
    # explicit CPU: a model may be built under `with torch.device("meta")` (checkpoint loading); this table is not
    # a parameter and must hold real numbers
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    inv_freq = 1.0 / pos_freqs
    y = yarn_parameters(cfg)
    if y is None:
        return inv_freq
    inv_freq_interp = 1.0 / (y["factor"] * pos_freqs)
    low, high = find_correction_range(y["beta_fast"], y["beta_slow"], dim, base,
                                      y["original_max_position_embeddings"], y["truncate"])
    extrap = 1 - linear_ramp_factor(low, high, dim // 2)  # 1 = keep the original frequency
    return inv_freq_interp * (1 - extrap) + inv_freq * extrap


def rope_attention_factor(cfg) -> float:
    """The factor transformers multiplies cos and sin by (YaRN "attention_factor"); 1.0 without yarn.

    = attention_factor if given; else get_mscale(s, mscale) / get_mscale(s, mscale_all_dim) when both are set and
    non-zero; else get_mscale(s) = 0.1 ln s + 1. (V3: mscale = mscale_all_dim = 1 -> 1.0.) It scales q_pe and k_pe,
    hence the rope part of every score by its square.
    """
    y = yarn_parameters(cfg)
    if y is None:
        return 1.0
    if y["attention_factor"] is not None:
        return float(y["attention_factor"])
    if y["mscale"] and y["mscale_all_dim"]:
        return float(yarn_get_mscale(y["factor"], y["mscale"]) / yarn_get_mscale(y["factor"], y["mscale_all_dim"]))
    return float(yarn_get_mscale(y["factor"]))


def softmax_scale(cfg, head_dim: int | None = None) -> float:
    """Attention logit scale: head_dim**-0.5 * yarn_get_mscale(factor, mscale_all_dim)**2 (V3 report eq. 10 + YaRN).

    `head_dim` defaults to `cfg.qk_head_dim` (nope + rope = 192 for V3: 1/sqrt(d_h + d_h^R)). Follows transformers:
    the YaRN correction is applied whenever yarn rope_scaling is configured with a non-zero `mscale_all_dim`
    (the official code applies it only if max_seq_len > original_seq_len). V3: 0.1352338; V2-Lite (0.707): 0.1147214.
    """
    d = int(head_dim if head_dim is not None else cfg.qk_head_dim)
    scale = d ** -0.5
    y = yarn_parameters(cfg)
    if y is not None and y["mscale_all_dim"]:
        m = yarn_get_mscale(y["factor"], y["mscale_all_dim"])
        scale = scale * m * m
    return scale


class RotaryEmbedding(nn.Module):
    """Complex rotary factors `freqs_cis[p, i] = a * exp(j * p * theta_i)` for positions p, pairs i.

    `a` = `rope_attention_factor(cfg)` (transformers' cos/sin scaling; 1 for V3). The table is cached in fp32 /
    complex64 and grown lazily (doubling) as positions are requested — up to `max_position_embeddings` first, and
    beyond if asked (YaRN extrapolation). It is deliberately not a registered buffer, so `module.to(bfloat16)`
    can't silently drop the imaginary part; it follows the device of the caller's tensor.

    forward(start_pos, seq_len) -> complex64 [seq_len, dim/2]; `cos_sin(...)` gives the real pair
    (cos, sin) [seq_len, dim/2] (already multiplied by `a`; the real and imaginary parts of the same table).
    Under `torch.compile` forward returns that (cos, sin) pair instead: inductor has no code generation for
    complex tensors, and `apply_rotary_interleaved` takes either form.
    """

    def __init__(self, cfg, dim: int | None = None, initial_len: int = 256):
        super().__init__()
        self.dim = int(dim if dim is not None else cfg.qk_rope_head_dim)
        self.max_position_embeddings = int(cfg.max_position_embeddings)
        self.inv_freq = rope_inv_freq(cfg, self.dim)
        self.attention_factor = rope_attention_factor(cfg)
        self._initial_len = max(1, min(int(initial_len), self.max_position_embeddings))
        self._cache: torch.Tensor | None = None
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None  # real views of _cache's table, fp32

    @property
    def cached_len(self) -> int:
        return 0 if self._cache is None else self._cache.shape[0]

    def _build(self, length: int, device) -> torch.Tensor:
        t = torch.arange(length, dtype=torch.float32, device=device)
        angles = torch.outer(t, self.inv_freq.to(device))  # fp32, as both references
        mag = torch.full(angles.shape, self.attention_factor, dtype=torch.float32, device=device)
        return torch.polar(mag, angles)

    def freqs_cis(self, start_pos: int, seq_len: int, device=None) -> torch.Tensor:
        end = int(start_pos) + int(seq_len)
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_pos}")
        device = torch.device(device) if device is not None else (
            self._cache.device if self._cache is not None else torch.device("cpu"))
        if self._cache is None or self._cache.shape[0] < end or self._cache.device != device:
            length = max(self._initial_len, self.cached_len)
            while length < end:
                length *= 2
            if length > self.max_position_embeddings >= end:
                length = self.max_position_embeddings  # don't overshoot the configured context
            self._cache = self._build(length, device)
            self._cos_sin = (self._cache.real.contiguous(), self._cache.imag.contiguous())
        return self._cache[start_pos:end]

    def forward(self, start_pos: int = 0, seq_len: int = 1, device=None):
        if torch.compiler.is_compiling():  # a compiled graph gets the real pair (no complex tensors in it)
            return self.cos_sin(start_pos, seq_len, device)
        return self.freqs_cis(start_pos, seq_len, device)

    def cos_sin(self, start_pos: int = 0, seq_len: int = 1, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) fp32 [seq_len, dim/2]: a * cos(p theta_i), a * sin(p theta_i) (contiguous, no complex view)."""
        self.freqs_cis(start_pos, seq_len, device)  # builds / grows the table
        end = int(start_pos) + int(seq_len)
        return self._cos_sin[0][start_pos:end], self._cos_sin[1][start_pos:end]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, attention_factor={self.attention_factor:.6g}, cached_len={self.cached_len}"


def _complex_rotate(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """x: fp32 [..., d] as d/2 complex pairs, times complex f (broadcastable to [..., d/2]) -> fp32 [..., d]."""
    # view_as_complex needs unit stride on the pair axis and an even offset/strides elsewhere (a slice such as
    # q[..., nope:] with an odd nope dim, or a gradient slice, is not); copy only in that case.
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(s % 2 for s in x.stride()[:-1]):
        x = x.clone(memory_format=torch.contiguous_format)  # fresh storage: offset 0, standard strides
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (x.shape[-1] // 2, 2))) * f).flatten(-2)


class _Rotate(torch.autograd.Function):
    """y = rotate(x, f); dx = rotate(dy, conj(f)) (a rotation's transpose is the inverse rotation; |f| scales both)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(f)
        return _complex_rotate(x, f)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (f,) = ctx.saved_tensors
        return _complex_rotate(dy, f.conj()), None


def _real_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same rotation in real arithmetic: pairs (a, b) = (x[2i], x[2i+1]) -> (a c - b s, a s + b c).

    x: fp32 [..., d]; cos, sin: broadcastable to [..., d/2] -> fp32 [..., d]. What compiled graphs run: inductor
    fuses it (and its autograd backward) into the surrounding kernels; it cannot generate code for complex
    tensors. Eager CPU keeps the complex multiply, one kernel per direction (faster there: docs/performance.md).
    """
    a, b = x.unflatten(-1, (x.shape[-1] // 2, 2)).unbind(-1)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def apply_rotary_interleaved(x: torch.Tensor, freqs_cis) -> torch.Tensor:
    """Rotate interleaved pairs: view x's last dim as d/2 complex numbers, multiply by freqs_cis (official form).

    x: [B, T, H, d] or [B, T, d] (any float dtype; computed in fp32, returned in x's dtype).
    freqs_cis: complex [T, d/2] (or already broadcastable to x's complex view, e.g. [B, T, 1, d/2]), or the real
    pair (cos, sin) of such a table (`RotaryEmbedding.cos_sin`).
    Eager: one complex multiply forward and one backward, bit-identical to the rotation spelled out in real
    arithmetic (4 strided muls, 2 adds and a stack) and faster on CPU (docs/performance.md). Under
    `torch.compile` (or given (cos, sin)): that real arithmetic (`_real_rotate`), equal within fp32 rounding.
    """
    dtype = x.dtype
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary dim must be even, got {d}")
    real = isinstance(freqs_cis, (tuple, list))
    if not real and torch.compiler.is_compiling():
        real, freqs_cis = True, (freqs_cis.real, freqs_cis.imag)
    pieces = []
    for f in (freqs_cis if real else (freqs_cis,)):
        if f.dim() == 2:
            if f.shape[0] != x.shape[1]:
                raise ValueError(f"freqs_cis covers {f.shape[0]} positions but x has {x.shape[1]}")
            f = f.view(1, f.shape[0], *([1] * (x.dim() - 3)), f.shape[1])
        pieces.append(f)
    xf = x.float()
    if real:
        return _real_rotate(xf, *pieces).to(dtype)
    f = pieces[0]
    if torch.is_grad_enabled() and xf.requires_grad:
        return _Rotate.apply(xf, f).to(dtype)
    return _complex_rotate(xf, f).to(dtype)


def interleaved_to_half(x: torch.Tensor) -> torch.Tensor:
    """The channel permutation [x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...] relating our interleaved layout to
    transformers' rotate_half layout (`rope_interleave=True`): rotate_half(perm(x)) == perm(interleaved(x))."""
    d = x.shape[-1]
    return x.reshape(*x.shape[:-1], d // 2, 2).transpose(-1, -2).reshape(*x.shape)
