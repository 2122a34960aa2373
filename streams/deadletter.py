"""Dead-letter records: what was refused, where it came from, and why."""

from __future__ import annotations

import base64
import time

import msgspec


class DeadLetter(msgspec.Struct):
    """The JSON value on the ``dead-letter`` topic (contract in docs/design.md)."""

    reason: str
    source_topic: str
    partition: int
    offset: int
    original: str  # base64 of the refused bytes
    index: int = -1  # event index inside a batched envelope; -1: the whole message
    ts: float = 0.0


_encoder = msgspec.json.Encoder()


def dead_letter(reason: str, source_topic: str, partition: int, offset: int,
                original: bytes | str | None, index: int = -1) -> bytes:
    """Encode one dead-letter record.

    >>> import json
    >>> rec = json.loads(dead_letter("clicks[0]: bad", "clicks", 2, 41, b"{", 0))
    >>> rec["reason"], rec["partition"], rec["offset"], rec["original"]
    ('clicks[0]: bad', 2, 41, 'ew==')
    """
    if isinstance(original, str):
        original = original.encode("utf-8", "surrogateescape")
    body = base64.b64encode(original or b"").decode("ascii")
    return _encoder.encode(DeadLetter(reason, source_topic, partition, offset, body, index, time.time()))


def reason_kind(reason: str) -> str:
    """A low-cardinality label for metrics, derived from a reason text."""
    lowered = reason.lower()
    for kind in ("not valid json", "exceeds the limit", "missing required field", "expected",
                 "finite", "future", "before 1990", "duplicate", "truncated", "garbled", "empty"):
        if kind in lowered:
            return kind.replace(" ", "_")
    return "invalid"
