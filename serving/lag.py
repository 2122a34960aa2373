"""Consumer lag per group, topic and partition, with lag in seconds and a health status.

Two pure parts and one I/O shell:

* :class:`OffsetTimeTable` — a bounded table of observed ``(log_end_offset, wall time)``
  points of one partition. The lag in seconds of a committed offset ``c`` is
  ``now - t(c)``, where ``t(c)`` is the time the log end was at ``c``, interpolated
  between the two points around it (the kafka-lag-exporter method). Offsets are a
  message count, seconds are what an operator can act on ("the model sees clicks
  40 s late").
* :func:`evaluate_window` — a Burrow-style status for one partition from its last N
  commit samples (a sliding window, not a fixed lag threshold), see :class:`Status`.
* :class:`LagMonitor` — asks the broker for groups, committed offsets and log-end
  offsets, feeds both, and returns a JSON-able report.

Broker notes (Tansu 0.6, checked against the test broker):

* ListGroups lists groups that have committed offsets; a group that joined but never
  committed is not listed (there is nothing to measure for it anyway). Its state
  field is ``Unknown``; DescribeGroups gives the real state and members.
* DescribeGroups answers an ``authorized_operations`` bit kafka-python 3.0 does not
  know and raises on; we do not ask for ACLs, so the admin client drops that field.
* ListOffsets(latest) answers the *base offset of the last record batch* plus one,
  not the high watermark: after one producer batch of 5 records it says 1, not 5.
  The Fetch response's high watermark is right, so the monitor reads the log end
  from a one-batch fetch at the end of each partition (``fetch_high_watermark``,
  :func:`streams.topics.high_watermarks`).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import pairwise
from typing import Any

from core import kafka as kafka_clients

log = logging.getLogger(__name__)

__all__ = [
    "CommitSample",
    "LagMonitor",
    "LagTracker",
    "OffsetTimeTable",
    "Status",
    "evaluate_window",
    "format_lag_table",
    "worst",
]


class Status(StrEnum):
    """Health of a partition's consumption, evaluated over a window of commit samples.

    In the order :func:`evaluate_window` checks them:

    ``OK``       any sample in the window has zero lag, or none of the rules below holds;
    ``REWIND``   the committed offset went backwards inside the window (a reset or replay);
    ``STOP``     the committed offset did not change over the window, lag stayed above
                 zero, no live member is known, and the last commit change is older than
                 the window's span: nobody consumes;
    ``STALL``    as STOP, but the group has live members: consumers are there (and keep
                 their session) but their offsets do not move;
    ``WARNING``  offsets move but lag grew between every pair of samples: consumers are
                 falling behind.

    Burrow reads commit timestamps from ``__consumer_offsets``, so it sees a consumer
    that re-commits the same offset (STALL) apart from one that stopped committing
    (STOP). Polling OffsetFetch cannot see a re-commit of the same offset, so group
    membership (DescribeGroups) stands in for "still committing".
    """

    OK = "OK"
    WARNING = "WARNING"
    REWIND = "REWIND"
    STALL = "STALL"
    STOP = "STOP"

    @property
    def rank(self) -> int:
        """Severity: a group's status is its worst partition's."""
        return _RANK[self]


_RANK = {Status.OK: 0, Status.WARNING: 1, Status.REWIND: 2, Status.STALL: 3, Status.STOP: 4}


def worst(statuses: Iterable[Status]) -> Status:
    """The most severe status (``OK`` for none).

    >>> worst([Status.OK, Status.STALL, Status.WARNING]).value
    'STALL'
    """
    return max(statuses, key=lambda s: s.rank, default=Status.OK)


@dataclass(frozen=True)
class CommitSample:
    """One observation of a partition: when, the group's committed offset, the log end."""

    ts: float
    committed: int
    log_end: int

    @property
    def lag(self) -> int:
        return max(0, self.log_end - self.committed)


def evaluate_window(samples: Sequence[CommitSample], now: float, last_commit_ts: float | None = None,
                    members: int | None = None, min_samples: int = 2) -> Status:
    """Burrow-style status of one partition from its window of samples (oldest first).

    ``last_commit_ts`` is when the committed offset was last seen to change (``None``:
    never seen to change, i.e. before the window); ``members`` is the group's live
    member count (``None``: unknown). Fewer than ``min_samples`` samples is ``OK``:
    there is no trend to judge yet.

    >>> s = [CommitSample(t, 10, 10 + 5 * t) for t in range(1, 5)]
    >>> evaluate_window(s, now=5.0, members=0).value
    'STOP'
    >>> evaluate_window(s, now=5.0, members=1).value
    'STALL'
    >>> evaluate_window([CommitSample(t, 10 * t, 12 * t) for t in range(1, 5)], now=5.0).value
    'WARNING'
    """
    if len(samples) < min_samples:
        return Status.OK
    if any(s.lag == 0 for s in samples):
        return Status.OK
    commits = [s.committed for s in samples]
    if any(b < a for a, b in pairwise(commits)):
        return Status.REWIND
    if commits[0] == commits[-1]:
        if members:
            return Status.STALL
        span = samples[-1].ts - samples[0].ts
        since = now - last_commit_ts if last_commit_ts is not None else float("inf")
        return Status.STOP if since > span else Status.STALL
    lags = [s.lag for s in samples]
    if all(b > a for a, b in pairwise(lags)):
        return Status.WARNING
    return Status.OK


