"""Server memory manners for a small hosted instance (Community Cloud: 0.7–2.7 GB for *all* processes).

Two measures around the heavy (torch) computations behind `app.compute`'s caches; neither changes a number or a
chart (issue 7, "Reliability for a hosted classroom"):

* **at most `HEAVY_CONCURRENCY` at a time per server process** (`heavy`). A cache miss allocates its temporaries
  while it runs (measured: +40–75 MB for a first visit of the MLA or MoE page), so a class missing the cache at
  once stacked one transient per session: `bench/load_test.py --client apptest --sessions 10 --seconds 60` peaked at
  730–860 MiB on a ~430 MiB baseline. Torch runs one intra-op thread per script run (`app.compute.common.torch_setup`), so
  on the 2-core host a third concurrent computation never finished sooner; it only raised the peak (measured with
  the gate: the same or more page visits in the same 60 s, p50 latency lower).
* **trim after each** (`trim`). glibc keeps freed memory in its heaps, and after the first large free it raises its
  mmap threshold, so tensors of up to 32 MB land in the heaps too: after one visit of the MoE page 60–80 MB stayed
  resident although nothing referenced it. `malloc_trim(0)` gives the free pages back to the OS; it costs
  ~0.2–7 ms, once per computation that took 5–1000 ms.

Off glibc (macOS, musl) `trim` does nothing. What stays on purpose (the caches) is bounded where the caches are
declared: `max_entries`, plus a byte budget `max_size` where entries grow with the knobs (tests/test_limits.py).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading

HEAVY_CONCURRENCY = 2   # concurrent heavy computations per server process (= the hosted core count)

_gate = threading.BoundedSemaphore(HEAVY_CONCURRENCY)
_local = threading.local()


def _glibc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _glibc_trim()


def trim() -> None:
    """Give the free pages of every malloc heap back to the OS (glibc; otherwise nothing)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def heavy(fn):
    """Decorator for a heavy computation, placed under its `st.cache_data` so only cache misses pay: at most
    `HEAVY_CONCURRENCY` run at once in this process, and the heaps are trimmed after each. Re-entrant within a
    thread (a heavy function that calls another one does not wait for a second slot)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if getattr(_local, "inside", False):
            return fn(*args, **kwargs)
        with _gate:
            _local.inside = True
            try:
                return fn(*args, **kwargs)
            finally:
                _local.inside = False
                trim()
    run.heavy = True
    return run
