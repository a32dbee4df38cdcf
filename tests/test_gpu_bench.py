"""bench/gpu_bench.py's loss-gap bookkeeping on a CPU (the training runs replaced by fixed rows): seeds of the same
protocol pool across device calls (`--update`), another protocol replaces them, and the verdict's interval is taken
over every pooled seed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import gpu_bench as gb  # noqa: E402

from core.cuda.results import mean_interval  # noqa: E402


@pytest.fixture
def ran(monkeypatch):
    """Replace the training of one seed by a fixed row; the list records which seeds actually ran."""
    seeds = []

    def fake(job):
        seed, control = job[0], job[-1]
        seeds.append(seed)
        bf, f8 = 1.2 + 0.01 * seed, 1.2 + 0.01 * seed * (1 + 0.002 * (seed % 3 - 1))
        row = {"bf16": {"val_loss": bf, "seconds": 1.0}, "deepseek": {"val_loss": f8, "seconds": 1.0},
               "relative_gap": f8 / bf - 1}
        if control:
            row["repeat_gap"] = 0.001 * (seed % 2)
        return seed, row

    monkeypatch.setattr(gb, "_seed_pair", fake)
    return seeds


def test_loss_gap_seeds_pool_across_runs_of_one_protocol(ran):
    dev = torch.device("cpu")
    first = gb.lossgap(dev, True, 3, seeds=(0, 1, 2), batch=2, control=True)
    more = gb.lossgap(dev, True, 3, seeds=(2, 3, 4, 5), batch=2, control=True, earlier=first)
    assert ran == [0, 1, 2, 3, 4, 5]  # seed 2 was not run twice
    assert sorted(more["seeds"], key=int) == ["0", "1", "2", "3", "4", "5"]
    _, lo, hi = mean_interval(r["relative_gap"] for r in more["seeds"].values())
    assert more["gap_interval_95"] == [lo, hi]
    other = gb.lossgap(dev, True, 3, seeds=(0, 1), batch=2, control=False, earlier=more)  # no control: another protocol
    assert sorted(other["seeds"]) == ["0", "1"] and ran[-2:] == [0, 1]
    legacy = {k: v for k, v in more.items() if k != "control"}  # a file written before the "control" key
    assert len(gb.lossgap(dev, True, 3, seeds=(6,), batch=2, control=True, earlier=legacy)["seeds"]) == 7
