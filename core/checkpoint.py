"""Hugging Face-format checkpoints: `load_hf(path)` and `save_hf(model, path)` (safetensors only).

A checkpoint folder holds `config.json` and one or more `*.safetensors` files (optionally indexed by
`model.safetensors.index.json`). Two tensor namings are understood:

* published DeepSeek-V3 naming (per-expert): `model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight`
* transformers v5 fused naming: `model.layers.{i}.mlp.experts.gate_up_proj` [E, 2I, H] and
  `model.layers.{i}.mlp.experts.down_proj` [E, H, I]

FP8 checkpoints (`quantization_config.quant_method == "fp8"`): every E4M3 `X.weight` comes with
`X.weight_scale_inv` (fp32, one per 128×128 block, as the official DeepSeek-V3 README_WEIGHTS describes) and is
dequantized on load (W = W_fp8 · scale per block, as the official `inference/fp8_cast_bf16.py`).

The MTP module is stored as `model.layers.{L + k}` (L = num_hidden_layers) with `enorm`, `hnorm`, `eh_proj`,
`shared_head.norm`, `shared_head.head`, `embed_tokens` and an ordinary decoder block; here it is `mtp.{k}`.
Its `embed_tokens` / `shared_head.head` copies are shared with the main model (V3 report §2.2) and are
checked for equality on load, not kept twice.

Never unpickles anything: `.bin` / `.pt` files are refused.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.config import ConfigError, ModelConfig
from core.model import DeepSeekV3

_EXPERT = re.compile(r"^(?P<pre>.*\.mlp\.experts)\.(?P<j>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(?P<i>\d+)\.(?P<rest>.+)$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says which file or tensor and why."""


# ---------------------------------------------------------------------------------------------- reading
def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, TypeError, KeyError, AttributeError):
            raise CheckpointError(f"{index.name}: not a valid index (needs a JSON object with a weight_map)") from None
        root = folder.resolve()
        files = []
        for n in names:
            f = (folder / str(n)).resolve()
            # the index is user-supplied: it may only name files inside the checkpoint folder
            if not isinstance(n, str) or f.parent != root:
                raise CheckpointError(f"{index.name}: {str(n)[:80]!r} is not a file inside the checkpoint folder")
            files.append(f)
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        hint = f" (found {pickles}: pickle formats are refused — convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{folder}: no *.safetensors files{hint}")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f.name}: listed in the index but missing")
    return files


def read_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, with FP8 weights dequantized to float32."""
    folder = Path(folder)
    raw: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(folder):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    raw[k] = fh.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f.name}: not a readable safetensors file ({e})") from None
    return dequantize_fp8_state(raw)


def dequantize_fp8_state(raw: dict[str, torch.Tensor], block_size: int = 128) -> dict[str, torch.Tensor]:
    """Replace every (`X.weight` fp8, `X.weight_scale_inv`) pair by the float32 weight (128×128 blocks)."""
    from core.fp8 import dequantize

    out = {}
    for k, t in raw.items():
        if k.endswith("_scale_inv"):
            continue
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            s = raw.get(k + "_scale_inv")
            if s is None:
                raise CheckpointError(f"{k}: FP8 weight without {k}_scale_inv")
            t = dequantize(t, s.float(), "block", block_size)
        out[k] = t
    return out


def hf_to_eva(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map transformers / published tensor names to `DeepSeekV3` state-dict names (stacking per-expert weights)."""
    L = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    shared_copies: dict[str, torch.Tensor] = {}
    for k, t in state.items():
        m = _LAYER.match(k)
        if m and int(m["i"]) >= L:  # MTP module k = i - L
            depth, rest = int(m["i"]) - L, m["rest"]
            if depth >= cfg.num_nextn_predict_layers:
                raise CheckpointError(f"{k}: MTP layer {depth} but num_nextn_predict_layers = "
                                      f"{cfg.num_nextn_predict_layers}")
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                shared_copies[k] = t
                continue
            if rest == "shared_head.norm.weight":
                k = f"mtp.{depth}.shared_head_norm.weight"
            elif rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
                k = f"mtp.{depth}.{rest}"
            else:
                k = f"mtp.{depth}.block.{rest}"
        e = _EXPERT.match(k)
        if e:
            experts.setdefault(e["pre"], {}).setdefault(e["proj"], {})[int(e["j"])] = t
            continue
        out[k] = t
    for pre, projs in experts.items():
        n = cfg.n_routed_experts
        for proj in ("gate_proj", "up_proj", "down_proj"):
            got = projs.get(proj, {})
            if sorted(got) != list(range(n)):
                missing = sorted(set(range(n)) - set(got))[:5]
                raise CheckpointError(f"{pre}: {proj} missing for experts {missing} (expected {n} experts)")
        gate = torch.stack([projs["gate_proj"][j] for j in range(n)])
        up = torch.stack([projs["up_proj"][j] for j in range(n)])
        out[f"{pre}.gate_up_proj"] = torch.cat([gate, up], dim=1)  # [E, 2I, H]: gate rows, then up rows
        out[f"{pre}.down_proj"] = torch.stack([projs["down_proj"][j] for j in range(n)])  # [E, H, I]
    main_embed = out.get("model.embed_tokens.weight")
    for k, t in shared_copies.items():
        ref = main_embed if k.endswith("embed_tokens.weight") else out.get("lm_head.weight", main_embed)
        if ref is not None and (ref.shape != t.shape or not torch.equal(ref.to(t.dtype), t)):
            raise CheckpointError(f"{k}: MTP copy differs from the main model's; Eva shares embedding and head")
    return out


