"""Evaluation and sampling of a (trained) DeepSeek-V3: validation loss, domain x expert routing, text samples.

Used by `core.train.TrainRun` after or during a run and by the app's training lab; none of them changes the
model (each restores `model.training`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.data import TOKENIZER, TokenDataset
from core.model import DeepSeekV3, generate
from core.moe import MoE

__all__ = ["evaluate", "domain_expert_matrix", "sample_text"]


@torch.no_grad()
def evaluate(model: DeepSeekV3, data: TokenDataset, batch_size: int = 16, seq_len: int = 128,
             num_batches: int | None = 4, split: str = "val") -> float:
    """Mean next-token cross-entropy (nats per token = per byte) over fixed evaluation windows.

    `num_batches=None` covers every non-overlapping window of the split (the full validation loss).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = model.lm_head.weight.device
    for x, y, _ in data.eval_batches(batch_size, seq_len, num_batches, split):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                       reduction="sum"))
        count += y.numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def domain_expert_matrix(model: DeepSeekV3, data: TokenDataset, batch_size: int = 16, seq_len: int = 128,
                         num_batches: int | None = 8, split: str = "val") -> dict:
    """Which experts each domain's tokens are routed to, per MoE layer of the main model.

    Runs fixed windows of a labelled dataset (`core.data.synthetic_dataset`) and counts, for every
    (domain d, expert e), the token slots of domain-d tokens assigned to expert e. Returns
      {"domains": [names], "layers": [layer indices], "counts": [L, D, E] int64,
       "fractions": [L, D, E] float (each row sums to 1: where a domain's slots go),
       "relative": [L, D, E] float (fraction * E: 1 = the uniform share, V3 Fig. 9 "relative expert load")}.
    """
    if not data.labelled:
        raise ValueError(f"data: dataset {data.name!r} has no domain labels; use the synthetic dataset")
    moes = model.moe_layers()
    layer_ids = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)]
    n_dom = len(data.domain_names)
    n_exp = model.config.n_routed_experts
    counts = torch.zeros(len(moes), n_dom, n_exp, dtype=torch.long)
    was_training = model.training
    model.eval()
    for x, _, doms in data.eval_batches(batch_size, seq_len, num_batches, split):
        model(x.to(model.lm_head.weight.device))
        d = doms.reshape(-1, 1)
        for li, moe in enumerate(moes):
            idx = moe.last_routing.indices.cpu()  # [B*T, K]
            flat = (d * n_exp + idx).reshape(-1)
            counts[li] += torch.bincount(flat, minlength=n_dom * n_exp).view(n_dom, n_exp)
    model.train(was_training)
    frac = counts.double() / counts.sum(-1, keepdim=True).clamp(min=1)
    return {"domains": list(data.domain_names), "layers": layer_ids, "counts": counts,
            "fractions": frac.float(), "relative": (frac * n_exp).float()}


def sample_text(model: DeepSeekV3, prompt: str = "", n: int = 200, temperature: float = 0.8, seed: int = 0,
                top_k: int | None = None) -> dict:
    """Generate `n` bytes after `prompt` (default "\\n") with `core.model.generate` (KV-cached, MTP drafts
    measured). Returns {"prompt", "completion", "text", "tokens", "mtp_drafts", "mtp_accepted",
    "mtp_acceptance" (None without MTP)}."""
    ids = TOKENIZER.encode(prompt or "\n")
    p = torch.tensor([ids], dtype=torch.long, device=model.lm_head.weight.device)
    res = generate(model, p, n, temperature=temperature, top_k=top_k, seed=seed)
    completion = TOKENIZER.decode(res.tokens[0])
    return {"prompt": prompt, "completion": completion, "text": prompt + completion, "tokens": res.tokens[0],
            "mtp_drafts": res.mtp_drafts, "mtp_accepted": res.mtp_accepted,
            "mtp_acceptance": res.acceptance if res.mtp_drafts else None}
