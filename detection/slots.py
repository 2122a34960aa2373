"""Compact pickling for the ``__slots__`` classes of a host's detection state.

Graph nodes and edges, parsed records, events, pending coalescer groups and alerts are
all pickled into Redis after every batch (:meth:`detection.engine.DetectionEngine.dump_state`).
"""

from __future__ import annotations

from operator import attrgetter

__all__ = ["Slotted"]


def _slot_state(cls) -> tuple[tuple, attrgetter]:
    """Every slot of *cls* and its bases (base first, ``__weakref__`` left out) and a
    getter of their values as one tuple."""
    names = tuple(s for c in reversed(cls.__mro__) for s in c.__dict__.get("__slots__", ())
                  if s != "__weakref__")
    return names, attrgetter(*names)


class Slotted:
    """Pickles its slots as one tuple of values.

    The default for ``__slots__`` classes builds a ``{slot: value}`` dict per object
    through ``copyreg._slotnames``; the worker pickles every touched host's graph after
    each batch (:meth:`detection.engine.DetectionEngine.dump_state`), so that per-object
    cost was a large part of its time. A subclass must set every slot in ``__init__``. States pickled
    the default way (``(None, {slot: value})``) still load.

    >>> import pickle
    >>> from detection.nodes import Edge, ProcNode
    >>> e = Edge(1.5, "read", ProcNode(7, 1.0, 4), None, {"n": 2})
    >>> f = pickle.loads(pickle.dumps(e, protocol=5))
    >>> (f.ts, f.op, f.proc.pid, f.obj, f.detail, f.inferred)
    (1.5, 'read', 7, None, {'n': 2}, False)
    """

    __slots__ = ()
    _state: tuple = ((), None)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._state = _slot_state(cls)

    def __getstate__(self):
        names, get = self._state
        return get(self) if len(names) > 1 else (get(self),)

    def __setstate__(self, state) -> None:
        if len(state) == 2 and state[0] is None and isinstance(state[1], dict):
            items = state[1].items()  # pickled the default way (before this change)
        else:
            items = zip(self._state[0], state, strict=True)
        for name, value in items:
            setattr(self, name, value)
