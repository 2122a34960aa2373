"""A typed Python client for the people around Headwater: producers and callers.

- :class:`EventSender` sends click, item and audit events to the broker the way the
  product expects them: validated first (the worker's own checks, so a bad event fails
  in the producer's hands with the field named, not later on ``dead-letter``), clicks
  partitioned by user and items by item (one shard owns an entity's counters), audit
  lines keyed by host, batched into envelopes; :meth:`EventSender.flush` raises
  :class:`DeliveryError` when the broker refused anything.
- :class:`ServingClient` scores (one user or many), lists models and alerts, reads
  status and lag, over serving's HTTP API (``GET /openapi.json`` documents it).
- :class:`FeatureReader` reads an entity's online features exactly as serving does.

Example, against a stack started with ``headwater up``::

    from headwater.client import EventSender, ServingClient

    with EventSender("127.0.0.1:19092") as sender:
        sender.send_clicks([{"event_id": "e1", "ts": time.time(), "user_id": "42",
                             "item_id": "50", "label": 1}])
    scores = ServingClient("http://127.0.0.1:8000").score("42", ["50", "181"])
    scores.by_item["50"], scores.model_version
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from kafka.errors import KafkaError

from core.net import redact_url
from features.definition import load as load_definition
from features.store import SyncOnlineStore
from streams.producer import make_producer
from streams.schemas import ClickEvent, InvalidEvent, ItemEvent, validate_click, validate_item
from streams.topics import partition_of

__all__ = ["DeliveryError", "EventSender", "FeatureReader", "HeadwaterError", "InvalidEvent",
           "Scores", "ServingClient"]


class HeadwaterError(Exception):
    """Serving answered with an error: ``status``, its message and the offending ``field``."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(f"{status}: {message}" + (f" (field {field})" if field else ""))
        self.status = status
        self.message = message
        self.field = field


class DeliveryError(Exception):
    """The broker did not take some messages; ``failures`` lists (topic, error) per message."""

    def __init__(self, failures: list[tuple[str, BaseException]], sent: int) -> None:
        first_topic, first = failures[0]
        super().__init__(f"{len(failures)} of {sent} messages not delivered; first, to "
                         f"{first_topic}: {type(first).__name__}: {first}")
        self.failures = failures


_TYPES = {"clicks": (ClickEvent, validate_click), "items": (ItemEvent, validate_item)}


