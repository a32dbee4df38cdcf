"""The training lab's knobs and what they become: caps of this server, the knob table (`KNOBS`: URL key, label,
widget kind, options; defaults read from `core.train.APP_DEFAULT` and the `mini` preset), knobs -> (ModelConfig,
TrainConfig) (`lab_config`, raising `LabConfigError` naming the knob), the sample prompt, the "≈ time" estimate
and the run labels / knob summaries. No widgets (the panel that draws the knobs is in app/lab/views.py).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable

from app.lab.worker import DEFAULT_PROMPT  # the sample prompt per dataset when the prompt knob is empty
from core.published import V3_BIAS_UPDATE_SPEED

# ====================================================================== caps (hosted manners)
MAX_STEPS = int(os.environ.get("EVA_LAB_MAX_STEPS", 400))
MAX_TOKENS = int(os.environ.get("EVA_LAB_MAX_TOKENS", 320_000))        # steps × batch × seq_len per run
MAX_SECONDS = float(os.environ.get("EVA_LAB_MAX_SECONDS", 120))         # wall time per run

MODEL = "mini"         # the lab always trains the `mini` preset with the knobs below
MAX_PROMPT_BYTES = 64  # the sample prompt, in UTF-8 bytes (the model is byte-level: one token per byte)

# ====================================================================== knobs
PRECISION_LABELS = {  # the keys are core.train.PRECISIONS (tests/test_app_training.py checks it)
    "fp32": "FP32", "bf16": "BF16", "deepseek-v3": "FP8 deepseek-v3", "deepseek-v3-fp32acc": "FP8 deepseek-v3-fp32acc",
    "deepseek-gemm": "FP8 deepseek-gemm",
    "tensor-current": "FP8 tensor-current", "tensor-delayed": "FP8 tensor-delayed", "hybrid": "FP8 hybrid",
    "mxfp8": "FP8 mxfp8", "rowwise": "FP8 rowwise",
}
#: core.fp8.SWITCHES by name (static so the app starts without torch; tests/test_app_training.py checks it).
FP8_SWITCHES = ("wgrad_128x1", "e5m6_attn_out", "pow2_attn_out", "pow2_dispatch", "swiglu_recompute", "bf16_combine",
                "bf16_moments", "acc14")
FP8_SWITCH_OPTIONS = ("",) + tuple(f"-{s}" for s in FP8_SWITCHES) + tuple(f"+{s}" for s in FP8_SWITCHES)


def switch_label(v: str) -> str:
    return "recipe as named" if not v else (f"without {v[1:]}" if v[0] == "-" else f"with {v[1:]}")
ATTN_LABELS = {"mla": "MLA", "mha": "MHA", "gqa": "GQA", "mqa": "MQA"}
FFN_LABELS = {"moe": "MoE", "dense": "dense"}
BAL_LABELS = {"none": "none", "aux_loss": "aux loss", "aux_free": "aux-loss-free", "both": "both"}
DATA_LABELS = {"synthetic": "synthetic", "pydoc": "pydoc"}


def _g(v) -> str:
    return f"{v:g}"


@dataclass(frozen=True, kw_only=True)
class Knob:
    """One lab knob: URL key, label, widget kind, options, option labels (what the URL holds). Its default is not
    written here: `source` names the field of `core.train.APP_DEFAULT` (or, as "model.<field>", of the `mini`
    preset) that holds it, so the lab and core cannot disagree (see `defaults`)."""
    key: str
    label: str
    kind: str                     # "radio" | "selectbox" | "select_slider" | "toggle" | "text"
    options: tuple = ()
    source: str | None = None     # where the default lives in core; None: an empty text knob
    labels: dict | Callable | None = None
    help: str | None = None
    short: str = ""               # prefix in run labels

    @property
    def default(self) -> Any:
        return defaults()[self.key]

    def fmt(self, v) -> str:
        """The option's label (the value the URL holds)."""
        if self.kind == "toggle":
            return "true" if v else "false"
        if callable(self.labels):
            return self.labels(v)
        if isinstance(self.labels, dict):
            return self.labels[v]
        return str(v)


