"""The audit path of the worker: audit lines → per-host detection engine → alerts.

Messages on ``audit`` are keyed by host, so one host's provenance graph lives in one
partition and one worker. A message value is raw auditd text (one or many lines) or a
JSON envelope ``{"host": ..., "lines": [...]}``.

Detection state is durable (:mod:`detection.state_store`): after every batch, for
each host it touched, either the batch's lines go to the host's journal (with its
alert chains) or, every ``audit_snapshot_every`` batches of the host or once its
journal holds ``audit_journal_max_bytes``, its whole engine (graph, open coalescing
window, alert chains) is written as a new snapshot that replaces the journal; all in
one write to Redis with the partition's next offset and the batch's outputs, fenced on
the offset the batch started from. Loading replays a host's journal on its snapshot. A worker that takes a partition (a restart, a kill
-9, a rebalance) loads that state, skips messages already applied (re-sending the
last batch's outputs, which a crash may have kept from going out) and re-reads from
Kafka what Redis lost (a Redis restored from an older AOF), so chains keep growing in
the same alerts. The host's learned baseline (:mod:`detection.baseline`) has its own
key and lifetime (:class:`detection.baseline_store.BaselineStore`): it is loaded the
first time the worker sees the host and the fields each batch changed are written back;
a batch that fails after its baseline was written (Redis failing between the two writes)
is learned twice when retried, which inflates familiarity by one batch at most.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from detection.state_store import journal_field
from streams.deadletter import dead_letter, reason_kind
from streams.events import Message, Output
from streams.metrics import WorkerMetrics

log = logging.getLogger(__name__)


def split_audit_message(key: bytes | None, value: bytes) -> tuple[str, list[bytes]]:
    """(host, lines) of one audit message.

    >>> split_audit_message(b"vm", b"type=EOE msg=audit(1.0:2): \\n")
    ('vm', [b'type=EOE msg=audit(1.0:2): '])
    """
    host = key.decode("utf-8", "replace") if key else "unknown"
    # Raw lines (what `headwater ship-audit` sends) are told by their first byte, without
    # copying the message; each line is kept unless it is empty or all whitespace, as
    # ``ln.strip()`` would tell, without copying it either.
    if value[:1] == b"{" or value[:1].isspace():
        text = value.lstrip()
        if text.startswith(b"{") and b'"lines"' in text[:4096]:
            try:
                doc = json.loads(text)
                host = str(doc.get("host") or host)
                return host, [ln.encode() if isinstance(ln, str) else ln for ln in doc["lines"]]
            except (ValueError, KeyError, TypeError):
                pass  # not an envelope after all: fall through to raw lines
    return host, [ln for ln in value.splitlines() if ln and not ln.isspace()]


def message_host(key: bytes | None, value: bytes) -> str:
    """The host an audit message belongs to, without splitting its lines.

    >>> message_host(b"vm", b'{"host": "db1", "lines": []}'), message_host(None, b"type=X")
    ('db1', 'unknown')
    """
    if value[:1] == b"{" or value[:1].isspace():  # else raw lines: no copy to strip
        text = value.lstrip()
        if text.startswith(b"{") and b'"lines"' in text[:4096]:
            return split_audit_message(key, value)[0]
    return key.decode("utf-8", "replace") if key else "unknown"


def audit_engine_config(settings):
    """The detection engine settings of the worker (learning switch, baseline half-life)."""
    from detection.engine import EngineConfig

    return EngineConfig(learn=settings.audit_learn,
                        baseline_half_life=settings.audit_baseline_half_life)


def _pack_outputs(outputs: list[Output]) -> bytes:
    """A batch's outputs as bytes (kept with its state, re-sent after a crash).

    >>> _unpack_outputs(_pack_outputs([("alerts", b"vm", b"{}", None)]))
    [('alerts', b'vm', b'{}', None)]
    """
    return json.dumps([[t, k.hex() if k is not None else None, v.hex(), p]
                       for t, k, v, p in outputs]).encode()


def _unpack_outputs(raw: bytes | None) -> list[Output]:
    if not raw:
        return []
    return [(t, bytes.fromhex(k) if k is not None else None, bytes.fromhex(v), p)
            for t, k, v, p in json.loads(raw)]


@dataclass
class _Writes:
    """One batch's detection state writes (see :meth:`AuditHandler._state_writes`)."""

    snapshots: dict[str, bytes] = field(default_factory=dict)  # host -> whole engine
    fields: dict[str, bytes] = field(default_factory=dict)  # journal entries, alert chains
    delete: list[str] = field(default_factory=list)  # the snapshotted hosts' journals
    journals: dict[str, tuple[list[str], int]] = field(default_factory=dict)  # after the write