def _validated(events: Iterable[Mapping[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The events as plain dicts, each checked as the worker will check it.

    >>> _validated([{"event_id": 1, "ts": 9e8, "user_id": 2, "item_id": 3, "label": 2}], "clicks")
    Traceback (most recent call last):
    ...
    streams.schemas.InvalidEvent: clicks[0].label must be 0 or 1, got 2
    """
    struct, check = _TYPES[kind]
    out = []
    for i, event in enumerate(events):
        where = f"{kind}[{i}]"
        try:
            typed = msgspec.convert(event, struct)
        except msgspec.ValidationError as exc:
            raise InvalidEvent(f"{where}: {exc}") from exc
        check(typed, where)
        out.append(dict(event))
    return out


class EventSender:
    """Sends events to a Headwater broker; use as a context manager (flushes on exit).

    ``partitions`` defaults to the topic's partition count on the broker. Sends are
    asynchronous; :meth:`flush` waits for every one and raises :class:`DeliveryError`
    listing those the broker refused.
    """

    def __init__(self, kafka: str, *, topic_prefix: str = "", batch: int = 500,
                 connect_timeout: float = 10.0, **producer_config: Any) -> None:
        self.topic_prefix = topic_prefix
        self.batch = batch
        self._producer = make_producer(kafka, connect_timeout=connect_timeout, **producer_config)
        self._pending: list[tuple[str, Any]] = []
        self._encoder = msgspec.json.Encoder()
        self.sent = 0

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def _partitions(self, topic: str) -> int:
        found = self._producer.partitions_for(topic)
        if not found:
            raise DeliveryError([(topic, KafkaError(f"topic {topic} does not exist"))], 0)
        return len(found)

    def _send(self, topic: str, value: bytes, *, key: bytes | None = None,
              partition: int | None = None) -> None:
        self.sent += 1
        try:
            future = self._producer.send(topic, value=value, key=key, partition=partition)
        except KafkaError as exc:  # refused before it left (e.g. too large): reported by flush
            self._pending.append((topic, exc))
            return
        self._pending.append((topic, future))

    def _send_keyed(self, kind: str, events: list[dict[str, Any]], key_field: str) -> int:
        topic = self.topic(kind)
        n = self._partitions(topic)
        parts = partition_of([str(e[key_field]) for e in events], n) if events else []
        for p in range(n):
            chunk = [e for e, ep in zip(events, parts, strict=True) if ep == p]
            for i in range(0, len(chunk), self.batch):
                self._send(topic, self._encoder.encode(chunk[i:i + self.batch]), partition=p)
        return len(events)

    def send_clicks(self, events: Iterable[Mapping[str, Any]]) -> int:
        """Validate and send click events (partitioned by ``user_id``); returns how many."""
        return self._send_keyed("clicks", _validated(events, "clicks"), "user_id")

    def send_items(self, events: Iterable[Mapping[str, Any]]) -> int:
        """Validate and send item events (partitioned by ``item_id``); returns how many."""
        return self._send_keyed("items", _validated(events, "items"), "item_id")

    def send_audit(self, lines: Iterable[str | bytes], host: str | None = None,
                   lines_per_message: int = 500) -> int:
        """Send raw auditd lines, keyed by ``host`` (default: this machine's name)."""
        key = (host or socket.gethostname()).encode()
        buf: list[bytes] = []
        count = 0
        for line in lines:
            raw = line.encode() if isinstance(line, str) else line
            buf.append(raw if raw.endswith(b"\n") else raw + b"\n")
            count += 1
            if len(buf) >= lines_per_message:
                self._send(self.topic("audit"), b"".join(buf), key=key)
                buf = []
        if buf:
            self._send(self.topic("audit"), b"".join(buf), key=key)
        return count

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for every send; returns how many messages were delivered, or raises."""
        self._producer.flush(timeout=timeout)
        failures = []
        for topic, future in self._pending:
            if isinstance(future, BaseException):
                failures.append((topic, future))
                continue
            try:
                future.get(timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - every failure is reported, none lost
                failures.append((topic, exc))
        delivered = len(self._pending) - len(failures)
        sent, self._pending = len(self._pending), []
        if failures:
            raise DeliveryError(failures, sent)
        return delivered

    def close(self) -> None:
        self._producer.close()

    def __enter__(self) -> EventSender:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()


@dataclass(frozen=True)
class Scores:
    """One user's scores: ``by_item`` maps item id (as sent, stringified) to probability."""

    model_version: str
    by_item: dict[str, float] = field(default_factory=dict)


class ServingClient:
    """Serving's HTTP API over one kept-alive connection (reconnects when it drops)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, timeout: float = 10.0,
                 admin_token: str | None = None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"serving URL must be http(s)://host:port, got {redact_url(url)!r}")
        self.url = url
        self._host, self._port, self._https = parts.hostname, parts.port, parts.scheme == "https"
        self.timeout = timeout
        self.admin_token = admin_token
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout)
        return self._conn

    def request(self, method: str, path: str, body: Any = None, *, admin: bool = False,
                query: Mapping[str, Any] | None = None) -> Any:
        """One call; the decoded JSON answer, or :class:`HeadwaterError`."""
        if query:
            path += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Content-Type": "application/json"}
        if admin and self.admin_token:
            headers["Authorization"] = f"Bearer {self.admin_token}"
        data = None if body is None else json.dumps(body).encode()
        for attempt in (0, 1):  # a kept-alive connection the server closed: reconnect once
            conn = self._connection()
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise
            except OSError as exc:
                self.close()
                raise HeadwaterError(0, f"serving at {self.url} unreachable: {exc}") from exc
        doc = json.loads(raw) if raw and resp.getheader("Content-Type", "").startswith(
            "application/json") else raw.decode(errors="replace")
        if resp.status >= 400:
            err = doc if isinstance(doc, dict) else {"error": doc}
            raise HeadwaterError(resp.status, str(err.get("error")), err.get("field"))
        return doc

    def score(self, user_id: str | int, candidates: list[str | int], *,
              context: Mapping[str, Any] | None = None, user: Mapping[str, Any] | None = None) -> Scores:
        """Score ``candidates`` for ``user_id`` with the model serving now."""
        body: dict[str, Any] = {"user_id": user_id, "candidates": list(candidates)}
        if context:
            body["context"] = dict(context)
        if user:
            body["user"] = dict(user)
        doc = self.request("POST", "/v1/score", body)
        return Scores(doc["model_version"],
                      {str(c): float(s) for c, s in zip(candidates, doc["scores"], strict=True)})

    def score_many(self, requests: list[Mapping[str, Any]]) -> list[Scores]:
        """Several users in one call (every one on the same model version)."""
        doc = self.request("POST", "/v1/score", {"requests": [dict(r) for r in requests]})
        return [Scores(doc["model_version"], {k: float(v) for k, v in r["scores"].items()})
                for r in doc["results"]]

    def models(self) -> dict[str, Any]:
        return self.request("GET", "/v1/models")

    def model(self, version: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/models/{urllib.parse.quote(str(version))}")

    def pin(self, version: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/models/{urllib.parse.quote(str(version))}/pin", {}, admin=True)

    def unpin(self) -> dict[str, Any]:
        return self.request("POST", "/v1/models/unpin", {}, admin=True)

    def rollback(self) -> dict[str, Any]:
        return self.request("POST", "/v1/models/rollback", {}, admin=True)

    def alerts(self, *, host: str | None = None, since: float | str | None = None,
               until: float | str | None = None, min_severity: str | None = None,
               limit: int = 100) -> list[dict[str, Any]]:
        """ATT&CK-tagged alerts, newest first."""
        return self.request("GET", "/v1/alerts", query={
            "host": host, "since": since, "until": until, "min_severity": min_severity,
            "limit": limit})["alerts"]

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/status")

    def lag(self) -> dict[str, Any]:
        return self.request("GET", "/v1/lag")

    def ready(self) -> bool:
        try:
            return bool(self.request("GET", "/readyz")["ready"])
        except HeadwaterError:
            return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FeatureReader:
    """An entity's online features from Redis, as serving reads them."""

    def __init__(self, redis_url: str, *, partitions: int = 4, features: str | None = None) -> None:
        """``features``: the feature definition the worker runs with (default: MovieLens)."""
        self._store = SyncOnlineStore.from_url(redis_url, partitions=partitions,
                                               counters=load_definition(features).counters)

    def get(self, entity: str) -> dict[str, Any]:
        """``user:ID``, ``item:ID`` (or ``genre:NAME``) -> its features now."""
        kind, sep, _ = entity.partition(":")
        if not sep or kind not in ("user", "item", "genre"):
            raise ValueError(f"entity must be user:ID, item:ID or genre:NAME, got {entity!r}")
        return self._store.entity_features(entity)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> FeatureReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
