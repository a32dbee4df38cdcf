"""`DistributedTrainRun`: the `core.train` step on D data-parallel ranks, with experts split over E of them.

Every rank builds the same model from the same seed (so the initial weights equal a single process's), then
`parallelize` shards it. Every rank draws the same GLOBAL batch from the shared seed and trains on its slice
rows [r*B/D, (r+1)*B/D), so the run sees exactly the batches a single process with `--batch-size B` sees.
Per-rank losses are means over equal slices, so their mean is the global loss and FSDP's averaged gradients
are the global gradient. After the step:
  - expert loads are summed over ranks (`global_loads`) before the aux-loss-free bias update, so every rank
    applies the same update a single process would (V3 §2.1.2) and all routers keep identical biases;
  - the record holds global values (losses averaged over ranks, loads and MaxVio of the global batch) plus
    `a2a_bytes` (activation bytes the expert exchanges sent between ranks this step, forward + backward,
    summed over ranks), `a2a_bytes_inter_node` and `a2a_meta_bytes` (per-expert counts and gate values).
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from core.model import DeepSeekV3
from core.parallel.fsdp import all_mean, clip_grad_norm_, full_state_dict, global_loads, parallelize
from core.parallel.mesh import Meshes
from core.train import TrainRun, lr_at

__all__ = ["DistributedTrainRun", "DIST_RECORD_FIELDS"]

#: Extra record keys of a distributed run (see the module docstring).
DIST_RECORD_FIELDS = ("a2a_bytes", "a2a_bytes_inter_node", "a2a_meta_bytes", "world_size", "dp", "ep")

_INFO_KEYS = ("lm_loss", "mtp_loss", "balance_loss", "aux_loss", "z_loss")


class DistributedTrainRun(TrainRun):
    """A `TrainRun` whose model is parallelized over `meshes` (call on every rank, same arguments)."""

    def __init__(self, model_cfg, cfg, meshes: Meshes, device: torch.device | str = "cpu", stop=None):
        super().__init__(model_cfg, cfg, stop)
        self.meshes = meshes
        self.device = torch.device(device)
        self.model.to(self.device)  # built on the CPU from the seed, as on one process; sharded below
        self.comm = parallelize(self.model, meshes)
        params = [p for p in self.model.parameters() if p.requires_grad]  # FSDP's sharded parameters
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, foreach=True)
        self.opt_params = params
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()

    def step(self, batch=None) -> dict:
        cfg = self.config
        self.status = "running"
        t_start = time.perf_counter()
        self.comm.reset()
        lr = lr_at(self.step_count, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        x, y = batch[:2] if batch is not None else self.data.batch(cfg.batch_size, cfg.seq_len, self.generator)[:2]
        share = x.shape[0] // self.world
        rows = slice(self.rank * share, (self.rank + 1) * share)
        loss, info = self._losses(x[rows].to(self.device), y[rows].to(self.device))
        keys = [k for k in _INFO_KEYS if info[k] is not None]
        means = all_mean([float(loss.detach())] + [info[k] for k in keys], self.device)
        loss_value = means[0]
        info.update(zip(keys, means[1:]))
        grad_norm = math.nan
        if math.isfinite(loss_value):  # the same verdict on every rank: all or none run the backward
            loss.backward()
            grad_norm = clip_grad_norm_(self.opt_params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        loads = global_loads([moe.last_routing.loads.detach() for moe in self.moes])
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            return self._diverged(loss_value, grad_norm, lr, info)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.uses_bias_update:
            from core.moe import update_bias
            for moe, c in zip(self.moes, loads):
                update_bias(moe.gate, c, cfg.gamma)
        traffic = torch.tensor([self.comm.activation_bytes, self.comm.inter_node_bytes, self.comm.meta_bytes],
                               dtype=torch.int64, device=self.device)
        dist.all_reduce(traffic)
        dt = time.perf_counter() - t_start
        self.step_count += 1
        n_tok = y.numel()
        self.tokens_seen += n_tok
        rec = self._record(loss_value, lr, grad_norm, info, loads[:len(self.main_moes)], n_tok / dt)
        rec.update(a2a_bytes=int(traffic[0]), a2a_bytes_inter_node=int(traffic[1]), a2a_meta_bytes=int(traffic[2]),
                   world_size=self.world, dp=self.meshes.plan.dp, ep=self.meshes.plan.ep)
        if cfg.eval_every and (self.step_count % cfg.eval_every == 0 or self.step_count == cfg.steps):
            rec["val_loss"] = self.evaluate(cfg.eval_batches)
        rec["elapsed_s"] = self.elapsed()
        if self.step_count >= cfg.steps:
            self.status = "done"
        self.records.append(rec)
        return rec

    def full_model(self) -> DeepSeekV3 | None:
        """An ordinary single-process model with the trained weights on rank 0 (None elsewhere); collective."""
        sd = full_state_dict(self.model, self.meshes)
        if self.rank != 0:
            return None
        model = DeepSeekV3(self.model_config)
        model.load_state_dict(sd)
        return model

    def save(self, path) -> None:
        """Rank 0 writes a normal `save_hf` checkpoint of the gathered weights; every rank must call it."""
        from core.checkpoint import save_hf
        model = self.full_model()
        if model is not None:
            save_hf(model, path)
        dist.barrier()

    def sample_text(self, *args, **kwargs) -> dict | None:
        """Sample from the gathered model on rank 0 (None elsewhere); collective."""
        from core.train import sample_text
        model = self.full_model()
        return None if model is None else sample_text(model, *args, **kwargs)
