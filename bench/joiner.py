"""The online joiner (streams/join_path.py) beside the labelled click path, on MovieLens.

Everything runs in this process against a real Redis server (no broker: the handlers'
outputs are collected instead of produced), through the product's own code:

- **labelled path** (baseline): the first ``--n`` protocol ratings as click events
  (label from the rating) through ``ClickHandler`` — counters, point-in-time rows;
- **joined path**: the same ratings as impressions, each scored by serving's
  ``Scorer`` at the rating's time (features read from the online store, which the
  joiner's rows update) and logged as serving logs them, ratings >= 4 as a click 1-5 s
  later, through ``JoinHandler`` with the default attribution window (600 s); each
  partition's impressions and due clicks go in in event-time order, and the joiner's
  clock is the replay's event time (so the labels do not depend on the machine's load).

Figures: handler events/s (the two paths alternate, ``--rounds``), label delay p50/p99
(event time from impression to row), Redis memory per open impression, and the
prequential AUC of the product's learner (``trainer_settings``) trained on each path's
rows in the order they were produced, re-chunked to the learner's step size.

Also (``--wide``, default 100) the handler's rate on answers of many candidates, the
impression side alone, as serving logs them.

    .venv/bin/python bench/joiner.py --n 10000 --rounds 1 --ablate
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.settings import Settings, default_data_dir  # noqa: E402
from features.movielens import click_events, load_movielens  # noqa: E402
from learner.batch import decode_batch, encode_batch  # noqa: E402
from learner.metrics import exact_auc  # noqa: E402
from streams.replay import partition_of  # noqa: E402

CHUNK = 200  # ratings per agent batch (--chunk)


_STATE = Path(tempfile.mkdtemp(prefix="bench-joiner-"))


def _settings(**kw) -> Settings:
    return Settings(content_encoder="hashing", partitions=4, state_dir=_STATE,
                    model_store=_STATE / "models", **kw)


async def labelled(redis_url: str, events: list[dict]) -> tuple[list[bytes], float]:
    import redis.asyncio as aioredis

    from streams.click_path import click_handler
    from streams.metrics import WorkerMetrics
    from streams.worker import WorkerState

    settings = _settings()
    client = aioredis.Redis.from_url(redis_url)
    metrics = WorkerMetrics()
    h = click_handler(settings, client, metrics, WorkerState(metrics), "127.0.0.1:1")
    parts = partition_of([e["user_id"] for e in events], 4)
    offsets = [0] * 4
    out, spent = [], 0.0
    for start in range(0, len(events), CHUNK):
        for p in range(4):
            evs = [e for e, q in zip(events[start:start + CHUNK], parts[start:start + CHUNK], strict=True) if q == p]
            if not evs:
                continue
            t = time.perf_counter()
            outs = await h(settings.topics["clicks"], p, [(offsets[p], None, json.dumps(evs).encode())])
            spent += time.perf_counter() - t
            offsets[p] += 1
            out += [v for topic, _k, v, _p in outs if topic == settings.topics["train-batches"]]
    await client.aclose()
    return out, spent


async def joined(redis_url: str, ml, events: list[dict], seed: int = 0,
                 window: float = 600.0) -> tuple[list[bytes], float, list[float]]:
    import redis.asyncio as aioredis

    from serving.app import build_context
    from serving.impressions import encode_impression, impression_record
    from serving.scoring import ScoreRequest
    from streams.join_path import JoinHandler
    from streams.metrics import WorkerMetrics

    settings = _settings(join_window_seconds=window)
    client = aioredis.Redis.from_url(redis_url)
    ctx = build_context(settings, client)
    served = ctx.baseline
    metrics = WorkerMetrics()
    # The joiner's clock is the replay's event time (the newest rating handed over), so
    # its idle rule, and with it every label, does not depend on how loaded the machine is.
    replay_now = [events[0]["ts"]]
    h = JoinHandler(settings, client, metrics, builder=ctx.scorer.builder,
                    clock=lambda: replay_now[0])
    h.delays = []
    sent: list = []

    async def send(outputs):
        sent.extend(outputs)
    h.send = send
    rng = np.random.default_rng(seed)
    rid_of: dict[str, str] = {}  # a joined row's event id -> the rating's
    parts = partition_of([e["user_id"] for e in events], 4)
    off = {(t, p): 0 for t in (h.imp_topic, h.act_topic) for p in range(4)}
    spent = 0.0
    pending: list[tuple[float, int, dict]] = []  # actions not yet due, by time
    for start in range(0, len(events), CHUNK):
        imps: dict[int, list] = {p: [] for p in range(4)}  # (event time, message)
        for e, p in zip(events[start:start + CHUNK], parts[start:start + CHUNK], strict=True):
            ctx.scorer.clock = lambda ts=e["ts"]: ts
            req = ScoreRequest(e["user_id"], [e["item_id"]], None, e.get("user"))
            scored = await ctx.scorer.score_rows(served, req)
            rid = uuid.uuid5(uuid.NAMESPACE_URL, str(e["event_id"])).hex
            rid_of[f"{rid}:0"] = str(e["event_id"])
            imps[int(p)].append((e["ts"], encode_impression(impression_record(
                rid, req.user_id, req.candidates, scored.scores, scored.categorical, scored.dense,
                e["ts"], served.version, ctx.scorer.schema_hash))))
            if e["label"] == 1:
                pending.append((e["ts"] + float(rng.uniform(1, 5)), int(p), {
                    "event_id": f"click-{e['event_id']}", "ts": 0.0, "user_id": e["user_id"],
                    "item_id": e["item_id"], "request_id": rid}))
        now = events[min(start + CHUNK, len(events)) - 1]["ts"]
        replay_now[0] = now
        due = sorted([a for a in pending if a[0] <= now], key=lambda a: a[0])
        pending = [a for a in pending if a[0] > now]
        # Each partition's impressions and due clicks are handed over in event-time order
        # (runs of one topic as one batch), as a live joiner sees them: a click never
        # reaches it after impressions shown long after it (a chunk of MovieLens ratings
        # can span hours: its impressions first, then its clicks, would close windows by
        # the chunk's newest impression before their clicks came).
        merged: dict[int, list] = {p: [(ts, 0, h.imp_topic, m) for ts, m in imps[p]] for p in range(4)}
        for ts, p, a in due:
            merged[p].append((ts, 1, h.act_topic, json.dumps([dict(a, ts=ts)]).encode()))
        t = time.perf_counter()
        for p in range(4):
            runs: list[tuple[str, list]] = []
            for _ts, _k, topic, m in sorted(merged[p], key=lambda x: (x[0], x[1])):
                if not runs or runs[-1][0] != topic:
                    runs.append((topic, []))
                runs[-1][1].append((off[topic, p], None, m))
                off[topic, p] += 1
            for topic, batch in runs:
                await h(topic, p, batch)
        spent += time.perf_counter() - t
    # the stream ends: the pending clicks go out, then the rest of the windows close
    last = events[-1]["ts"]
    for p in range(4):
        acts = sorted(pending, key=lambda a: a[0])
        msgs = [json.dumps([dict(a, ts=ts) for ts, q, a in acts if q == p]).encode()]
        if json.loads(msgs[0]):
            await h(h.act_topic, p, [(off[h.act_topic, p], None, msgs[0])])
            off[h.act_topic, p] += 1
    h.on_assigned(range(4))
    await h.close_until(last + window + 10)
    await client.aclose()
    rows = [v for topic, _k, v, _p in sent if topic == settings.topics["train-batches"]]
    return rows, spent, h.delays, rid_of


async def open_memory(redis_url: str, n: int = 5000) -> float:
    """Redis bytes per open impression (one candidate with the default schema's row)."""
    import redis.asyncio as aioredis

    from features.defaults import row_builder
    from streams.join_path import JoinHandler
    from streams.metrics import WorkerMetrics

    settings = _settings(join_window_seconds=1e9)
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    h = JoinHandler(settings, client, WorkerMetrics(), builder=row_builder(settings))
    h.send = lambda outputs: asyncio.sleep(0)
    schema = h.schema
    t0 = time.time() - 3600
    msgs = [(i, None, json.dumps({
        "request_id": uuid.uuid4().hex, "ts": t0 + i * 0.01, "user_id": f"u{i % 500}",
        "model_version": "1", "schema_hash": schema.hash,
        "candidates": [{"item_id": f"i{i % 1600}", "position": 0, "score": 0.123456}],
        "categorical": [[int(x) for x in np.random.default_rng(i).integers(1, 2**62, len(schema.categorical))]],
        "dense": [[float(x) for x in np.random.default_rng(i).random(len(schema.dense))]]}).encode())
        for i in range(n)]
    for s in range(0, n, 500):
        await h(h.imp_topic, 0, msgs[s:s + 500])
    # the join state an open impression keeps (open, due, ui), not the counters it moved
    used = 0
    for name in ("open", "due", "ui"):
        used += await client.memory_usage(h.key(0, name), samples=0) or 0
    n_open = await client.hlen(h.key(0, "open"))
    await client.aclose()
    return used / n_open


async def wide_answers(redis_url: str, candidates: int, answers: int = 1200,
                       batch: int = 50) -> float:
    """Handler answers/s for answers of ``candidates`` candidates each, logged as serving
    logs them (rows as bytes), in batches of ``batch`` messages of one partition, on the
    worker's Redis client. Every window stays open: this is the impression side's cost
    (decode, counters, open state), the joined path's main cost when serving answers with
    many candidates."""
    from core.redis_client import connect_async
    from features.defaults import row_builder
    from serving.impressions import encode_impression, impression_record
    from streams.join_path import JoinHandler
    from streams.metrics import WorkerMetrics

    settings = _settings(join_window_seconds=1e9)
    client = connect_async(redis_url)
    await client.flushdb()
    h = JoinHandler(settings, client, WorkerMetrics(), builder=row_builder(settings))

    async def send(outputs):
        pass
    h.send = send
    schema = h.schema
    rng = np.random.default_rng(0)
    t0 = time.time() - 3600
    msgs = [(i, None, encode_impression(impression_record(
        uuid.uuid4().hex, f"u{i % 500}", [f"i{(i * 7 + j) % 1600}" for j in range(candidates)],
        rng.random(candidates), rng.integers(1, 2**62, (candidates, len(schema.categorical))),
        rng.random((candidates, len(schema.dense))).astype(np.float32), t0 + i * 0.01, "1",
        schema.hash))) for i in range(answers)]
    await h(h.imp_topic, 0, msgs[:batch])  # warm-up: compiled kernels, scripts loaded
    spent = 0.0
    for s in range(batch, answers, batch):
        t = time.perf_counter()
        await h(h.imp_topic, 0, msgs[s:s + batch])
        spent += time.perf_counter() - t
    await client.aclose()
    return (answers - batch) / spent


def rows_table(payloads: list[bytes]) -> tuple[pa.Table, str]:
    """All rows in production order, and their schema."""
    batches = [decode_batch(p) for p in payloads]
    return (pa.concat_tables([b.table.replace_schema_metadata(None) for b in batches]),
            batches[0].schema_json)


def reordered(payloads: list[bytes], order) -> list[bytes]:
    """The rows of ``payloads`` taken in ``order`` (row indices), as one message."""
    table, schema_json = rows_table(payloads)
    t = table.take(pa.array(np.asarray(order, np.int64)))
    cols = {name: t.column(name).to_numpy(zero_copy_only=False) for name in t.column_names}
    import hashlib

    h = hashlib.sha256(schema_json.encode()).hexdigest()
    return [encode_batch(cols, schema_json, h, "bench", 0, 0, t.num_rows)]


def rechunk(payloads: list[bytes], step: int) -> list[bytes]:
    """All rows in production order, re-cut into messages of ``step`` rows."""
    table, schema_json = rows_table(payloads)
    import hashlib

    h = hashlib.sha256(schema_json.encode()).hexdigest()
    out = []
    for s in range(0, table.num_rows, step):
        t = table.slice(s, step)
        cols = {name: t.column(name).to_numpy(zero_copy_only=False) for name in t.column_names}
        cols["offset"] = np.arange(s, s + t.num_rows)
        cols["sub"] = np.zeros(t.num_rows, np.int32)
        out.append(encode_batch(cols, schema_json, h, "bench", 0, s, s + t.num_rows))
    return out


def prequential_auc(payloads: list[bytes]) -> tuple[float, int]:
    from streams.learner_runner import trainer_settings

    s = _settings()
    ts = dataclasses.replace(trainer_settings(s), served_lag=None)
    trainer = ts.build(decode_batch(payloads[0]).schema_json)
    ys, ps = [], []
    for p in rechunk(payloads, s.learner_step_rows):
        b = decode_batch(p)
        res = trainer.step(b)
        ys.append(b.labels)
        ps.append(res.scores)
    y, pr = np.concatenate(ys), np.concatenate(ps)
    return float(exact_auc(y, pr)), len(y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="ratings replayed")
    ap.add_argument("--rounds", type=int, default=2, help="alternating timing rounds")
    ap.add_argument("--chunk", type=int, default=200,
                    help="ratings scored before the joiner sees them (the agent batch)")
    ap.add_argument("--ablate", action="store_true",
                    help="also the AUC of each path's rows in the other path's order")
    ap.add_argument("--wide", type=int, default=100,
                    help="also the handler's answers/s for answers of this many candidates "
                         "(0: not measured)")
    args = ap.parse_args()
    global CHUNK
    CHUNK = args.chunk
    import os

    import redis

    from headwater.servers import start_redis

    ml = load_movielens(default_data_dir() / "ml-100k")
    events = click_events(ml, 0, args.n)
    server = start_redis()
    url = server.extra["url"]
    sync = redis.Redis.from_url(url)
    results: dict[str, list] = {"labelled": [], "joined": []}
    try:
        for r in range(args.rounds):
            for name in ("labelled", "joined"):
                sync.flushdb()
                from features.store import SyncOnlineStore
                SyncOnlineStore(sync, partitions=4).put_item_attributes(
                    {iid: {"genres": doc.get("genres"), "year": doc.get("year")} for iid, doc in ml.items.items()},
                    ts=events[0]["ts"] - 1)
                if name == "labelled":
                    rows, spent = asyncio.run(labelled(url, events))
                    n_events, delays = len(events), None
                else:
                    rows, spent, delays, rid_of = asyncio.run(joined(url, ml, events, seed=r))
                    n_events = len(events) + sum(e["label"] for e in events)
                results[name].append((rows, spent, n_events, delays))
                print(f"round {r} {name}: {n_events} events in {spent:.2f}s handler time = "
                      f"{n_events / spent:.0f} events/s; {sum(len(decode_batch(p)) for p in rows)} rows; "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
        mem = asyncio.run(open_memory(url))
        wide = asyncio.run(wide_answers(url, args.wide)) if args.wide else None
    finally:
        sync.close()
        server.stop()
    lab_rows, _, _, _ = results["labelled"][0]
    j_rows, _, _, delays = results["joined"][0]
    print(f"label-1 rows: labelled {sum(int(decode_batch(p).labels.sum()) for p in lab_rows)}, "
          f"joined {sum(int(decode_batch(p).labels.sum()) for p in j_rows)}")
    d = np.asarray(delays)
    auc_l, n_l = prequential_auc(lab_rows)
    auc_j, n_j = prequential_auc(j_rows)
    if args.ablate:
        # Which difference costs the AUC: the order rows reach the learner in, or the
        # rows themselves (features as served vs point-in-time pre-event features)?
        jt, _ = rows_table(j_rows)
        lt, _ = rows_table(lab_rows)
        j_ids = [rid_of[e] for e in jt.column("event_id").to_pylist()]
        l_pos = {e: i for i, e in enumerate(lt.column("event_id").to_pylist())}
        print(f"ablation: labelled rows in the joined path's order: "
              f"{prequential_auc(reordered(lab_rows, [l_pos[e] for e in j_ids]))[0]:.4f}")
        # the same rating's row on both paths: which columns differ, how often
        lt_same = lt.take(pa.array([l_pos[e] for e in j_ids]))
        diffs = []
        for name in jt.column_names:
            if not name.startswith(("c:", "d:")):
                continue
            a = jt.column(name).to_numpy(zero_copy_only=False)
            b = lt_same.column(name).to_numpy(zero_copy_only=False)
            differ = ~np.isclose(a, b, rtol=1e-4, atol=1e-6) if a.dtype.kind == "f" else a != b
            if differ.any():
                diffs.append((float(differ.mean()), name))
        print("ablation: columns differing between the two paths' rows of the same rating "
              "(share of rows): " + ", ".join(f"{n} {m:.2f}" for m, n in sorted(diffs, reverse=True)[:25]))
        j_pos = {e: i for i, e in enumerate(j_ids)}
        print(f"ablation: joined rows in the labelled path's (impression) order: "
              f"{prequential_auc(reordered(j_rows, [j_pos[e] for e in lt.column('event_id').to_pylist()]))[0]:.4f}",
              flush=True)
    rate = {k: float(np.median([n / s for _, s, n, _ in v])) for k, v in results.items()}
    print()
    print(f"handler events/s (median of {args.rounds}): labelled {rate['labelled']:.0f}, "
          f"joined {rate['joined']:.0f} (impressions + actions); ratio {rate['joined'] / rate['labelled']:.2f}")
    pos = d[d < 600]
    print(f"label delay (event time) p50 {np.percentile(d, 50):.1f} s, p99 {np.percentile(d, 99):.1f} s; "
          f"label-1 rows p50 {np.percentile(pos, 50):.1f} s, p99 {np.percentile(pos, 99):.1f} s")
    print(f"Redis memory per open impression: {mem:.0f} bytes")
    if wide is not None:
        print(f"joiner handler, answers of {args.wide} candidates (rows as bytes, batches of 50): "
              f"{wide:.0f} answers/s = {wide * args.wide:.0f} impressions/s")
    print(f"prequential AUC: labelled path {auc_l:.4f} over {n_l} rows; joined path {auc_j:.4f} "
          f"over {n_j} rows; difference {auc_j - auc_l:+.4f}")
    print(f"load average {os.getloadavg()}; machine shared with other engineers")


if __name__ == "__main__":
    main()
