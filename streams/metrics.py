"""The worker's Prometheus metrics, built on an injected registry (tests use a fresh one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class WorkerMetrics:
    """Metric objects of the worker; names follow Prometheus conventions.

    Late and already-applied (duplicate offset) events and Redis timings are exported by
    the online store itself (``headwater_features_*``, ``headwater_redis_seconds``) on
    the same registry; the worker does not count them a second time under other names.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages_in = Counter("headwater_messages_in_total", "Kafka messages consumed",
                                   ["topic"], registry=r)
        self.events_in = Counter("headwater_events_in_total", "Events decoded (valid or not)",
                                 ["topic"], registry=r)
        self.events_valid = Counter("headwater_events_valid_total", "Events that passed validation",
                                    ["topic"], registry=r)
        self.events_out = Counter("headwater_events_out_total", "Records produced", ["topic"],
                                  registry=r)
        self.dead_letters = Counter("headwater_dead_letter_total", "Records sent to dead-letter",
                                    ["source_topic", "reason"], registry=r)
        self.batch_size = Histogram("headwater_batch_events", "Events per agent batch", ["topic"],
                                    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
                                    registry=r)
        self.batch_seconds = Histogram("headwater_batch_seconds", "Handler time per batch",
                                       ["topic"], registry=r)
        self.errors = Counter("headwater_worker_errors_total", "Handler failures (retried)",
                              ["topic"], registry=r)
        self.alerts = Counter("headwater_alerts_total", "Alert updates emitted", ["technique"],
                              registry=r)
        self.audit_memory = Gauge("headwater_audit_graph_bytes",
                                  "Approximate provenance-graph memory at the host's last state snapshot",
                                  ["host"], registry=r)
        self.audit_replayed = Counter(
            "headwater_audit_replayed_messages_total",
            "Audit messages skipped as already applied (their state was stored before a restart)",
            ["topic"], registry=r)
        self.items_coded = Counter("headwater_items_coded_total", "Items given quantized codes",
                                   registry=r)
        self.rewinds = Counter("headwater_partition_rewinds_total",
                               "Partitions stopped because Redis recorded offsets the log does "
                               "not hold (REWIND: the log was reset while the state was kept)",
                               ["topic", "partition"], registry=r)
        self.stopped = Gauge("headwater_partition_stopped",
                             "1 while a partition is stopped (REWIND); fix: headwater reset",
                             ["topic", "partition"], registry=r)
        self.refused = Counter("headwater_refused_messages_total",
                               "Messages of stopped partitions, not applied", ["topic"], registry=r)
        self.code_seconds = Histogram("headwater_item_code_seconds",
                                      "Item event to codes stored", registry=r)
