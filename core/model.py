"""The DeepSeek-V3 model: decoder blocks, multi-token prediction (MTP) and generation.

Module and parameter names follow transformers' `DeepseekV3ForCausalLM` (`model.embed_tokens`,
`model.layers.{i}.self_attn.q_a_proj`, `model.layers.{i}.mlp.experts.gate_up_proj`, `lm_head`, ...), so a
transformers state dict maps onto ours 1:1 except for the MTP module (stored as `model.layers.{L}` in the
published checkpoint, `mtp.{k}` here) and per-expert tensors; `core.checkpoint` does that mapping and loads
(`load_hf`) or saves (`save_hf`) a model. The dependency runs one way: the checkpoint module imports this one.

Shapes: B batch, T tokens, H hidden_size, V vocab_size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from core.attention import build_attention, make_cache
from core.config import ModelConfig
from core.gemm import Linear
from core.layers import MLP, Embedding, RMSNorm
from core.moe import MoE


class DecoderLayer(nn.Module):
    """Pre-norm block (official model.py `Block`): x += attn(norm(x)); x += ffn(norm(x)).

    The FFN is a dense SwiGLU for the first `first_k_dense_replace` layers and DeepSeekMoE after.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, moe: bool | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        moe = cfg.is_moe_layer(layer_idx) if moe is None else moe
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache=None) -> torch.Tensor:
        """x: [B, T, H] -> [B, T, H]."""
        x = x + self.self_attn(self.input_layernorm(x), start_pos=start_pos, cache=cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPModule(nn.Module):
    """One multi-token-prediction module (V3 report §2.2, eqs. 21-23), depth k.

    h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]    (eh_proj: [H, 2H])
    h^k  = TRM_k(h')                                           (a full decoder block, MoE FFN)
    P^k_{i+k+1} = OutHead(shared_head.norm(h^k_i))              (embedding and head shared with the main model)

    Concatenation order: embedding FIRST, then the previous hidden state. The paper writes [h; emb], but the
    released checkpoint is consumed as eh_proj(cat[enorm(emb), hnorm(h)]) by the runtimes that load it
    (vLLM/SGLang deepseek_mtp; DeepSeek-V3#712), so we follow the weights' layout.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = DecoderLayer(cfg, layer_idx, moe=cfg.n_routed_experts > 0)
        self.shared_head_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, start_pos: int = 0, cache=None) -> torch.Tensor:
        """h_prev: [B, T, H] (depth k-1 states at positions i), emb_next: [B, T, H] (Emb(t_{i+k})).

        Returns h^k: [B, T, H] (before shared_head_norm)."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(h, start_pos=start_pos, cache=cache)


class DeepSeekV3(nn.Module):
    """DeepSeek-V3: embedding, `num_hidden_layers` pre-norm blocks, final RMSNorm, untied head, MTP modules.

    `model(input_ids)` -> logits [B, T, V] (all positions, unlike the official inference code which returns
    only the last). With `caches` (from `new_caches`) it runs incrementally from `start_pos`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = nn.ModuleList([MTPModule(cfg, cfg.num_hidden_layers + k)
                                  for k in range(cfg.num_nextn_predict_layers)])
        self.init_weights()

    def init_weights(self) -> None:
        """Re-draw every parameter as transformers' DeepseekV3PreTrainedModel does: N(0, initializer_range) for
        embeddings, linear layers, the router and the experts; zero biases; RMSNorm weights one.

        Each module that owns parameters initialises them in its own `init_weights(std)`; this one pass visits
        submodules children-first in registration order (`nn.Module.apply`), which fixes the random draw order
        and so the weights a seed gives."""
        std = self.config.initializer_range

        def init(m: nn.Module) -> None:
            if m is self:
                return
            if hasattr(m, "init_weights"):
                m.init_weights(std)
            elif next(m.parameters(recurse=False), None) is not None:  # a new module must not keep torch's init
                raise TypeError(f"{type(m).__name__} owns parameters but defines no init_weights(std)")

        self.apply(init)

    # ------------------------------------------------------------------ forward
    def hidden_states(self, input_ids: torch.Tensor, start_pos: int = 0, caches=None) -> torch.Tensor:
        """input_ids: [B, T] (int64) -> final hidden states after the last block, before `norm`: [B, T, H]."""
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, start_pos=start_pos, cache=None if caches is None else caches[i])
        return x

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, caches=None) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, V]."""
        return self.lm_head(self.model.norm(self.hidden_states(input_ids, start_pos, caches)))

    def mtp_hidden(self, h_main_normed: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """MTP hidden states for training: depth k covers positions 0..T-k-1 and predicts t_{i+k+1}.

        h_main_normed: [B, T, H] = norm(main hidden) (what runtimes feed the MTP module);
        returns a list (one per depth) of [B, T-k, H] (after shared_head_norm).
        """
        out, h = [], h_main_normed
        T = input_ids.shape[1]
        for k, mod in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            emb = self.model.embed_tokens(input_ids[:, k:])
            h = mod(h[:, : T - k], emb)
            out.append(mod.shared_head_norm(h))
        return out

    def compute_loss(self, input_ids: torch.Tensor, targets: torch.Tensor, mtp_lambda: float = 0.3) -> dict:
        """Next-token cross-entropy plus the MTP loss (V3 report eqs. 24-25).

        input_ids, targets: [B, T] with targets[:, i] = t_{i+1}. Depth k predicts targets[:, i+k] from
        position i. L_MTP = (lambda / D) Σ_k mean CE_k (mean over the T-k valid positions; eq. 24 divides by T).
        Returns {"loss": total, "lm_loss", "mtp_loss", "mtp_losses": [..]}.
        """
        h = self.model.norm(self.hidden_states(input_ids))
        logits = self.lm_head(h)
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        mtp_losses = []
        if self.mtp and mtp_lambda > 0:
            for k, hk in enumerate(self.mtp_hidden(h, input_ids), start=1):
                lk = self.lm_head(hk)
                mtp_losses.append(F.cross_entropy(lk.reshape(-1, lk.shape[-1]).float(), targets[:, k:].reshape(-1)))
        mtp = (mtp_lambda / len(mtp_losses)) * sum(mtp_losses) if mtp_losses else logits.new_zeros(())
        return {"loss": lm + mtp, "lm_loss": lm, "mtp_loss": mtp, "mtp_losses": mtp_losses, "logits": logits}

    # ------------------------------------------------------------------ helpers
    def moe_layers(self) -> list[nn.Module]:
        """The MoE modules of the main model, in layer order."""
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def new_caches(self, batch: int, max_len: int, kind: str = "absorb", dtype: torch.dtype | None = None):
        """One cache per main layer plus one per MTP module. kind: "absorb" (latent) or "naive" (MLA only)."""
        dtype = dtype or next(self.parameters()).dtype
        n = self.config.num_hidden_layers + len(self.mtp)
        device = self.lm_head.weight.device
        return [make_cache(self.config, kind, batch, max_len, dtype, device) for _ in range(n)]

    def num_parameters(self, include_mtp: bool = False) -> int:
        n = sum(p.numel() for name, p in self.named_parameters() if include_mtp or not name.startswith("mtp."))
        # the noaux_tc bias is a buffer, counted by core.calc as a (non-trainable) parameter
        n += sum(b.numel() for name, b in self.named_buffers()
                 if name.endswith("e_score_correction_bias") and (include_mtp or not name.startswith("mtp.")))
        return n


# ---------------------------------------------------------------------------------------------- generation
@dataclass
class GenerationResult:
    tokens: list[list[int]]            # generated tokens per sequence (prompt excluded)
    mtp_drafts: int = 0                # MTP second-token drafts that could be checked
    mtp_accepted: int = 0              # drafts equal to the token the main model then produced
    per_step_accept: list = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        return self.mtp_accepted / self.mtp_drafts if self.mtp_drafts else float("nan")


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None) -> torch.Tensor:
    """logits: [B, V] -> next tokens [B]. temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(model: DeepSeekV3, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, cache_kind: str = "absorb",
             measure_mtp: bool = True) -> GenerationResult:
    """Autoregressive generation through the per-layer KV caches (absorbed MLA latent cache by default).

    prompt: [B, P] int64. Each step feeds one token at `start_pos` (official generate.py). When the model
    has MTP modules and `measure_mtp`, depth 1 drafts token t+2 from (h_t, t+1) through its own cache, and a
    draft is accepted when the main model later produces the same token — the acceptance rate the V3 report
    quotes as 85-90% for the released model (§5.4.3). Drafts are measured, not used to skip steps.
    """
    model.eval()
    B, P = prompt.shape
    total = P + max_new_tokens
    caches = model.new_caches(B, total + 1, kind=cache_kind)
    L = model.config.num_hidden_layers
    gen = torch.Generator(prompt.device).manual_seed(seed) if temperature > 0 else None
    use_mtp = measure_mtp and len(model.mtp) > 0
    res = GenerationResult(tokens=[[] for _ in range(B)])

    h = model.hidden_states(prompt, 0, caches[:L])
    hn = model.model.norm(h)
    nxt = _sample(model.lm_head(hn[:, -1]), temperature, top_k, gen)
    draft = None
    pos = P  # position of `nxt`
    mtp_pos = 0  # next position the MTP module's cache expects
    pending_h = hn  # main states at positions mtp_pos.. whose successor token is known

    for step in range(max_new_tokens):
        for b in range(B):
            res.tokens[b].append(int(nxt[b]))
        if use_mtp:
            # MTP depth 1 at positions mtp_pos..pos-1 pairs h_i with t_{i+1}; t_{pos} = nxt is now known.
            seq_next = nxt[:, None] if pending_h.shape[1] == 1 else torch.cat(
                [prompt[:, mtp_pos + 1:], nxt[:, None]], dim=1)
            mod = model.mtp[0]
            hk = mod(pending_h, model.model.embed_tokens(seq_next), start_pos=mtp_pos, cache=caches[L])
            draft_logits = model.lm_head(mod.shared_head_norm(hk[:, -1]))
            new_draft = draft_logits.argmax(-1)  # drafts token at position pos + 1
            mtp_pos = pos
        if step == max_new_tokens - 1:
            break
        h = model.hidden_states(nxt[:, None], pos, caches[:L])
        hn = model.model.norm(h)
        following = _sample(model.lm_head(hn[:, -1]), temperature, top_k, gen)
        if use_mtp:
            acc = (new_draft == following).float()
            res.mtp_drafts += B
            res.mtp_accepted += int(acc.sum())
            res.per_step_accept.append(float(acc.mean()))
            pending_h = hn
        nxt, pos = following, pos + 1
    return res
