"""The dashboard in real headless Chromium over the real ops routes, Redis and broker.

The page must show what the JSON endpoints say: key figures against ``/v1/status``, lag
rows against ``/v1/lag``. Saves ``artifacts/dashboard.png``.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from core.health import PERIOD_S
from core.settings import Settings
from detection.alert_store import save_alerts
from headwater.servers import free_port
from tests.ops.conftest import make_lagging_group, publish_heartbeats
from tests.ops.test_ops_routes import ALERTS

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
async def serving(kafka_bootstrap, redis_db, topic_prefix, tmp_path):
    """The real serving process body (``serving.app.serve``: app, ops routes, model
    watcher, its own heartbeat) on a free port, plus worker/learner heartbeats and a
    lagging consumer group on the real broker."""
    from serving.app import serve

    client = aioredis.Redis.from_url(redis_db)
    t0 = time.time() - 42.0
    await publish_heartbeats(client, t0, events=1000, rows=500, auc=0.71)

    async def keep_alive():
        # the stand-ins heartbeat like live services do: their documents expire after
        # TTL_S, which a loaded machine can spend before the page has read them
        while True:
            await publish_heartbeats(client, t0, events=1000, rows=500, auc=0.71)
            await asyncio.sleep(PERIOD_S)

    topic, group = make_lagging_group(kafka_bootstrap, topic_prefix)
    settings = Settings(kafka=kafka_bootstrap, redis=redis_db, topic_prefix=topic_prefix,
                        http_port=free_port(), model_store=tmp_path / "models",
                        state_dir=tmp_path / "state")
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(settings, kafka_bootstrap, redis_db, stop, ready))
    done, _ = await asyncio.wait([task, asyncio.create_task(ready.wait())], timeout=30,
                                 return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # serving failed to start: raise its error
    assert ready.is_set(), "serving did not get ready within 30 s"
    beats = asyncio.create_task(keep_alive())
    try:
        yield {"base": f"http://127.0.0.1:{settings.http_port}", "client": client, "group": group,
               "topic": topic}
    finally:
        beats.cancel()
        stop.set()
        await asyncio.wait_for(task, 30)
        await client.aclose()


@pytest.fixture
async def page():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    pw_api = pytest.importorskip("playwright.async_api", reason="pip install playwright")
    async with pw_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = await browser.new_page(viewport={"width": 1400, "height": 1100})
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        requests: list[str] = []
        pg.on("request", lambda r: requests.append(r.url))
        pg.js_errors, pg.requested = errors, requests
        try:
            yield pg
        finally:
            await browser.close()


async def field(pg, name: str) -> str:
    return await pg.get_attribute(f'[data-field="{name}"]', "data-value")


async def test_dashboard_shows_what_the_api_says(serving, page):
    base = serving["base"]
    await save_alerts(serving["client"], ALERTS)
    await page.goto(base + "/")
    group = serving["group"]
    # Serving samples lag every 2 s; wait for a refresh that shows our group, and for
    # serving's own heartbeat (published every 2 s) to be on the page.
    await page.wait_for_selector(f'tr[data-lag-group="{group}"]', timeout=15000)
    await page.wait_for_selector('tr[data-service="serving"][data-instance]', timeout=15000)
    await page.wait_for_function("Number(document.body.dataset.updates || 0) >= 2", timeout=15000)
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/v1/status") as r:
            status = await r.json()
        async with s.get(base + "/v1/lag") as r:
            lag = await r.json()

    workers = status["services"]["worker"]
    learner = status["services"]["learner"][0]
    for key in ("events_in_total", "events_valid_total", "dead_letter_total"):
        assert float(await field(page, f"worker.{key}")) == sum(w[key] for w in workers)
    assert await page.text_content('[data-field="worker.events_in_total"]') == "1,100"
    assert float(await field(page, "learner.rows_trained")) == learner["rows_trained"]
    assert float(await field(page, "learner.auc")) == learner["prequential_auc"]
    assert await field(page, "learner.version") == learner["model_version"]
    assert await field(page, "kafka.address") == status["kafka"]["address"]
    assert await field(page, "redis.address") == status["redis"]["address"]
    assert await page.get_attribute("#kafka-reachable", "data-value") == "true"
    assert float(await field(page, "lag.total")) == status["lag"]["total"]
    assert await field(page, "alerts.count") == "3"
    assert await page.get_attribute('[data-alert="a3"]', "data-severity") == "critical"

    # every service instance with its health and last error
    rows = await page.eval_on_selector_all(
        "#services-table tr[data-instance]",
        "rs => rs.map(r => [r.dataset.service, r.dataset.instance,"
        " r.querySelector('[data-col=healthy]').dataset.value,"
        " r.querySelector('[data-col=last_error]').textContent])")
    serving_doc = status["services"]["serving"][0]
    assert rows == [["worker", "host-a-1", "true", "—"],
                    ["worker", "host-b-2", "true", "RedisError: connection reset (retried)"],
                    ["learner", learner["instance"], "true", "—"],
                    ["serving", serving_doc["instance"], "true", serving_doc["last_error"] or "—"]]

    # lag rows match /v1/lag (values may move between the two reads: same group, same rows)
    shown = await page.eval_on_selector_all(
        "#lag-table tr[data-lag-row]",
        "rs => rs.map(r => [r.dataset.lagRow, ...['committed','log_end','lag','status']"
        ".map(c => r.querySelector(`[data-col=${c}]`).dataset.value)])")
    expected = [[f"{g['group']}|{p['topic']}|{p['partition']}", str(p["committed"]),
                 str(p["log_end"]), str(p["lag"]), p["status"]]
                for g in lag["groups"] for p in g["partitions"]]
    mine = [r for r in shown if r[0].startswith(group + "|")]
    assert mine == [r for r in expected if r[0].startswith(group + "|")]
    assert [r[3] for r in mine] == ["0", "11"]

    # lag also reaches Prometheus through serving's /metrics
    async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
        metrics_text = await r.text()
    topic = serving["topic"]
    assert (f'headwater_consumer_lag_messages{{group="{group}",partition="1",topic="{topic}"}} 11.0'
            in metrics_text
            or f'headwater_consumer_lag_messages{{group="{group}",topic="{topic}",partition="1"}} 11.0'
            in metrics_text), metrics_text[-1500:]

    # charts drew lines; nothing outside the server was requested; no JS errors
    await page.wait_for_function(
        "document.querySelector('svg[data-series=auc] polyline') !== null", timeout=10000)
    assert all(u.startswith(base) for u in page.requested), page.requested
    assert page.js_errors == []

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
