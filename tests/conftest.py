"""Shared test set-up."""
from __future__ import annotations

import os
import sys
import tempfile

import pytest

# The run store (app/lab/store.py) of every app, server and worker the tests start: a folder of this test session,
# never the user's cache (a run stored by an earlier session would be shown instead of trained).
os.environ["EVA_DATA_DIR"] = tempfile.mkdtemp(prefix="eva-test-store-")


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_setup():
    """The app sets torch up for its server (app/compute/common.py torch_setup: one intra-op thread per script run, torch's
    own fp32 GEMMs) and AppTest runs the app in this process. Give every test module the thread count and the
    core.gemm backend it started with back, and let the next app module set the server up again, whatever the
    tests before it did."""
    import torch

    from core import gemm
    n, backend, setting = torch.get_num_threads(), gemm._backend, gemm._setting
    yield
    torch.set_num_threads(n)
    gemm._backend, gemm._setting = backend, setting
    common = sys.modules.get("app.compute.common")
    if common is not None:
        common._TORCH_READY = False


@pytest.fixture(scope="session")
def server():
    """The browser tests' live `streamlit run` (tests/e2e_helpers.py): one for the session, its base URL."""
    from e2e_helpers import live_server
    yield from live_server()


@pytest.fixture(scope="module")
def browser():
    """The browser tests' Debian Chromium through Playwright (tests/e2e_helpers.py), one a module: Playwright's sync
    API marks an asyncio loop running in this thread while it is open, which would break a later module's asyncio."""
    from e2e_helpers import chromium
    yield from chromium()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip on a machine where torch sees no CUDA GPU (CI); `-m gpu` selects them."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
