"""Group records into events by ``audit(TS:SERIAL)``.

auditd writes the records of one event together and usually ends it with
``EOE``, but shipped logs may interleave serials (several CPUs, a shipper that
reorders) and older auditd versions or filtered corpora omit ``EOE``. The
:class:`Coalescer` keeps a small bounded window of pending serials and emits
an event as soon as it is *complete*:

* an ``EOE`` record arrives for it, or
* its ``PROCTITLE`` (always the last record auditd emits for a syscall event)
  has arrived and it holds the ``SYSCALL`` and all ``items`` ``PATH`` records, or
* it is a single user-space record (``USER_*``, ``CRED_*``, ``DAEMON_*`` ...), or
* it fell out of the window: more than ``max_pending`` serials are open, or it is
  ``max_age`` seconds (log time) older than the newest record seen.

Records for a serial that was already emitted are counted as ``late_records``
and dropped: the event has been acted on and re-emitting it would count twice.
"""

from __future__ import annotations

from collections import deque

from .events import AuditEvent, event_from_records
from .records import Record
from .slots import Slotted

_STANDALONE_PREFIXES = (
    "USER_",
    "CRED_",
    "DAEMON_",
    "SERVICE_",
    "SYSTEM_",
    "ANOM_LOGIN",
    "USYS_",
    "AVC_USER",
    "ACCT_",
    "GRP_",
    "ADD_",
    "DEL_",
    "CHGRP_",
    "CHUSER_",
    "ROLE_",
    "LABEL_",
    "SOFTWARE_UPDATE",
    "TRUSTED_APP",
)


def is_standalone(rtype: str) -> bool:
    """True for user-space record types that form an event on their own.

    >>> is_standalone("USER_START"), is_standalone("SYSCALL")
    (True, False)
    """
    return rtype.startswith(_STANDALONE_PREFIXES)


class _Pending(Slotted):
    __slots__ = ("records", "has_syscall", "items", "npath", "has_proctitle")

    def __init__(self):
        self.records: list[Record] = []
        self.has_syscall = False
        self.items = 0
        self.npath = 0
        self.has_proctitle = False


class Coalescer:
    """Bounded, order-tolerant reassembly of records into :class:`AuditEvent`.

    Parameters
    ----------
    max_pending : int
        Open serials kept at most; the oldest is emitted when exceeded.
    max_age : float
        Log-time seconds after which an open serial is emitted incomplete.

    Examples
    --------
    >>> from detection.records import parse_line
    >>> c = Coalescer()
    >>> c.add(parse_line('type=CWD msg=audit(1.0:7): cwd="/"'))
    []
    >>> [e.serial for e in c.add(parse_line('type=EOE msg=audit(1.0:7): '))]
    [7]
    """

    #: the horizon of the last age scan of the open serials, and whether a serial opened
    #: since then already lies beyond it (class defaults: a state pickled before these
    #: existed scans at its next record)
    _scanned = float("-inf")
    _stale = True

    def __init__(self, max_pending: int = 64, max_age: float = 2.0, remember: int = 4096):
        self.max_pending = max_pending
        self.max_age = max_age
        self._pending: dict[int, _Pending] = {}
        self._done: set[int] = set()
        self._done_order: deque[int] = deque()
        self._remember = remember
        self._newest = 0.0
        self.late_records = 0
        self.incomplete_events = 0

    def __len__(self) -> int:
        return len(self._pending)

    def _finish(self, serial: int, out: list[AuditEvent], complete: bool = True) -> None:
        p = self._pending.pop(serial)
        if not complete:
            self.incomplete_events += 1
        self._done.add(serial)
        self._done_order.append(serial)
        if len(self._done_order) > self._remember:
            self._done.discard(self._done_order.popleft())
        if p.records:
            out.append(event_from_records(p.records))

    def add(self, rec: Record) -> list[AuditEvent]:
        """Add one record; return the events it completed (often none or one)."""
        out: list[AuditEvent] = []
        serial = rec.serial
        if rec.ts > self._newest:
            self._newest = rec.ts
        p = self._pending.get(serial)
        if p is None:
            if serial in self._done:
                self.late_records += 1
                return out
            if rec.rtype == "EOE":
                return out
            if is_standalone(rec.rtype):
                self._done.add(serial)
                self._done_order.append(serial)
                if len(self._done_order) > self._remember:
                    self._done.discard(self._done_order.popleft())
                out.append(event_from_records([rec]))
                self._expire(out)
                return out
            p = self._pending[serial] = _Pending()
            if rec.ts < self._newest - self.max_age:
                self._stale = True  # a late serial: the next age scan must see it
        t = rec.rtype
        if t == "EOE":
            self._finish(serial, out)
        else:
            p.records.append(rec)
            if t == "SYSCALL":
                p.has_syscall = True
                try:
                    p.items = int(rec.fields.get("items", 0))
                except ValueError:
                    p.items = 0
            elif t == "PATH":
                p.npath += 1
            elif t == "PROCTITLE":
                p.has_proctitle = True
            if p.has_proctitle and p.has_syscall and p.npath >= p.items:
                self._finish(serial, out)
        self._expire(out)
        return out

    def _expire(self, out: list[AuditEvent]) -> None:
        pend = self._pending
        while len(pend) > self.max_pending:
            self._finish(next(iter(pend)), out, complete=False)
        if pend:
            horizon = self._newest - self.max_age
            # An open serial's first record never changes, so one that passed a scan
            # can only fall behind a later horizon; skip the scan unless the horizon
            # moved or a serial opened behind it since.
            if horizon == self._scanned and not self._stale:
                return
            self._scanned = horizon
            self._stale = False
            for serial in list(pend):
                recs = pend[serial].records
                if recs and recs[0].ts < horizon:
                    self._finish(serial, out, complete=False)

    def flush(self) -> list[AuditEvent]:
        """Emit every open serial (end of input)."""
        out: list[AuditEvent] = []
        for serial in sorted(self._pending):
            p = self._pending[serial]
            complete = p.has_syscall and p.has_proctitle and p.npath >= p.items
            self._finish(serial, out, complete=complete or not p.has_syscall)
        return out
