"""The model holder: refusing bad checkpoints, pin, rollback, restart, memory bound, admin auth."""

from __future__ import annotations

import pytest

from features.schema import FeatureSchema
from serving.holder import HolderError, ModelHolder, VersionState


def _states(listing: dict) -> dict[str, str]:
    return {m["version"]: m["state"] for m in listing["models"]}


@pytest.mark.parametrize(
    ("damage", "reason", "words"),
    [
        ("tamper", "checksum", "sha256 mismatch"),
        ("schema", "schema", "feature schema hash"),
        ("nan", "sanity", "NaN"),
        ("truncate", "checksum", "bytes"),
        ("manifest", "manifest", "manifest.json"),
    ],
)
async def test_bad_checkpoint_fails_and_never_serves(
    settings, seeded_redis, publish, store, make_app, h, builder, damage, reason, words
):
    publish(0)
    client, ctx = await make_app(settings, seeded_redis)
    if damage == "schema":
        other = FeatureSchema(builder.schema.categorical, builder.schema.dense[:-1])
        bad = publish(1, schema=other)
    else:
        bad = publish(1, nan=damage == "nan")
        pt = store.path(bad) / "model.pt"
        if damage == "tamper":
            h.tamper(store, bad)
        elif damage == "truncate":
            pt.write_bytes(pt.read_bytes()[:-10])
        elif damage == "manifest":
            (store.path(bad) / "manifest.json").write_text("{broken")
    assert await ctx.holder.submit(ctx.holder.offer, bad) is False
    listing = await (await client.get("/v1/models")).json()
    entry = next(m for m in listing["models"] if m["version"] == bad)
    assert entry["state"] == "FAILED" and words in entry["error"]
    assert listing["serving"] == "000001"
    resp = await client.post("/v1/score", data=h.score_body())
    assert (await resp.json())["model_version"] == "000001"
    text = await (await client.get("/metrics")).text()
    assert h.metric(text, "headwater_model_load_failures_total", f'reason="{reason}"') == 1
    assert bad in ctx.status_fields()["last_error"]
    # Offering it again does not retry (versions are immutable) and a later good one swaps in.
    assert await ctx.holder.submit(ctx.holder.offer, bad) is False
    good = publish(2)
    assert await ctx.holder.submit(ctx.holder.offer, good) is True
    assert ctx.holder.current.version == good


async def test_quality_gate_refuses_a_worse_model(settings, seeded_redis, publish, make_app):
    publish(0, metrics={"auc": 0.75})
    _, ctx = await make_app(settings, seeded_redis, quality_margin=0.02)
    worse = publish(1, metrics={"auc": 0.70})
    assert await ctx.holder.submit(ctx.holder.offer, worse) is False
    info = ctx.holder.info(worse)
    assert info.state is VersionState.FAILED and "quality gate" in info.error
    slightly = publish(2, metrics={"auc": 0.74})
    assert await ctx.holder.submit(ctx.holder.offer, slightly) is True


async def test_quality_gate_is_off_by_default(settings, seeded_redis, publish, make_app):
    publish(0, metrics={"auc": 0.75})
    _, ctx = await make_app(settings, seeded_redis)
    assert await ctx.holder.submit(ctx.holder.offer, publish(1, metrics={"auc": 0.5})) is True


async def test_pin_rollback_unpin_over_http(settings, seeded_redis, publish, store, make_app, h):
    for seed in range(3):
        publish(seed)
    client, ctx = await make_app(settings, seeded_redis)
    assert ctx.holder.current.version == "000003"
    resp = await client.post("/v1/models/rollback", headers=h.auth())
    assert resp.status == 200, await resp.text()
    doc = await resp.json()
    assert doc["serving"] == "000002" and doc["pinned"] == "000002"
    assert store.pins() == ["000002"]
    # Pinned: a newer publication is loaded and checked but does not serve.
    v4 = publish(3)
    assert await ctx.holder.submit(ctx.holder.offer, v4) is False
    assert ctx.holder.info(v4).state in (VersionState.AVAILABLE, VersionState.RETIRED)
    assert (await (await client.post("/v1/score", data=h.score_body())).json())[
        "model_version"
    ] == "000002"
    # Rolling back again goes one further back, to a version no longer in memory.
    doc = await (await client.post("/v1/models/rollback", headers=h.auth())).json()
    assert doc["serving"] == "000001" and store.pins() == ["000001"]
    # Pin by short number.
    doc = await (await client.post("/v1/models/3/pin", headers=h.auth())).json()
    assert doc["serving"] == "000003" and doc["pinned"] == "000003"
    resp = await client.post("/v1/models/unpin", headers=h.auth())
    doc = await resp.json()
    assert doc["serving"] == v4 and doc["pinned"] is None and store.pins() == []


