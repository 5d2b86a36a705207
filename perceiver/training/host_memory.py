"""Host memory policy for XLA:CPU processes: keep freed memory instead of unmapping it.

Why: XLA:CPU allocates each execution's temporary buffer (gigabytes for the released
model's train step) with ``malloc``, and glibc serves requests above its mmap threshold
(32 MB at most) with a fresh ``mmap`` that ``free`` unmaps again. Every step therefore
page-faults its whole temporary buffer back in, and the kernel zero-fills every page,
which costs about as much system time as the step's arithmetic (figures:
``bench/RESULTS.md``). Serving large blocks from the heap and never trimming it lets the
next step reuse the same pages, already mapped.

The cost: the process keeps its peak footprint (it is reached again every step anyway).
Call ``retain_freed_memory()`` first thing in ``main``, before JAX starts its threads:
glibc gives a thread an arena at its first allocation, and only the main arena grows
from the heap (the others fall back to ``mmap`` for blocks this large).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = -1   # as M_TRIM_THRESHOLD: never trim (mallopt(3))

_applied = None


def retain_freed_memory() -> bool:
  """Makes glibc serve large blocks from one never-trimmed heap; True if it applied.

  Idempotent. A no-op returning False where the C library is not glibc (macOS, musl).
  """
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  try:
    mallopt = _libc().mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  mallopt.restype = ctypes.c_int
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER))
  _applied = all(mallopt(param, value) == 1 for param, value in settings)
  if not _applied:
    logging.warning('mallopt refused a setting: freed memory may still be unmapped')
  return _applied


def release_freed_memory() -> None:
  """Returns freed heap memory to the system (glibc's ``malloc_trim``), so that the
  resident size is live data; a no-op where the C library is not glibc."""
  try:
    _libc().malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _libc():
  return ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
