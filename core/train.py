"""Training engine for small DeepSeek-V3 variants on CPU: short, fast, reproducible runs.

    run = train(PRESETS["mini"], TrainConfig(steps=125))      # an iterator of per-step records
    for rec in run:                                           # stoppable between steps (`stop=`)
        print(rec["step"], rec["loss"], rec["max_vio"])
    run.model, run.records, run.evaluate(), run.sample_text("The "), run.domain_expert_matrix()

One step (`TrainRun.step`):
  1. a batch of random windows from `core.data` (a torch.Generator seeded from `seed`);
  2. forward + loss = LM cross-entropy + MTP loss (lambda / D * sum_k L_k, V3 eqs. 24-25, when `mtp`)
     + alpha * sum over MoE layers of the sequence-wise balance loss (V3 eqs. 17-20, when `balancing` is
     "aux_loss" / "both") + z_loss * sum over MoE layers of the router z-loss (ST-MoE, when `z_loss` > 0);
  3. backward, gradient-norm clipping, AdamW with linear warm-up then cosine decay to `min_lr`;
  4. aux-loss-free balancing (V3 §2.1.2, LFB Alg. 1): after the optimizer step, every MoE router's
     `e_score_correction_bias` moves by gamma * sign(mean load - load_i) using THIS step's loads, outside
     autograd (when `balancing` is "aux_free" / "both");
  5. a record (see `RECORD_FIELDS`).
A non-finite loss or gradient norm stops the run before the optimizer step: `TrainingDiverged` is raised
(its `.record` is the final record, with an `error` message, also appended to `run.records`).

Precision: "fp32"; "bf16" = bf16 compute with fp32 master weights (the model's parameters are bf16 for the
forward/backward; `core.optim.AdamW` keeps fp32 master copies, updates them from the bf16 gradients and rounds
them back into the parameters, on CUDA in one Triton pass a parameter; the router, its bias,
RMSNorm statistics, the expert-output sum and the losses stay fp32; attention probabilities are bf16 with fp32
accumulation inside the softmax); or an FP8 recipe name from `core.fp8.RECIPES`
(emulated FP8 GEMMs via `core.fp8.convert_to_fp8`, fp32 master weights, AdamW moments in BF16 when the recipe's
`optimizer_moments` is "bf16" (`core.optim.AdamW`); per-step overflow counts in the record).

Device: `device` "cpu" (default), "cuda" or "auto" (the CLI's default). The model is initialised on the CPU (same
weights on every device) and moved; batches, evaluation and sampling follow it. On CUDA a recipe the GPU path
implements ("deepseek-gemm", see `core.cuda.fp8_linear.gpu_recipe_issues`) runs real FP8 GEMMs on bf16 working weights
with fp32 masters (no per-step FP8 statistics: the record's `fp8` is None); other recipes stay emulated.

Determinism: the model init (`torch.manual_seed(seed)`), the data stream and the batches all derive from
`seed`; every op used is deterministic on CPU, so the same settings give bit-identical losses (same machine
and thread count).

Evaluation and sampling helpers live in `core.evaluate`; the CLI (`python -m core.train --preset mini --steps 300
--json run.json`) in `core.cli`; the distributed run (a `TrainRun` subclass) in `core.parallel.trainer`.
(About 600 lines: `TrainConfig` with one validated field per knob is ~140 of them and `TrainRun` ~220; the step
stays in one class so that the distributed run overrides its hooks instead of copying it.)
"""
from __future__ import annotations

import dataclasses
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from core import gemm
from core.checkpoint import save_hf
from core.compile import block_status, compile_blocks, cpp_compiler, cuda_opt_in
from core.config import ATTENTION_TYPES, ModelConfig, get_preset
from core.cuda.device import DEVICES, resolve_device
from core.data import DATASETS, TOKENIZER, TokenDataset, get_dataset
from core.evaluate import domain_expert_matrix, evaluate, sample_text
from core.fp8 import RECIPE_ALIASES, RECIPES, FP8Recipe, get_recipe, with_switches
from core.model import DeepSeekV3
from core.moe import MoE, load_metrics, router_z_loss, sequence_balance_loss, update_bias
from core.optim import AdamW
from core.rng import seeded

