"""FP8 scaling: granularities (tensor / row / 1x128 tile / 128x128 block / MX 1x32), quantize and
dequantize with one fp32 scale per group, current scaling (``compute_scale`` from the tensor's own amax),
delayed scaling (``AmaxHistory``, ``DelayedScaler``) and the overflow count of a given scale.

Implements V3 report §3.3.2 "Fine-Grained Quantization" (1x128 activation tiles, 128x128 weight
blocks) and "Online Quantization" (current amax per tile/block), following the official
inference/kernel.py ``act_quant`` / ``weight_dequant`` (the scale is a *dequantization* scale,
``s = amax / fmt_max``; ``q = cast(clamp(x / s))``, ``x_hat = q * s``).
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import torch
import torch.nn.functional as F

from core.fp8.formats import (
    FP8Format, _check_overflow, _overflow_mask, cast_to_fp8, get_format, round_to_format,
)

__all__ = [
    "GRANULARITIES", "AMAX_FLOOR", "MX_BLOCK",
    "group_amax", "compute_scale", "scale_shape", "quantize", "dequantize", "overflow_count",
    "AmaxHistory", "DelayedScaler",
]

GRANULARITIES = ("tensor", "row", "tile", "block", "mx")
#: amax floor of the official inference/kernel.py ``act_quant``, so an all-zero group gives a finite
#: scale instead of 0 (and 0/0 = NaN).
AMAX_FLOOR = 1e-4
#: OCP MX block size (1x32 along the last dim, one E8M0 scale per block).
MX_BLOCK = 32


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
    if not spec.scaled:
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
        (q, scale): q has x's shape and a float8 dtype (bfloat16 for "bf16"; float32 holding E5M6 values for
        "e5m6", which has no torch dtype); scale is float32.
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
    if not spec.scaled:  # bf16 contrast: scale is 1 unless one was passed in
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
