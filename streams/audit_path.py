"""The audit path of the worker: audit lines → per-host detection engine → alerts.

Messages on ``audit`` are keyed by host, so one host's provenance graph lives in one
partition and one worker. A message value is raw auditd text (one or many lines) or a
JSON envelope ``{"host": ..., "lines": [...]}``.

The host's learned baseline (:mod:`detection.baseline`) is loaded from Redis
(:class:`detection.baseline_store.BaselineStore`) the first time the worker sees the
host and the fields each batch changed are written back after the batch, so it
survives a worker restart. The provenance graph itself is in memory only: after a
restart chains start afresh. A batch replayed after a crash (at-least-once) is
learned twice; that inflates familiarity by one batch at most.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import Executor

from streams.app import Message, Output
from streams.deadletter import dead_letter, reason_kind
from streams.metrics import WorkerMetrics

log = logging.getLogger(__name__)


def split_audit_message(key: bytes | None, value: bytes) -> tuple[str, list[bytes]]:
    """(host, lines) of one audit message.

    >>> split_audit_message(b"vm", b"type=EOE msg=audit(1.0:2): \\n")
    ('vm', [b'type=EOE msg=audit(1.0:2): '])
    """
    host = key.decode("utf-8", "replace") if key else "unknown"
    text = value.lstrip()
    if text.startswith(b"{") and b'"lines"' in text[:4096]:
        try:
            doc = json.loads(text)
            host = str(doc.get("host") or host)
            return host, [ln.encode() if isinstance(ln, str) else ln for ln in doc["lines"]]
        except (ValueError, KeyError, TypeError):
            pass  # not an envelope after all: fall through to raw lines
    return host, [ln for ln in value.splitlines() if ln.strip()]


def message_host(key: bytes | None, value: bytes) -> str:
    """The host an audit message belongs to, without splitting its lines.

    >>> message_host(b"vm", b'{"host": "db1", "lines": []}'), message_host(None, b"type=X")
    ('db1', 'unknown')
    """
    text = value.lstrip()
    if text.startswith(b"{") and b'"lines"' in text[:4096]:
        return split_audit_message(key, value)[0]
    return key.decode("utf-8", "replace") if key else "unknown"


def audit_engine_config(settings):
    """The detection engine settings of the worker (learning switch, baseline half-life)."""
    from detection.engine import EngineConfig

    return EngineConfig(learn=settings.audit_learn,
                        baseline_half_life=settings.audit_baseline_half_life)


class AuditHandler:
    """Feeds each host's engine and produces alert updates and dead letters."""

    def __init__(self, topics: dict[str, str], metrics: WorkerMetrics,
                 alert_sink: Callable[[list[dict]], object] | None = None,
                 config=None, executor: Executor | None = None, baseline_store=None) -> None:
        self.topics = topics
        self.metrics = metrics
        self.alert_sink = alert_sink
        self.config = config
        self.engines: dict = {}
        self.executor = executor
        self.baseline_store = baseline_store
        self._restored: dict[str, dict] = {}  # host -> stored baseline, until its engine exists

    def engine(self, host: str):
        eng = self.engines.get(host)
        if eng is None:
            # Imported on first use: workers that only see clicks skip the rule tables.
            from detection.engine import DetectionEngine, EngineConfig

            self.config = self.config or EngineConfig()
            eng = self.engines[host] = DetectionEngine(host=host, config=self.config)
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

    def _process(self, topic: str, partition: int, messages: list[Message]):
        outputs: list[Output] = []
        alerts: dict[str, dict] = {}
        seen: set[str] = set()
        for offset, key, value in messages:
            self.metrics.messages_in.labels(topic).inc()
            host, lines = split_audit_message(key, value or b"")
            self.metrics.events_in.labels(topic).inc(len(lines))
            seen.add(host)
            res = self.engine(host).process_lines(lines)
            for line, reason in res.errors:
                reason = f"audit line from host {host}: {reason}"
                outputs.append((self.topics["dead-letter"], key,
                                dead_letter(reason, topic, partition, offset, line), None))
                self.metrics.dead_letters.labels(topic, reason_kind(reason)).inc()
            self.metrics.events_valid.labels(topic).inc(len(lines) - len(res.errors))
            for alert in res.alerts:
                alerts[alert["id"]] = alert  # one update per alert per batch: the newest
        for alert in alerts.values():
            outputs.append((self.topics["alerts"], alert["host"].encode(),
                            json.dumps(alert, default=str).encode(), None))
            for technique in alert.get("techniques", []):
                self.metrics.alerts.labels(technique).inc()
        for host in seen:  # only hosts whose graph changed (the estimate walks every node)
            self.metrics.audit_memory.labels(host).set(
                self.engines[host].graph.counts()["memory_bytes"])
        # taken in this (executor) thread: the engines are only touched here
        deltas = ({h: self.engines[h].baseline_delta() for h in seen}
                  if self.baseline_store is not None else {})
        return outputs, list(alerts.values()), deltas

    async def __call__(self, topic: str, partition: int, messages: list[Message]) -> list[Output]:
        loop = asyncio.get_running_loop()
        await self._restore(messages)
        # Parsing and graph work is CPU-bound: keep it off the event loop.
        outputs, alerts, deltas = await loop.run_in_executor(self.executor, self._process, topic,
                                                             partition, messages)
        await self._save_baselines(deltas)
        if alerts and self.alert_sink is not None:
            result = self.alert_sink(alerts)
            if asyncio.iscoroutine(result):
                await result
        self.metrics.events_out.labels(self.topics["alerts"]).inc(len(alerts))
        return outputs
