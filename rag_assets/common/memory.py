"""The memory of a run's process: its peak, and handing back what a step freed."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource


def peak_rss_mb() -> float:
    """The largest resident memory of this process so far (workers not included), in MB.

    With the in-process executor, a step's figure is the run's peak up to the end of that step.
    """
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _malloc_trim() -> object | None:
    library = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(library), "malloc_trim", None) if library else None


_MALLOC_TRIM = _malloc_trim()  # glibc only; elsewhere there is nothing to call


def release_freed_memory() -> None:
    """Give the system back the memory the last step freed (glibc's `malloc_trim`).

    The steps of a run share one process, and glibc keeps what a step frees for later
    allocations; the next step's do not all fit in it. At a million chunks 1.2 GB of freed
    memory was still resident when `es_index` began, and the run's peak was that plus the
    publish's own: 4.6 GB where the publish alone needs 1.8.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
