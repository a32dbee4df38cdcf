"""The training CLI: `python -m core.train --preset mini --steps 300 --seed 0 --json run.json --save ckpt/`.

Three steps, one function each, so that new flags slot into one place:
  `parse_args`   argv -> argparse.Namespace (`--help` lists every `TrainConfig` knob);
  `build_configs` the namespace -> (ModelConfig, TrainConfig) (where the model's architecture comes from);
  `run_and_write` trains, draws the progress bar, writes the JSON records / checkpoint / sample.
Under torchrun with `--dp D [--ep E]` the run is a `core.parallel` one (`core.parallel.launch.run`); rank 0
draws, writes and prints, the checkpoint and the sample are gathered from every rank.
The JSON file is a JSON *list* with one record per logged step (every `log_every` steps and the last).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import torch

import core.train
from core.config import ModelConfig, get_preset
from core.cuda.device import DEVICES
from core.parallel.launch import add_parallel_args, wants_distributed
from core.train import TrainConfig, TrainingDiverged, TrainRun, train

__all__ = ["json_safe", "write_records", "parse_args", "build_configs", "run_and_write", "main"]


def json_safe(obj):
    """A strict-JSON copy of records: non-finite floats become None, tensors/arrays become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):
        return json_safe(obj.tolist())
    return obj


def write_records(path, records: list[dict]) -> None:
    """Write records as one JSON list (strict JSON: non-finite numbers become null), atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(json_safe(records), f, allow_nan=False)
    os.replace(tmp, path)


class _Progress:
    """A one-line text progress bar on stderr (redrawn in place on a terminal, every ~10 % otherwise)."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self.last_pct = -1

    def update(self, rec: dict) -> None:
        step = rec["step"]
        frac = step / self.total
        pct = int(frac * 10)
        if not self.tty and pct == self.last_pct and step != self.total:
            return
        self.last_pct = pct
        bar = "#" * int(frac * 20) + "-" * (20 - int(frac * 20))
        parts = [f"step {step}/{self.total} [{bar}] loss {rec['loss']:.4f}"]
        if rec.get("val_loss") is not None:
            parts.append(f"val {rec['val_loss']:.4f}")
        if rec.get("max_vio") is not None:
            parts.append(f"maxvio {rec['max_vio']:.2f}")
        parts.append(f"{rec['tokens_per_s']:,.0f} tok/s  {rec['elapsed_s']:.1f}s")
        line = "  ".join(parts)
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m core.train", description=core.train.__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help="model preset from core.config.PRESETS (default: mini)")
    src.add_argument("--config", metavar="FILE", help="a transformers-format config.json (any DeepSeek-family size)")
    ap.add_argument("--json", help="write the step records to this file (a JSON list)")
    ap.add_argument("--save", help="save the trained model here with save_hf (config.json + safetensors)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--sample", type=int, default=0, help="print this many sampled bytes after training")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    add_parallel_args(ap)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = {"default": f.default, "help": f.metadata.get("help", "")}
        if f.name == "betas":
            ap.add_argument(flag, type=float, nargs=2, metavar=("BETA1", "BETA2"), **kw)
        elif f.name in ("mtp", "compile", "fp8_experts"):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name in ("alpha", "max_time_s"):
            ap.add_argument(flag, type=float, **kw)
        elif f.name == "kv_heads":
            ap.add_argument(flag, type=int, **kw)
        elif f.name == "fp8_switches":
            ap.add_argument(flag, nargs="*", metavar="SWITCH", **kw)
        elif f.name == "device":
            ap.add_argument(flag, choices=DEVICES, **{**kw, "default": "auto"})  # the CLI takes a GPU when there is one
        else:
            ap.add_argument(flag, type=type(f.default), **kw)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argv (default sys.argv[1:]) -> namespace; argparse exits with status 2 on a malformed flag."""
    return _arg_parser().parse_args(argv)


def build_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The model's base config (the `--preset`, or the `--config` file) and the run's TrainConfig; ValueError names
    a bad knob, OSError an unreadable file.

    `core.train.train` then applies the run's attention/FFN/MTP knobs to the model config."""
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if args.config:
        return ModelConfig.from_hf(args.config), cfg
    return get_preset(args.preset or "mini"), cfg


def run_and_write(run: TrainRun, args: argparse.Namespace) -> int:
    """Train `run` to the end, writing what `args` asks for; returns the exit status
    (0 done, 1 diverged, 130 interrupted). The JSON file is written even when the run stops early."""
    cfg = run.config
    lead = getattr(run, "rank", 0) == 0  # a parallel run: only rank 0 draws, writes and prints
    progress = None if args.quiet or not lead else _Progress(cfg.steps)
    logged: list[dict] = []
    code = 0
    try:
        for rec in run:
            if rec["step"] % cfg.log_every == 0 or rec["step"] == cfg.steps:
                logged.append(rec)
            if progress:
                progress.update(rec)
    except TrainingDiverged as e:  # a parallel run's ranks see the same global loss and stop together
        logged.append(e.record)
        if lead:
            print(f"\nerror: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    finally:
        if progress:
            progress.close()
        if args.json and lead:
            write_records(args.json, logged)
    if args.save and code != 1:
        run.save(args.save)  # collective in a parallel run (rank 0 writes the gathered weights)
        if lead:
            print(f"saved checkpoint to {args.save}", file=sys.stderr)
    s = run.sample_text("", args.sample, seed=cfg.seed) if args.sample and code == 0 else None
    if s is not None:  # None on the ranks other than 0
        print(s["text"])
        if s["mtp_acceptance"] is not None:
            print(f"MTP draft acceptance: {s['mtp_acceptance']:.1%} ({s['mtp_accepted']}/{s['mtp_drafts']})",
                  file=sys.stderr)
    compiled = run.records[-1].get("compiled") if run.records else None
    if compiled and compiled["errors"] and lead:
        print(f"warning: --compile: compiling failed, these blocks ran eager: {compiled['errors']}", file=sys.stderr)
    if run.records and code == 0 and lead:
        last = run.records[-1]
        print(json.dumps(json_safe({"steps": run.step_count, "loss": last["loss"], "val_loss": last["val_loss"],
                                     "status": run.status, "elapsed_s": round(run.elapsed(), 2)})))
    return code


def main(argv: list[str] | None = None) -> int:
    """Parse, build the configs, train and write; returns the exit status (2 for an invalid setting)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if wants_distributed(args):
        from core.parallel.launch import run as run_parallel
        return run_parallel(args)
    try:
        model_cfg, cfg = build_configs(args)
        run = train(model_cfg, cfg)
    except OSError as e:
        print(f"error: config: cannot read {args.config!r}: {e.strerror or e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_and_write(run, args)


if __name__ == "__main__":
    sys.exit(main())
