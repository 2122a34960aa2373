"""JSON Schemas of the events on the topics, generated from the code's own types.

The types (:class:`streams.schemas.ClickEvent`, :class:`~streams.schemas.ItemEvent`,
:class:`streams.deadletter.DeadLetter`) give the shape through ``msgspec.json.schema``;
the semantic checks the decoder applies on top (id lengths, the label's values, the
event-time window) are added from the same constants the decoder uses. ``python
scripts/contracts.py`` writes them to ``docs/schemas/``; ``tests/streams/test_contracts.py``
fails when the files drift from the code or when the schema and the decoder disagree on
an event.

Audit events are not JSON: the ``audit`` topic carries raw auditd text lines (one or
more records per message, keyed by host), as ``auditd`` writes them.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec

from streams.deadletter import DeadLetter
from streams.schemas import (
    ACTION_TYPES,
    MAX_FUTURE_S,
    MIN_TS,
    ActionEvent,
    ClickEvent,
    ImpressionEvent,
    ItemEvent,
)

DIALECT = "https://json-schema.org/draft/2020-12/schema"

#: file stem -> (type, topic, what one message may hold)
EVENT_TYPES: dict[str, tuple[type, str, str]] = {
    "click-event": (ClickEvent, "clicks",
                    "one event, a JSON array of events (an envelope), or JSON lines"),
    "item-event": (ItemEvent, "items",
                   "one event, a JSON array of events (an envelope), or JSON lines"),
    "dead-letter": (DeadLetter, "dead-letter", "one record per message"),
    "impression-event": (ImpressionEvent, "impressions",
                         "one event (serving writes one per scored request)"),
    "action-event": (ActionEvent, "actions",
                     "one event, a JSON array of events (an envelope), or JSON lines"),
}

_ID = {"anyOf": [{"type": "string", "minLength": 1, "maxLength": 256}, {"type": "integer"}]}
_TS = {"type": "number", "minimum": MIN_TS,
       "description": f"event time, epoch seconds; from 1990-01-01 to at most "
                      f"{MAX_FUTURE_S:.0f} s after the receiver's clock"}


def event_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of one event type, by its file stem.

    >>> s = event_schema("click-event")
    >>> s["$defs"]["ClickEvent"]["properties"]["label"]
    {'enum': [0, 1]}
    >>> sorted(s["$defs"]["ClickEvent"]["required"])
    ['event_id', 'item_id', 'label', 'ts', 'user_id']
    """
    kind, topic, holds = EVENT_TYPES[name]
    schema = msgspec.json.schema(kind)
    body = schema["$defs"][kind.__name__]
    props = body["properties"]
    if kind is ClickEvent:
        for key in ("event_id", "user_id", "item_id"):
            props[key] = copy.deepcopy(_ID)
        props["label"] = {"enum": [0, 1]}
        props["ts"] = dict(_TS)
    elif kind is ItemEvent:
        props["item_id"] = copy.deepcopy(_ID)
        props["ts"] = dict(_TS)
    elif kind is ActionEvent:
        for key in ("event_id", "user_id", "item_id"):
            props[key] = copy.deepcopy(_ID)
        props["request_id"] = {"anyOf": [{"type": "string", "minLength": 1, "maxLength": 256},
                                         {"type": "null"}], "default": None}
        props["action"] = {"enum": list(ACTION_TYPES), "default": "click"}
        props["ts"] = dict(_TS)
    elif kind is ImpressionEvent:
        props["user_id"] = copy.deepcopy(_ID)
        props["request_id"] = {"type": "string", "minLength": 1, "maxLength": 256}
        props["ts"] = dict(_TS)
        props["candidates"]["minItems"] = 1
        shown = schema["$defs"]["Shown"]["properties"]
        shown["item_id"] = copy.deepcopy(_ID)
        for rows in ("categorical", "dense"):  # the bytes form: base64's alphabet
            for form in props[rows]["anyOf"]:
                if form.get("type") == "string":
                    form["pattern"] = "^[A-Za-z0-9+/]*={0,2}$"
    return {
        "$schema": DIALECT,
        "$id": f"{name}.schema.json",
        "title": f"{kind.__name__} (topic `{topic}`)",
        "description": f"{(kind.__doc__ or '').strip()} A message holds {holds}.",
        **schema,
    }


def all_schemas() -> dict[str, dict[str, Any]]:
    """Every event schema, by file stem."""
    return {name: event_schema(name) for name in EVENT_TYPES}
