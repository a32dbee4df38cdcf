"""Attention: Multi-head Latent Attention (MLA) and the MHA / GQA / MQA baselines, with measurable KV caches.

MLA (V2 report §2.1, V3 report §2.1.1 eqs. 1-11), shapes for one layer (B batch, T new tokens, S cached tokens,
H heads, C = kv_lora_rank, R = qk_rope_head_dim, Dn = qk_nope_head_dim, Dv = v_head_dim):

    c_kv = RMSNorm(W_DKV h)            [B, T, C]    eq. 1   (kv_a_proj_with_mqa rows [:C], kv_a_layernorm; the
                                                            norm after the latent is from V2 §2.1 / the code)
    k^R  = RoPE(W_KR h)                [B, T, R]    eq. 3   (kv_a_proj_with_mqa rows [C:]; ONE key shared by heads)
    k^C, v^C = W_UK c_kv, W_UV c_kv    [B, T, H, Dn], [B, T, H, Dv]  eqs. 2, 5 (kv_b_proj)
    c_q = RMSNorm(W_DQ h); q^C = W_UQ c_q; q^R = RoPE(W_QR c_q)        eqs. 6-8 (q_a_proj, q_a_layernorm, q_b_proj;
                                                                        or a single q_proj when q_lora_rank is None)
    o_i = sum_j softmax_j(q_i . k_j * scale) v^C_j;  u = W_O [o_1..o_H]   eqs. 10-11 (o_proj)

Only c_kv and k^R need caching (the vectors of eqs. 1 and 3, boxed in blue in the reports). Three numerically equivalent paths:

* training (cache=None): decompress K/V for the sequence and run `causal_attention` (baddbmm + softmax + bmm).
* absorbed (`MLACache`, official attn_impl="absorb"): cache c_kv and the ROTATED k^R; fold W_UK into the query
  (q_lat = q^C W_UK, [B, T, H, C]) and W_UV after the softmax, so the cache is (C + R) elements/token/layer.
* naive (`NaiveKVCache`, official attn_impl="naive"): cache the decompressed per-head K [.., H, Dn+R] and V [.., H, Dv].

Baselines (`GroupedQueryAttention`): Llama-style q/k/v/o projections with head dim d_h = cfg.v_head_dim; RoPE
(interleaved, YaRN-aware) over the FULL d_h (the baselines have no decoupled rope part), softmax scale
d_h**-0.5 * mscale^2. KV cache = 2 * n_g * d_h elements/token/layer (V2 report Table 1; n_g = H for MHA, 1 for MQA).

Parameter names match transformers' `DeepseekV3Attention` exactly, so its state dict loads 1:1 (strict).
Positions: a forward at `start_pos` covers positions start_pos .. start_pos+T-1; with a cache, query t sees cached
keys 0 .. start_pos+t (a correct causal mask also for chunked prefill at start_pos > 0 with T > 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .calc import kv_cache_bytes
from .gemm import Linear
from .layers import RMSNorm
from .rope import RotaryEmbedding, apply_rotary_interleaved, softmax_scale

__all__ = [
    "MLA", "GroupedQueryAttention", "causal_attention", "MLACache", "NaiveKVCache", "KVCache", "build_attention", "make_cache",
    "cache_bytes_formula",
]

# q_a_layernorm / kv_a_layernorm use eps 1e-6 in both references (transformers' DeepseekV3RMSNorm default and the
# official RMSNorm default), independent of cfg.rms_norm_eps.
_LATENT_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------- caches
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                    if hasattr(torch, n))


class _GrowableCache:
    """Per-layer cache of named tensors shaped [batch, capacity, *feature_shape].

    Preallocated when `max_len` is given, otherwise grown by doubling on demand. `seq_len` = valid prefix length;
    `nbytes()` = bytes of the cache tensors' valid prefix (measured from the tensors, not a formula).
    `dtype` sets the bytes per element (fp32 4, bf16/fp16 2, float8 1); writes are cast to it (float8: saturating,
    no scale — a teaching knob for memory, not a faithful FP8 KV-cache quantizer), reads are cast back.
    """

    _fields: dict[str, tuple[int, ...]] = {}

    def __init__(self, batch: int, max_len: int | None = None, dtype: torch.dtype = torch.bfloat16,
                 device=None, **_):
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be >= 1 or None (grow on demand), got {max_len}")
        self.batch = int(batch)
        self.max_len = None if max_len is None else int(max_len)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.seq_len = 0
        cap = self.max_len if self.max_len is not None else 0
        self._t = {name: torch.zeros(self.batch, cap, *shape, dtype=dtype, device=self.device)
                   for name, shape in self._fields.items()}

    @property
    def capacity(self) -> int:
        return next(iter(self._t.values())).shape[1]

    @property
    def bytes_per_element(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def _ensure(self, end: int) -> None:
        if end <= self.capacity:
            return
        if self.max_len is not None:
            raise ValueError(f"cache overflow: positions up to {end} requested, max_len is {self.max_len}")
        new_cap = max(16, self.capacity)
        while new_cap < end:
            new_cap *= 2
        for name, t in self._t.items():
            grown = torch.zeros(self.batch, new_cap, *t.shape[2:], dtype=t.dtype, device=t.device)
            grown[:, : self.seq_len] = t[:, : self.seq_len]
            self._t[name] = grown

    def _update(self, start_pos: int, **new: torch.Tensor) -> list[torch.Tensor]:
        """Write `new[name]` [B, T, ...] at positions start_pos..start_pos+T-1; return each tensor's valid prefix
        [B, start_pos+T, ...] (cache dtype). The valid length becomes start_pos + T (earlier positions are kept,
        later ones discarded, so re-running from an earlier start_pos rewinds)."""
        first = next(iter(new.values()))
        b, t = first.shape[0], first.shape[1]
        if b != self.batch:
            raise ValueError(f"cache was made for batch {self.batch}, got a batch of {b}")
        if start_pos < 0 or start_pos > self.seq_len:
            raise ValueError(f"start_pos {start_pos} must be in [0, seq_len={self.seq_len}] (no gaps in the cache)")
        end = start_pos + t
        self._ensure(end)
        out = []
        for name, value in new.items():
            buf = self._t[name]
            if tuple(value.shape[2:]) != tuple(buf.shape[2:]):
                raise ValueError(f"cache field {name!r} holds {tuple(buf.shape[2:])} per token, got "
                                 f"{tuple(value.shape[2:])} (cache made for another config?)")
            value = value.detach()  # the cache is inference state: no autograd
            if buf.dtype in _FP8_DTYPES:  # saturate: a plain cast maps |v| > max to NaN
                fmax = torch.finfo(buf.dtype).max
                value = value.float().clamp(-fmax, fmax)
            buf[:, start_pos:end] = value.to(buf.dtype)
            out.append(buf[:, :end])
        self.seq_len = end
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """The valid prefix of each cache tensor, [batch, seq_len, ...]."""
        return {name: t[:, : self.seq_len] for name, t in self._t.items()}

    def nbytes(self) -> int:
        """Bytes of the cache tensors holding the valid prefix (measured: sum of tensor.nbytes)."""
        return sum(t.nbytes for t in self.tensors().values())

    def allocated_bytes(self) -> int:
        """Bytes actually allocated (capacity >= seq_len)."""
        return sum(t.nbytes for t in self._t.values())

    def reset(self) -> None:
        self.seq_len = 0

    def __repr__(self) -> str:
        shapes = {n: tuple(t.shape[2:]) for n, t in self._t.items()}
        return (f"{type(self).__name__}(batch={self.batch}, seq_len={self.seq_len}, capacity={self.capacity}, "
                f"dtype={self.dtype}, per_token={shapes}, nbytes={self.nbytes()})")


class MLACache(_GrowableCache):
    """Absorbed-MLA cache: normalized latent c_kv [B, S, kv_lora_rank] and rotated k^R [B, S, qk_rope_head_dim].

    nbytes = batch * seq_len * (kv_lora_rank + qk_rope_head_dim) * bytes per layer (V2 report Table 1:
    (d_c + d_h^R) per token per layer; V3: 576 elements).
    """

    def __init__(self, batch: int, kv_lora_rank: int, qk_rope_head_dim: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, device=None):
        self._fields = {"c_kv": (int(kv_lora_rank),), "k_pe": (int(qk_rope_head_dim),)}
        super().__init__(batch, max_len, dtype, device)

    def update(self, start_pos: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store c_kv [B, T, C] and rotated k_pe [B, T, R]; return the prefixes [B, start_pos+T, C], [.., R]."""
        a, b = self._update(start_pos, c_kv=c_kv, k_pe=k_pe)
        return a, b


