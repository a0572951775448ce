"""Host-process settings: keep XLA:CPU's large buffers in the malloc heap between steps.

XLA on the CPU allocates every temporary and output buffer of a jitted call with `memalign`, and
frees it afterwards. glibc serves allocations above 32 MB (and, from worker threads, anything too
big for a thread arena) with a fresh `mmap`, returned to the kernel on `free`: the next call
faults the same memory in again, 4 KB at a time, zero-filled. At benchmark size S the DPO step
faulted 0.85 GB (208k page faults) per step, ~8% of its time (1.57 → 1.44 s once they were gone).

`configure_malloc()` sets three glibc malloc options (`mallopt`, the same as the environment
variables `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1`):
  - one arena, so worker threads allocate from the main heap instead of mmap-backed arenas;
  - no mmap for large blocks: they come from the heap and are reused after `free`;
  - the heap is never trimmed (-1 disables trimming, mallopt(3)). A 2 GB threshold was not
    enough: the GRPO update at config S frees ~2.7 GB of temporaries at once, glibc returned them,
    and every update faulted 560k pages back in (3 of its 5.2 s in the kernel; 3.6 s without).
The cost: the process keeps its peak heap (like a caching allocator) instead of unmapping freed
buffers, and `memalign`'s alignment slack keeps a freed block from fitting the next request
of the same size until neighbours coalesce: a loop that reallocates one 64 MB buffer grew the heap
by 6-16 such blocks before it reused them (the DPO step at S settled within 4 steps).

Entry points call it (`specs_jax.main`, `benchmarks/`); library code never does. It must run
before JAX starts its CPU backend (the worker threads pick their arena when they first allocate).
`SPECS_JAX_MALLOC_TUNING=0` turns it off; on anything but Linux with glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))

_applied: bool | None = None


def configure_malloc(enable: bool | None = None) -> bool:
  """Applies the settings above once per process; True if they are in effect.

  Args:
    enable: None reads `SPECS_JAX_MALLOC_TUNING` (default on; "0" turns it off).
  """
  global _applied
  if enable is None:
    enable = os.environ.get("SPECS_JAX_MALLOC_TUNING", "1").strip() not in ("0", "false", "off", "no")
  if not enable:
    return False
  if _applied is not None:
    return _applied
  _applied = False
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):      # not glibc (e.g. musl): nothing to tune
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  _applied = all(mallopt(param, value) == 1 for param, value in _SETTINGS)
  if not _applied:
    log.warning("glibc mallopt refused the buffer-reuse settings; XLA:CPU buffers stay mmap-backed")
  return _applied
