"""Click messages → event columns, and the dead letters of the events that were refused.

Pure: no I/O, no metrics. :class:`streams.click_path.ClickHandler` counts and produces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streams.deadletter import dead_letter
from streams.events import Message, Output
from streams.schemas import decode_clicks

__all__ = ["DecodedClicks", "concat_columns", "decode_click_messages", "select_rows"]


@dataclass
class DecodedClicks:
    """The valid events of a batch of messages as columns (with ``offset`` and ``sub``,
    the message's offset and the event's index in it), and what was refused."""

    columns: dict
    #: (message index, event index, original bytes, reason) per refused event or message
    errors: list[tuple[int, int, bytes, str]]

    @property
    def n_valid(self) -> int:
        return len(self.columns["ts"])

    def dead_letters(self, dead_letter_topic: str, topic: str, partition: int,
                     messages: list[Message]) -> list[Output]:
        """One dead letter per error, keyed as its message, naming reason and position."""
        out: list[Output] = []
        for m, index, raw, reason in self.errors:
            offset, key, _ = messages[m]
            out.append((dead_letter_topic, key,
                        dead_letter(reason, topic, partition, offset, raw, index), None))
        return out


def decode_click_messages(messages: list[Message], max_message_bytes: int) -> DecodedClicks:
    """Decode and validate every message (a JSON event, array or JSON lines).

    >>> good = b'{"event_id": "e", "ts": 880000000, "user_id": "u", "item_id": "i", "label": 1}'
    >>> d = decode_click_messages([(7, None, good), (8, None, b"[")], 1 << 20)
    >>> d.n_valid, d.columns["offset"].tolist(), d.columns["sub"].tolist(), len(d.errors)
    (1, [7], [0], 1)
    """
    batch = decode_clicks([value for _, _, value in messages], max_message_bytes)
    offsets = np.fromiter((m[0] for m in messages), np.int64, len(messages))
    cols = batch.columns
    cols["offset"] = offsets[batch.message]
    cols["sub"] = batch.sub.astype(np.int32)
    return DecodedClicks(cols, list(batch.errors))


def select_rows(columns: dict, keep: np.ndarray) -> dict:
    """The rows of ``columns`` where ``keep`` is true (numpy columns and lists alike).

    >>> select_rows({"a": np.array([1, 2]), "b": ["x", "y"]}, np.array([False, True]))
    {'a': array([2]), 'b': ['y']}
    """
    return {k: (v[keep] if isinstance(v, np.ndarray) else [x for x, ok in zip(v, keep, strict=True) if ok])
            for k, v in columns.items()}


def concat_columns(before: dict, after: dict) -> dict:
    """``before``'s rows then ``after``'s, column by column (``after``'s columns).

    >>> concat_columns({"a": np.array([1]), "b": ["x"]}, {"a": np.array([2]), "b": ["y"]})
    {'a': array([1, 2]), 'b': ['x', 'y']}
    """
    return {k: (np.concatenate([before[k], v]) if isinstance(before[k], np.ndarray)
                else list(before[k]) + list(v)) for k, v in after.items()}
