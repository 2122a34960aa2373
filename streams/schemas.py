"""Event schemas and the decoder that splits a Kafka message into good events and errors.

A message holds one event (a JSON object), a batched envelope (a JSON array) or JSON
lines. Every event is validated on its own: one bad event in an envelope is rejected
with a reason naming its index and field, and the good events beside it still count.

msgspec was chosen over pydantic after measuring both on MovieLens click events
(``bench/schemas_decode.py``): typed decoding straight from bytes, no dict detour.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

Scalar = str | int | float | bool | None

#: Earliest accepted event time (1990-01-01): older stamps are clock or unit bugs.
MIN_TS = 631_152_000.0
#: How far in the future an event time may lie (seconds) before it is refused.
MAX_FUTURE_S = 86_400.0


class ClickEvent(msgspec.Struct, frozen=True):
    """One impression: ``label`` 1 clicked, 0 shown and not clicked."""

    event_id: str | int
    ts: float
    user_id: str | int
    item_id: str | int
    label: int
    context: dict[str, Scalar] = {}
    user: dict[str, Scalar] = {}


class ItemEvent(msgspec.Struct, frozen=True):
    """An item's content: text, tags and optional vectors per modality."""

    item_id: str | int
    ts: float
    text: str | None = None
    tags: list[str] = []
    vectors: dict[str, list[float]] = {}
    attributes: dict[str, Scalar] = {}


class InvalidEvent(ValueError):
    """An event failed validation; the message names the field."""


@dataclass
class Decoded:
    """Result of decoding one message: events (with their index) and rejects."""

    events: list[Any] = field(default_factory=list)
    subs: list[int] = field(default_factory=list)
    errors: list[tuple[int, bytes, str]] = field(default_factory=list)


def _check_ts(ts: float, where: str, now: float) -> None:
    if not math.isfinite(ts):
        raise InvalidEvent(f"{where}.ts is not a finite number ({ts!r})")
    if ts < MIN_TS:
        raise InvalidEvent(f"{where}.ts={ts!r} is before 1990-01-01 (expected epoch seconds)")
    if ts > now + MAX_FUTURE_S:
        raise InvalidEvent(f"{where}.ts={ts!r} is more than a day in the future")


def _check_id(value: Any, name: str, where: str) -> None:
    if isinstance(value, str):
        if not value or len(value) > 256:
            raise InvalidEvent(f"{where}.{name} must be a non-empty string of at most 256 chars")
    elif isinstance(value, bool):
        raise InvalidEvent(f"{where}.{name} must be a string or integer, got bool")


def _check_scalars(mapping: dict[str, Scalar], name: str, where: str) -> None:
    for key, value in mapping.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidEvent(f"{where}.{name}.{key} is not a finite number")


def validate_click(ev: ClickEvent, where: str = "$", now: float | None = None) -> ClickEvent:
    """Semantic checks msgspec's types cannot express; raises :class:`InvalidEvent`."""
    now = time.time() if now is None else now
    _check_id(ev.event_id, "event_id", where)
    _check_id(ev.user_id, "user_id", where)
    _check_id(ev.item_id, "item_id", where)
    if ev.label not in (0, 1):
        raise InvalidEvent(f"{where}.label must be 0 or 1, got {ev.label!r}")
    _check_ts(ev.ts, where, now)
    _check_scalars(ev.context, "context", where)
    _check_scalars(ev.user, "user", where)
    return ev


def validate_item(ev: ItemEvent, where: str = "$", now: float | None = None) -> ItemEvent:
    now = time.time() if now is None else now
    _check_id(ev.item_id, "item_id", where)
    _check_ts(ev.ts, where, now)
    for modality, vec in ev.vectors.items():
        if not all(math.isfinite(x) for x in vec):
            raise InvalidEvent(f"{where}.vectors.{modality} holds a non-finite number")
    return ev


_VALIDATORS = {ClickEvent: validate_click, ItemEvent: validate_item}


def _split(payload: bytes) -> list[bytes]:
    """The raw JSON texts of a message: one object, an array's elements, or JSON lines."""
    text = payload.strip()
    if text.startswith(b"["):
        return [bytes(raw) for raw in msgspec.json.decode(text, type=list[msgspec.Raw])]
    if b"\n" in text:
        return [line for line in (ln.strip() for ln in text.split(b"\n")) if line]
    return [text]


def decode_message(payload: bytes, kind: type, max_bytes: int | None = None,
                   now: float | None = None) -> Decoded:
    """Decode one Kafka message value into validated events of ``kind``.

    Never raises on bad input: everything wrong ends in ``errors`` as
    ``(index, original bytes, reason)``; index -1 means the whole message.

    >>> d = decode_message(b'[{"event_id":"a","ts":9e8,"user_id":1,"item_id":2,"label":1},'
    ...                    b' {"event_id":"b","ts":9e8,"user_id":1,"item_id":2,"label":"x"}]',
    ...                    ClickEvent)
    >>> [e.event_id for e in d.events], d.errors[0][2]
    (['a'], 'clicks[1]: Expected `int`, got `str` - at `$.label`')
    """
    label = "clicks" if kind is ClickEvent else "items"
    out = Decoded()
    if payload is None:
        out.errors.append((-1, b"", f"{label}: empty message (tombstone)"))
        return out
    if max_bytes is not None and len(payload) > max_bytes:
        out.errors.append((-1, payload, f"{label}: message of {len(payload)} bytes exceeds the limit of {max_bytes}"))
        return out
    try:
        parts = _split(payload)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        out.errors.append((-1, payload, f"{label}: not valid JSON: {exc}"))
        return out
    validator = _VALIDATORS[kind]
    now = time.time() if now is None else now
    decoder = msgspec.json.Decoder(kind)
    for i, raw in enumerate(parts):
        where = f"{label}[{i}]"
        try:
            ev = decoder.decode(raw)
            validator(ev, "$", now)
        except msgspec.ValidationError as exc:
            out.errors.append((i, raw, f"{where}: {exc}"))
            continue
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            out.errors.append((i, raw, f"{where}: not valid JSON: {exc}"))
            continue
        except InvalidEvent as exc:
            out.errors.append((i, raw, f"{where}: {exc}"))
            continue
        out.events.append(ev)
        out.subs.append(i)
    return out
