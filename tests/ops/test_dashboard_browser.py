"""The dashboard in real headless Chromium over the real ops routes, Redis and broker.

The page must show what the JSON endpoints say: key figures against ``/v1/status``, lag
rows against ``/v1/lag``. Saves ``artifacts/dashboard.png``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import aiohttp
import pytest

from detection.alert_store import save_alerts
from tests.ops.test_ops_routes import ALERTS

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


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


async def test_dashboard_shows_what_the_api_says(ops_server, page):
    base = ops_server["base"]
    await save_alerts(ops_server["client"], ALERTS)
    await page.goto(base + "/")
    # Two refreshes after the lag window (3 samples of 0.5 s) is full.
    await page.wait_for_function("Number(document.body.dataset.updates || 0) >= 2", timeout=15000)
    await page.wait_for_function(
        "document.querySelector('[data-lag-row] [data-col=status]')?.dataset.value === 'STOP'",
        timeout=15000)
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
    assert rows == [["worker", "host-a-1", "true", "—"],
                    ["worker", "host-b-2", "true", "RedisError: connection reset (retried)"],
                    ["learner", learner["instance"], "true", "—"]]
    assert await page.get_attribute('tr[data-service="serving"] .badge', "class") == "badge s-DOWN"

    # lag rows match /v1/lag (values may move between the two reads: same group, same rows)
    shown = await page.eval_on_selector_all(
        "#lag-table tr[data-lag-row]",
        "rs => rs.map(r => [r.dataset.lagRow, ...['committed','log_end','lag','status']"
        ".map(c => r.querySelector(`[data-col=${c}]`).dataset.value)])")
    expected = [[f"{g['group']}|{p['topic']}|{p['partition']}", str(p["committed"]),
                 str(p["log_end"]), str(p["lag"]), p["status"]]
                for g in lag["groups"] for p in g["partitions"]]
    mine = [r for r in shown if r[0].startswith(ops_server["group"] + "|")]
    assert mine == [r for r in expected if r[0].startswith(ops_server["group"] + "|")]
    assert [r[3] for r in mine] == ["0", "11"]

    # charts drew lines; nothing outside the server was requested; no JS errors
    await page.wait_for_function(
        "document.querySelector('svg[data-series=auc] polyline') !== null", timeout=10000)
    assert all(u.startswith(base) for u in page.requested), page.requested
    assert page.js_errors == []

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
