"""The ops samplers stop when the app shuts down, even when a sample swallows the cancel.

On Python 3.11 ``asyncio.wait_for`` can swallow a cancellation that arrives as its inner
call completes; the status sample reads Redis under ``wait_for``. A sampler loop that only
relied on ``CancelledError`` then sampled on forever and held serving's shutdown (in the
ops tests: 15 s per teardown, until the fixture's own bound cancelled the cleanup).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from core.settings import Settings
from serving.ops import add_ops_routes


async def test_samplers_stop_on_cleanup_when_a_sample_swallows_the_cancel():
    app = web.Application()
    # Unreachable addresses: nothing here connects (the samples are replaced below).
    state = add_ops_routes(app, settings=Settings(), redis=None, kafka="127.0.0.1:9",
                           redis_url="redis://127.0.0.1:9/0", period=0.01)
    calls = {"lag": 0, "status": 0}
    in_flight = asyncio.Event()
    swallowed = asyncio.Event()

    async def sample_status():
        # A status sample that is still waiting when shutdown cancels it, and loses the
        # cancel (what a racing wait_for does).
        calls["status"] += 1
        in_flight.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()

    async def sample_lag():
        calls["lag"] += 1
        await asyncio.sleep(0.001)

    state.sample_status = sample_status
    state.sample_lag = sample_lag
    state.close_monitor = lambda: None
    runner = web.AppRunner(app)
    await runner.setup()
    await in_flight.wait()
    while calls["lag"] < 3:
        await asyncio.sleep(0.005)
    cleanup = asyncio.create_task(runner.cleanup())
    # A hang guard, not a timing: without the stop flag the cleanup never returns.
    done, _ = await asyncio.wait({cleanup}, timeout=30)
    assert cleanup in done, "the ops samplers kept running after the app's cleanup"
    await cleanup
    assert swallowed.is_set() and state.stopping
    status_calls = calls["status"]
    await asyncio.sleep(0.05)
    assert calls["status"] == status_calls, "a sampler sampled after shutdown"