KNOBS: dict[str, Knob] = {k.key: k for k in [
    Knob(key="tr_attn", label="Attention", kind="radio", options=tuple(ATTN_LABELS), source="attention",
         labels=ATTN_LABELS,
         help="MLA caches a small latent (DeepSeek-V3); MHA a K and V per head; GQA shares K/V between 2 heads; MQA "
              "one K/V for all heads."),
    Knob(key="tr_ffn", label="Feed-forward", kind="radio", options=tuple(FFN_LABELS), source="ffn", labels=FFN_LABELS,
         help="MoE: 1 shared + routed experts after the first (dense) layer, as DeepSeek-V3. dense: a SwiGLU FFN in "
              "every layer."),
    Knob(key="tr_experts", label="Routed experts", kind="select_slider", options=(4, 8, 16, 32),
         source="model.n_routed_experts", short="E",
         help="Routed experts per MoE layer, in up to 4 groups (node-limited routing: a token uses its best half "
              "of the groups)."),
    Knob(key="tr_topk", label="Experts per token (top-k)", kind="select_slider", options=(1, 2, 3, 4, 6, 8),
         source="model.num_experts_per_tok", short="k",
         help="Routed experts each token uses (plus the shared expert). At most half of the routed experts."),
    Knob(key="tr_bal", label="Load balancing", kind="radio", options=tuple(BAL_LABELS), source="balancing",
         labels=BAL_LABELS,
         help="aux-loss-free = DeepSeek-V3's bias controller; aux loss = a sequence-wise balance loss weighted by α; "
              "both = bias + a tiny aux loss; none = nothing counters imbalance (the router may collapse)."),
    Knob(key="tr_gamma", label="Bias update speed γ", kind="select_slider", options=(1e-3, 3e-3, 1e-2, 3e-2),
         source="gamma", labels=_g, short="γ=",
         help=f"V3 used {V3_BIAS_UPDATE_SPEED:g} over thousands of steps; 0.01 lets the controller act within a "
              "short run."),
    Knob(key="tr_alpha", label="Aux loss weight α", kind="select_slider", options=(1e-4, 1e-3, 1e-2, 1e-1),
         source="balance_alpha", labels=_g, short="α=",
         help="Weight of the sequence-wise balance loss (used by 'aux loss' and 'both')."),
    Knob(key="tr_prec", label="Precision", kind="selectbox", options=tuple(PRECISION_LABELS), source="precision",
         labels=PRECISION_LABELS,
         help="FP32; BF16 compute with FP32 master weights; or an emulated FP8 recipe (attention and FFN/expert "
              "GEMM operands quantized as the recipe says; embedding, head and router stay high precision): "
              "deepseek-v3 = the V3 "
              "report's recipe in full (§3.3), deepseek-v3-fp32acc = the same with exact accumulation, deepseek-gemm "
              "= only its FP8 GEMM operands; the others are TransformerEngine / torchao / MX recipes for contrast. "
              "The FP8 page's recipe table lists every tensor of a layer under each."),
    Knob(key="tr_fp8sw", label="FP8 recipe switch", kind="selectbox", options=FP8_SWITCH_OPTIONS, source=None,
         labels=switch_label, short="FP8 ",
         help="Turn one switch of the V3 report's FP8 recipe off (or on) for the chosen FP8 recipe, to see what it "
              "buys: e.g. 'deepseek-v3' without wgrad_128x1, or 'deepseek-gemm' with bf16_moments. The FP8 page's "
              "table says what each switch does to every tensor."),
    Knob(key="tr_mtp", label="Multi-token prediction (MTP)", kind="toggle", source="mtp",
         help="One MTP module that also predicts the token after next (V3 §2.2); its drafts are checked when "
              "sampling."),
    Knob(key="tr_data", label="Dataset", kind="radio", options=tuple(DATA_LABELS), source="dataset",
         labels=DATA_LABELS,
         help="synthetic: four token domains (arithmetic, brackets, copy, sorted) — lets you see experts specialise. "
              "pydoc: English text of Python's bundled documentation."),
    Knob(key="tr_steps", label="Steps", kind="select_slider", options=(25, 50, 100, 125, 150, 200, 300, 400),
         source="steps", short="steps=", help=f"Optimizer steps (this server allows up to {MAX_STEPS})."),
    Knob(key="tr_lr", label="Learning rate", kind="select_slider", options=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
         source="lr", labels=_g, short="lr=",
         help="Peak AdamW learning rate (linear warm-up over 10% of the steps, then cosine decay)."),
    Knob(key="tr_batch", label="Batch (sequences)", kind="select_slider", options=(2, 4, 8, 16, 32),
         source="batch_size", short="batch="),
    Knob(key="tr_seq", label="Sequence length (tokens)", kind="select_slider", options=(16, 32, 64, 128, 256),
         source="seq_len", short="seq="),
    Knob(key="tr_prompt", label="Sample prompt", kind="text",
         help="After training, the model continues this text (160 sampled bytes). Empty: the dataset's default "
              f"prompt. The model reads bytes, so at most {MAX_PROMPT_BYTES} bytes of UTF-8 (an accented letter "
              "is 2, an emoji 4). It does not change the training."),
]}


