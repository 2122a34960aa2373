"""Event schemas and the decoder that splits a Kafka message into good events and errors.

A message holds one event (a JSON object), a batched envelope (a JSON array) or JSON
lines. Every event is validated on its own: one bad event in an envelope is rejected
with a reason naming its index and field, and the good events beside it still count.

msgspec was chosen over pydantic after measuring both on MovieLens click events
(``bench/schemas_decode.py``: 3.3 µs vs 11.8 µs per event decoded and type-checked).
"""

from __future__ import annotations

import binascii
import math
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import numpy as np
import pybase64

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


class Shown(msgspec.Struct, frozen=True):
    """One candidate of an impression: the item, where it was shown, its score."""

    item_id: str | int
    position: int
    score: float


class ImpressionEvent(msgspec.Struct, frozen=True):
    """One ``/v1/score`` answer as serving logged it: what was shown to whom, when, by
    which model, with the feature row each candidate was scored on (``categorical`` and
    ``dense``: one row per candidate, in the order of the feature schema whose sha256
    is ``schema_hash``). Each is either a list of rows, or the matrix's bytes in
    base64: little-endian int64 (``categorical``) or float32 (``dense``), row after
    row. Serving writes the bytes (:func:`impression_rows` reads both)."""

    request_id: str
    ts: float
    user_id: str | int
    model_version: str
    schema_hash: str
    candidates: list[Shown]
    categorical: list[list[int]] | Annotated[str, msgspec.Meta(extra_json_schema={
        "contentEncoding": "base64",
        "description": "the rows' int64 tokens, little-endian, row after row"})]
    dense: list[list[float]] | Annotated[str, msgspec.Meta(extra_json_schema={
        "contentEncoding": "base64",
        "description": "the rows' float32 values, little-endian, row after row"})]


#: The action types that label an impression 1 (any other is refused).
ACTION_TYPES = ("click",)


class ActionEvent(msgspec.Struct, frozen=True):
    """A user acted on a shown item: ``request_id`` names the impression (the
    ``/v1/score`` answer); without it, the user's latest impression of the item up to
    ``ts`` is the one."""

    event_id: str | int
    ts: float
    user_id: str | int
    item_id: str | int
    action: str = "click"
    request_id: str | None = None


class InvalidEvent(ValueError):
    """An event failed validation; the message names the field."""


@dataclass
class Decoded:
    """Result of decoding one message: events (with their index) and rejects."""

    events: list[Any] = field(default_factory=list)
    subs: list[int] = field(default_factory=list)
    errors: list[tuple[int, bytes, str]] = field(default_factory=list)
    #: per event, what validating it computed for its consumer: an impression's
    #: ``(categorical, dense)`` matrices (decoded once, not again by the joiner);
    #: ``None`` for the other kinds
    derived: list[Any] = field(default_factory=list)


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


def _check_event(ev: Any, where: str, now: float | None, ids: tuple[str, ...],
                 optional: tuple[str, ...] = ()) -> None:
    """What every event kind checks alike: its ``ids`` (and ``optional`` ids when given)
    are valid ids, its ``ts`` is a plausible epoch time."""
    for name in ids:
        _check_id(getattr(ev, name), name, where)
    for name in optional:
        if getattr(ev, name) is not None:
            _check_id(getattr(ev, name), name, where)
    _check_ts(ev.ts, where, time.time() if now is None else now)


def _check_finite(values, what: str) -> None:
    if not all(math.isfinite(x) for x in values):
        raise InvalidEvent(f"{what} holds a non-finite number")


def _check_scalars(mapping: dict[str, Scalar], name: str, where: str) -> None:
    for key, value in mapping.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidEvent(f"{where}.{name}.{key} is not a finite number")


def validate_click(ev: ClickEvent, where: str = "$", now: float | None = None) -> ClickEvent:
    """Semantic checks msgspec's types cannot express; raises :class:`InvalidEvent`."""
    if ev.label not in (0, 1):
        raise InvalidEvent(f"{where}.label must be 0 or 1, got {ev.label!r}")
    _check_event(ev, where, now, ("event_id", "user_id", "item_id"))
    _check_scalars(ev.context, "context", where)
    _check_scalars(ev.user, "user", where)
    return ev


