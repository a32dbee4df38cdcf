"""Shared test set-up."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads():
    """The app runs torch with one intra-op thread per script run (app/compute.py torch_setup); give every test module
    the thread count it started with back, whatever the app tests before it did."""
    import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
