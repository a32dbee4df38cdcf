"""The distributed side of the training CLI: `torchrun --nproc-per-node N -m core.train ... --dp D [--ep E]`.

Every rank parses the same command line, checks the --dp/--ep rules against the world size torchrun exported
(before any collective, so a bad combination stops every rank with the same message instead of leaving one
waiting), joins the process group (gloo on CPU, NCCL on CUDA), trains a `DistributedTrainRun`, and rank 0 writes
the JSON records and the `save_hf` checkpoint. Several nodes: the same command on each node with torchrun's
`--nnodes/--node-rank` and a c10d rendezvous (README).
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from core.parallel.mesh import ParallelError, ParallelPlan, build_meshes, init_distributed, validate_plan, world_from_env

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


def run(args, cfg, device_type: str | None = None) -> int:
    """Train on every rank; returns the process exit code (2 for a bad setting, 1 for divergence)."""
    from core.train import TrainingDiverged, _Progress, json_safe, resolve_model_config, write_records
    from core.parallel.trainer import DistributedTrainRun

    world, rank = world_from_env()
    try:
        mcfg = resolve_model_config(args.preset, cfg)
        validate_plan(ParallelPlan(args.dp, args.ep), world, mcfg.n_routed_experts, cfg.batch_size, cfg.precision)
    except ValueError as e:  # ParallelError, ConfigError, TrainConfigError: all name the knob
        _say(rank, f"error: {e}")
        return 2
    device = init_distributed(device_type or device_type_of(args, cfg))
    code = 0
    try:
        meshes = build_meshes(ParallelPlan(args.dp, args.ep), device.type)
        run_ = DistributedTrainRun(mcfg, cfg, meshes, device)
        progress = _Progress(cfg.steps) if rank == 0 and not args.quiet else None
        logged: list[dict] = []
        try:
            for rec in run_:
                if rec["step"] % cfg.log_every == 0 or rec["step"] == cfg.steps:
                    logged.append(rec)
                if progress:
                    progress.update(rec)
        except TrainingDiverged as e:  # every rank sees the same global loss, so all stop here together
            logged.append(e.record)
            if rank == 0:
                print(f"\nerror: {e}", file=sys.stderr)
            code = 1
        finally:
            if progress:
                progress.close()
        if rank == 0 and args.json:
            write_records(args.json, logged)
        if args.save and code == 0:
            run_.save(args.save)
            if rank == 0:
                print(f"saved checkpoint to {args.save}", file=sys.stderr)
        if args.sample and code == 0:  # rank 0 samples from the gathered weights
            s = run_.sample_text("", args.sample, seed=cfg.seed)
            if s is not None:
                print(s["text"])
        if rank == 0 and run_.records and code == 0:
            last = run_.records[-1]
            print(json.dumps(json_safe({"steps": run_.step_count, "loss": last["loss"], "val_loss": last["val_loss"],
                                         "status": run_.status, "elapsed_s": round(run_.elapsed(), 2),
                                         "world_size": world, "dp": args.dp, "ep": args.ep})))
    finally:
        dist.destroy_process_group()
    return code


def main(argv: list[str] | None = None) -> int:
    """`python -m core.parallel.launch` = `python -m core.train` with --dp/--ep (until the CLI carries them)."""
    import dataclasses
    from core.train import TrainConfig, _arg_parser
    ap = _arg_parser()
    add_parallel_args(ap)
    if not any(a.dest == "device" for a in ap._actions):  # until the training CLI has its own --device
        ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"),
                        help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(args, cfg)


if __name__ == "__main__":
    sys.exit(main())
