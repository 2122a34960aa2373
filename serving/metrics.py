"""Prometheus metrics of the serving process, built on an injected registry.

Names follow the house rules (docs/style.md): ``headwater_`` prefix, base units, ``_total``
on counters (``prometheus_client`` appends it), no user or item ids as labels. A test
builds :class:`ServingMetrics` on a fresh ``CollectorRegistry`` so two apps in one
process never collide on the global one.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServingMetrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_CANDIDATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
_SWAP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServingMetrics:
    """Every serving metric, registered on ``registry``.

    ``headwater_model_freshness_seconds`` is computed at scrape time (now minus the
    serving model's publication ``created_at``), so it keeps growing while no new model
    arrives, which is what an alert on staleness needs.
    """

    def __init__(self, registry: CollectorRegistry | None = None, clock=time.time) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock
        r = self.registry
        self.requests = Counter(
            "headwater_score_requests",
            "Scoring requests by HTTP status code.",
            ["code"],
            registry=r,
        )
        self.score_seconds = Histogram(
            "headwater_score_seconds",
            "Wall time of one /v1/score request, features and forward pass.",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.candidates = Histogram(
            "headwater_score_candidates",
            "Candidates per scoring request.",
            registry=r,
            buckets=_CANDIDATE_BUCKETS,
        )
        self.model_version = Gauge(
            "headwater_model_version",
            "Version number of the model serving requests (0: none).",
            registry=r,
        )
        self.swaps = Counter(
            "headwater_model_swaps", "Model swaps (new version, pin, rollback).", registry=r
        )
        self.load_failures = Counter(
            "headwater_model_load_failures",
            "Checkpoints refused, by reason (checksum, schema, load, sanity, quality, error).",
            ["reason"],
            registry=r,
        )
        self.swap_seconds = Histogram(
            "headwater_model_swap_seconds",
            "Time from starting to load a version to serving it (verify, load, warm-up, checks).",
            registry=r,
            buckets=_SWAP_BUCKETS,
        )
        self.deltas_applied = Counter(
            "headwater_model_deltas_applied",
            "Delta versions loaded, by how: patched (a copy of the base's loaded model with "
            "only what changed replaced) or rebuilt (base + delta rebuilt like a full load).",
            ["how"],
            registry=r,
        )
        self._created_at: float | None = None
        self.freshness = Gauge(
            "headwater_model_freshness_seconds",
            "Seconds since the serving model was published (now - manifest created_at).",
            registry=r,
        )
        self.freshness.set_function(self._freshness)
        self.requests_total = 0

    def _freshness(self) -> float:
        return (
            float("nan") if self._created_at is None else max(0.0, self.clock() - self._created_at)
        )

    def observe_request(
        self, code: int, seconds: float | None = None, candidates: int | None = None
    ) -> None:
        self.requests.labels(str(code)).inc()
        self.requests_total += 1
        if seconds is not None:
            self.score_seconds.observe(seconds)
        if candidates is not None:
            self.candidates.observe(candidates)

    def serving_changed(self, version: str | None, created_at: float | None) -> None:
        self.model_version.set(int(version) if version else 0)
        self._created_at = created_at

    def render(self) -> bytes:
        return generate_latest(self.registry)
