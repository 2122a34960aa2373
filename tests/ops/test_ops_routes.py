"""The ops routes over a real Redis and broker: status, lag, alerts, time series, page."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from detection.alert_store import save_alerts
from headwater.commands import collect_status
from tests.ops.conftest import PERIOD, publish_heartbeats

pytestmark = pytest.mark.integration


async def get(base: str, path: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.get(base + path) as r:
        return r.status, await r.json()


async def test_status_is_the_headwater_status_document(ops_server):
    code, doc = await get(ops_server["base"], "/v1/status")
    assert code == 200
    cli = await asyncio.to_thread(collect_status, ops_server["settings"])
    for key in ("kafka", "redis"):
        assert doc[key] == cli[key]
    assert doc["kafka"]["reachable"] is True and doc["redis"]["reachable"] is True
    strip = lambda svc: {n: [{k: v for k, v in d.items()} for d in docs] for n, docs in svc.items()}  # noqa: E731
    assert strip(doc["services"]) == strip(cli["services"])
    assert [d["instance"] for d in doc["services"]["worker"]] == ["host-a-1", "host-b-2"]
    assert doc["services"]["learner"][0]["prequential_auc"] == 0.71


async def test_ops_responses_match_the_openapi_document(ops_server):
    from tests.openapi_check import check

    for _ in range(200):  # until the samplers have filled the lag report and the series
        _, series = await get(ops_server["base"], "/v1/timeseries")
        _, lag = await get(ops_server["base"], "/v1/lag")
        if series["points"] and lag.get("groups"):
            break
        await asyncio.sleep(PERIOD / 4)
    assert series["points"] and lag["groups"]
    for path in ("/v1/status", "/v1/lag", "/v1/timeseries", "/v1/alerts"):
        code, doc = await get(ops_server["base"], path)
        assert code == 200
        check(path, "get", 200, doc)
    code, doc = await get(ops_server["base"], "/v1/alerts?limit=0")
    assert code == 400
    check("/v1/alerts", "get", 400, doc)


async def test_status_reports_unreachable_redis(ops_server):
    state = ops_server["state"]
    import redis.asyncio as aioredis

    from headwater.servers import free_port
    from serving.ops import build_status

    state_redis, state.redis = state.redis, aioredis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    try:
        doc = await build_status(state)
    finally:
        await state.redis.aclose()
        state.redis = state_redis
    assert doc["redis"]["reachable"] is False and doc["redis"]["error"]
    assert doc["services"] == {}


async def test_lag_route_samples_in_the_background(ops_server):
    await asyncio.sleep(PERIOD * 4)
    code, lag = await get(ops_server["base"], "/v1/lag")
    assert code == 200 and lag["error"] is None and lag["window"] == 3
    (g,) = [g for g in lag["groups"] if g["group"] == ops_server["group"]]
    rows = {p["partition"]: p for p in g["partitions"]}
    assert (rows[0]["log_end"], rows[0]["committed"], rows[0]["lag"]) == (15, 15, 0)
    assert (rows[1]["log_end"], rows[1]["committed"], rows[1]["lag"]) == (15, 4, 11)
    # committed offsets frozen with lag > 0 and no member, over a full window
    assert rows[1]["status"] == "STOP" and g["status"] == "STOP"
    code, status = await get(ops_server["base"], "/v1/status")
    assert status["lag"]["groups"][ops_server["group"]] == "STOP"


async def test_timeseries_has_rates_and_learner_metrics(ops_server):
    client, t0 = ops_server["client"], ops_server["t0"]
    await asyncio.sleep(PERIOD * 2.5)
    await publish_heartbeats(client, t0, events=3000, rows=900, auc=0.74)
    await asyncio.sleep(PERIOD * 2.5)
    code, series = await get(ops_server["base"], "/v1/timeseries")
    assert code == 200 and series["period_s"] == PERIOD
    pts = series["points"]
    assert len(pts) >= 3
    assert pts[0]["events_in_total"] == 1100 and pts[-1]["events_in_total"] == 3100
    assert any((p["events_per_s"] or 0) > 0 for p in pts)
    assert pts[-1]["auc"] == 0.74 and pts[-1]["logloss"] == 0.512
    assert pts[-1]["rows_trained"] == 900 and pts[-1]["learner_version"] == "000007"
    code, tail = await get(ops_server["base"], f"/v1/timeseries?since={pts[-2]['ts']}")
    assert tail["points"][0] == pts[-1]  # (a newer point may have arrived since)


ALERTS = [
    {"id": "a1", "host": "web-1", "ts": 1000.0, "severity": "low", "techniques": ["T1059"],
     "tactics": ["execution"], "chain": []},
    {"id": "a2", "host": "web-1", "ts": 2000.0, "severity": "high", "techniques": ["T1105"],
     "tactics": ["command-and-control"], "chain": []},
    {"id": "a3", "host": "db-1", "ts": 3000.0, "severity": "critical",
     "techniques": ["T1003"], "tactics": ["credential-access"], "chain": []},
]


async def test_alerts_filters(ops_server):
    await save_alerts(ops_server["client"], ALERTS)
    base = ops_server["base"]
    _, doc = await get(base, "/v1/alerts")
    assert [a["id"] for a in doc["alerts"]] == ["a3", "a2", "a1"] and doc["count"] == 3
    _, doc = await get(base, "/v1/alerts?host=web-1")
    assert [a["id"] for a in doc["alerts"]] == ["a2", "a1"]
    _, doc = await get(base, "/v1/alerts?since=1500&until=2500")
    assert [a["id"] for a in doc["alerts"]] == ["a2"]
    _, doc = await get(base, "/v1/alerts?min_severity=high&limit=1")
    assert [a["id"] for a in doc["alerts"]] == ["a3"]


@pytest.mark.parametrize("query,needle", [
    ("since=yesterday", "since must be epoch seconds"),
    ("until=nan", "until must be a finite number"),
    ("since=5&until=1", "is after until"),
    ("min_severity=urgent", "min_severity must be one of low, medium, high, critical"),
    ("limit=0", "limit must be between 1 and 1000"),
    ("limit=ten", "limit must be an integer"),
    ("hots=web-1", "unknown query parameter"),
])
async def test_alerts_rejects_bad_parameters(ops_server, query, needle):
    code, doc = await get(ops_server["base"], f"/v1/alerts?{query}")
    assert code == 400 and needle in doc["error"]


async def test_dashboard_page_is_self_contained(ops_server):
    async with aiohttp.ClientSession() as s, s.get(ops_server["base"] + "/") as r:
        assert r.status == 200 and r.content_type == "text/html"
        html = await r.text()
    assert "data-field=\"worker.events_in_total\"" in html
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", html), "the page must not load anything remote"