class NaiveKVCache(_GrowableCache):
    """Naive MLA cache (official attn_impl="naive"; transformers-style): full per-head K and V.

    K [B, S, H, qk_head_dim] (nope + rotated rope part), V [B, S, H, v_head_dim];
    nbytes = batch * seq_len * H * (qk_head_dim + v_head_dim) * bytes per layer (V3: 128*(192+128) = 40960 el.).
    """

    def __init__(self, batch: int, num_heads: int, qk_head_dim: int, v_head_dim: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, device=None):
        self._fields = {"k": (int(num_heads), int(qk_head_dim)), "v": (int(num_heads), int(v_head_dim))}
        super().__init__(batch, max_len, dtype, device)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self._update(start_pos, k=k, v=v)
        return a, b


class KVCache(_GrowableCache):
    """Baseline (MHA / GQA / MQA) cache: rotated K and V of the kv heads, each [B, S, n_g, d_h].

    nbytes = batch * seq_len * 2 * n_g * d_h * bytes per layer (V2 report Table 1: 2 n_h d_h (MHA), 2 n_g d_h (GQA),
    2 d_h (MQA)).
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, device=None):
        self._fields = {"k": (int(num_kv_heads), int(head_dim)), "v": (int(num_kv_heads), int(head_dim))}
        super().__init__(batch, max_len, dtype, device)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self._update(start_pos, k=k, v=v)
        return a, b


def _check_input(x: torch.Tensor, hidden: int) -> torch.Size:
    if x.dim() != 3 or x.shape[-1] != hidden or x.shape[1] == 0:
        raise ValueError(f"expected x of shape [batch, tokens >= 1, {hidden}], got {tuple(x.shape)}")
    return x.shape


def _causal_mask(t: int, s: int, start_pos: int, device) -> torch.Tensor:
    """Boolean [T, S]: query t (position start_pos+t) may attend key j iff j <= start_pos + t."""
    q_pos = torch.arange(t, device=device)[:, None] + start_pos
    k_pos = torch.arange(s, device=device)[None, :]
    return k_pos <= q_pos


_TAKES_DV: dict[tuple, bool] = {}


def sdpa_takes_dv(device: torch.device, dtype: torch.dtype, q_shape: tuple, dv: int, grad: bool) -> bool:
    """True when torch's SDPA dispatcher picks a fused kernel that takes V's head dim `dv` unequal to q/k's (cuDNN
    attention on Hopper does), so causal_attention need not zero-pad V to Dq. Asked once per (device, dtype, q
    shape, dv, grad) on empty tensors of those shapes; False on a CPU and wherever the dispatcher would choose
    another kernel (flash needs equal head dims, the memory-efficient kernel is several times slower).
    core.compile marks it a trace-time constant (shapes are static there)."""
    key = (str(device), dtype, tuple(q_shape), dv, grad)
    if key not in _TAKES_DV:
        ok = False
        if torch.device(device).type == "cuda" and q_shape[-1] != dv:
            q = torch.empty(q_shape, device=device, dtype=dtype, requires_grad=grad)
            v = torch.empty((*q_shape[:-1], dv), device=device, dtype=dtype, requires_grad=grad)
            ok = torch._fused_sdp_choice(q, q, v, None, 0.0, True) == int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)
        _TAKES_DV[key] = bool(ok)
    return _TAKES_DV[key]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention over a whole sequence (training / prefill without a cache).

    q, k: [B, H, T, Dq], v: [B, H, T, Dv] -> [B, H, T, Dv]. softmax(q k^T * scale + causal -inf mask) v as one
    `baddbmm` (scores plus the additive mask), a softmax in q's dtype (fp32 accumulation inside) and one `bmm`.
    Not `F.scaled_dot_product_attention`: on CPU its only kernel for Dv != Dq (MLA: 192 vs 128) is the math path,
    which upcasts bf16 to fp32 (timings in docs/performance.md).
    """
    b, h, t, d = q.shape
    if q.is_cuda:
        # CUDA: one fused kernel. cuDNN takes Dv != Dq as it is (`sdpa_takes_dv`); flash needs equal head dims, so
        # elsewhere V is zero-padded to Dq (192 for V3) and the pad columns of the output, exactly zero, dropped.
        dv = v.shape[-1]
        if dv == d or sdpa_takes_dv(q.device, q.dtype, tuple(q.shape), dv, q.requires_grad):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, F.pad(v, (0, d - dv)), is_causal=True, scale=scale)[..., :dv]
    mask = torch.full((t, t), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    scores = torch.baddbmm(mask, q.reshape(b * h, t, d), k.reshape(b * h, t, d).transpose(1, 2), alpha=scale)
    o = torch.bmm(scores.softmax(dim=-1), v.reshape(b * h, t, v.shape[-1]))
    return o.view(b, h, t, -1)


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """softmax over the last dim in fp32 (both references do), masked positions -> 0; cast back to `dtype`."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.float32).to(dtype)


# ----------------------------------------------------------------------------------------------------- MLA
class MLA(nn.Module):
    """Multi-head Latent Attention (V3 report §2.1.1 eqs. 1-11; V2 report §2.1), transformers-compatible names.

    forward(x [B, T, hidden], start_pos=0, cache=None, return_attn=False) -> [B, T, hidden]
    (or (out, probs [B, H, T, S]) with return_attn; S = start_pos + T with a cache, T without).

    * cache None       -> training path: full causal attention over x's T tokens (positions start_pos..), SDPA.
    * MLACache         -> absorbed decode (caches c_kv + rotated k^R; W_UK folded into q, W_UV applied after).
    * NaiveKVCache     -> naive decode (caches decompressed per-head K and V).
    All three give the same output (fp32: ~1e-6).
    """

    def __init__(self, cfg, layer_idx: int = 0, rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        bias = cfg.attention_bias
        h, dq = self.num_heads, self.qk_head_dim
        # Biases exactly where transformers' DeepseekV3Attention puts them (q_b_proj, q_proj, kv_b_proj never).
        if self.q_lora_rank is None:
            self.q_proj = Linear(self.hidden_size, h * dq, bias=False)
        else:
            self.q_a_proj = Linear(self.hidden_size, self.q_lora_rank, bias=bias)            # W_DQ (eq. 6)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=_LATENT_NORM_EPS)
            self.q_b_proj = Linear(self.q_lora_rank, h * dq, bias=False)                      # W_UQ | W_QR
        self.kv_a_proj_with_mqa = Linear(self.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim,
                                            bias=bias)                                           # W_DKV | W_KR
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=_LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim),
                                   bias=False)                                                   # W_UK | W_UV
        self.o_proj = Linear(h * self.v_head_dim, self.hidden_size, bias=bias)               # W_O (eq. 11)
        self.rotary = rotary if rotary is not None else RotaryEmbedding(cfg, cfg.qk_rope_head_dim)
        self.softmax_scale = softmax_scale(cfg)

    # ---- pieces
    def _queries(self, x: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope [B, T, H, Dn], rotated q_pe [B, T, H, R] (eqs. 6-9)."""
        b, t, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.num_heads, self.qk_head_dim)
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rotary_interleaved(q_pe, freqs)

    def _latents(self, x: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized latent c_kv [B, T, C] (eq. 1) and rotated shared key k_pe [B, T, R] (eq. 3)."""
        kv = self.kv_a_proj_with_mqa(x)
        c_kv, k_pe = torch.split(kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rotary_interleaved(k_pe, freqs)

    def _expand(self, c_kv: torch.Tensor, k_pe: torch.Tensor,
                heads_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Decompress: K [B, S, H, Dn+R] = [W_UK c_kv ; k_pe broadcast to heads] (eq. 4), V [B, S, H, Dv] (eq. 5).

        heads_first: return K as a contiguous [B, H, S, Dn+R] and V as a [B, H, S, Dv] view instead."""
        b, s, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(b, s, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        if heads_first:
            k_nope, v, k_pe = k_nope.transpose(1, 2), v.transpose(1, 2), k_pe[:, None].expand(-1, self.num_heads, -1, -1)
        else:
            k_pe = k_pe[:, :, None, :].expand(-1, -1, self.num_heads, -1)
        return torch.cat([k_nope, k_pe], dim=-1), v

    def _wkv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj weight split per head: W_UK [H, Dn, C], W_UV [H, Dv, C]."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    # ---- forward
    def forward(self, x: torch.Tensor, start_pos: int = 0, cache=None, return_attn: bool = False):
        b, t, _ = _check_input(x, self.hidden_size)
        freqs = self.rotary(start_pos, t, device=x.device)
        q_nope, q_pe = self._queries(x, freqs)
        c_kv, k_pe = self._latents(x, freqs)

        if cache is None:
            if return_attn:
                k, v = self._expand(c_kv, k_pe)
                q = torch.cat([q_nope, q_pe], dim=-1)
                return self._eager(q, k, v, _causal_mask(t, t, 0, x.device), b, t)
            # [B, H, T, d] layout, built by the concatenations themselves (no extra transpose copies)
            k, v = self._expand(c_kv, k_pe, heads_first=True)
            q = torch.cat([q_nope.transpose(1, 2), q_pe.transpose(1, 2)], dim=-1)
            o = causal_attention(q, k, v, self.softmax_scale)
            return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))

        mask = _causal_mask(t, start_pos + t, start_pos, x.device) if t > 1 else None
        if isinstance(cache, MLACache):
            return self._absorbed(q_nope, q_pe, c_kv, k_pe, cache, start_pos, mask, return_attn)
        if isinstance(cache, NaiveKVCache):
            k, v = self._expand(c_kv, k_pe)
            k_all, v_all = cache.update(start_pos, k, v)
            q = torch.cat([q_nope, q_pe], dim=-1)
            return self._eager(q, k_all.to(x.dtype), v_all.to(x.dtype), mask, b, t, return_attn)
        raise TypeError(f"MLA needs an MLACache or NaiveKVCache (or None), got {type(cache).__name__}")

    def _eager(self, q, k, v, mask, b, t, return_attn=True):
        """Explicit attention: q [B,T,H,Dq], k [B,S,H,Dq], v [B,S,H,Dv] -> out (, probs [B,H,T,S])."""
        scores = torch.einsum("bthd,bshd->bhts", q, k) * self.softmax_scale
        p = _masked_softmax(scores, mask, q.dtype)
        o = torch.einsum("bhts,bshd->bthd", p, v)
        out = self.o_proj(o.reshape(b, t, -1))
        return (out, p) if return_attn else out

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, cache: MLACache, start_pos, mask, return_attn):
        """Absorbed attention over the latent cache (official attn_impl="absorb").

        scores[b,h,t,s] = (q_lat[b,t,h] . c_kv[b,s] + q_pe[b,t,h] . k_pe[b,s]) * scale, q_lat = q_nope W_UK
        ([B,T,H,C]); o = (sum_s p c_kv[s]) W_UV^T per head — W_UK/W_UV are never applied to the S cached tokens.
        """
        b, t = q_nope.shape[:2]
        ckv_all, kpe_all = cache.update(start_pos, c_kv, k_pe)
        ckv_all, kpe_all = ckv_all.to(q_nope.dtype), kpe_all.to(q_nope.dtype)
        w_uk, w_uv = self._wkv_b()
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
        scores = (torch.einsum("bthc,bsc->bhts", q_lat, ckv_all)
                  + torch.einsum("bthr,bsr->bhts", q_pe, kpe_all)) * self.softmax_scale
        p = _masked_softmax(scores, mask, q_nope.dtype)
        o_lat = torch.einsum("bhts,bsc->bthc", p, ckv_all)
        o = torch.einsum("bthc,hdc->bthd", o_lat, w_uv)
        out = self.o_proj(o.reshape(b, t, -1))
        return (out, p) if return_attn else out


