"""POST /v1/score against real Redis features and a real published checkpoint."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from features.store import SyncOnlineStore
from tests.stackutil import wait_until_async


async def test_scores_are_finite_in_candidate_order_and_match_offline_rows(
    settings, seeded_redis, publish, make_app, builder, h
):
    publish(0, kind="deepfm")
    client, ctx = await make_app(settings, seeded_redis)
    cands = ["i1", "i2", "i3", "i1"]
    resp = await client.post("/v1/score", data=h.score_body("u1", cands))
    assert resp.status == 200, await resp.text()
    doc = await resp.json()
    assert doc["model_version"] == "000001"
    scores = np.array(doc["scores"])
    assert (
        scores.shape == (4,) and np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()
    )
    assert scores[0] == pytest.approx(scores[3])
    # Same features, same rows, same model computed outside the app: training/serving parity.
    want = h.expected_scores(
        ctx.holder.current, builder, seeded_redis, settings.partitions, "u1", cands
    )
    np.testing.assert_allclose(scores, want, rtol=1e-6)
    # Order follows the candidates.
    resp = await client.post("/v1/score", data=h.score_body("u1", cands[::-1]))
    np.testing.assert_allclose((await resp.json())["scores"], scores[::-1], rtol=1e-6)


async def test_counters_reach_the_model(settings, seeded_redis, publish, make_app, h):
    """A popular item and a never-seen one get different dense features, hence scores."""
    publish(3)
    client, ctx = await make_app(settings, seeded_redis)
    body = h.score_body("u1", ["i1", "i1"], context={"device": "tv"})
    assert (await client.post("/v1/score", data=body)).status == 200  # starts the tracking
    tracker = ctx.scorer.store.transport.invalidations
    await wait_until_async(lambda: tracker.live, what="Redis tracks serving's reads")
    resp = await client.post(
        "/v1/score", data=h.score_body("u1", ["i1", "i1"], context={"device": "tv"})
    )
    a = (await resp.json())["scores"]
    # Redis flushed of counters: the same ids now read as cold, once Redis's invalidation
    # (which it sends beside its answer to the flush) has reached serving's cache
    cache = ctx.scorer.store.read_cache
    seen = cache.stats()["invalidations"]
    await _flush(seeded_redis)
    await wait_until_async(lambda: cache.stats()["invalidations"] > seen, what="the flush's invalidation")
    resp = await client.post(
        "/v1/score", data=h.score_body("u1", ["i1", "i1"], context={"device": "tv"})
    )
    b = (await resp.json())["scores"]
    assert a[0] != pytest.approx(b[0])




async def _flush(url: str) -> None:
    import redis.asyncio as aioredis

    c = aioredis.Redis.from_url(url)
    await c.flushdb()
    await c.aclose()


async def test_unknown_users_and_items_score_cold(settings, seeded_redis, publish, make_app, h):
    publish(1)
    client, _ = await make_app(settings, seeded_redis)
    resp = await client.post(
        "/v1/score",
        data=json.dumps(
            {
                "user_id": 987654,
                "candidates": ["never-seen", 42, "i1"],
                "context": {"device": "phone"},
            }
        ),
    )
    assert resp.status == 200, await resp.text()
    scores = (await resp.json())["scores"]
    assert len(scores) == 3 and all(0.0 < s < 1.0 for s in scores)


async def test_empty_candidate_list_scores_nothing(settings, seeded_redis, publish, make_app, h):
    publish(1)
    client, _ = await make_app(settings, seeded_redis)
    resp = await client.post("/v1/score", data=h.score_body("u1", []))
    assert resp.status == 200
    assert (await resp.json())["scores"] == []


async def test_before_any_model_the_baseline_ranks_by_item_ctr_then_hot_swaps(
    settings, seeded_redis, publish, make_app, h
):
    """A fresh deployment answers from the first second: items ranked by the smoothed CTR
    serving reads for them (model_version "baseline"); the first good checkpoint then
    replaces the baseline by an ordinary hot swap."""
    client, ctx = await make_app(settings, seeded_redis)
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["model_version"] == "baseline"
    cands = ["i1", "i2", "i3", "never-seen"]
    resp = await client.post("/v1/score", data=h.score_body("u1", cands))
    assert resp.status == 200, await resp.text()
    doc = await resp.json()
    assert doc["model_version"] == "baseline"
    feats = SyncOnlineStore(redis.Redis.from_url(seeded_redis),
                            partitions=settings.partitions).get_online_features(
        {"user_id": ["u1"] * 4, "item_id": cands}, features=["item_ctr_total"])
    np.testing.assert_allclose(doc["scores"], feats["item_ctr_total"], rtol=1e-6)
    assert doc["scores"][0] > doc["scores"][3], "the popular item outranks an unseen one"
    version = publish(0, kind="deepfm")
    assert await ctx.holder.submit(ctx.holder.offer, version)
    resp = await client.post("/v1/score", data=h.score_body("u1", cands))
    assert (await resp.json())["model_version"] == version


async def test_no_model_and_no_baseline_is_503_and_not_ready(settings, seeded_redis, make_app, h):
    client, _ = await make_app(settings.model_copy(update={"serve_baseline": False}), seeded_redis)
    resp = await client.post("/v1/score", data=h.score_body())
    assert resp.status == 503
    assert "no model" in (await resp.json())["error"]
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "no model AVAILABLE yet" in (await ready.json())["reasons"]


async def test_ready_with_model_and_redis(settings, seeded_redis, publish, make_app):
    publish(0)
    client, _ = await make_app(settings, seeded_redis)
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json()) == {
        "ready": True,
        "model_version": "000001",
        "redis": True,
        "reasons": [],
    }


@pytest.mark.parametrize(
    ("body", "status", "field", "words"),
    [
        (b"{not json", 400, "body", "not valid JSON"),
        (b"[1, 2]", 400, "body", "JSON object"),
        (b'{"candidates": ["a"]}', 400, "user_id", "user_id is required"),
        (b'{"user_id": "u", "candidates": "a"}', 400, "candidates", "must be a list"),
        (b'{"user_id": "u"}', 400, "candidates", "candidates is required"),
        (b'{"user_id": true, "candidates": []}', 400, "user_id", "string or an integer"),
        (b'{"user_id": 1.5, "candidates": []}', 400, "user_id", "string or an integer"),
        (b'{"user_id": "u", "candidates": ["a", null]}', 400, "candidates[1]", "candidates[1]"),
        (b'{"user_id": "u", "candidates": [], "context": [1]}', 400, "context", "object"),
        (
            b'{"user_id": "u", "candidates": [], "context": {"d": {"x": 1}}}',
            400,
            "context.d",
            "context.d",
        ),
        (b'{"user_id": NaN, "candidates": []}', 400, "body", "NaN"),
        (b"\xff\xfe\x00garbage", 400, "body", "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, 400, "body", None),
    ],
)
async def test_bad_requests_are_400_naming_the_field(
    settings, seeded_redis, publish, make_app, body, status, field, words
):
    publish(0)
    client, _ = await make_app(settings, seeded_redis)
    resp = await client.post("/v1/score", data=body)
    assert resp.status == status, await resp.text()
    doc = await resp.json()
    assert doc["field"] == field
    if words:
        assert words in doc["error"]


async def test_limits_are_413_with_the_setting_named(settings, seeded_redis, publish, make_app, h):
    publish(0)
    client, _ = await make_app(settings, seeded_redis)
    too_many = [f"i{k}" for k in range(settings.max_candidates + 1)]
    resp = await client.post("/v1/score", data=h.score_body("u1", too_many))
    assert resp.status == 413
    assert "HEADWATER_MAX_CANDIDATES" in (await resp.json())["error"]
    big = json.dumps({"user_id": "u", "candidates": ["x" * 200] * 400}).encode()
    assert len(big) > settings.max_body_bytes
    resp = await client.post("/v1/score", data=big)
    assert resp.status == 413
    assert "HEADWATER_MAX_BODY_BYTES" in (await resp.json())["error"]

    # Chunked (no Content-Length): the limit still holds while reading.
    async def chunks():
        for k in range(0, len(big), 4096):
            yield big[k : k + 4096]

    resp = await client.post("/v1/score", data=chunks())
    assert resp.status == 413


async def test_unknown_route_and_method_are_json_errors(settings, seeded_redis, make_app):
    client, _ = await make_app(settings, seeded_redis)
    resp = await client.get("/v1/nope")
    assert resp.status == 404 and "error" in await resp.json()
    resp = await client.get("/v1/score")
    assert resp.status == 405 and "error" in await resp.json()


async def test_unexpected_exception_is_logged_500_with_error_id(
    settings, seeded_redis, publish, make_app, h, caplog
):
    publish(0)
    client, ctx = await make_app(settings, seeded_redis)

    async def broken(*a, **k):
        raise RuntimeError("boom")

    ctx.scorer.store.get_online_features = broken  # through the coalesced read
    resp = await client.post("/v1/score", data=h.score_body())
    assert resp.status == 500
    doc = await resp.json()
    assert "boom" not in json.dumps(doc) and len(doc["error_id"]) == 12
    assert any(doc["error_id"] in r.getMessage() for r in caplog.records)
    text = await (await client.get("/metrics")).text()
    assert h.metric(text, "headwater_score_requests_total", 'code="500"') == 1


json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ids = st.one_of(
    st.text(max_size=300), st.integers(min_value=-(2**70), max_value=2**70), json_values
)
good_ids = st.text(min_size=1, max_size=20) | st.integers(min_value=-(2**63), max_value=2**63 - 1)
bodies = st.one_of(
    st.binary(max_size=200),
    st.fixed_dictionaries(
        {"user_id": good_ids, "candidates": st.lists(good_ids, max_size=8)},
        optional={"context": st.dictionaries(st.text(max_size=8), json_scalars, max_size=5)},
    ).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"user_id": ids, "candidates": st.one_of(st.lists(ids, max_size=8), json_values)},
        optional={
            "context": st.one_of(
                json_values, st.dictionaries(st.text(max_size=8), json_scalars, max_size=5)
            ),
            "user": json_values,
        },
    ).map(lambda d: json.dumps(d).encode()),
)


@hsettings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies)
async def test_fuzzed_bodies_never_5xx(settings, seeded_redis, publish, make_app, body):
    client, _ = await _shared_app(settings, seeded_redis, make_app, publish)
    resp = await client.post("/v1/score", data=body)
    assert resp.status < 500, (body, await resp.text())
    event(f"HTTP {resp.status}")
    doc = await resp.json()
    if resp.status == 200:
        assert len(doc["scores"]) == len(json.loads(body)["candidates"])
    else:
        assert doc["error"]


_APPS: dict[int, tuple] = {}


async def _shared_app(settings, redis_url, make_app, publish):
    """One app per test run (Hypothesis calls the test body many times with one fixture set)."""
    key = id(settings)
    if key not in _APPS:
        _APPS.clear()
        publish(0)
        _APPS[key] = await make_app(settings, redis_url)
    return _APPS[key]


async def test_one_call_scores_several_users(settings, seeded_redis, publish, make_app, h):
    """``{"requests": [...]}``: one result per request, scores keyed by item id, each equal
    to what a single request for that user returns, all from one model version."""
    version = publish(0, kind="deepfm")
    client, _ = await make_app(settings, seeded_redis)
    body = {"requests": [{"user_id": "u1", "candidates": ["i1", "i2"]},
                         {"user_id": "u2", "candidates": ["i3"], "context": {"device": "tv"}}]}
    resp = await client.post("/v1/score", data=json.dumps(body).encode())
    assert resp.status == 200, await resp.text()
    doc = await resp.json()
    assert doc["model_version"] == version
    assert [r["user_id"] for r in doc["results"]] == ["u1", "u2"]
    for sub, result in zip(body["requests"], doc["results"], strict=True):
        one = await client.post("/v1/score", data=h.score_body(sub["user_id"], sub["candidates"],
                                                               sub.get("context")))
        single = (await one.json())["scores"]
        assert list(result["scores"]) == sub["candidates"]
        np.testing.assert_allclose(list(result["scores"].values()), single, rtol=1e-6)
    bad = await client.post("/v1/score", data=json.dumps(
        {"requests": [{"user_id": "u1", "candidates": ["i1"]}, {"candidates": ["i1"]}]}).encode())
    assert bad.status == 400
    assert (await bad.json())["field"] == "requests[1].user_id"


async def test_one_version_metadata(settings, seeded_redis, publish, make_app):
    version = publish(0, kind="deepfm")
    client, _ = await make_app(settings, seeded_redis)
    resp = await client.get(f"/v1/models/{int(version)}")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["version"] == version and doc["serving"] is True
    assert doc["state"]["state"] == "AVAILABLE"
    assert doc["manifest"]["sha256"] and doc["manifest"]["version"] == version
    assert (await client.get("/v1/models/999")).status == 404
    assert (await client.get("/v1/models/latest")).status == 400


async def test_scoring_answers_through_a_redis_restart(settings, publish, make_app, tmp_path, h):
    """Redis is down when the request arrives and back within the retry bound: 200, not 5xx."""

    from headwater.servers import start_redis

    server = start_redis(data_dir=tmp_path / "redis", appendfsync="always")
    port = server.port
    try:
        publish(0, kind="deepfm")
        client, ctx = await make_app(settings, server.extra["url"])
        resp = await client.post("/v1/score", data=h.score_body("u1", ["i1", "i2"]))
        assert resp.status == 200, await resp.text()
        before = (await resp.json())["scores"]
        server.proc.kill()
        server.proc.wait()

        async def restart_soon():
            await asyncio.sleep(0.5)
            return await asyncio.get_running_loop().run_in_executor(
                None, lambda: start_redis(port=port, data_dir=tmp_path / "redis", appendfsync="always"))

        restarting = asyncio.ensure_future(restart_soon())
        resp = await client.post("/v1/score", data=h.score_body("u1", ["i1", "i2"]))
        server = await restarting
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["scores"] == pytest.approx(before)
        assert ctx.scorer.redis_retries >= 1  # it did meet the outage
        # and the serving heartbeat (`headwater status`, /v1/status) says so
        assert ctx.status_fields()["redis_retries"] == ctx.scorer.redis_retries
    finally:
        server.stop()


async def test_scoring_fails_once_redis_stays_down_past_the_bound(settings, publish, make_app,
                                                                  tmp_path, h):
    from headwater.servers import start_redis

    server = start_redis()
    publish(0, kind="deepfm")
    client, ctx = await make_app(settings, server.extra["url"])
    ctx.scorer.redis_retry_seconds = 0.3
    server.stop()
    resp = await client.post("/v1/score", data=h.score_body("u1", ["i1"]))
    assert resp.status >= 500
    assert ctx.scorer.redis_retries >= 1


@pytest.mark.parametrize("kind", ["fgcnn", "deepfm"])
async def test_concurrent_requests_share_forwards_and_score_as_alone(
    settings, seeded_redis, publish, make_app, h, kind
):
    """Dynamic batching: rows of requests ready in one loop turn go through one forward
    pass, and every request's scores equal its scores when sent alone: the same rows,
    the same model; a bigger matrix may round a float32 product differently (FGCNN's
    convolutions: a last-bit difference), never more."""

    publish(0, kind=kind)
    client, ctx = await make_app(settings, seeded_redis)
    batcher = ctx.scorer.batcher
    assert batcher is not None and batcher.max_rows == settings.serve_batch_rows
    asks = [("u1", ["i1", "i2", "i3"]), ("u2", ["i3"]), ("u9", ["i2", "new", "i1", "i1"]),
            ("u1", ["new"]), ("u2", ["i1", "i2"])]
    alone = []
    for user, cands in asks:
        resp = await client.post("/v1/score", data=h.score_body(user, cands))
        alone.append((await resp.json())["scores"])
    before = (batcher.forwards, batcher.requests)
    for _ in range(5):  # whether Redis answers land in one turn is up to the scheduler
        resps = await asyncio.gather(*(client.post("/v1/score", data=h.score_body(u, c))
                                       for u, c in asks))
        together = [(await r.json())["scores"] for r in resps]
        for got, want in zip(together, alone, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert batcher.requests - before[1] == 5 * len(asks)

    # The batcher itself, on the served model: one forward for all, each slice exact.
    served = ctx.holder.current
    rng = np.random.default_rng(0)
    rows = [(rng.integers(1, 2**62, size=(n, served.n_categorical), dtype=np.int64),
             rng.uniform(0, 3, size=(n, served.n_dense)).astype(np.float32))
            for n in (1, 7, 100, 3)]
    forwards = batcher.forwards
    got = await asyncio.gather(*(batcher.predict(served, c, d) for c, d in rows))
    assert batcher.forwards == forwards + 1
    for (c, d), scores in zip(rows, got, strict=True):
        np.testing.assert_allclose(scores, served.predict(c, d), rtol=1e-6, atol=0)


async def test_coalesced_reads_answer_each_request_as_its_own_read(
    settings, seeded_redis, publish, make_app
):
    """Requests that ask in one loop turn share one feature read (users, contexts and
    items mixed, an unknown item, a repeated one), and each gets exactly what a read of
    its own rows alone gives at the same time: features, rows, and the time itself."""
    from serving.scoring import ScoreRequest

    publish(0, kind="deepfm")
    _, ctx = await make_app(settings, seeded_redis)
    scorer = ctx.scorer
    assert scorer.reads is not None and scorer.reads.max_rows == settings.serve_read_rows
    asks = [ScoreRequest("u1", ["i1", "i2", "i3"]), ScoreRequest("u2", ["i3"], {"device": "tv"}),
            ScoreRequest("u9", ["i2", "new", "i1", "i1"]), ScoreRequest("u1", ["new"])]
    t0 = time.time()
    reads = scorer.reads.reads
    together = await asyncio.gather(*(scorer.features(r, t0 + k) for k, r in enumerate(asks)))
    assert scorer.reads.reads == reads + 1
    at = t0 + len(asks) - 1  # the latest request's time: every slice is read at it
    assert [t for _, t in together] == [at] * len(asks)
    for req, (feats, _) in zip(asks, together, strict=True):
        n = len(req.candidates)
        alone = await scorer.store.get_online_features(
            {"user_id": [req.user_id] * n, "item_id": req.candidates, "context": [req.context] * n},
            now=at)
        assert feats.keys() == alone.keys()
        for k, v in alone.items():
            if isinstance(v, np.ndarray):
                np.testing.assert_array_equal(feats[k], v, err_msg=k)
            else:
                assert list(feats[k]) == list(v), k
        for mine, theirs in zip(scorer.encode(req, feats, at), scorer.encode(req, alone, at),
                                strict=True):
            np.testing.assert_array_equal(mine, theirs)


async def test_read_coalescer_bounds_rows_and_fails_every_joined_request():
    """Reads of at most ``max_rows`` rows (a request is never split); a failed read is
    every joined request's error, and the next turn reads again."""
    from serving.scoring import ReadCoalescer

    class Store:
        sizes: list[int] = []
        fail = False

        async def get_online_features(self, rows, now):
            if Store.fail:
                raise redis.exceptions.ConnectionError("down")
            Store.sizes.append(len(rows["item_id"]))
            return {"item": list(rows["item_id"])}

    def rows(*items):
        return {"user_id": ["u"] * len(items), "item_id": list(items), "context": [None] * len(items)}

    c = ReadCoalescer(Store(), max_rows=5)
    got = await asyncio.gather(c.read(rows("a", "b", "c"), 1.0), c.read(rows("d", "e"), 2.0),
                               c.read(rows("f", "g", "h", "i"), 3.0), c.read(rows(*"jklmnop"), 4.0))
    assert Store.sizes == [5, 4, 7]  # 3 + 2; 4 (+ 7 would pass 5); 7 alone
    assert [g[0]["item"] for g in got] == [["a", "b", "c"], ["d", "e"], ["f", "g", "h", "i"],
                                           list("jklmnop")]
    assert [g[1] for g in got] == [2.0, 2.0, 3.0, 4.0]  # each read at its latest request's time
    assert (c.reads, c.requests) == (3, 4)
    Store.fail = True
    failed = await asyncio.gather(c.read(rows("a"), 5.0), c.read(rows("b"), 5.0),
                                  return_exceptions=True)
    assert [type(e) for e in failed] == [redis.exceptions.ConnectionError] * 2
    Store.fail = False
    assert (await c.read(rows("z"), 6.0))[0] == {"item": ["z"]}