def validate_item(ev: ItemEvent, where: str = "$", now: float | None = None) -> ItemEvent:
    _check_event(ev, where, now, ("item_id",))
    for modality, vec in ev.vectors.items():
        _check_finite(vec, f"{where}.vectors.{modality}")
    return ev


def _rows(value: list[list[Any]] | str, dtype: str, n: int, what: str) -> np.ndarray:
    """One impression matrix ``[n, k]`` from its rows or its base64 bytes."""
    if isinstance(value, str):
        try:
            raw = pybase64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidEvent(f"{what} is not base64 ({exc})") from None
        size = np.dtype(dtype).itemsize
        if len(raw) % (n * size):
            raise InvalidEvent(f"{what} holds {len(raw)} bytes: not {n} rows of "
                               f"{np.dtype(dtype).name} ({size} bytes each)")
        return np.frombuffer(raw, dtype).reshape(n, -1).copy()  # writable, as torch wants
    if len(value) != n:
        raise InvalidEvent(f"{what} needs one row per candidate ({n}), has {len(value)}")
    if len({len(row) for row in value}) > 1:
        raise InvalidEvent(f"{what}: rows of unequal length")
    try:
        return np.asarray(value, dtype).reshape(n, -1)
    except OverflowError:
        raise InvalidEvent(f"{what} holds a token outside int64") from None


def impression_rows(ev: ImpressionEvent, where: str = "$") -> tuple[np.ndarray, np.ndarray]:
    """``(categorical int64 [n, F], dense float32 [n, D])`` of an impression, whichever
    form it was written in; :class:`InvalidEvent` names the field that is wrong.

    >>> rows = np.array([[1, -2], [3, 4]], np.int64)
    >>> ev = ImpressionEvent("r", 1.7e9, "u", "1", "h", [Shown("a", 0, 0.5), Shown("b", 1, 0.5)],
    ...                      pybase64.b64encode_as_string(rows.astype("<i8").tobytes()), [[0.5], [1.5]])
    >>> cat, dense = impression_rows(ev)
    >>> cat.tolist(), dense.dtype.name, dense.tolist()
    ([[1, -2], [3, 4]], 'float32', [[0.5], [1.5]])
    >>> impression_rows(msgspec.structs.replace(ev, dense="AAAA"))
    Traceback (most recent call last):
    ...
    streams.schemas.InvalidEvent: $.dense holds 3 bytes: not 2 rows of float32 (4 bytes each)
    """
    n = len(ev.candidates)
    if not n:
        raise InvalidEvent(f"{where}.candidates must not be empty")
    return (_rows(ev.categorical, "<i8", n, f"{where}.categorical"),
            _rows(ev.dense, "<f4", n, f"{where}.dense"))


def validate_impression(ev: ImpressionEvent, where: str = "$", now: float | None = None) -> ImpressionEvent:
    _checked_impression_rows(ev, where, now)
    return ev