__all__ = [
    "TrainConfig", "TrainConfigError", "TrainingDiverged", "TrainRun", "train", "build_model", "resolve_model_config",
    "lr_at", "warm_up", "APP_DEFAULT", "BALANCING", "PRECISIONS", "FFNS", "RECORD_FIELDS",
]

BALANCING = ("none", "aux_loss", "aux_free", "both")
PRECISIONS = ("fp32", "bf16") + tuple(RECIPES)
FFNS = ("moe", "dense")
# Default sequence-wise balance-loss weight when `alpha` is None: 1e-3 alone (the Loss-Free Balancing paper's
# aux-loss baseline, LFB §4.1), 1e-4 next to the bias controller (V3 report §4.2: "extremely small").
DEFAULT_ALPHA = {"aux_loss": 1e-3, "both": 1e-4}

#: Keys of every step record (values None when they do not apply, e.g. `val_loss` between evaluations):
#: step (1-based); loss (total optimised), lm_loss, mtp_loss (lambda-weighted), balance_loss (unweighted
#: sequence-wise L_Bal, mean over the main MoE layers; 1 = balanced), aux_loss (the alpha-weighted term added to
#: the loss), z_loss (unweighted router z-loss, mean over main MoE layers); val_loss (nats/byte on fixed
#: held-out windows, every `eval_every` steps and at the last); lr (this step's); grad_norm (before clipping);
#: tokens_per_s (this step, evaluation excluded); tokens (trained so far); elapsed_s (since the run started);
#: expert_loads [layer][expert] token-slot counts of this batch (main MoE layers); max_vio (MaxVio_batch, mean
#: over those layers) and max_vio_layers; router_bias [layer][expert] after this step's update; fp8 (FP8Stats
#: summary: overflow_count, flushed_to_zero_count, amax_max, ... for FP8 recipes, else None); fp32_gemm (the library
#: that ran fp32 CPU GEMMs and why: `core.gemm.choice()`); compiled (None: the blocks ran eager; else the compiled
#: blocks, training forwards run compiled / eager so far, compiler errors: `core.compile.block_status`); error (set only on the final record of a diverged run).
RECORD_FIELDS = (
    "step", "loss", "lm_loss", "mtp_loss", "balance_loss", "aux_loss", "z_loss", "val_loss", "lr", "grad_norm",
    "tokens_per_s", "tokens", "elapsed_s", "expert_loads", "max_vio", "max_vio_layers", "router_bias", "fp8",
    "fp32_gemm", "compiled", "error",
)