class AuditHandler:
    """Feeds each host's engine and produces alert updates and dead letters.

    With a ``state_store`` (the worker's), detection state survives restarts as the
    module docstring says; without one (unit tests) it lives in this object only.
    """

    def __init__(self, topics: dict[str, str], metrics: WorkerMetrics,
                 alert_sink: Callable[[list[dict]], object] | None = None,
                 config=None, executor: Executor | None = None, baseline_store=None,
                 state_store=None, read_range: Callable | None = None,
                 log_end: Callable[[str, int], int] | None = None, snapshot_every: int = 16,
                 journal_max_bytes: int = 1_000_000) -> None:
        self.topics = topics
        self.metrics = metrics
        self.alert_sink = alert_sink
        self.config = config
        self.engines: dict = {}
        self.executor = executor
        self.baseline_store = baseline_store
        self.state_store = state_store
        #: reads messages [start, stop) of a partition back from Kafka (a gap re-read)
        self.read_range = read_range
        self._restored: dict[str, dict] = {}  # host -> stored baseline, until its engine exists
        #: host -> (snapshot, journal entries, alert chains) from Redis, until its engine exists
        self._blobs: dict[str, tuple] = {}
        #: host -> (its journal's fields in Redis, their bytes): what the next snapshot deletes
        self._journal: dict[str, tuple[list[str], int]] = {}
        self.snapshot_every = snapshot_every
        self.journal_max_bytes = journal_max_bytes
        self._hosts: dict[int, set[str]] = {}  # partition -> hosts whose state it holds
        self._next: dict[int, int | None] = {}  # partition -> next offset (loaded partitions)
        #: a partition's log end offset (the REWIND check when its state is loaded)
        self.log_end = log_end
        #: partition -> why it is stopped (a REWIND); its messages are refused
        self.stopped: dict[int, str] = {}
        #: pauses fetching a partition (set by the worker)
        self.pause = None

    def engine(self, host: str):
        eng = self.engines.get(host)
        if eng is None:
            # Imported on first use: workers that only see clicks skip the rule tables.
            from detection.engine import DetectionEngine, EngineConfig

            self.config = self.config or EngineConfig()
            stored_state = self._blobs.pop(host, None)
            if stored_state is not None:
                snapshot, journal, alerts = stored_state
                eng = DetectionEngine.resume(host, snapshot, journal, alerts, config=self.config)
                log.info("audit host %s: resumed its detection state (%d alerts, %d nodes, "
                         "%d journal batches replayed)", host, len(eng.aggregator.alerts),
                         len(eng.graph), len(journal))
            else:
                eng = DetectionEngine(host=host, config=self.config)
            self.engines[host] = eng
            stored = self._restored.pop(host, None)
            if stored:
                n = eng.load_baseline(stored)
                log.info("audit host %s: restored %d learned baseline patterns", host, n)
        return eng

    async def _restore(self, messages: list[Message]) -> None:
        """Load the stored baselines of hosts this worker has not seen yet."""
        if self.baseline_store is None:
            return
        for host in {message_host(key, value or b"") for _, key, value in messages}:
            if host not in self.engines and host not in self._restored:
                self._restored[host] = await self.baseline_store.load(host)

    async def _save_baselines(self, deltas: dict) -> None:
        if deltas:
            await self.baseline_store.save(deltas)

    def forget(self, partitions) -> None:
        """Drop what this worker holds of ``partitions`` (revoked, or a failed batch):
        the next batch reloads it from Redis."""
        for p in partitions:
            for host in self._hosts.pop(p, set()):
                self.engines.pop(host, None)
                self._blobs.pop(host, None)
                self._journal.pop(host, None)
                self._restored.pop(host, None)
            self._next.pop(p, None)

    async def _load(self, topic: str, partition: int) -> bytes | None:
        """Load the partition's stored state; returns the last batch's packed outputs."""
        state = await self.state_store.load(topic, partition)
        if state.next_offset is not None and self.log_end is not None:
            end = await asyncio.get_running_loop().run_in_executor(None, self.log_end, topic,
                                                                   partition)
            if state.next_offset > end:
                self._stop(topic, partition, (
                    f"{topic}[{partition}]: REWIND: Redis holds detection state applied up to "
                    f"offset {state.next_offset}, but the broker's log ends at {end}: the log "
                    f"was reset while Redis kept its state. Run `headwater reset` (wipes Redis, "
                    f"the model store and the broker's log) and replay."))
                return None
        self._next[partition] = state.next_offset
        self._hosts[partition] = state.host_names()
        for host in self._hosts[partition]:
            if host not in self.engines:
                journal = state.journals.get(host, [])
                self._blobs[host] = (state.hosts.get(host), [e for _, e in journal],
                                     state.alerts.get(host))
                self._journal[host] = ([f for f, _ in journal], sum(len(e) for _, e in journal))
        if state.next_offset is not None:
            log.info("audit %s[%d]: resuming %d hosts' detection state at offset %d",
                     topic, partition, len(self._hosts[partition]), state.next_offset)
        return state.last_outputs

    def _process(self, topic: str, partition: int, messages: list[Message], emit_from: int = 0):
        outputs: list[Output] = []
        alerts: dict[str, dict] = {}
        seen: dict = {}  # host -> its engine (held here: a revocation may drop it meanwhile)
        batch: dict[str, list] = {}  # host -> its messages' lines (its journal entry)
        m = self.metrics  # each counter's child looked up once per batch, not per message
        messages_in, events_in = m.messages_in.labels(topic), m.events_in.labels(topic)
        events_valid = m.events_valid.labels(topic)
        for offset, key, value in messages:
            host, lines = split_audit_message(key, value or b"")
            eng = seen.get(host) or seen.setdefault(host, self.engine(host))
            batch.setdefault(host, []).append(lines)
            res = eng.process_lines(lines)
            for alert in res.alerts:
                alerts[alert["id"]] = alert  # one update per alert per batch: the newest
            if offset < emit_from:  # a gap re-read: its dead letters went out the first time
                continue
            messages_in.inc()
            events_in.inc(len(lines))
            for line, reason in res.errors:
                reason = f"audit line from host {host}: {reason}"
                outputs.append((self.topics["dead-letter"], key,
                                dead_letter(reason, topic, partition, offset, line), None))
                self.metrics.dead_letters.labels(topic, reason_kind(reason)).inc()
            events_valid.inc(len(lines) - len(res.errors))
        for alert in alerts.values():
            outputs.append((self.topics["alerts"], alert["host"].encode(),
                            json.dumps(alert, default=str).encode(), None))
            for technique in alert.get("techniques", []):
                self.metrics.alerts.labels(technique).inc()
        self._hosts.setdefault(partition, set()).update(seen)
        # taken in this (executor) thread: the engines are only touched here
        deltas = ({h: eng.baseline_delta() for h, eng in seen.items()}
                  if self.baseline_store is not None else {})
        writes = (self._state_writes(seen, batch, messages[0][0]) if self.state_store is not None
                  else None)
        return outputs, list(alerts.values()), deltas, writes

    def _state_writes(self, seen: dict, batch: dict[str, list], first: int) -> _Writes:
        """What the batch writes to Redis per host: a journal entry and the alert chains,
        or a new snapshot that deletes the journal (every ``snapshot_every`` batches of
        the host, or once its journal holds ``journal_max_bytes``)."""
        w = _Writes()
        for host, eng in seen.items():
            fields, size = self._journal.get(host, ([], 0))
            entry = eng.journal_entry(batch[host])
            if len(fields) + 1 >= self.snapshot_every or size + len(entry) >= self.journal_max_bytes:
                w.snapshots[host] = eng.dump_state()
                w.delete += [*fields, f"a:{host}"]
                w.journals[host] = ([], 0)
                # the memory estimate walks every node: with the snapshot, not every batch
                self.metrics.audit_memory.labels(host).set(eng.graph.counts()["memory_bytes"])
            else:
                name = journal_field(host, first)
                w.fields[name] = entry
                w.fields[f"a:{host}"] = eng.dump_alerts()
                w.journals[host] = ([*fields, name], size + len(entry))
        return w

    async def __call__(self, topic: str, partition: int, messages: list[Message]) -> list[Output]:
        if self.state_store is None:
            outputs, alerts, deltas, _ = await self._run(topic, partition, messages)
            await self._finish(alerts, deltas)
            return outputs
        try:
            return await self._durable(topic, partition, messages)
        except BaseException:
            # The engines may hold this batch while Redis does not: drop them, so the
            # retry starts again from the stored state instead of applying it twice.
            self.forget([partition])
            raise

    async def _run(self, topic: str, partition: int, messages: list[Message], emit_from: int = 0):
        loop = asyncio.get_running_loop()
        await self._restore(messages)
        # Parsing and graph work is CPU-bound: keep it off the event loop.
        return await loop.run_in_executor(self.executor, self._process, topic, partition,
                                          messages, emit_from)

    async def _finish(self, alerts: list[dict], deltas: dict) -> None:
        await self._save_baselines(deltas)
        if alerts and self.alert_sink is not None:
            result = self.alert_sink(alerts)
            if asyncio.iscoroutine(result):
                await result
        self.metrics.events_out.labels(self.topics["alerts"]).inc(len(alerts))

    def _stop(self, topic: str, partition: int, reason: str) -> None:
        if partition not in self.stopped:
            log.error("stopping %s[%d]: %s", topic, partition, reason)
            self.metrics.rewinds.labels(topic, str(partition)).inc()
            self.metrics.stopped.labels(topic, str(partition)).set(1)
        self.stopped[partition] = reason
        if self.pause is not None:
            self.pause(partition)

    async def _durable(self, topic: str, partition: int, messages: list[Message]) -> list[Output]:
        if partition not in self.stopped and partition not in self._next:
            last_out = await self._load(topic, partition)
        else:
            last_out = None
        if partition in self.stopped:
            self.metrics.refused.labels(topic).inc(len(messages))
            return []
        start = self._next[partition]
        fresh = [m for m in messages if start is None or m[0] >= start]
        outputs: list[Output] = []
        if len(fresh) < len(messages):
            # Applied before a crash or a rebalance: not again. The last applied batch's
            # outputs may not have gone out (killed before producing): send them again.
            self.metrics.audit_replayed.labels(topic).inc(len(messages) - len(fresh))
            outputs.extend(_unpack_outputs(last_out))
        if not fresh:
            return outputs
        first = fresh[0][0]
        if start is not None and first > start:
            log.warning("detection state of %s[%d] ends at offset %d, the batch starts at %d: "
                        "re-reading the gap", topic, partition, start, first)
            loop = asyncio.get_running_loop()
            fresh = await loop.run_in_executor(None, self.read_range, topic, partition,
                                               start, first) + fresh
        produced, alerts, deltas, w = await self._run(topic, partition, fresh, first)
        await self._finish(alerts, deltas)
        await self.state_store.save(topic, partition, start, fresh[-1][0] + 1, w.snapshots,
                                    _pack_outputs(produced), w.fields, w.delete)
        self._journal.update(w.journals)
        self._next[partition] = fresh[-1][0] + 1
        return outputs + produced
