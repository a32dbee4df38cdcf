"""core.rng.seeded: a seed gives the same weights whatever other threads of the process do with torch's global
generator (the app runs every session's script and page fragment in a thread of one server process)."""
from __future__ import annotations

import threading

import torch

from app.compute import moe
from core.rng import seeded


def _router_weight():
    return moe._router_setup((), 7, 0.5)[1].weight.detach().clone()


def test_seeded_builds_are_the_same_while_other_threads_seed_and_draw():
    """The MoE page's router built 40 times while another thread seeds and draws (as another session's page
    would): every build equals the one made alone. Without the lock, 22 of 50 such builds differed."""
    alone = _router_weight()
    stop = threading.Event()

    def other_session():
        while not stop.is_set():
            with seeded(123):
                torch.randn(1000)

    t = threading.Thread(target=other_session)
    t.start()
    try:
        assert all(torch.equal(_router_weight(), alone) for _ in range(40))
    finally:
        stop.set()
        t.join()


def test_seeded_is_reentrant_and_seeds():
    with seeded(3):
        a = torch.randn(4)
        with seeded(3):
            b = torch.randn(4)
    assert torch.equal(a, b)