@functools.lru_cache(maxsize=1)  # one dict, read once (core.train imports torch)
def defaults() -> dict[str, Any]:
    """{knob key: default}, read from core: `core.train.APP_DEFAULT` (the lab's default run) and the `mini` preset.
    `tr_alpha`'s default is the weight 'aux loss' balancing uses when none is given (`balance_alpha`). Imports
    core.train (and torch) on first use, not when the app starts; raises if a default is not one of its options."""
    from core.config import get_preset
    from core.train import APP_DEFAULT

    model = get_preset(MODEL)
    out: dict[str, Any] = {}
    for key, kn in KNOBS.items():
        if kn.source is None:
            out[key] = ""
        elif kn.source.startswith("model."):
            out[key] = getattr(model, kn.source[len("model."):])
        elif kn.source == "balance_alpha":
            out[key] = APP_DEFAULT.replace(balancing="aux_loss", alpha=None).balance_alpha
        else:
            out[key] = getattr(APP_DEFAULT, kn.source)
        if kn.options and out[key] not in kn.options:
            raise ValueError(f"{kn.label}: core's default {out[key]!r} is not one of the knob's options {kn.options}")
    return out


MOE_ONLY = ("tr_experts", "tr_topk", "tr_bal", "tr_gamma", "tr_alpha")
FP8_ONLY = ("tr_fp8sw",)
AFTER_ONLY = ("tr_prompt",)   # knobs of the sampling after training: not part of a run's label


# ====================================================================== knobs -> configs
class LabConfigError(ValueError):
    """An impossible knob combination; `knob` is the knob's label."""

    def __init__(self, knob: str, rule: str):
        self.knob, self.rule = knob, rule
        super().__init__(f"{knob}: {rule}")


_FIELD_KNOB = {"num_experts_per_tok": "tr_topk", "n_group": "tr_experts", "topk_group": "tr_experts",
               "n_routed_experts": "tr_experts", "steps": "tr_steps", "batch_size": "tr_batch",
               "seq_len": "tr_seq", "lr": "tr_lr", "kv_heads": "tr_attn", "balancing": "tr_bal",
               "precision": "tr_prec", "fp8_switches": "tr_fp8sw", "attention": "tr_attn", "ffn": "tr_ffn", "dataset": "tr_data"}


