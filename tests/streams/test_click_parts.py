"""The click path's parts, each on its own, and the handler over the in-memory kit
(store, duplicate window, log): fast unit tests beside the real-stack ones
(test_worker_integration.py, faults/test_worker_faults.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from core.settings import Settings
from features.defaults import row_builder
from features.memory_store import MemoryIdWindow, MemoryOnlineStore
from learner.batch import decode_batch
from streams.click_decode import decode_click_messages
from streams.click_dedup import DuplicateFilter
from streams.click_path import ClickHandler
from streams.click_rows import RowEncoder
from streams.events import MemoryLog
from streams.metrics import WorkerMetrics
from streams.worker import WorkerState

SETTINGS = Settings(partitions=2, train_message_rows=2)
TOPICS = SETTINGS.topics
CLICKS, DLQ, ROWS = TOPICS["clicks"], TOPICS["dead-letter"], TOPICS["train-batches"]


def ev(i: int, user: str = "u1", ts: float | None = None, event_id: str | None = None) -> dict:
    return {"event_id": event_id or f"e{i}", "ts": 880_000_000.0 + (i if ts is None else ts),
            "user_id": user, "item_id": f"i{i % 3}", "label": i % 2}


def payload(*events: dict) -> bytes:
    return json.dumps(list(events) if len(events) > 1 else events[0]).encode()


def test_decoding_keeps_positions_and_names_what_was_refused():
    messages = [(5, b"k", payload(ev(1), ev(2))), (6, None, b"{not json"),
                (7, None, payload(ev(3), {"event_id": "x", "ts": 1.0}))]
    decoded = decode_click_messages(messages, 1 << 20)
    assert decoded.columns["offset"].tolist() == [5, 5, 7]
    assert decoded.columns["sub"].tolist() == [0, 1, 0]
    letters = [json.loads(v) for _, _, v, _ in decoded.dead_letters(DLQ, CLICKS, 1, messages)]
    assert [(d["offset"], d["partition"]) for d in letters] == [(6, 1), (7, 1)]
    assert "not valid JSON" in letters[0]["reason"] and "user_id" in letters[1]["reason"]


def test_duplicates_are_dropped_and_dead_lettered_once():
    window = MemoryIdWindow(100)
    dedup = DuplicateFilter(window, DLQ)
    first = [(0, b"k0", payload(ev(1), ev(2)))]
    cols = decode_click_messages(first, 1 << 20).columns
    kept, n = asyncio.run(dedup.drop(cols, CLICKS, 0, first, []))
    assert n == 0 and len(kept["ts"]) == 2
    again = [(3, b"k3", payload(ev(9, event_id="e2"), ev(4)))]
    letters: list = []
    kept, n = asyncio.run(dedup.drop(decode_click_messages(again, 1 << 20).columns, CLICKS, 0,
                                     again, letters))
    assert n == 1 and kept["event_id"].tolist() == ["e4"]
    (topic, key, value, _), = letters
    doc = json.loads(value)
    assert (topic, key, doc["offset"]) == (DLQ, b"k3", 3)
    assert "duplicate event_id 'e2' (first seen at offset 0, event 1)" in doc["reason"]
    # A gap re-read of the same message: the same positions, so nothing is a duplicate.
    kept, n = asyncio.run(dedup.drop(decode_click_messages(first, 1 << 20).columns, CLICKS, 0,
                                     first, None))
    assert n == 0


def test_rows_are_encoded_in_small_messages_with_their_offset_ranges():
    builder = row_builder(SETTINGS)
    store = MemoryOnlineStore(partitions=2, counters=builder.config.counters)
    messages = [(o, None, payload(ev(o))) for o in range(10, 15)]
    cols = decode_click_messages(messages, 1 << 20).columns
    result = asyncio.run(store.apply_batch(CLICKS, 1, cols))
    result.valid[0] = False  # an event whose pre-event state is no longer known: no row
    out, n = RowEncoder(builder, ROWS, 2).outputs(cols, result, CLICKS, 1)
    assert n == 4 and [o[0] for o in out] == [ROWS] * 2 and {o[1] for o in out} == {b"1"}
    batches = [decode_batch(o[2]) for o in out]
    assert [(b.offset_start, b.offset_end, len(b)) for b in batches] == [(11, 13, 2), (13, 15, 2)]
    assert batches[1].event_ids.tolist() == ["e13", "e14"]
    assert batches[1].schema_hash == builder.schema.hash
    with pytest.raises(ValueError):
        RowEncoder(builder, ROWS, 0)


class Kit:
    """A click handler over the in-memory store, window and log."""

    def __init__(self) -> None:
        self.metrics = WorkerMetrics()
        self.state = WorkerState(self.metrics)
        self.builder = row_builder(SETTINGS)
        self.store = MemoryOnlineStore(partitions=2, counters=self.builder.config.counters)
        self.log = MemoryLog()
        self.paused: list[int] = []
        self.handler = ClickHandler(SETTINGS, self.metrics, self.state, store=self.store,
                                    window=MemoryIdWindow(1000), events=self.log,
                                    builder=self.builder, sink=self.log, pause=self.paused.append)
        self.loop = asyncio.new_event_loop()

    def produce(self, partition: int, *events: dict) -> tuple[int, bytes | None, bytes]:
        value = payload(*events)
        return self.log.append(CLICKS, partition, value), None, value

    def handle(self, partition: int, *messages) -> list:
        return self.loop.run_until_complete(self.handler(CLICKS, partition, list(messages)))

    def rows(self, outputs) -> list[str]:
        return [e for o in outputs if o[0] == ROWS for e in decode_batch(o[2]).event_ids.tolist()]

    def impressions(self, user: str) -> int:
        return self.loop.run_until_complete(self.store.entity_features(f"user:{user}"))["impressions_total"]


def test_the_handler_strings_the_parts_together():
    kit = Kit()
    out = kit.handle(0, kit.produce(0, ev(1), ev(2)), kit.produce(0, ev(3, event_id="e1")),
                     (2, None, b"garbage"))
    assert kit.rows(out) == ["e1", "e2"]
    reasons = [json.loads(o[2])["reason"] for o in out if o[0] == DLQ]
    assert len(reasons) == 2 and "duplicate event_id 'e1'" in reasons[0]
    assert kit.impressions("u1") == 2
    assert kit.state.status()["events_in_total"] == 4
    assert kit.state.status()["dead_letter_total"] == 2


def test_writes_the_store_lost_are_read_back_from_the_log_first():
    kit = Kit()
    kit.handle(0, kit.produce(0, ev(1)))
    before = kit.store.snapshot()
    kit.handle(0, kit.produce(0, ev(2)), kit.produce(0, ev(3)))
    kit.store.restore(before)  # a restart from an older copy: offsets 1 and 2 are lost
    out = kit.handle(0, kit.produce(0, ev(4)))
    assert kit.rows(out) == ["e2", "e3", "e4"], "the lost events' rows are built again"
    assert kit.impressions("u1") == 4 and not kit.handler.stopped


def test_a_store_restart_is_noticed_and_every_partition_repaired():
    kit = Kit()
    kit.handler.on_assigned({0, 1})
    kit.loop.run_until_complete(kit.handler.check_redis())
    kit.handle(1, kit.produce(1, ev(1, user="u2")))
    before = kit.store.snapshot()
    kit.handle(1, kit.produce(1, ev(2, user="u2")))
    kit.store.restore(before)
    kit.loop.run_until_complete(kit.handler.check_redis())  # new instance: verify everything
    assert kit.impressions("u2") == 2
    assert [decode_batch(v).event_ids.tolist() for v in kit.log.messages(ROWS)] == [["e2"]], \
        "the repair's rows went to the sink"


def test_a_store_ahead_of_the_log_stops_the_partition():
    kit = Kit()
    kit.handle(0, kit.produce(0, ev(1)), kit.produce(0, ev(2)))
    kit.log.partitions[(CLICKS, 0)].clear()  # the broker's log was reset, the store was not
    kit.handler.on_assigned({0})
    kit.loop.run_until_complete(kit.handler.verify(0, check_end=True))
    assert "REWIND" in kit.handler.stopped[0] and kit.paused == [0]
    assert kit.handle(0, kit.produce(0, ev(3))) == [] and kit.impressions("u1") == 2
    assert kit.metrics.registry.get_sample_value("headwater_refused_messages_total",
                                                 {"topic": CLICKS}) == 1