# ----------------------------------------------------------------------------------------------------- baselines
class GroupedQueryAttention(nn.Module):
    """MHA / GQA / MQA baseline (Llama-style), chosen by cfg.attention_type; n_g = cfg.kv_heads K/V heads.

    Projections: q_proj hidden -> H*d_h, k_proj/v_proj hidden -> n_g*d_h, o_proj H*d_h -> hidden (bias per
    cfg.attention_bias); d_h = cfg.v_head_dim. Query head i uses K/V head i // (H / n_g). RoPE (interleaved,
    YaRN-aware) rotates the full d_h of q and k; softmax scale = softmax_scale(cfg, d_h) = d_h**-0.5 * mscale^2.
    forward(x, start_pos=0, cache=None|KVCache, return_attn=False) like MLA.
    """

    def __init__(self, cfg, layer_idx: int = 0, rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.attention_type = cfg.attention_type
        self.hidden_size = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.kv_heads if cfg.attention_type != "mla" else cfg.num_attention_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_key_value_heads ({self.num_kv_heads}) must divide num_attention_heads "
                             f"({self.num_heads})")
        self.head_dim = cfg.v_head_dim
        if self.head_dim % 2:
            raise ValueError(f"v_head_dim (the baseline head dim) must be even for RoPE, got {self.head_dim}")
        bias = cfg.attention_bias
        self.q_proj = Linear(self.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(self.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(self.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, self.hidden_size, bias=bias)
        self.rotary = rotary if rotary is not None else RotaryEmbedding(cfg, self.head_dim)
        if self.rotary.dim != self.head_dim:
            raise ValueError(f"rotary dim {self.rotary.dim} != head dim {self.head_dim}")
        self.softmax_scale = softmax_scale(cfg, self.head_dim)

    def _qkv(self, x, start_pos):
        b, t, _ = x.shape
        freqs = self.rotary(start_pos, t, device=x.device)
        q = apply_rotary_interleaved(self.q_proj(x).view(b, t, self.num_heads, self.head_dim), freqs)
        k = apply_rotary_interleaved(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim), freqs)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        return q, k, v

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                return_attn: bool = False):
        b, t, _ = _check_input(x, self.hidden_size)
        q, k, v = self._qkv(x, start_pos)
        groups = self.num_heads // self.num_kv_heads
        if cache is None and not return_attn:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, scale=self.softmax_scale, enable_gqa=groups > 1)
            return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        if cache is None:
            mask = _causal_mask(t, t, 0, x.device)
        else:
            if not isinstance(cache, KVCache):
                raise TypeError(f"{self.attention_type} attention needs a KVCache, got {type(cache).__name__}")
            k, v = cache.update(start_pos, k, v)
            k, v = k.to(x.dtype), v.to(x.dtype)
            mask = _causal_mask(t, start_pos + t, start_pos, x.device) if t > 1 else None
        # [B, S, n_g, d] -> [B, S, H, d] (same grouping as SDPA enable_gqa / transformers repeat_kv)
        k = k.repeat_interleave(groups, dim=2)
        v = v.repeat_interleave(groups, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) * self.softmax_scale
        p = _masked_softmax(scores, mask, q.dtype)
        out = self.o_proj(torch.einsum("bhts,bshd->bthd", p, v).reshape(b, t, -1))
        return (out, p) if return_attn else out


