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

import torch
import torch.distributed as dist

from core.model import DeepSeekV3
from core.parallel.fsdp import all_mean, clip_grad_norm_, full_state_dict, global_loads, parallelize
from core.parallel.mesh import Meshes
from core.train import TrainRun

__all__ = ["DistributedTrainRun", "DIST_RECORD_FIELDS"]

#: Extra record keys of a distributed run (see the module docstring).
DIST_RECORD_FIELDS = ("a2a_bytes", "a2a_bytes_inter_node", "a2a_meta_bytes", "world_size", "dp", "ep")

_INFO_KEYS = ("lm_loss", "mtp_loss", "balance_loss", "aux_loss", "z_loss")


class DistributedTrainRun(TrainRun):
    """A `TrainRun` whose model is parallelized over `meshes` (call on every rank, same arguments).

    Only the hooks of `TrainRun.step` differ from one process (see the module docstring).
    """

    def __init__(self, model_cfg, cfg, meshes: Meshes, device: torch.device | str = "cpu", stop=None):
        self.meshes = meshes
        self.device = torch.device(device)
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        super().__init__(model_cfg, cfg, stop)

    def _prepare(self, model):
        # built on the CPU from the seed (the weights of one process), then moved and sharded
        self.comm = parallelize(model.to(self.device), self.meshes)
        return model

    def _local_batch(self, x, y):
        self.comm.reset()  # this step's exchanges start here
        share = x.shape[0] // self.world
        rows = slice(self.rank * share, (self.rank + 1) * share)
        return x[rows].to(self.device), y[rows].to(self.device)

    def _global_loss(self, loss, info):
        # equal slices: the mean of the ranks' means is the global mean; the same verdict on a non-finite loss
        # reaches every rank, so all or none run the backward
        keys = [k for k in _INFO_KEYS if info[k] is not None]
        means = all_mean([loss] + [info[k] for k in keys], self.device)
        info.update(zip(keys, means[1:]))
        return means[0]

    def _clip_grad_norm(self, max_norm):
        return clip_grad_norm_(self.opt_params, max_norm)

    def _global_loads(self, loads):
        return global_loads(loads)

    def _record(self, loss, lr, grad_norm, info, loads, tokens_per_s) -> dict:
        rec = super()._record(loss, lr, grad_norm, info, loads, tokens_per_s)
        traffic = torch.tensor([self.comm.activation_bytes, self.comm.inter_node_bytes, self.comm.meta_bytes],
                               dtype=torch.int64, device=self.device)
        dist.all_reduce(traffic)
        rec.update(a2a_bytes=int(traffic[0]), a2a_bytes_inter_node=int(traffic[1]), a2a_meta_bytes=int(traffic[2]),
                   world_size=self.world, dp=self.meshes.plan.dp, ep=self.meshes.plan.ep)
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