def load_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, strict: bool = True) -> DeepSeekV3:
    """Build a `DeepSeekV3` from a Hugging Face-format folder (config.json + *.safetensors)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: config.json missing")
    cfg = ModelConfig.from_hf(folder / "config.json")
    raw = read_tensors(folder)
    notes = []
    L = cfg.num_hidden_layers
    if cfg.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{L}.") for k in raw):
        # transformers' DeepseekV3ForCausalLM has no MTP module and saves none: load without it.
        notes.append(f"config.json declares {cfg.num_nextn_predict_layers} MTP module(s) but the checkpoint has "
                     "no model.layers.{L}.* tensors: loaded without MTP")
        cfg = cfg.replace(num_nextn_predict_layers=0)
    state = hf_to_eva(raw, cfg)
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    unexpected = [k for k in state if k not in expected]
    if strict and (missing or unexpected):
        raise CheckpointError(f"tensor names do not match the config: missing {missing[:8]}"
                              f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                              f"{'...' if len(unexpected) > 8 else ''}")
    for k, t in state.items():
        if k in expected and tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{k}: shape {tuple(t.shape)} in the checkpoint, {tuple(expected[k].shape)} "
                                  "expected from config.json")
    model = model.to_empty(device="cpu")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        if "model.embed_tokens.weight" in state:
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    # keep the router bias in fp32 (official commit 4592be4) whatever the model dtype
    state = {k: (t.float() if k.endswith("e_score_correction_bias") else t.to(dtype)) for k, t in state.items()}
    model.load_state_dict(state, strict=strict, assign=False)
    if dtype != torch.float32:
        model = model.to(dtype)
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias") and mod.e_score_correction_bias is not None:
                mod.e_score_correction_bias.data = mod.e_score_correction_bias.data.float()
    model.eval()
    model.load_notes = notes
    return model


# ---------------------------------------------------------------------------------------------- writing
def eva_to_hf(model: DeepSeekV3, fused_experts: bool = False) -> dict[str, torch.Tensor]:
    """`DeepSeekV3` state dict -> published naming (per-expert; MTP as model.layers.{L+k}).

    fused_experts=True keeps transformers v5's fused `experts.gate_up_proj` / `experts.down_proj` instead.
    """
    cfg = model.config
    L = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for k, t in model.state_dict().items():
        t = t.detach().contiguous()
        if k.startswith("mtp."):
            _, depth, rest = k.split(".", 2)
            pre = f"model.layers.{L + int(depth)}"
            if rest == "shared_head_norm.weight":
                k = f"{pre}.shared_head.norm.weight"
            elif rest.startswith("block."):
                k = f"{pre}.{rest[len('block.'):]}"
            else:
                k = f"{pre}.{rest}"
        if not fused_experts and k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len(".gate_up_proj")]
            inter = t.shape[1] // 2
            for j in range(t.shape[0]):
                out[f"{pre}.{j}.gate_proj.weight"] = t[j, :inter].clone()
                out[f"{pre}.{j}.up_proj.weight"] = t[j, inter:].clone()
            continue
        if not fused_experts and k.endswith("mlp.experts.down_proj"):
            pre = k[: -len(".down_proj")]
            for j in range(t.shape[0]):
                out[f"{pre}.{j}.down_proj.weight"] = t[j].clone()
            continue
        out[k] = t
    for depth in range(len(model.mtp)):
        pre = f"model.layers.{L + depth}"
        out[f"{pre}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[f"{pre}.shared_head.head.weight"] = out.get("lm_head.weight", out["model.embed_tokens.weight"]).clone()
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def save_hf(model: DeepSeekV3, path: str | os.PathLike, fused_experts: bool = False, fp8: bool = False) -> Path:
    """Write `config.json` + `model.safetensors` in the published naming (transformers loads it).

    fp8=True stores every 2-D Linear weight of attention / FFN / experts as E4M3 with a `weight_scale_inv`
    per 128×128 block and adds the published `quantization_config` (embedding, head, router, norms stay
    high precision, as in the released DeepSeek-V3 weights).
    """
    from core.fp8 import quantize

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = eva_to_hf(model, fused_experts=fused_experts)
    cfg = model.config.to_hf()
    cfg.pop("quantization_config", None)
    if fp8:
        q_state = {}
        for k, t in tensors.items():
            quantizable = (t.dim() == 2 and k.endswith("_proj.weight") and ".mlp.gate." not in k
                           and "shared_head" not in k)
            if quantizable:
                q, s = quantize(t.float(), "e4m3", "block", 128)
                q_state[k] = q
                q_state[k + "_scale_inv"] = s.float().contiguous()
            else:
                q_state[k] = t
        tensors = q_state
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]}
    cfg["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


__all__ = ["load_hf", "save_hf", "read_tensors", "hf_to_eva", "eva_to_hf", "CheckpointError", "ConfigError"]