# ----------------------------------------------------------------------------------------------------- factories
_KINDS = ("absorbed", "naive", "mha", "gqa", "mqa", "kv", "auto")
# accepted spellings: the official attn_impl name "absorb", and "mla"/"latent" for the latent cache
_ALIASES = {"absorb": "absorbed", "mla": "absorbed", "latent": "absorbed"}


def build_attention(cfg, layer_idx: int = 0, rotary: RotaryEmbedding | None = None) -> nn.Module:
    """MLA for cfg.attention_type == "mla", else the MHA / GQA / MQA baseline."""
    if cfg.attention_type == "mla":
        return MLA(cfg, layer_idx, rotary)
    return GroupedQueryAttention(cfg, layer_idx, rotary)


def _baseline_kv_heads(cfg, kind: str) -> int:
    if kind == "mha":
        return cfg.num_attention_heads
    if kind == "mqa":
        return 1
    if kind == "gqa":
        return cfg.num_key_value_heads
    return cfg.kv_heads  # "kv": whatever the config's baseline uses


def make_cache(cfg, kind: str = "auto", batch: int = 1, max_len: int | None = None,
               dtype: torch.dtype | None = torch.bfloat16, device=None):
    """One layer's cache for a module built from `cfg`.

    kind: "absorbed" (alias "absorb", "mla", "latent"; MLACache) or "naive" (NaiveKVCache) for MLA configs;
    "mha" / "gqa" / "mqa" / "kv" -> KVCache with H / num_key_value_heads / 1 / cfg.kv_heads heads of
    d_h = v_head_dim; "auto" -> absorbed for MLA, the config's baseline cache otherwise. For a baseline config
    (attention_type mha/gqa/mqa) the MLA kinds fall back to its KVCache (a baseline has no latent to cache).
    max_len None -> grow on demand; dtype None -> torch's default dtype.
    """
    kind = _ALIASES.get(kind, kind)
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS + tuple(_ALIASES)}, got {kind!r}")
    if dtype is None:
        dtype = torch.get_default_dtype()
    if kind == "auto" or (cfg.attention_type != "mla" and kind in ("absorbed", "naive")):
        kind = "absorbed" if cfg.attention_type == "mla" else "kv"
    if kind == "absorbed":
        return MLACache(batch, cfg.kv_lora_rank, cfg.qk_rope_head_dim, max_len, dtype, device)
    if kind == "naive":
        return NaiveKVCache(batch, cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim, max_len, dtype, device)
    return KVCache(batch, _baseline_kv_heads(cfg, kind), cfg.v_head_dim, max_len, dtype, device)


def cache_bytes_formula(cfg, kind: str, seq_len: int, batch: int = 1, bytes_per_element: int = 2) -> int:
    """Paper formula for ONE layer's cache (V2 report Table 1), the number `nbytes()` must reproduce.

    absorbed: B*S*(kv_lora_rank + qk_rope_head_dim)*bytes; naive: B*S*H*(qk_head_dim + v_head_dim)*bytes;
    mha/gqa/mqa/kv: B*S*2*n_g*d_h*bytes with d_h = v_head_dim. Delegates to `core.calc.kv_cache_bytes`
    (the one place the formula lives), divided by the number of layers.
    """
    kind = _ALIASES.get(kind, kind)
    if kind == "auto":
        kind = "absorbed" if cfg.attention_type == "mla" else "kv"
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    calc_kind = {"absorbed": "mla", "naive": "mla_naive"}.get(kind, kind)
    heads = None
    if kind == "kv":
        calc_kind, heads = "gqa", cfg.kv_heads
    total = kv_cache_bytes(cfg, calc_kind, int(seq_len), int(batch), int(bytes_per_element), num_kv_heads=heads)
    return total // cfg.num_hidden_layers