async def test_admin_errors(settings, seeded_redis, publish, make_app, h, store):
    publish(0)
    bad = publish(1)
    h.tamper(store, bad)
    client, ctx = await make_app(settings, seeded_redis)
    assert ctx.holder.current.version == "000001"
    resp = await client.post("/v1/models/rollback", headers=h.auth())
    assert resp.status == 409 and "no good version older" in (await resp.json())["error"]
    resp = await client.post("/v1/models/000009/pin", headers=h.auth())
    assert resp.status == 404
    resp = await client.post("/v1/models/abc/pin", headers=h.auth())
    assert resp.status == 400
    resp = await client.post(f"/v1/models/{bad}/pin", headers=h.auth())
    assert resp.status == 409 and "cannot serve" in (await resp.json())["error"]


async def test_admin_endpoints_need_the_token(settings, seeded_redis, publish, make_app, h):
    publish(0)
    publish(1)
    client, ctx = await make_app(settings, seeded_redis)
    for path in ("/v1/models/rollback", "/v1/models/000001/pin", "/v1/models/unpin"):
        resp = await client.post(path)
        assert resp.status == 401, path
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        resp = await client.post(path, headers=h.auth("wrong"))
        assert resp.status == 401
        resp = await client.post(path, headers={"X-Admin-Token": "wrong"})
        assert resp.status == 401
    assert ctx.holder.current.version == "000002" and ctx.holder.pinned is None
    resp = await client.post("/v1/models/000001/pin", headers={"X-Admin-Token": h.ADMIN_TOKEN})
    assert resp.status == 200
    # Listing is read-only and open.
    assert (await client.get("/v1/models")).status == 200


async def test_admin_endpoints_disabled_without_configured_token(
    settings, seeded_redis, publish, make_app, h
):
    publish(0)
    publish(1)
    open_settings = settings.model_copy(update={"admin_token": None})
    client, ctx = await make_app(open_settings, seeded_redis)
    for path in ("/v1/models/rollback", "/v1/models/000001/pin", "/v1/models/unpin"):
        resp = await client.post(path, headers=h.auth())
        assert resp.status == 403
        assert (await resp.json())["error"] == "admin endpoints disabled: set HEADWATER_ADMIN_TOKEN"
    assert ctx.holder.current.version == "000002"


def test_restart_serves_newest_good_version_at_once(store, publish, builder, h):
    publish(0)
    publish(1)
    bad = publish(2)
    h.tamper(store, bad)
    holder = ModelHolder(store, builder.schema)
    try:
        assert holder.start() == "000002"
        assert holder.current.version == "000002"
        states = _states(holder.listing())
        assert states == {"000003": "FAILED", "000002": "AVAILABLE", "000001": "RETIRED"}
    finally:
        holder.close()


def test_restart_serves_the_persisted_pin(store, publish, builder):
    for seed in range(3):
        publish(seed)
    first = ModelHolder(store, builder.schema)
    first.start()
    first.pin("000001")
    first.close()
    again = ModelHolder(store, builder.schema)
    try:
        assert again.start() == "000001"
        assert again.pinned == "000001"
        assert again.offer("000004") is False  # unknown in store: fails, and pinned anyway
        assert again.current.version == "000001"
    finally:
        again.close()


