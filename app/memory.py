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

The training worker (`app.lab.worker`, its own process) wants the opposite while it trains: `keep_freed_pages`. A
training step frees and allocates the same few MB of activations and gradients every step; glibc's defaults gave the
top of the heap back to the OS after each step and served some buffers by mmap, so every step faulted the same pages
in again (figures in docs/performance.md). It keeps them for the run; the worker trims after each job as above.

Off glibc (macOS, musl) `trim` and `keep_freed_pages` do nothing. What stays on purpose (the caches) is bounded where the caches are
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


def _glibc(name: str):
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")
# glibc <malloc.h> parameter numbers and the values `keep_freed_pages` sets: 32 MiB is the largest mmap threshold
# glibc accepts on 64-bit (HEAP_MAX_SIZE / 2); a 1 GiB trim threshold keeps any run's freed heap top in the process.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
KEEP_FREED = {_M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20, _M_MMAP_THRESHOLD: 32 << 20}


def trim() -> None:
    """Give the free pages of every malloc heap back to the OS (glibc; otherwise nothing)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def keep_freed_pages() -> bool:
    """Make this process keep the memory it frees (glibc; elsewhere nothing, returns False): buffers up to 32 MiB
    come from the heap, and its free top is neither returned to the OS nor grown page by page. For a process whose
    work frees and re-allocates the same buffers in a loop (the lab's training worker); `trim()` still returns the
    free pages when asked (malloc_trim ignores these thresholds). Returns True when glibc accepted every setting."""
    if _MALLOPT is None:
        return False
    return all(_MALLOPT(param, value) == 1 for param, value in KEEP_FREED.items())


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
