"""The distributed side of the training CLI: `torchrun --nproc-per-node N -m core.train ... --dp D [--ep E]`.

Every rank parses the same command line, checks the --dp/--ep rules against the world size torchrun exported
(before any collective, so a bad combination stops every rank with the same message instead of leaving one
waiting), joins the process group (gloo on CPU, NCCL on CUDA), trains a `DistributedTrainRun`, and rank 0 writes
the JSON records and the `save_hf` checkpoint. Several nodes: the same command on each node with torchrun's
`--nnodes/--node-rank` and a c10d rendezvous (README).
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from core.parallel.mesh import ParallelPlan, build_meshes, init_distributed, validate_plan, world_from_env

__all__ = ["add_parallel_args", "wants_distributed", "run"]


def add_parallel_args(ap) -> None:
    ap.add_argument("--dp", type=int, default=1,
                    help="data-parallel ranks (FSDP2); must equal the world size torchrun starts")
    ap.add_argument("--ep", type=int, default=1,
                    help="expert-parallel ranks (routed experts split over E of the --dp ranks); divides --dp "
                         "and n_routed_experts")


def wants_distributed(args) -> bool:
    """True when the command line or torchrun asks for more than one process."""
    return args.dp != 1 or args.ep != 1 or world_from_env()[0] > 1


def _say(rank: int, msg: str) -> None:
    print(f"[rank {rank}] {msg}", file=sys.stderr, flush=True)


def device_type_of(args, cfg) -> str:
    """"cuda" or "cpu" from the run's --device (auto: CUDA when this machine has it)."""
    want = getattr(cfg, "device", None) or getattr(args, "device", None) or "cpu"
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if str(want).startswith("cuda") else "cpu"


def run(args) -> int:
    """Train on every rank with `core.cli.run_and_write`; returns the exit code (2 for a bad setting)."""
    from core.cli import build_configs, run_and_write
    from core.parallel.trainer import DistributedTrainRun
    from core.train import TrainConfigError, resolve_model_config

    world, rank = world_from_env()
    plan = ParallelPlan(args.dp, args.ep)
    try:
        model_cfg, cfg = build_configs(args)
        mcfg = resolve_model_config(model_cfg, cfg)
        validate_plan(plan, world, mcfg.n_routed_experts, cfg.batch_size, cfg.precision)
        if cfg.compile:  # core.compile wraps one process's blocks; FSDP and the EP all-to-all hooks are not traced
            raise TrainConfigError("compile", "compiles one-process runs only; leave --compile off with --dp/--ep")
    except ValueError as e:  # ParallelError, ConfigError, TrainConfigError: each names its knob
        _say(rank, f"error: {e}")
        return 2
    device = init_distributed(device_type_of(args, cfg))
    try:
        try:
            run_ = DistributedTrainRun(model_cfg, cfg, build_meshes(plan, device.type), device)
        except ValueError as e:  # the same on every rank (same arguments), so no rank is left waiting
            _say(rank, f"error: {e}")
            return 2
        return run_and_write(run_, args)
    finally:
        dist.destroy_process_group()
