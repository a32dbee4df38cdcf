"""Cached computations behind the pages, one module per dashboard (`app.compute.mla` serves `pages/mla.py`):
knob values in, DataFrames / plain dicts out, every number from `core`.

Every function is wrapped in a bounded ``st.cache_data`` (returns a copy per call, shared by all sessions whose
inputs are equal). Configs travel as their normalized JSON string (``Shared.cfg_json``) so the cache key is
cheap and exact. Functions that build torch modules keep the modules local (nothing mutable is shared), and run
under ``app.memory.heavy`` (at most two at a time per server; the heaps are trimmed afterwards). Shared pieces
(config keys, overrides, torch set-up, dtype maps) live in `app.compute.common`.
"""
# The dashboards' modules as attributes: after `from app import compute`, `compute.mla.<fn>` works.
from app.compute import common, fp8, mla, moe, overview  # noqa: F401
