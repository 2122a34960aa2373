"""Items numbered once per process, each with the objects its row was built from.

Serving keeps per-item work between requests: the counter references of an item
(:class:`features.counters.RequestSlots`) and its tokens
(:meth:`features.rows.RowBuilder.item_blocks`). Both are valid while the item's
attributes (and codes) are the *same objects* the online store's item cache handed out
when the row was built: a re-read makes new ones. :class:`ItemTable` is that
bookkeeping, shared: it numbers items, keeps the objects alive (so their ``id`` cannot
be reused) with their ids in an array, and tells a request in one numpy comparison which
of its candidates need their row rebuilt. Callers keep their rows in arrays of their
own, indexed by the item's number and at least :attr:`ItemTable.capacity` long.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["ItemTable"]


class ItemTable:
    """Numbers for items and the objects each number's row was built from.

    >>> t = ItemTable(objects=1, limit=1000)
    >>> a, b = {"genres": ["Drama"]}, {"genres": []}
    >>> rows, stale = t.rows(["m1", "m2", "m1"], [a, b, a])
    >>> rows.tolist(), stale.tolist()  # new items: every position stale
    ([0, 1, 0], [0, 1, 2])
    >>> t.keep(0, (a,)); t.keep(1, (b,))
    >>> t.rows(["m2", "m1"], [b, a])[1].tolist()  # the same objects: nothing to rebuild
    []
    >>> t.rows(["m2", "m1"], [b, dict(a)])[1].tolist()  # m1 re-read (a new object)
    [1]
    """

    def __init__(self, objects: int, limit: int | None) -> None:
        self.objects = objects
        #: more items than this: every number is forgotten (rows rebuilt as needed);
        #: ``None``: never here, the caller clears the table (with rows of its own)
        self.limit = limit
        self.clear()

    def clear(self) -> None:
        """Forget every item and row."""
        self.number: dict[Any, int] = {}  # item -> its number
        self._kept: list[tuple | None] = []  # the objects of each number's row
        self._ids = np.full((1024, self.objects), -1, np.int64)  # ... their id()s

    @property
    def capacity(self) -> int:
        """Rows the callers' arrays must hold (numbers are below it)."""
        return len(self._ids)

    def rows(self, items: Sequence[Any], *objects: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """``(numbers, stale)``: each item's number (numbered on first sight) and the
        positions whose objects (one sequence per kind, aligned with ``items``) are not
        the ones its row was built from; a new item's are always stale."""
        n = len(items)
        number = self.number
        try:
            ks = np.fromiter(map(number.__getitem__, items), np.int64, n)
        except KeyError:
            if self.limit is not None and len(number) + n > self.limit:
                self.clear()
                number = self.number
            for it in items:
                if it not in number:
                    number[it] = len(self._kept)
                    self._kept.append(None)
            if len(self._kept) > len(self._ids):  # new rows' ids are -1: stale
                more = max(len(self._kept), 2 * len(self._ids)) - len(self._ids)
                self._ids = np.vstack([self._ids, np.full((more, self.objects), -1, np.int64)])
            ks = np.fromiter(map(number.__getitem__, items), np.int64, n)
        ids = self._ids[ks]
        stale = ids[:, 0] != np.fromiter(map(id, objects[0]), np.int64, n)
        for j in range(1, self.objects):
            stale |= ids[:, j] != np.fromiter(map(id, objects[j]), np.int64, n)
        return ks, np.flatnonzero(stale)

    def keep(self, k: int, objects: tuple) -> None:
        """Number ``k``'s row is now built from ``objects`` (kept alive here)."""
        self._kept[k] = objects
        self._ids[k] = [*map(id, objects)]

    def __len__(self) -> int:
        return len(self.number)