def test_broken_pin_falls_back_to_newest_good(store, publish, builder, h):
    publish(0)
    publish(1)
    store.pin("000001")
    h.tamper(store, "000001")
    holder = ModelHolder(store, builder.schema)
    try:
        assert holder.start() == "000002"
        assert "pinned version 000001 is not loadable" in holder.last_error
    finally:
        holder.close()


def test_memory_holds_serving_plus_previous(store, publish, builder):
    holder = ModelHolder(store, builder.schema, keep_loaded=2)
    try:
        holder.start()
        for seed in range(5):
            holder.offer(publish(seed))
        loaded = [v for v, i in holder._versions.items() if i.served is not None]
        assert sorted(loaded) == ["000004", "000005"]
        assert holder.current.version == "000005"
        assert holder.info("000003").state is VersionState.RETIRED
        # Rollback is instant from memory, and pins.
        assert holder.rollback() == "000004"
    finally:
        holder.close()


def test_rescan_picks_up_a_missed_publication(store, publish, builder):
    holder = ModelHolder(store, builder.schema)
    try:
        assert holder.start() is None
        publish(0)
        publish(1)
        holder.rescan()
        assert holder.current.version == "000002"
    finally:
        holder.close()


def test_bad_version_names_are_rejected(store, builder):
    holder = ModelHolder(store, builder.schema)
    try:
        with pytest.raises(HolderError) as err:
            holder.pin("../etc")
        assert err.value.status == 400
    finally:
        holder.close()


async def test_metrics_exposition(settings, seeded_redis, publish, make_app, h):
    publish(0)
    client, _ = await make_app(settings, seeded_redis)
    await client.post("/v1/score", data=h.score_body())
    await client.post("/v1/score", data=b"nope")
    resp = await client.get("/metrics")
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    for name in (
        "headwater_score_seconds_bucket",
        "headwater_score_candidates_bucket",
        "headwater_model_swaps_total",
        "headwater_model_swap_seconds_bucket",
        "headwater_model_freshness_seconds",
        "headwater_model_load_failures_total",
    ):
        assert name in text, name
    assert h.metric(text, "headwater_score_requests_total", 'code="200"') == 1
    assert h.metric(text, "headwater_score_requests_total", 'code="400"') == 1
    assert h.metric(text, "headwater_model_version") == 1
    assert h.metric(text, "headwater_model_freshness_seconds") >= 0
    assert _states(await (await client.get("/v1/models")).json()) == {"000001": "AVAILABLE"}


def test_announcements_of_pruned_or_old_versions_are_ignored(store, publish, builder):
    """The watcher replays the topic from the start: old or pruned versions cost nothing."""
    for seed in range(3):
        publish(seed)
    holder = ModelHolder(store, builder.schema)
    try:
        holder.start()
        assert holder.offer("000042") is False  # not in the store (pruned / never there)
        assert holder.info("000042") is None
        assert holder.offer("000001") is False and holder.offer("000002") is False
        assert holder.current.version == "000003"
        assert holder.metrics.load_failures._metrics == {}
        assert holder.last_error is None
    finally:
        holder.close()


def test_a_version_pruned_right_after_its_announcement_is_not_failed(store, publish, builder,
                                                                    monkeypatch):
    """Retention may delete a version between the holder's existence check and its manifest
    read (with deltas on, a new full checkpoint supersedes the deltas before it): gone, not
    a bad checkpoint, so nothing is FAILED and no error is recorded."""
    import shutil

    publish(0)
    holder = ModelHolder(store, builder.schema)
    try:
        holder.start()
        publish(1)
        publish(2)
        shutil.rmtree(store.dir / "000002")  # pruned...
        exists = holder.store.exists
        seen = []

        def exists_once_more(version: str) -> bool:  # ...just after the holder checked
            if version == "000002" and not seen:
                seen.append(version)
                return True
            return exists(version)

        monkeypatch.setattr(holder.store, "exists", exists_once_more)
        assert holder.offer("000002") is True  # skips to the newest, 000003
        assert seen and holder.info("000002") is None
        assert holder.last_error is None and holder.metrics.load_failures._metrics == {}
        assert holder.current.version == "000003"
    finally:
        holder.close()