def expert_groups(n_experts: int) -> tuple[int, int]:
    """(n_group, topk_group) for `n_experts`: up to 4 groups of >= 2 experts; a token may use half of them."""
    g = max(1, min(4, n_experts // 2))
    return g, max(1, g // 2)


def sample_prompt(knobs: dict) -> str:
    """The text the trained model continues: the prompt knob, or the dataset's default when it is empty. Raises
    LabConfigError (naming the knob) when it is longer than MAX_PROMPT_BYTES bytes of UTF-8."""
    k = {**defaults(), **knobs}
    p = k.get("tr_prompt") or ""
    if not isinstance(p, str):
        p = str(p)
    label = KNOBS["tr_prompt"].label
    try:
        n = len(p.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate (only a crafted URL can carry one)
        raise LabConfigError(label, "it holds characters that are not valid text; type the prompt again") from None
    if n > MAX_PROMPT_BYTES:
        raise LabConfigError(label, f"{n} bytes of UTF-8 ({len(p)} characters); at most {MAX_PROMPT_BYTES} bytes. The "
                                    "model reads one byte per token, so an accented letter counts 2 and an emoji 4. "
                                    "Shorten it (or clear it for the dataset's default).")
    return p or DEFAULT_PROMPT.get(k["tr_data"], "The ")


def lab_config(knobs: dict, seed: int):
    """(ModelConfig, TrainConfig) for the lab's knobs; raises LabConfigError naming the knob and the rule. (The
    sample prompt is not part of the TrainConfig; it is validated here too, see `sample_prompt`.)"""
    from core.config import ConfigError, get_preset
    from core.train import APP_DEFAULT, TrainConfigError, resolve_model_config

    k = {**defaults(), **knobs}
    steps, batch, seq = int(k["tr_steps"]), int(k["tr_batch"]), int(k["tr_seq"])
    if steps > MAX_STEPS:
        raise LabConfigError(KNOBS["tr_steps"].label, f"this server allows at most {MAX_STEPS} steps per run")
    if steps * batch * seq > MAX_TOKENS:
        raise LabConfigError("Steps × batch × sequence length",
                             f"{steps} × {batch} × {seq} = {steps * batch * seq:,} tokens; this server allows "
                             f"{MAX_TOKENS:,} tokens per run so one run cannot starve the others. Lower one of them.")
    sample_prompt(k)
    base = get_preset(MODEL)
    try:
        if k["tr_ffn"] == "moe":
            e, topk = int(k["tr_experts"]), int(k["tr_topk"])
            g, tg = expert_groups(e)
            if topk > e // 2:
                raise LabConfigError(KNOBS["tr_topk"].label,
                                     f"at most {e // 2} with {e} routed experts (a token may use {tg} of {g} expert "
                                     f"groups of {e // g}); pick more experts or a smaller top-k")
            base = base.replace(n_routed_experts=e, num_experts_per_tok=topk, n_group=g, topk_group=tg)
        bal = k["tr_bal"]
        # APP_DEFAULT gives every field no knob sets (eval_batches, optimizer settings); warm-up over 10% of the
        # steps and six validations per run are the rules its values follow (125 steps: warm-up 12, validation every 20)
        cfg = APP_DEFAULT.replace(
            steps=steps, batch_size=batch, seq_len=seq, lr=float(k["tr_lr"]), warmup=max(1, round(steps / 10)),
            seed=int(seed), dataset=k["tr_data"], balancing=bal if k["tr_ffn"] == "moe" else "none",
            gamma=float(k["tr_gamma"]), alpha=float(k["tr_alpha"]) if bal in ("aux_loss", "both") else None,
            mtp=bool(k["tr_mtp"]), precision=k["tr_prec"], attention=k["tr_attn"], ffn=k["tr_ffn"],
            eval_every=max(1, steps // 6), max_time_s=MAX_SECONDS)
        sw = k.get("tr_fp8sw") or ""
        if sw and cfg.fp8_recipe is not None:  # one switch flipped relative to the named recipe
            from core.fp8 import flip_switch, switches_of
            try:
                cfg = cfg.replace(fp8_switches=switches_of(flip_switch(cfg.fp8_recipe, sw)))
            except ValueError as e:
                raise TrainConfigError("fp8_switches", str(e).removeprefix("fp8_switches: ")) from None
        mcfg = resolve_model_config(base, cfg)
    except ConfigError as e:
        kn = KNOBS.get(_FIELD_KNOB.get(e.field, ""))
        raise LabConfigError(kn.label if kn else e.field, e.rule) from e
    except TrainConfigError as e:
        kn = KNOBS.get(_FIELD_KNOB.get(e.knob, ""))
        raise LabConfigError(kn.label if kn else e.knob, str(e).split(": ", 1)[-1]) from e
    return mcfg, cfg


# Seconds per step and per trained token of the default model on one core, and cost multipliers; only for the
# "≈ time" hint before a run. Fitted to runs of 2x32, 8x64 and 16x128 tokens per step on a 2-core AMD Zen 5 with
# fp32 GEMMs on oneDNN (core.gemm; within ~15% across that range): fp32 17 s for the default run, bf16 0.76x,
# FP8 recipes (emulated) ~3x, no MTP 0.75x. deepseek-v3 ~6x and deepseek-v3-fp32acc ~4.5x the fp32 step (8x64
# tokens, 1 thread, measured on the shared 2-core box while busy, so only the ratio is meant). Each finished run
# recalibrates this server's ratio (speed_ratio).
_S_PER_STEP, _S_PER_TOKEN = 0.045, 0.00015
_FACTOR = {"bf16": 0.76, "fp32": 1.0, "deepseek-v3": 6.0, "deepseek-v3-fp32acc": 4.5}


def _cost_factor(cfg) -> float:
    f = _FACTOR.get(cfg.precision, 3.0)
    return f * (1.0 if cfg.mtp else 0.75)


def model_seconds(cfg) -> float:
    """Predicted seconds of a run on the reference server (a fixed cost per step plus a cost per token)."""
    per_step = (_S_PER_STEP + _S_PER_TOKEN * cfg.batch_size * cfg.seq_len) * _cost_factor(cfg)
    return cfg.steps * per_step * (1 + 2 * cfg.eval_batches / max(cfg.eval_every, 1) / 3)


def estimate_seconds(cfg, mgr: "RunManager | None" = None) -> float:
    """≈ wall time of a run: the model above times this server's measured speed ratio (from finished runs)."""
    return 0.3 + model_seconds(cfg) * (getattr(mgr, "speed_ratio", None) or 1.0)


UNCALIBRATED_SLOWDOWN = 2.5  # a shared server with a browser open ran the default run 2.4x the reference time


def estimate_text(cfg, mgr: "RunManager | None" = None) -> str:
    """The run-time hint shown before Start: from this server's finished runs once there are any, else the
    reference figure as a range (this server's speed is not known yet)."""
    est = estimate_seconds(cfg, mgr)
    if getattr(mgr, "speed_ratio", None):
        return f"≈ {est:.0f} s on this server (timed from its earlier runs)"
    return (f"about {est:.0f}–{est * UNCALIBRATED_SLOWDOWN:.0f} s (timed on a reference 2-core machine; this "
            "server's first run calibrates the estimate)")


def knob_summary(knobs: dict) -> list[str]:
    """['Attention = MHA', 'Sample prompt = `12+`', ...]: every knob that differs from its default, in panel order
    (Markdown; text knobs as code, so a typed value cannot format the message)."""
    out = []
    for key, kn in KNOBS.items():
        v = knobs.get(key, kn.default)
        if v != kn.default:
            out.append(f"{kn.label} = " + (code_span(str(v)) if kn.kind == "text" else f"**{kn.fmt(v)}**"))
    return out


def run_label(knobs: dict, number: int) -> str:
    """'#2 FP8 deepseek, MHA' — the knobs that differ from the lab's defaults."""
    k = {**defaults(), **knobs}
    bits = []
    for key, kn in KNOBS.items():
        if key in AFTER_ONLY or key in MOE_ONLY and k["tr_ffn"] == "dense":
            continue
        if key in FP8_ONLY and k["tr_prec"] in ("fp32", "bf16"):
            continue
        if key == "tr_gamma" and k["tr_bal"] not in ("aux_free", "both"):
            continue
        if key == "tr_alpha" and k["tr_bal"] not in ("aux_loss", "both"):
            continue
        if k[key] != kn.default:
            if kn.kind == "toggle":
                bits.append(f"{'MTP' if k[key] else 'no MTP'}")
            elif key == "tr_bal":
                bits.append(f"balancing {kn.fmt(k[key])}")
            else:
                bits.append(f"{kn.short}{kn.fmt(k[key])}")
    return f"#{number} " + (", ".join(bits) if bits else "default")



def code_span(text: str) -> str:
    """`text` as a Markdown inline code span, whatever backticks it holds (CommonMark: a longer fence)."""
    import re
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"