class OffsetTimeTable:
    """Observed ``(log_end_offset, time)`` points of one partition, oldest first, bounded.

    A run of equal offsets keeps only its first and last point: the first says when the
    log end *reached* that offset, the last bounds when it left it, so interpolation
    inside the next step is not smeared over the idle time.

    >>> t = OffsetTimeTable()
    >>> for off, ts in [(0, 100.0), (100, 110.0), (300, 120.0)]:
    ...     t.add(off, ts)
    >>> t.time_at(200)
    115.0
    >>> t.lag_seconds(50, now=130.0)
    25.0
    >>> t.lag_seconds(300, now=130.0)
    0.0
    """

    def __init__(self, max_points: int = 120) -> None:
        if max_points < 2:
            raise ValueError(f"max_points must be >= 2, got {max_points}")
        self.max_points = max_points
        self.offsets: list[int] = []
        self.times: list[float] = []

    def __len__(self) -> int:
        return len(self.offsets)

    def add(self, offset: int, ts: float) -> None:
        """Record that the log end was at ``offset`` at ``ts`` (times must not go back)."""
        if self.offsets and offset < self.offsets[-1]:
            # The log end went backwards: the topic was recreated or the broker lost its
            # data (memory storage). The old history describes another log.
            self.offsets.clear()
            self.times.clear()
        if (len(self.offsets) >= 2 and self.offsets[-1] == offset
                and self.offsets[-2] == offset):
            self.times[-1] = ts
            return
        self.offsets.append(offset)
        self.times.append(ts)
        if len(self.offsets) > self.max_points:
            del self.offsets[0]
            del self.times[0]

    def time_at(self, offset: int) -> float | None:
        """When the log end was at ``offset``: interpolated, or extrapolated below the table.

        ``None`` if the table is empty. Above the newest point the answer is the newest
        time (the log end had passed ``offset`` by then).
        """
        if not self.offsets:
            return None
        i = bisect.bisect_left(self.offsets, offset)
        if i == len(self.offsets):
            return self.times[-1]
        if self.offsets[i] == offset:
            return self.times[i]  # the first point at that offset: when it was reached
        o1, t1 = self.offsets[i], self.times[i]
        if i == 0:
            # Below the table: extrapolate the table's overall rate backwards. With no
            # rate (one point, or a flat table) the log end was already past ``offset``
            # at the oldest point, which bounds the lag from below.
            o0, t0, on, tn = self.offsets[0], self.times[0], self.offsets[-1], self.times[-1]
            if on == o0 or tn == t0:
                return t0
            return t0 - (o0 - offset) * (tn - t0) / (on - o0)
        # offsets[i - 1] is the last point of its flat run (see the class docstring).
        o0, t0 = self.offsets[i - 1], self.times[i - 1]
        return t0 + (offset - o0) * (t1 - t0) / (o1 - o0)

    def lag_seconds(self, committed: int, now: float) -> float | None:
        """``now`` minus when the log end was at ``committed``; 0 when caught up."""
        if not self.offsets:
            return None
        if committed >= self.offsets[-1]:
            return 0.0
        t = self.time_at(committed)
        return None if t is None else max(0.0, now - t)


@dataclass
class _PartitionState:
    window: deque[CommitSample]
    last_commit_ts: float | None = None


@dataclass
class Observation:
    """What the broker said at one moment (the input of :meth:`LagTracker.update`)."""

    ts: float
    log_ends: dict[tuple[str, int], int]
    committed: dict[str, dict[tuple[str, int], int]]
    members: dict[str, int | None] = field(default_factory=dict)


