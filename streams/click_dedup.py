"""Duplicate event ids: refused to dead-letter (naming where the id was first seen).

The window itself (:class:`features.event_ids.EventIdWindow`, in Redis) tells a replay
of the same message (the same id at the same position: not a duplicate) from another
event with an id already seen.
"""

from __future__ import annotations

import json

import numpy as np

from features.store_protocol import DuplicateWindow
from streams.click_decode import select_rows
from streams.deadletter import dead_letter
from streams.events import Message, Output

__all__ = ["DuplicateFilter"]


class DuplicateFilter:
    """Drops events whose id the window has seen at another position."""

    def __init__(self, window: DuplicateWindow, dead_letter_topic: str) -> None:
        self.window = window
        self.dead_letter_topic = dead_letter_topic

    async def drop(self, columns: dict, topic: str, partition: int, messages: list[Message],
                   dead_letters: list[Output] | None) -> tuple[dict, int]:
        """``columns`` without duplicates, and how many were dropped.

        With ``dead_letters``, one dead letter per duplicate is appended to it (a gap
        re-read passes ``None``: its duplicates were dead-lettered the first time).
        """
        ids = [str(e) for e in columns["event_id"]]
        dup, first = await self.window.duplicates(topic, partition, ids, columns["offset"],
                                                  columns["sub"])
        if not dup.any():
            return columns, 0
        if dead_letters is not None:
            keys = {m[0]: m[1] for m in messages}
            for i in np.flatnonzero(dup):
                off, sub = int(columns["offset"][i]), int(columns["sub"][i])
                first_off, first_sub = first[i].split(":")
                reason = (f"clicks[{sub}]: duplicate event_id {ids[i]!r} "
                          f"(first seen at offset {first_off}, event {first_sub})")
                original = json.dumps({"event_id": ids[i], "user_id": str(columns["user_id"][i]),
                                       "item_id": str(columns["item_id"][i]),
                                       "ts": float(columns["ts"][i]),
                                       "label": int(columns["label"][i])}).encode()
                dead_letters.append((self.dead_letter_topic, keys.get(off),
                                     dead_letter(reason, topic, partition, off, original, sub), None))
        return select_rows(columns, ~dup), int(dup.sum())