def _checked_impression_rows(ev: ImpressionEvent, where: str,
                             now: float | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`validate_impression`, giving the rows it decoded."""
    _check_event(ev, where, now, ("request_id", "user_id"))
    if not _candidates_ok(ev.candidates):  # then name the first wrong one
        for i, c in enumerate(ev.candidates):
            _check_id(c.item_id, "item_id", f"{where}.candidates[{i}]")
            _check_finite((c.score,), f"{where}.candidates[{i}].score")
            if not 0 <= c.position < len(ev.candidates):
                raise InvalidEvent(f"{where}.candidates[{i}].position={c.position} names no "
                                   f"row (0 to {len(ev.candidates) - 1})")
    cat, dense = impression_rows(ev, where)  # refuses an empty candidate list too
    bad = np.flatnonzero(~np.isfinite(dense).all(axis=1))
    if len(bad):
        raise InvalidEvent(f"{where}.dense[{int(bad[0])}] holds a non-finite number")
    return cat, dense


def _candidates_ok(candidates: list[Shown]) -> bool:
    """Whether every candidate passes the per-candidate checks of
    :func:`validate_impression`, in a few passes over the list instead of a Python loop
    of calls per candidate (a 100-candidate answer: 78 µs of checks before).

    >>> _candidates_ok([Shown("a", 0, 0.5), Shown(7, 1, 0.25)])
    True
    >>> _candidates_ok([Shown("a", 0, 0.5), Shown("", 1, 0.25)])
    False
    """
    if not candidates:
        return True
    ids = [c.item_id for c in candidates]
    positions = [c.position for c in candidates]
    lengths = [len(x) for x in ids if isinstance(x, str)]
    return (bool not in set(map(type, ids))
            and (not lengths or (min(lengths) > 0 and max(lengths) <= 256))
            and all(map(math.isfinite, [c.score for c in candidates]))
            and min(positions) >= 0 and max(positions) < len(candidates))


def validate_action(ev: ActionEvent, where: str = "$", now: float | None = None) -> ActionEvent:
    if ev.action not in ACTION_TYPES:
        raise InvalidEvent(f"{where}.action must be one of {list(ACTION_TYPES)}, got {ev.action!r}")
    _check_event(ev, where, now, ("event_id", "user_id", "item_id"), optional=("request_id",))
    return ev


def _deriving_nothing(validate: Any) -> Any:
    def check(ev: Any, where: str, now: float | None) -> None:
        validate(ev, where, now)
    return check


# per kind: validate an event, giving what the consumer needs from it (Decoded.derived)
_CHECKS = {ClickEvent: _deriving_nothing(validate_click),
           ItemEvent: _deriving_nothing(validate_item),
           ImpressionEvent: _checked_impression_rows,
           ActionEvent: _deriving_nothing(validate_action)}
_LABELS = {ClickEvent: "clicks", ItemEvent: "items", ImpressionEvent: "impressions",
           ActionEvent: "actions"}


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
    label = _LABELS[kind]
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
    check = _CHECKS[kind]
    now = time.time() if now is None else now
    decoder = msgspec.json.Decoder(kind)
    for i, raw in enumerate(parts):
        where = f"{label}[{i}]"
        try:
            ev = decoder.decode(raw)
            derived = check(ev, "$", now)
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
        out.derived.append(derived)
    return out


# -- the click path's batch decoder ---------------------------------------------------

_CLICK = msgspec.json.Decoder(ClickEvent)
_CLICK_LIST = msgspec.json.Decoder(list[ClickEvent])
_CLICK_FIELDS = ("event_id", "ts", "user_id", "item_id", "label", "context", "user")


@dataclass
class ClickBatch:
    """Decoded click events of many messages, as columns (see :func:`decode_clicks`).

    ``columns`` holds ``event_id``, ``user_id``, ``item_id`` (object arrays of canonical
    strings), ``ts`` (float64), ``label`` (int8), ``context`` and ``user`` (lists of dicts
    or None); ``message[i]`` is the index of the message event ``i`` came from and
    ``sub[i]`` its index inside that message. Events are in (message, sub) order.
    ``errors`` are ``(message index, event index, original bytes, reason)``.
    """

    columns: dict[str, Any]
    message: Any
    sub: Any
    errors: list[tuple[int, int, bytes, str]] = field(default_factory=list)


def click_columns(events: list[ClickEvent]) -> dict[str, Any]:
    """Columns of decoded click events (see :class:`ClickBatch`; ``label`` as float64)."""
    import numpy as np

    n = len(events)

    def ids(name: str) -> Any:
        # msgspec gives str or int (never bool); str(int) is its canonical text. Read-only:
        # the store and the row builder then factorise the column once between them
        # (features.hashing.factorize).
        col = np.empty(n, dtype=object)
        col[:] = [str(getattr(e, name)) for e in events]
        col.flags.writeable = False
        return col

    return {
        "event_id": ids("event_id"),
        "ts": np.fromiter([e.ts for e in events], np.float64, n),
        "user_id": ids("user_id"),
        "item_id": ids("item_id"),
        # float64: an out-of-range label must reach the range check, not overflow here.
        "label": np.fromiter([e.label for e in events], np.float64, n),
        "context": [e.context or None for e in events],
        "user": [e.user or None for e in events],
    }


def _suspects(cols: dict[str, Any], now: float) -> Any:
    """Events the fast path cannot vouch for: ``validate_click`` decides about them.

    Non-finite numbers cannot come out of msgspec's JSON decoder (it refuses ``NaN`` and
    out-of-range numbers), so only ranges, labels and id lengths are checked here.
    """
    import numpy as np

    ts, label = cols["ts"], cols["label"]
    bad = ~np.isfinite(ts) | (ts < MIN_TS) | (ts > now + MAX_FUTURE_S) | ((label != 0) & (label != 1))
    for name in ("event_id", "user_id", "item_id"):
        lens = np.fromiter(map(len, cols[name]), np.int64, len(ts))
        bad |= (lens == 0) | (lens > 256)
    return bad


def decode_clicks(payloads: list[bytes | None], max_bytes: int | None = None,
                  now: float | None = None) -> ClickBatch:
    """Decode many click messages at once; same events and reasons as :func:`decode_message`.

    Single-object messages are joined and decoded by one msgspec call, envelopes by one
    call each, and validated as columns; only a message that fails somewhere goes
    through :func:`decode_message`, element by element, for its exact reasons.

    >>> b = decode_clicks([b'{"event_id":"a","ts":9e8,"user_id":1,"item_id":2,"label":1}',
    ...                    b'[{"event_id":"b","ts":9e8,"user_id":1,"item_id":2,"label":0},'
    ...                    b' {"event_id":"c","ts":9e8,"user_id":1,"item_id":2,"label":5}]'])
    >>> b.columns["event_id"].tolist(), b.message.tolist(), b.sub.tolist()
    (['a', 'b'], [0, 1], [0, 0])
    >>> b.errors[0][:2], b.errors[0][3]
    ((1, 1), 'clicks[1]: $.label must be 0 or 1, got 5')
    """
    import numpy as np

    now = time.time() if now is None else now
    singles: list[int] = []
    envelopes: list[int] = []
    slow: list[int] = []
    for m, p in enumerate(payloads):
        if p is None or (max_bytes is not None and len(p) > max_bytes):
            slow.append(m)
            continue
        head = p[:1] if p[:1] not in b" \t\r\n" else p.lstrip()[:1]
        if head == b"{" and b"\n" not in p.strip():
            singles.append(m)
        elif head == b"[":
            envelopes.append(m)
        else:
            slow.append(m)
    chunks: list[tuple[list[ClickEvent], list[int], list[int]]] = []  # events, message, sub
    if singles:
        # One decode call per message: joining them into one array would let a message
        # like '{..},{..' shift event boundaries between messages.
        evs, ok = [], []
        for m in singles:
            try:
                evs.append(_CLICK.decode(payloads[m]))
                ok.append(m)
            except (msgspec.DecodeError, UnicodeDecodeError):
                slow.append(m)
        chunks.append((evs, ok, [0] * len(ok)))
    for m in envelopes:
        try:
            evs = _CLICK_LIST.decode(payloads[m])
        except (msgspec.DecodeError, UnicodeDecodeError):
            slow.append(m)
            continue
        chunks.append((evs, [m] * len(evs), list(range(len(evs)))))
    events = [e for c in chunks for e in c[0]]
    msg = np.asarray([m for c in chunks for m in c[1]], dtype=np.int64)
    sub = np.asarray([s for c in chunks for s in c[2]], dtype=np.int64)
    cols = click_columns(events)
    bad = _suspects(cols, now)
    if bad.any():
        again = set(msg[bad].tolist())
        slow += sorted(again)
        keep = ~np.isin(msg, list(again))
        events = [e for e, k in zip(events, keep.tolist(), strict=True) if k]
        msg, sub = msg[keep], sub[keep]
    errors: list[tuple[int, int, bytes, str]] = []
    if slow:
        slow_events: list[ClickEvent] = []
        slow_msg: list[int] = []
        slow_sub: list[int] = []
        for m in sorted(slow):
            d = decode_message(payloads[m], ClickEvent, max_bytes, now)
            slow_events += d.events
            slow_msg += [m] * len(d.events)
            slow_sub += d.subs
            errors += [(m, i, raw, reason) for i, raw, reason in d.errors]
        events += slow_events
        msg = np.concatenate([msg, np.asarray(slow_msg, np.int64)])
        sub = np.concatenate([sub, np.asarray(slow_sub, np.int64)])
        cols = None
    order = np.lexsort((sub, msg))
    if cols is None or not (order == np.arange(len(order))).all():
        events = [events[i] for i in order.tolist()]
        msg, sub = msg[order], sub[order]
        cols = None
    if cols is None:
        cols = click_columns(events)
    cols["label"] = cols["label"].astype(np.int8)
    return ClickBatch(cols, msg, sub, errors)