class LagTracker:
    """The pure half of :class:`LagMonitor`: windows, time tables and the report.

    Feed it :class:`Observation` s (from a broker, or synthetic ones in tests); it keeps
    per partition the last ``window`` commit samples and a time table of the log end.
    """

    def __init__(self, window: int = 10, max_table_points: int = 120,
                 min_samples: int | None = None) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2 samples, got {window}")
        self.window = window
        # Like Burrow with a complete window: no verdict before there is a full trend.
        self.min_samples = window if min_samples is None else min_samples
        self.tables: dict[tuple[str, int], OffsetTimeTable] = {}
        self.partitions: dict[tuple[str, str, int], _PartitionState] = {}
        self.max_table_points = max_table_points

    def update(self, obs: Observation) -> dict[str, Any]:
        now = obs.ts
        for tp, end in obs.log_ends.items():
            self.tables.setdefault(tp, OffsetTimeTable(self.max_table_points)).add(end, now)
        groups = []
        seen: set[tuple[str, str, int]] = set()
        for group in sorted(obs.committed):
            rows = []
            members = obs.members.get(group)
            for (topic, partition), committed in sorted(obs.committed[group].items()):
                end = obs.log_ends.get((topic, partition))
                if end is None:
                    continue  # the topic is gone; its committed offsets are history
                key = (group, topic, partition)
                seen.add(key)
                st = self.partitions.get(key)
                if st is None:
                    st = self.partitions[key] = _PartitionState(deque(maxlen=self.window))
                elif st.window and st.window[-1].committed != committed:
                    st.last_commit_ts = now
                # A committed offset past the log end means the log end answer is behind
                # (see the module notes); never report negative lag.
                end = max(end, committed)
                st.window.append(CommitSample(now, committed, end))
                status = evaluate_window(list(st.window), now, st.last_commit_ts, members,
                                         self.min_samples)
                table = self.tables[(topic, partition)]
                lag_s = table.lag_seconds(committed, now)
                rows.append({
                    "topic": topic, "partition": partition, "committed": committed,
                    "log_end": end, "lag": end - committed,
                    "lag_seconds": None if lag_s is None else round(lag_s, 3),
                    "status": status.value,
                })
            groups.append({
                "group": group,
                "status": worst(Status(r["status"]) for r in rows).value,
                "members": members,
                "lag": sum(r["lag"] for r in rows),
                "max_lag_seconds": max((r["lag_seconds"] or 0.0 for r in rows), default=0.0),
                "partitions": rows,
            })
        for key in [k for k in self.partitions if k not in seen]:
            del self.partitions[key]
        for tp in [tp for tp in self.tables if tp not in obs.log_ends]:
            del self.tables[tp]
        return {"ts": now, "window": self.window, "groups": groups}