async def test_a_lone_read_goes_at_once_and_a_busy_turn_waits_for_it():
    """A request with nothing else queued in its loop turn reads at once (as without
    coalescing); one asking while other callbacks wait lets them run first, so the
    requests among them join its read."""
    from serving.scoring import ReadCoalescer

    order = []

    class Store:
        async def get_online_features(self, rows, now):
            order.append(f"read {rows['item_id']}")
            return {"item": rows["item_id"]}

    c = ReadCoalescer(Store(), max_rows=100)
    one = {"user_id": ["u"], "item_id": ["a"], "context": [None]}
    await asyncio.sleep(0)  # let whatever the test runner queued run first
    lone = c.read(one, 1.0)
    with pytest.raises(StopIteration) as done:  # finished without yielding to the loop once
        lone.send(None)
    assert done.value.value == ({"item": ["a"]}, 1.0)
    asyncio.get_running_loop().call_soon(order.append, "other")
    assert (await c.read({**one, "item_id": ["b"]}, 2.0))[0] == {"item": ["b"]}
    assert order == ["read ['a']", "other", "read ['b']"]


async def test_a_cancelled_coalesced_read_cancels_its_requests():
    """A read cancelled under the requests (the server stopping) ends each joined request
    cancelled, and the coalescer lets go of the finished read."""
    from serving.scoring import ReadCoalescer

    started = asyncio.Event()

    class Store:
        async def get_online_features(self, rows, now):
            started.set()
            await asyncio.sleep(3600)

    c = ReadCoalescer(Store(), max_rows=100)
    one = {"user_id": ["u"], "item_id": ["a"], "context": [None]}
    reads = [asyncio.ensure_future(c.read(one, 1.0)), asyncio.ensure_future(c.read(one, 2.0))]
    await started.wait()  # the joined read is in flight (no fixed sleep to race)
    (running,) = c._running  # noqa: SLF001 - the read in flight, held by the coalescer
    running.cancel()
    done = await asyncio.gather(*reads, return_exceptions=True)
    assert [type(d) for d in done] == [asyncio.CancelledError] * 2
    await asyncio.sleep(0)
    assert not c._running  # noqa: SLF001
