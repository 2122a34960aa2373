"""The online joiner on a real Redis: one row per impression, labelled in event time."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import redis.asyncio as aioredis

from core.settings import Settings
from learner.batch import decode_batch
from streams.join_path import JoinHandler
from streams.metrics import WorkerMetrics

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def joiner(redis_db):
    made = []

    async def make(**overrides):
        settings = Settings(join_window_seconds=60, join_lateness_seconds=2, join_idle_seconds=30,
                            **overrides)
        client = aioredis.Redis.from_url(redis_db)
        clock = Clock()
        h = JoinHandler(settings, client, WorkerMetrics(), clock=clock)
        h.clock_ = clock
        h.sent = []

        async def send(outputs):
            h.sent.extend(outputs)
        h.send = send
        h.on_assigned({0})
        made.append(client)
        return h
    yield make
    for c in made:
        await c.aclose()


def impression(h: JoinHandler, rid: str, ts: float, items, user="u1", as_bytes=False,
               fields=None) -> bytes:
    """An impression as serving logs it (``as_bytes``: rows as base64 bytes, else as
    lists; ``fields``: categorical fields per row, default the schema's)."""
    f, d = fields or len(h.schema.categorical), len(h.schema.dense)
    cat = [[100 * k + j + 1 for j in range(f)] for k in range(len(items))]
    dense = [[0.25 * k + 0.1 * j for j in range(d)] for k in range(len(items))]
    if as_bytes:
        cat = base64.b64encode(np.asarray(cat, "<i8").tobytes()).decode()
        dense = base64.b64encode(np.asarray(dense, "<f4").tobytes()).decode()
    return json.dumps({
        "request_id": rid, "ts": ts, "user_id": user, "model_version": "baseline",
        "schema_hash": h.schema.hash,
        "candidates": [{"item_id": i, "position": k, "score": 0.5} for k, i in enumerate(items)],
        "categorical": cat, "dense": dense,
    }).encode()


def action(eid, ts, item, rid=None, user="u1") -> bytes:
    ev = {"event_id": eid, "ts": ts, "user_id": user, "item_id": item}
    if rid is not None:
        ev["request_id"] = rid
    return json.dumps(ev).encode()


def rows(h: JoinHandler) -> dict[str, tuple[int, int]]:
    """event id -> (label, seq) over every train batch sent; a row sent twice must agree."""
    out: dict[str, tuple[int, int]] = {}
    for topic, _k, value, _p in h.sent:
        if topic != h.topics["train-batches"]:
            continue
        b = decode_batch(value)
        assert b.source_topic == f"joined:{h.imp_topic}"
        for eid, label, seq in zip(b.table.column("event_id").to_pylist(), b.labels.tolist(),
                                   b.offsets.tolist(), strict=True):
            assert out.setdefault(eid, (label, seq)) == (label, seq)
    return out


def features(h: JoinHandler) -> dict[str, tuple[list, list]]:
    """event id -> (categorical row, dense row) over every train batch sent."""
    out: dict[str, tuple[list, list]] = {}
    for topic, _k, value, _p in h.sent:
        if topic == h.topics["train-batches"]:
            b = decode_batch(value)
            for eid, cat, dense in zip(b.table.column("event_id").to_pylist(), b.categorical.tolist(),
                                       b.dense.tolist(), strict=True):
                out[eid] = (cat, dense)
    return out


def dead(h: JoinHandler) -> list[str]:
    return [json.loads(v)["reason"] for t, _k, v, _p in h.sent if t == h.topics["dead-letter"]]


async def test_click_in_window_is_1_the_rest_0_when_the_watermark_passes(joiner):
    h = await joiner()
    await h(h.imp_topic, 0, [(0, b"u1", impression(h, "r1", T0, ["a", "b"]))])
    await h(h.act_topic, 0, [(0, b"u1", action("c1", T0 + 5, "a", "r1"))])
    assert rows(h) == {"r1:0": (1, 0)}
    # the window of r1/b (T0 + 60) closes once both sides' event time pass it (+ lateness)
    await h(h.imp_topic, 0, [(1, b"u1", impression(h, "r2", T0 + 63, ["c"]))])
    assert "r1:1" not in rows(h)  # actions' side still at T0 + 5
    await h(h.act_topic, 0, [(1, b"u1", action("c2", T0 + 64, "zz", "other"))])
    assert rows(h) == {"r1:0": (1, 0), "r1:1": (0, 1)}
    b = decode_batch(h.sent[0][2])
    assert b.categorical.tolist()[0][:3] == [1, 2, 3]  # the served row, as logged


async def test_an_action_before_its_impression_is_held_and_duplicates_count_once(joiner):
    h = await joiner()
    await h(h.act_topic, 0, [(0, b"u1", action("c1", T0 + 3, "a", "r1")),
                             (1, b"u1", action("c1", T0 + 3, "a", "r1"))])
    assert rows(h) == {}
    await h(h.imp_topic, 0, [(0, b"u1", impression(h, "r1", T0, ["a"]))])
    await h(h.act_topic, 0, [(2, b"u1", action("c1", T0 + 3, "a", "r1"))])
    assert rows(h) == {"r1:0": (1, 0)}
    reg = h.metrics.registry
    assert reg.get_sample_value("headwater_join_actions_total", {"outcome": "duplicate"}) == 2
    assert reg.get_sample_value("headwater_join_rows_total", {"label": "1"}) == 1
    assert not dead(h)


async def test_a_late_action_is_dead_lettered_and_changes_no_label(joiner):
    h = await joiner()
    await h(h.imp_topic, 0, [(0, b"u1", impression(h, "r1", T0, ["a"])),
                             (1, b"u2", impression(h, "r9", T0 + 200, ["x"], user="u2"))])
    await h(h.act_topic, 0, [(0, b"u2", action("c0", T0 + 199, "q", "nothing", user="u2"))])
    assert rows(h) == {"r1:0": (0, 0)}
    await h(h.act_topic, 0, [(1, b"u1", action("c1", T0 + 100, "a", "r1"))])
    assert rows(h) == {"r1:0": (0, 0)}
    assert any("late action" in r for r in dead(h)), dead(h)


async def test_actions_without_request_id_match_the_users_latest_impression_of_the_item(joiner):
    h = await joiner()
    await h(h.imp_topic, 0, [(0, b"u1", impression(h, "r1", T0, ["a", "b"]))])
    await h(h.act_topic, 0, [(0, b"u1", action("c1", T0 + 4, "b"))])
    assert rows(h) == {"r1:1": (1, 0)}


async def test_replayed_offsets_change_nothing_and_a_restart_resumes(joiner):
    h = await joiner()
    msgs = [(0, b"u1", impression(h, "r1", T0, ["a", "b"]))]
    await h(h.imp_topic, 0, msgs)
    await h(h.imp_topic, 0, msgs)  # at-least-once delivery: the same batch again
    h2 = await joiner()  # a restarted worker on the same Redis
    await h2(h2.imp_topic, 0, msgs)
    await h2(h2.act_topic, 0, [(0, b"u1", action("c1", T0 + 1, "b", "r1"))])
    assert rows(h2) == {"r1:1": (1, 0)}
    reg = h.metrics.registry
    assert reg.get_sample_value("headwater_join_impressions_total", {"outcome": "opened"}) == 2


async def test_a_transaction_retried_after_a_watch_conflict_counts_once(joiner, redis_db):
    """Another writer touches the fenced key mid-transaction: the transaction runs again,
    and its metrics (outcomes, messages, dead letters) are counted once, when it commits."""
    h = await joiner()
    other = aioredis.Redis.from_url(redis_db)
    apply, conflicts = h._apply, []

    async def conflicting(pipe, p, topic, messages, meta, b):
        await apply(pipe, p, topic, messages, meta, b)
        if not conflicts:  # once: a real WATCH conflict on the real Redis
            conflicts.append(topic)
            await other.hset(h.key(p, "meta"), "touched", "1")
    h._apply = conflicting
    await h(h.imp_topic, 0, [(0, b"u1", impression(h, "r1", T0, ["a", "b"])),
                             (1, b"u1", b'{"not": "an impression"}')])
    await other.aclose()
    assert conflicts == [h.imp_topic]
    reg = h.metrics.registry
    assert reg.get_sample_value("headwater_join_impressions_total", {"outcome": "opened"}) == 2
    assert reg.get_sample_value("headwater_messages_in_total", {"topic": h.imp_topic}) == 2
    assert reg.get_sample_value("headwater_events_valid_total", {"topic": h.imp_topic}) == 1
    dead_counts = [smp.value for m in reg.collect() for smp in m.samples
                   if smp.name == "headwater_dead_letter_total"]
    assert sum(dead_counts) == 1
    assert len(dead(h)) == 1


async def test_rows_written_but_not_sent_before_a_crash_go_out_once_after_it(joiner):
    h = await joiner()
    await h(h.act_topic, 0, [(0, b"u2", action("c0", T0 + 999, "q", "none", user="u2"))])

    async def broker_down(outputs):
        raise ConnectionError("broker down")
    h.send = broker_down
    with pytest.raises(ConnectionError):
        await h(h.imp_topic, 0, [(0, b"u1", impression(h, "r1", T0, ["a"])),
                                 (1, b"u1", impression(h, "r2", T0 + 1000, ["b"]))])
    h2 = await joiner()
    await h2.flush_all()
    await h2.flush_all()
    assert rows(h2) == {"r1:0": (0, 0)} and len(h2.sent) == 1
    item = await h2.store.entity_features("item:a")
    assert (item["impressions_total"], item["clicks_total"]) == (1, 0)


async def test_idle_partitions_close_windows_with_the_clock(joiner):
    h = await joiner()
    await h(h.imp_topic, 0, [(0, b"u1", impression(h, "r1", T0, ["a"]))])
    await h.tick()
    assert rows(h) == {}
    h.clock_.now += 31  # both sides idle from now on: the watermark follows the clock
    await h.tick()
    h.clock_.now += 40
    await h.tick()
    assert rows(h) == {}  # T0 - 2 + 40 s: the window (60 s) is still open
    h.clock_.now += 30
    await h.tick()
    assert rows(h) == {"r1:0": (0, 0)}


async def test_an_impression_logged_under_another_schema_is_dead_lettered(joiner):
    h = await joiner()
    bad = json.loads(impression(h, "r1", T0, ["a"]))
    bad["schema_hash"] = "0" * 64
    await h(h.imp_topic, 0, [(0, b"u1", json.dumps(bad).encode())])
    assert rows(h) == {} and "feature schema" in dead(h)[0]


async def test_rows_logged_as_bytes_join_as_the_same_rows_as_lists(joiner):
    h = await joiner()
    await h(h.imp_topic, 0, [(0, b"u1", impression(h, "r1", T0, ["a", "b"])),
                             (1, b"u1", impression(h, "r2", T0, ["a", "b"], as_bytes=True))])
    await h(h.imp_topic, 0, [(2, b"u1", impression(h, "r3", T0 + 63, ["c"]))])
    await h(h.act_topic, 0, [(0, b"u1", action("c2", T0 + 64, "zz", "other"))])
    by_event = features(h)
    assert sorted(by_event) == ["r1:0", "r1:1", "r2:0", "r2:1"]
    assert by_event["r1:0"] == by_event["r2:0"] and by_event["r1:1"] == by_event["r2:1"]
    assert by_event["r2:1"][0][:2] == [101, 102] and by_event["r2:1"][1][:2] == [
        float(np.float32(0.25)), float(np.float32(0.35))]


async def test_open_impressions_a_joiner_before_session_26_stored_join_as_before(joiner):
    """Open impressions keep their rows as bytes; one stored as JSON numbers (the form
    before session 26, in Redis across an upgrade) still becomes the same row."""
    import msgspec

    h = await joiner()
    await h(h.imp_topic, 0, [(0, b"u1", impression(h, "r1", T0, ["a", "b"], as_bytes=True))])
    key = h.key(0, "open")
    stored = {k.decode(): msgspec.json.decode(v) for k, v in (await h.client.hgetall(key)).items()}
    assert all("cb" in imp and "c" not in imp for imp in stored.values())
    old = next(k for k in stored if k.endswith("\x1fa"))
    imp = stored[old]
    imp["c"] = np.frombuffer(base64.b64decode(imp.pop("cb")), "<i8").tolist()
    imp["d"] = np.frombuffer(base64.b64decode(imp.pop("db")), "<f4").tolist()
    await h.client.hset(key, old, json.dumps(imp))
    await h(h.act_topic, 0, [(0, b"u1", action("c1", T0 + 1, "a", "r1")),
                             (1, b"u1", action("c2", T0 + 1, "b", "r1"))])
    by_event = features(h)
    f, d = len(h.schema.categorical), len(h.schema.dense)
    assert by_event["r1:0"] == ([j + 1 for j in range(f)],
                                [float(np.float32(0.1 * j)) for j in range(d)])
    assert by_event["r1:1"] == ([100 + j + 1 for j in range(f)],
                                [float(np.float32(0.25 + 0.1 * j)) for j in range(d)])


@pytest.mark.parametrize("as_bytes", [False, True])
async def test_an_impression_whose_rows_miss_a_field_is_dead_lettered(joiner, as_bytes):
    h = await joiner()
    short = impression(h, "r1", T0, ["a"], as_bytes=as_bytes, fields=len(h.schema.categorical) - 1)
    await h(h.imp_topic, 0, [(0, b"u1", short), (1, b"u1", impression(h, "r2", T0, ["b"]))])
    await h(h.imp_topic, 0, [(2, b"u1", impression(h, "r3", T0 + 63, ["c"]))])
    await h(h.act_topic, 0, [(0, b"u1", action("c2", T0 + 64, "zz", "other"))])
    assert rows(h) == {"r2:0": (0, 0)}  # the good impression beside it still joins
    (reason,) = dead(h)
    assert f"rows of {len(h.schema.categorical) - 1} categorical" in reason, reason


async def test_joined_rows_move_the_counters_once(joiner):
    h = await joiner()
    await h(h.act_topic, 0, [(0, b"u2", action("c0", T0 + 999, "q", "none", user="u2"))])
    await h(h.imp_topic, 0, [(0, b"u1", impression(h, "r1", T0, ["a", "b"]))])
    await h(h.act_topic, 0, [(1, b"u1", action("c1", T0 + 5, "a", "r1"))])
    await h(h.imp_topic, 0, [(1, b"u1", impression(h, "r2", T0 + 500, ["c"]))])
    assert rows(h) == {"r1:0": (1, 0), "r1:1": (0, 1)}
    h2 = await joiner()
    await h2.flush_all()  # nothing left, and nothing counted again
    now = T0 + 3605
    got = {e: await h.store.entity_features(e, now=now) for e in ("item:a", "item:b", "user:u1")}
    assert (got["item:a"]["impressions_total"], got["item:a"]["clicks_total"]) == (1, 1)
    assert (got["item:b"]["impressions_total"], got["item:b"]["clicks_total"]) == (1, 0)
    # r2's impression counts when shown, though its window is still open
    assert (got["user:u1"]["impressions_total"], got["user:u1"]["clicks_total"]) == (3, 1)
    # the impression at its time (T0), the click at the click's (T0 + 5): an hour later
    assert got["item:a"]["impressions_1h"] == pytest.approx(2 ** (-3605 / 3600), rel=1e-9)
    assert got["item:a"]["clicks_1h"] == pytest.approx(0.5, rel=1e-9)
    # point in time: a row read as of T0 + 3 sees the impression, not the later click
    res = await h.store.apply_batch("clicks", 0, [{"ts": T0 + 3, "user_id": "u9", "item_id": "a",
                                                   "label": 0, "offset": 0, "event_id": "x"}])
    assert res.features["item_impressions_total"][0] == 1
    assert res.features["item_clicks_total"][0] == 0


async def test_close_until_ends_a_finite_replay(joiner):
    h = await joiner()
    await h(h.imp_topic, 0, [(0, b"u1", impression(h, "r1", T0, ["a"]))])
    await h.close_until(T0 + 59)
    assert rows(h) == {}
    await h.close_until(T0 + 60)
    assert rows(h) == {"r1:0": (0, 0)}