def test_a_backlog_of_publications_loads_only_the_newest(store, publish, builder):
    holder = ModelHolder(store, builder.schema)
    try:
        holder.start()
        for seed in range(4):
            publish(seed)
        assert holder.offer("000001") is True  # the watcher is behind: 000004 already exists
        assert holder.current.version == "000004"
        assert holder.info("000001").state is VersionState.RETIRED
        assert holder.offer("000002") is False and holder.offer("000003") is False
        assert holder.swaps == 1
    finally:
        holder.close()


def test_a_patched_delta_with_a_nan_row_is_refused_and_its_base_is_untouched(store, builder):
    """Serving patches a delta onto its base's model; the sanity check still sees every
    tensor the delta replaced (the shared ones were checked with the base)."""
    import torch

    from learner.models import build_model
    from learner.store import compute_delta
    from serving.loader import ModelLoader
    from serving.models import LoadFailure
    from tests.serving.conftest import _spec

    schema = builder.schema
    torch.manual_seed(0)
    model = build_model(_spec(schema, "deepfm"))
    model.embedding.mark_dirty([1, 2])
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    full = store.publish({"model": base_state}, config={"model": model.spec.to_dict()},
                         feature_schema_json=schema.to_json(), feature_schema_hash=schema.hash,
                         rows_trained=1, watermarks={}, metrics={})["version"]
    loader = ModelLoader(store, schema)
    base = loader.load(full)

    def delta(row: int, value: float) -> str:
        with torch.no_grad():
            model.embedding.table.weight[row] = value
        model.embedding.mark_dirty([row])
        return store.publish_delta(compute_delta(base_state, model.state_dict()), base=full,
                                   rows_trained=2, watermarks={}, metrics={})["version"]

    good = loader.load(delta(7, 0.5), base_of=lambda _: base)
    assert good.patched and torch.equal(good.model.embedding.table.weight[7], torch.full((5,), 0.5))
    with pytest.raises(LoadFailure, match="NaN") as exc:
        loader.load(delta(9, float("nan")), base_of=lambda _: base)
    assert exc.value.reason == "sanity"
    after = base.model.state_dict()
    assert all(torch.equal(after[k], base_state[k]) for k in base_state)


async def test_a_wiped_store_is_noticed_and_its_new_versions_serve(
    settings, seeded_redis, publish, store, make_app, h
):
    """``headwater reset`` clears the model store while serving runs: the old run's model
    must stop answering, and the new run's versions serve although their numbers are
    lower than (or equal to) the ones serving knew."""
    for seed in range(3):
        publish(seed)
    client, ctx = await make_app(settings, seeded_redis)
    old = ctx.holder.current
    assert old.version == "000003"
    store.clear()  # what `headwater reset` does, from another process
    await ctx.holder.submit(ctx.holder.rescan)
    assert ctx.holder.current is None and ctx.holder.listing()["models"] == []
    assert "was replaced" in ctx.holder.last_error
    resp = await client.post("/v1/score", data=h.score_body())
    assert (await resp.json())["model_version"] == "baseline"
    # The new run publishes; an announcement of its first version swaps it in.
    first = publish(7)
    assert first == "000001"
    assert await ctx.holder.submit(ctx.holder.offer, first) is True
    assert ctx.holder.current.manifest["sha256"] == store.manifest(first)["sha256"]
    # Wiped again and the new numbering catches up with the known one before any rescan:
    # the announcement of a known number is checked against the store's checkpoint.
    store.clear()
    assert publish(8) == "000001"
    assert await ctx.holder.submit(ctx.holder.offer, "000001") is False  # started over instead
    served = ctx.holder.current
    assert served.version == "000001" and served.manifest["sha256"] == store.manifest("000001")["sha256"]
    resp = await client.post("/v1/score", data=h.score_body())
    assert (await resp.json())["model_version"] == "000001"
    # An ordinary rescan afterwards changes nothing.
    await ctx.holder.submit(ctx.holder.rescan)
    assert ctx.holder.current is served
