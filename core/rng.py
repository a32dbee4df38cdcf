"""torch's global random generator, seeded and held by one thread at a time.

Modules initialise their weights from torch's global generator (nn.Linear, core.moe.Router, core.attention.MLA, ...).
The app runs each session's script, and each page fragment, in its own thread of one process: two threads that seed
the global generator and then build modules interleave their draws, so the same seed gave different weights under
load (the MoE page's router, measured: 22 of 50 builds differed with another thread drawing). Everything that seeds
the global generator to build something deterministic does it inside `seeded`:

    with seeded(seed):
        router = Router(cfg)          # the same weights for the same seed, whatever other threads do

(Code that draws with its own `torch.Generator` needs no lock.)"""
from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["seeded"]

_LOCK = threading.RLock()  # re-entrant: a seeded block may call code that seeds again


@contextlib.contextmanager
def seeded(seed: int):
    """`torch.manual_seed(seed)`, then the block, with no other thread's `seeded` block in between."""
    with _LOCK:
        torch.manual_seed(seed)
        yield