class LagMonitor:
    """Sample the broker's consumer groups: committed offsets, log ends, lag, status.

    ``groups=None`` follows every group ListGroups names (re-listed on each sample).
    Call :meth:`sample` periodically (``headwater lag --watch``, serving's ops task
    every 2 s) so the windows fill; the first samples of a partition are ``OK`` until
    there is a trend. Blocking (kafka-python): from async code use a thread.
    """

    def __init__(self, bootstrap: str, groups: Sequence[str] | None = None, window: int = 10, *,
                 fetch_high_watermark: bool = True, request_timeout_ms: int = 10_000,
                 clock: Callable[[], float] = time.time, max_table_points: int = 120,
                 min_samples: int | None = None) -> None:
        self.bootstrap = bootstrap
        self.groups = list(groups) if groups is not None else None
        self.fetch_high_watermark = fetch_high_watermark
        self.request_timeout_ms = request_timeout_ms
        self.clock = clock
        self.tracker = LagTracker(window, max_table_points, min_samples)
        self._admin = None
        self._consumer = None
        self.last_error: str | None = None

    @property
    def window(self) -> int:
        return self.tracker.window

    # ---- broker clients (created lazily so a monitor can be built before the broker runs)
    def _admin_client(self):
        if self._admin is None:
            from kafka import KafkaAdminClient

            class _Admin(KafkaAdminClient):
                def _process_acl_operations(self, obj):
                    # Tansu sets an operation bit kafka-python's enum lacks; we never
                    # asked for ACLs, so drop them instead of failing the describe.
                    obj.pop("authorized_operations", None)
                    return obj

            self._admin = kafka_clients.admin(self.bootstrap, admin_class=_Admin, client_id="headwater-lag",
                                              request_timeout_ms=self.request_timeout_ms)
        return self._admin

    def _consumer_client(self):
        if self._consumer is None:
            # No group: this consumer never joins or commits, it only reads log ends.
            self._consumer = kafka_clients.consumer(
                self.bootstrap, client_id="headwater-lag", group_id=None,
                enable_auto_commit=False, fetch_max_wait_ms=10, max_partition_fetch_bytes=1,
                request_timeout_ms=max(self.request_timeout_ms, 11_000),
                consumer_timeout_ms=1000,
            )
        return self._consumer

    def close(self) -> None:
        for client in (self._consumer, self._admin):
            if client is not None:
                try:
                    client.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    log.debug("closing a lag client failed", exc_info=True)
        self._admin = self._consumer = None

    def __enter__(self) -> LagMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reads ------------------------------------------------------------------------
    def _list_groups(self) -> list[str]:
        if self.groups is not None:
            return list(self.groups)
        listed = self._admin_client().list_groups()
        return sorted({g["group_id"] for g in listed if g.get("protocol_type") in ("consumer", "")})

    def _members(self, groups: list[str]) -> dict[str, int | None]:
        if not groups:
            return {}
        try:
            described = self._admin_client().describe_groups(groups)
        except Exception as exc:  # noqa: BLE001 - membership refines STOP vs STALL only
            log.debug("DescribeGroups failed: %r", exc)
            return {g: None for g in groups}
        out: dict[str, int | None] = {}
        for g in groups:
            d = described.get(g) or {}
            out[g] = None if d.get("error") else len(d.get("members") or [])
        return out

    def _committed(self, groups: list[str]) -> dict[str, dict[tuple[str, int], int]]:
        if not groups:
            return {}
        res = self._admin_client().list_group_offsets({g: None for g in groups})
        out: dict[str, dict[tuple[str, int], int]] = {}
        for g in groups:
            offs = res.get(g) or {}
            out[g] = {(tp.topic, tp.partition): int(om.offset) for tp, om in offs.items()
                      if om is not None and om.offset is not None and om.offset >= 0}
        return out

    def _log_ends(self, partitions: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
        from kafka import TopicPartition

        if not partitions:
            return {}
        consumer = self._consumer_client()
        topics = consumer.topics()
        tps = [TopicPartition(t, p) for t, p in sorted(partitions) if t in topics]
        if not tps:
            return {}
        ends = {tp: int(o) for tp, o in consumer.end_offsets(tps).items() if o is not None}
        if self.fetch_high_watermark:
            from streams.topics import high_watermarks

            for tp, hw in high_watermarks(consumer, list(ends), ends).items():
                ends[tp] = max(ends[tp], hw)
        return {(tp.topic, tp.partition): o for tp, o in ends.items()}

    def observe(self) -> Observation:
        """One round trip to the broker: groups, members, committed offsets, log ends."""
        groups = self._list_groups()
        committed = self._committed(groups)
        members = self._members([g for g in groups if committed.get(g)])
        partitions = {tp for offs in committed.values() for tp in offs}
        log_ends = self._log_ends(partitions)
        return Observation(self.clock(), log_ends, committed, members)

    def sample(self) -> dict[str, Any]:
        """A lag report: ``{"ts", "window", "groups": [{"group", "status", "partitions": [...]}]}``.

        Each partition row: ``topic, partition, committed, log_end, lag, lag_seconds,
        status``. A broker error is raised (``headwater lag`` shows it); serving's task
        records it instead.
        """
        try:
            obs = self.observe()
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise
        self.last_error = None
        return self.tracker.update(obs)


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{s / 60:.1f}m"
    return f"{s / 3600:.1f}h"


def format_lag_table(report: dict[str, Any]) -> str:
    """The plain-text table ``headwater lag`` prints (one row per partition).

    >>> print(format_lag_table({"ts": 0, "groups": [{"group": "g", "status": "OK", "partitions": [
    ...     {"topic": "clicks", "partition": 0, "committed": 5, "log_end": 7, "lag": 2,
    ...      "lag_seconds": 1.5, "status": "OK"}]}]}))  # doctest: +NORMALIZE_WHITESPACE
    GROUP  TOPIC   PARTITION  COMMITTED  LOG-END  LAG  LAG-TIME  STATUS
    g      clicks          0          5        7    2      1.5s  OK
    g      (total)                                 2      1.5s  OK
    """
    header = ("GROUP", "TOPIC", "PARTITION", "COMMITTED", "LOG-END", "LAG", "LAG-TIME", "STATUS")
    rows: list[tuple[str, ...]] = []
    for g in report.get("groups", []):
        parts = g.get("partitions", [])
        for p in parts:
            rows.append((g["group"], p["topic"], str(p["partition"]), str(p["committed"]),
                         str(p["log_end"]), str(p["lag"]), _fmt_seconds(p.get("lag_seconds")),
                         p["status"]))
        total = sum(p["lag"] for p in parts)
        max_s = max((p.get("lag_seconds") or 0.0 for p in parts), default=0.0)
        rows.append((g["group"], "(total)", "", "", "", str(total), _fmt_seconds(max_s), g["status"]))
    if not rows:
        return "no consumer groups with committed offsets"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {2, 3, 4, 5, 6}

    def line(r: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        return "  ".join(cells).rstrip()

    return "\n".join(line(r) for r in [header, *rows])