class TrainConfigError(ValueError):
    """An invalid training setting; the message starts with the knob's name."""

    def __init__(self, knob: str, rule: str):
        self.knob = knob
        super().__init__(f"{knob}: {rule}")


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN/inf; `.record` is the final record (with `error`)."""

    def __init__(self, message: str, record: dict | None = None):
        super().__init__(message)
        self.record = record


def _h(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """Every knob of a training run (defaults = the issue's 300-step pydoc recipe on the `mini` model).

    `alpha` None means 1e-3 for balancing="aux_loss" and 1e-4 for "both" (V3's value); it is ignored for
    "none"/"aux_free". `gamma` is the bias update speed of aux-loss-free balancing (V3: 1e-3; short runs on
    the app use a larger one). `kv_heads` sets the K/V heads for attention="gqa" (default: heads // 2).
    `eval_every` 0 disables validation; otherwise it runs every `eval_every` steps and at the last step.
    `max_time_s` stops the run (between steps) once that much wall time has passed.
    """

    steps: int = _h("optimizer steps", default=300)
    batch_size: int = _h("sequences per batch", default=16)
    seq_len: int = _h("tokens per sequence", default=128)
    lr: float = _h("peak learning rate (AdamW)", default=3e-3)
    betas: tuple[float, float] = _h("AdamW betas", default=(0.9, 0.95))
    weight_decay: float = _h("AdamW decoupled weight decay (matrices and embeddings only)", default=0.1)
    warmup: int = _h("linear warm-up steps", default=30)
    min_lr: float = _h("learning rate at the end of the cosine decay", default=0.0)
    grad_clip: float = _h("max global gradient norm (0 = no clipping)", default=1.0)
    seed: int = _h("seed for init, data and batches", default=0)
    dataset: str = _h(f"one of {DATASETS}", default="pydoc")
    balancing: str = _h(f"one of {BALANCING}", default="aux_free")
    gamma: float = _h("aux-loss-free bias update speed", default=1e-3)
    alpha: float | None = _h("sequence-wise balance loss weight (None: 1e-3 aux_loss, 1e-4 both)", default=None)
    z_loss: float = _h("router z-loss coefficient", default=0.0)
    mtp: bool = _h("multi-token prediction module on/off", default=True)
    mtp_lambda: float = _h("MTP loss weight lambda", default=0.3)
    precision: str = _h(f"one of {PRECISIONS}", default="fp32")
    fp8_switches: tuple[str, ...] | None = _h("FP8 recipe switches that are on (core.fp8.SWITCHES; the others off); "
                                              "None: the recipe as named", default=None)
    fp8_experts: bool = _h("CUDA FP8 GEMM path: the routed experts' GEMMs in FP8 too, one FP8 GEMM per expert "
                           "(slower with many small experts; off: bf16 grouped GEMMs). The emulated recipes always "
                           "quantize the experts", default=False)
    attention: str = _h(f"one of {ATTENTION_TYPES}", default="mla")
    kv_heads: int | None = _h("K/V heads for attention=gqa (default heads // 2)", default=None)
    ffn: str = _h(f"one of {FFNS}", default="moe")
    eval_every: int = _h("validate every N steps (0 = never)", default=50)
    eval_batches: int = _h("validation batches per evaluation", default=4)
    log_every: int = _h("CLI: write/print a record every N steps", default=1)
    max_time_s: float | None = _h("stop after this many seconds", default=None)
    device: str = _h(f"one of {DEVICES} (auto: cuda when a GPU is visible)", default="cpu")
    compile: bool = _h("torch.compile the decoder blocks' training forward (core.compile; CPU needs a C++ "
                       "compiler; fp32 / bf16 only; pays off only for long runs: docs/performance.md)", default=False)

    def __post_init__(self):
        self.validate()

    @property
    def balance_alpha(self) -> float:
        """The balance-loss weight actually used (0 unless balancing uses the aux loss)."""
        if self.balancing not in DEFAULT_ALPHA:
            return 0.0
        return DEFAULT_ALPHA[self.balancing] if self.alpha is None else float(self.alpha)

    @property
    def fp8_recipe(self) -> FP8Recipe | None:
        """The FP8 recipe this run trains with (the named one with `fp8_switches` applied), None for fp32/bf16."""
        if self.precision not in RECIPES:
            return None
        r = get_recipe(self.precision)
        return r if self.fp8_switches is None else with_switches(r, self.fp8_switches)

    @property
    def uses_bias_update(self) -> bool:
        return self.balancing in ("aux_free", "both")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise TrainConfigError naming the knob for every impossible value."""
        def integer(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TrainConfigError(name, f"must be an integer, got {v!r}")
            if v < lo:
                raise TrainConfigError(name, f"must be >= {lo}, got {v}")

        def number(name, lo=0.0, strict=False, hi=None, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TrainConfigError(name, f"must be a finite number, got {v!r}")
            if (v <= lo) if strict else (v < lo):
                raise TrainConfigError(name, f"must be {'>' if strict else '>='} {lo}, got {v}")
            if hi is not None and v > hi:
                raise TrainConfigError(name, f"must be <= {hi}, got {v}")

        def choice(name, options):
            if getattr(self, name) not in options:
                raise TrainConfigError(name, f"must be one of {options}, got {getattr(self, name)!r}")

        for name, lo in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("warmup", 0), ("seed", 0),
                         ("eval_every", 0), ("eval_batches", 1), ("log_every", 1)):
            integer(name, lo)
        number("lr", strict=True)
        number("weight_decay")
        number("min_lr", hi=self.lr)
        number("grad_clip")
        number("gamma")
        number("alpha", optional=True)
        number("z_loss")
        number("mtp_lambda")
        number("max_time_s", strict=True, optional=True)
        b = self.betas
        if (not isinstance(b, (tuple, list)) or len(b) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in b)):
            raise TrainConfigError("betas", f"must be two numbers in [0, 1), got {b!r}")
        self.betas = (float(b[0]), float(b[1]))
        choice("dataset", DATASETS)
        choice("balancing", BALANCING)
        self.precision = RECIPE_ALIASES.get(self.precision, self.precision)  # old names of renamed recipes
        choice("precision", PRECISIONS)
        if self.fp8_switches is not None:
            if isinstance(self.fp8_switches, str) or not all(isinstance(s, str) for s in self.fp8_switches):
                raise TrainConfigError("fp8_switches", f"must be a list of switch names, got {self.fp8_switches!r}")
            if self.precision not in RECIPES:
                raise TrainConfigError("fp8_switches", f"apply to an FP8 recipe, not precision={self.precision!r}")
            self.fp8_switches = tuple(self.fp8_switches)
            try:
                self.fp8_recipe
            except ValueError as e:
                raise TrainConfigError("fp8_switches", str(e).removeprefix("fp8_switches: ")) from None
        choice("attention", ATTENTION_TYPES)
        choice("ffn", FFNS)
        choice("device", DEVICES)
        try:
            resolve_device(self.device)
        except ValueError as e:
            raise TrainConfigError("device", str(e).split(": ", 1)[1]) from None
        if not isinstance(self.mtp, bool):
            raise TrainConfigError("mtp", f"must be true or false, got {self.mtp!r}")
        if self.mtp and self.mtp_lambda == 0:
            raise TrainConfigError("mtp_lambda", "must be > 0 when mtp is on (turn mtp off to train without MTP)")
        if self.kv_heads is not None:
            integer("kv_heads", 1)
        if not isinstance(self.fp8_experts, bool):
            raise TrainConfigError("fp8_experts", f"must be true or false, got {self.fp8_experts!r}")
        if self.fp8_experts and self.precision not in RECIPES:
            raise TrainConfigError("fp8_experts", f"runs the experts in FP8 and needs an FP8 --precision, got "
                                                  f"precision={self.precision!r}")
        if self.fp8_experts and not gpu_fp8(self):  # else it would be silently ignored
            raise TrainConfigError("fp8_experts", "puts the routed experts on the CUDA FP8 GEMM path, which needs "
                                                  "--device cuda (or auto on a GPU) and a recipe that path runs "
                                                  "(deepseek-gemm); elsewhere the emulated recipe already quantizes "
                                                  f"the experts (device={self.device!r}, precision={self.precision!r})")
        if not isinstance(self.compile, bool):
            raise TrainConfigError("compile", f"must be true or false, got {self.compile!r}")
        if self.compile and self.precision not in ("fp32", "bf16"):
            raise TrainConfigError("compile", f"compiles fp32 and bf16 runs only; precision={self.precision!r} "
                                              "(an FP8 recipe) runs eager: leave --compile off")
        if self.compile and resolve_device(self.device).type == "cpu" and cpp_compiler() is None:
            raise TrainConfigError("compile", "on the CPU torch.compile needs a C++ compiler (g++ / clang++ on PATH, "
                                              "or $CXX); none was found: install one or leave --compile off")


#: The training lab's default run: the `mini` model (MLA, MoE, MTP, fp32) on the synthetic domains, 125 steps of
#: 4 x 64 tokens, with a bias speed large enough for the aux-loss-free controller to act within a short run. It is
#: GEMM-bound, so its time is its tokens: 4 sequences (not 8) and 125 steps (not 150) keep it under 20 s on one core
#: of a 2-core host, results included, with the same validation loss, MaxVio contrast and expert specialisation within
#: seed-to-seed noise (timings and the comparison: docs/performance.md, bench/default_quality.py). Warm-up and
#: validation follow the lab's rules (`app.lab.knobs.lab_config`): 10% of the steps, six validations per run.
APP_DEFAULT = TrainConfig(steps=125, batch_size=4, seq_len=64, lr=3e-3, warmup=12, dataset="synthetic",
                          balancing="aux_free", gamma=1e-2, eval_every=20, eval_batches=2)


# ---------------------------------------------------------------------------------------------- model
def resolve_model_config(model_cfg: ModelConfig | str, cfg: TrainConfig) -> ModelConfig:
    """The model config a run trains: `model_cfg` (or a preset name) with the run's attention/FFN/MTP knobs."""
    base = get_preset(model_cfg) if isinstance(model_cfg, str) else model_cfg
    changes: dict = {"attention_type": cfg.attention}
    if cfg.attention == "gqa":
        kv = cfg.kv_heads or max(1, base.num_attention_heads // 2)
        if base.num_attention_heads % kv:
            raise TrainConfigError("kv_heads", f"must divide num_attention_heads ({base.num_attention_heads}), "
                                               f"got {kv}")
        changes["num_key_value_heads"] = kv
    if cfg.ffn == "dense":
        changes["first_k_dense_replace"] = base.num_hidden_layers
    changes["num_nextn_predict_layers"] = max(1, base.num_nextn_predict_layers) if cfg.mtp else 0
    mcfg = base.replace(**changes)
    if mcfg.vocab_size < TOKENIZER.vocab_size:
        raise TrainConfigError("vocab_size", f"byte-level data needs vocab_size >= 256, got {mcfg.vocab_size}")
    if cfg.seq_len > mcfg.max_position_embeddings:
        raise TrainConfigError("seq_len", f"must be <= max_position_embeddings ({mcfg.max_position_embeddings}), "
                                          f"got {cfg.seq_len}")
    if cfg.uses_bias_update and mcfg.n_routed_experts and not mcfg.uses_bias_routing:
        raise TrainConfigError("balancing", f"{cfg.balancing!r} needs topk_method='noaux_tc' (the router bias), "
                                            f"got {mcfg.topk_method!r}")
    return mcfg


def gpu_fp8(cfg: TrainConfig) -> bool:
    """True when `cfg` trains with real FP8 GEMMs (core.cuda.fp8_linear): CUDA and a recipe the GPU path
    implements (`core.cuda.fp8_linear.gpu_recipe_issues`); other recipes run emulated on any device."""
    if cfg.fp8_recipe is None or resolve_device(cfg.device).type != "cuda":
        return False
    from core.cuda.fp8_linear import gpu_recipe_issues
    return not gpu_recipe_issues(cfg.fp8_recipe)


def build_model(mcfg: ModelConfig, cfg: TrainConfig) -> DeepSeekV3:
    """A freshly initialised model (from `torch.manual_seed(cfg.seed)`, on the CPU so every device starts from
    the same weights), moved to `cfg.device` and converted for `cfg.precision`. On CUDA an FP8 recipe that the GPU
    path implements runs real FP8 GEMMs on bf16 working weights (fp32 masters in the optimizer)."""
    with seeded(cfg.seed):  # (the global generator, held against other threads of this process)
        model = DeepSeekV3(mcfg)
    model = model.to(resolve_device(cfg.device))
    if cfg.precision == "bf16" or gpu_fp8(cfg):
        model.to(torch.bfloat16)  # routers stay fp32 (core.moe.Router._apply)
    if gpu_fp8(cfg):
        from core.cuda.fp8_linear import convert_model
        convert_model(model, cfg.fp8_recipe, experts=cfg.fp8_experts)
    elif cfg.fp8_recipe is not None:
        from core.fp8 import convert_to_fp8
        convert_to_fp8(model, cfg.fp8_recipe)
    if cfg.compile or (model.lm_head.weight.is_cuda and cuda_opt_in()):
        compile_blocks(model)  # core.compile: whole decoder blocks, training path only
    return model


def all_moe_layers(model: DeepSeekV3) -> list[MoE]:
    """Every MoE module, main layers first, then the MTP modules' (all are balanced; main ones are logged)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based `step`: linear warm-up to `lr` over `warmup` steps, then cosine to `min_lr`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------- the run
def _stop_requested(stop) -> bool:
    if stop is None:
        return False
    if hasattr(stop, "is_set"):
        return bool(stop.is_set())
    return bool(stop())


def _finite_or_none(v):
    return v if v is None or math.isfinite(v) else None


class TrainRun:
    """A training run: an iterator of step records that keeps the model and everything learned.

    Attributes: `model`, `model_config`, `config` (TrainConfig), `data` (TokenDataset), `optimizer`,
    `records` (every record yielded so far), `step_count`, `status` ("ready" | "running" | "done" | "stopped"
    | "time limit" | "diverged"), `error`. Iterate it (or call `step()`) to train.
    """

    def __init__(self, model_cfg: ModelConfig | str, cfg: TrainConfig | None = None,
                 stop: threading.Event | Callable[[], bool] | None = None):
        self.config = cfg = cfg if cfg is not None else TrainConfig()
        cfg.validate()
        self.t0 = time.perf_counter()
        self.model_config = resolve_model_config(model_cfg, cfg)
        self.data = get_dataset(cfg.dataset, cfg.seed)
        self.data.check_seq_len("train", cfg.seq_len)
        self.model = self._prepare(build_model(self.model_config, cfg))
        self.model.train()
        self.stop = stop
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.moes = all_moe_layers(self.model)
        self.main_moes = self.model.moe_layers()
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        bf16_moments = cfg.fp8_recipe is not None and cfg.fp8_recipe.optimizer_moments == "bf16"
        if bf16_moments or any(p.dtype != torch.float32 for p in params):
            # fp32 master weights behind bf16 working weights, BF16 moments where the recipe asks (V3 report §3.3.3)
            self.optimizer = AdamW(groups, lr=cfg.lr, betas=cfg.betas,
                                   moment_dtype=torch.bfloat16 if bf16_moments else torch.float32)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
        self.opt_params = params
        self.fp8_stats = None
        if cfg.precision in RECIPES:
            from core.fp8 import get_fp8_stats
            self.fp8_stats = get_fp8_stats(self.model)
        self.records: list[dict] = []
        self.step_count = 0
        self.tokens_seen = 0
        self.status = "ready"
        self.error: str | None = None

    # -- iteration
    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.status in ("done", "stopped", "time limit", "diverged"):
            raise StopIteration
        if self.step_count >= self.config.steps:
            self.status = "done"
            raise StopIteration
        if _stop_requested(self.stop):
            self.status = "stopped"
            raise StopIteration
        if self.config.max_time_s is not None and self.step_count and self.elapsed() >= self.config.max_time_s:
            self.status = "time limit"
            raise StopIteration
        return self.step()

    def run(self) -> list[dict]:
        """Train to the end (or until stopped) and return all records."""
        for _ in self:
            pass
        return self.records

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    # -- one step
    def _losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        out = self.model.compute_loss(x, y, cfg.mtp_lambda if cfg.mtp else 0.0)
        loss = out["loss"]
        alpha, zc = cfg.balance_alpha, cfg.z_loss
        bal_terms, z_terms = [], []
        for moe in self.moes:
            r = moe.last_routing
            with torch.set_grad_enabled(alpha > 0):
                bal_terms.append(sequence_balance_loss(r.scores, r.scores.shape[-1], r.indices.shape[-1], r.seq_len))
            with torch.set_grad_enabled(zc > 0):
                z_terms.append(router_z_loss(r.logits))
        aux = alpha * torch.stack(bal_terms).sum() if bal_terms and alpha > 0 else None
        zl = zc * torch.stack(z_terms).sum() if z_terms and zc > 0 else None
        if aux is not None:
            loss = loss + aux
        if zl is not None:
            loss = loss + zl
        n_main = len(self.main_moes)
        info = {
            "lm_loss": float(out["lm_loss"].detach()),
            "mtp_loss": float(out["mtp_loss"].detach()) if cfg.mtp else None,
            # unweighted means over the main model's MoE layers (1.0 = perfectly balanced)
            "balance_loss": float(sum(t.detach() for t in bal_terms[:n_main]) / n_main) if n_main else None,
            "aux_loss": float(aux.detach()) if aux is not None else 0.0,
            "z_loss": float(sum(t.detach() for t in z_terms[:n_main]) / n_main) if n_main else None,
        }
        return loss, info

    def step(self, batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """Train one step and return its record (raises TrainingDiverged on a NaN/inf loss or gradient).

        `batch`: optional (input_ids, targets) [B, T] to train on instead of the run's own random windows
        (benchmarks feed two models the same batch)."""
        cfg = self.config
        self.status = "running"
        t_start = time.perf_counter()
        lr = lr_at(self.step_count, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        x, y = batch[:2] if batch is not None else self.data.batch(cfg.batch_size, cfg.seq_len, self.generator)[:2]
        loss, info = self._losses(*self._local_batch(x, y))
        loss_value = self._global_loss(float(loss.detach()), info)
        grad_norm = math.nan
        if math.isfinite(loss_value):
            loss.backward()
            grad_norm = self._clip_grad_norm(cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        loads = self._global_loads([moe.last_routing.loads.detach() for moe in self.moes])
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            return self._diverged(loss_value, grad_norm, lr, info)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.uses_bias_update:
            for moe, c in zip(self.moes, loads):
                update_bias(moe.gate, c, cfg.gamma)
        dt = time.perf_counter() - t_start
        self.step_count += 1
        n_tok = y.numel()
        self.tokens_seen += n_tok
        rec = self._record(loss_value, lr, grad_norm, info, loads[:len(self.main_moes)], n_tok / dt)
        if cfg.eval_every and (self.step_count % cfg.eval_every == 0 or self.step_count == cfg.steps):
            rec["val_loss"] = self.evaluate(cfg.eval_batches)
        rec["elapsed_s"] = self.elapsed()
        if self.step_count >= cfg.steps:
            self.status = "done"
        self.records.append(rec)
        return rec

    # -- what a data-parallel run (core.parallel.trainer.DistributedTrainRun) replaces; one process: identity
    def _prepare(self, model: DeepSeekV3) -> DeepSeekV3:
        """The freshly built model -> the model to train (a parallel run shards it here)."""
        return model

    def _local_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch [B, T] -> the rows this process trains on, on the model's device."""
        device = self.model.lm_head.weight.device
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def _global_loss(self, loss: float, info: dict) -> float:
        """This process's loss -> the run's loss (`info`'s loss terms likewise, in place)."""
        return loss

    def _clip_grad_norm(self, max_norm: float) -> float:
        """Clip the gradients to `max_norm` (torch's rule); returns the norm before clipping."""
        if isinstance(self.optimizer, AdamW):  # the coefficient is applied as the update reads each gradient
            return self.optimizer.clip_grad_norm_(max_norm)
        return float(torch.nn.utils.clip_grad_norm_(self.opt_params, max_norm))

    def _global_loads(self, loads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-layer expert loads of this process's tokens -> of the global batch (what the bias update uses)."""
        return loads

    def _record(self, loss, lr, grad_norm, info, loads, tokens_per_s) -> dict:
        vios = [load_metrics(c)["max_vio"] for c in loads]
        fp8 = None
        if self.fp8_stats is not None:
            snap = self.fp8_stats.snapshot()
            fp8 = {k: v for k, v in snap.items() if k != "tensors"}
            self.fp8_stats.reset()
        rec = dict.fromkeys(RECORD_FIELDS)
        rec.update(info)
        rec.update(
            step=self.step_count, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
            tokens=self.tokens_seen, expert_loads=[c.tolist() for c in loads],
            max_vio=sum(vios) / len(vios) if vios else None, max_vio_layers=vios,
            router_bias=[moe.gate.e_score_correction_bias.tolist() for moe in self.main_moes
                         if moe.gate.e_score_correction_bias is not None],
            fp8=fp8, fp32_gemm=gemm.choice(),  # which library ran the fp32 CPU GEMMs, and why (core.gemm)
            compiled=block_status(self.model),  # None: eager
        )
        return rec

    def _diverged(self, loss, grad_norm, lr, info) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
        self.error = (f"Training diverged at step {self.step_count + 1}: the {what}. The model was not updated; "
                      f"try a lower learning rate (lr={self.config.lr:g}), gradient clipping or fp32 precision.")
        rec = dict.fromkeys(RECORD_FIELDS)
        rec.update({k: _finite_or_none(v) if isinstance(v, float) else v for k, v in info.items()})
        rec.update(step=self.step_count + 1, loss=_finite_or_none(loss), lr=lr, grad_norm=_finite_or_none(grad_norm),
                   tokens=self.tokens_seen, elapsed_s=self.elapsed(), fp32_gemm=gemm.choice(), error=self.error)
        self.records.append(rec)
        self.status = "diverged"
        raise TrainingDiverged(self.error, rec)

    # -- after (or during) a run
    def evaluate(self, num_batches: int | None = 4) -> float:
        """Validation loss (nats/byte) on fixed windows of `seq_len`; None batches = the whole split."""
        return evaluate(self.model, self.data, self.config.batch_size, self.config.seq_len, num_batches)

    def domain_expert_matrix(self, num_batches: int | None = 8, data: TokenDataset | None = None) -> dict:
        """Domain x expert assignment fractions (see `domain_expert_matrix`); the synthetic dataset by default."""
        if data is None:
            data = self.data if self.data.labelled else get_dataset("synthetic", self.config.seed)
        return domain_expert_matrix(self.model, data, self.config.batch_size, self.config.seq_len, num_batches)

    def sample_text(self, prompt: str = "", n: int = 200, temperature: float = 0.8, seed: int = 0,
                    top_k: int | None = None) -> dict:
        return sample_text(self.model, prompt, n, temperature, seed, top_k)

    def save(self, path) -> None:
        """Save the model with `core.checkpoint.save_hf` (config.json + model.safetensors)."""
        save_hf(self.model, path)


def warm_up() -> None:
    """Pay torch's one-time cost of the first optimizer in a process (it imports torch._dynamo) and load the
    default dataset now, so that a run started later yields its first record quickly (a server calls this at
    start-up; figures in docs/performance.md)."""
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    get_dataset(APP_DEFAULT.dataset, APP_DEFAULT.seed)


def train(model_cfg: ModelConfig | str, train_cfg: TrainConfig | None = None,
          stop: threading.Event | Callable[[], bool] | None = None) -> TrainRun:
    """Start a run: returns a `TrainRun`, an iterator that yields one record per step (see `RECORD_FIELDS`).

    `stop`: a threading.Event or a callable checked between steps. The run object keeps the model, the
    records and helpers for after training (`evaluate`, `domain_expert_matrix`, `sample_text`, `save`).
    """
    return TrainRun(model_cfg, train_cfg, stop)


if __name__ == "__main__":  # `python -m core.train ...`: the CLI lives in core.cli (imported here only)
    from core.cli import main

    sys.exit(main())
