"""The garbage collector of a long-running stream process, tuned for big batches.

A worker's heap is mostly what it imported and built at start (Faust, aiokafka, numpy,
pyarrow, the app): hundreds of thousands of objects that live as long as the process.
CPython's cyclic collector walks all of them at every full collection, and a click take
of thousands of events allocates enough containers (decoded events, their dicts, rows)
to trigger several per take. :func:`settle` moves everything alive at start out of the
collector's reach (``gc.freeze``: still reference-counted and freed as usual, never
walked) and lets the youngest generation grow before it is collected, so a take's
short-lived objects are mostly freed by reference counting before any collection.
Cycles are still collected: only how often the collector looks changes.
"""

from __future__ import annotations

import gc

__all__ = ["settle"]


def settle(young: int) -> tuple[int, int, int]:
    """Freeze the objects alive now and collect the young generation every ``young``
    allocations; 0 leaves the collector as Python set it. Returns the thresholds in force.

    >>> before = gc.get_threshold()
    >>> settle(0) == before
    True
    >>> settle(50_000)[0]
    50000
    >>> gc.set_threshold(*before); gc.unfreeze()
    """
    if young:
        gc.collect()
        gc.freeze()
        _, mid, old = gc.get_threshold()
        gc.set_threshold(young, mid, old)
    return gc.get_threshold()
