"""``headwater serve --workers 2`` on the real stack: a rolling restart drops nothing.

Clients score in a loop (keep-alive connections, as a load balancer would keep them)
while the supervisor replaces each worker in turn (SIGHUP). Every request must be
answered 200: none failed, none refused, none cut off.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.request

import pytest

from tests.stackutil import Service, service_env, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration]

#: what the supervisor may take to start or replace 2 workers (serving.workers.Supervisor
#: defaults: ready_timeout 120 s per start, stop_timeout 30 s per stop)
WORKERS_BOUND = 2 * (120 + 30)


class KeepAliveLoad:
    """``clients`` aiohttp clients scoring in a loop on pooled connections (own thread)."""

    def __init__(self, port: int, clients: int = 4) -> None:
        self.url = f"http://127.0.0.1:{port}/v1/score"
        self.clients = clients
        self.ok = 0
        self.failed: list[str] = []
        self.pids: set[int] = set()
        self.closes: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        import aiohttp

        body = json.dumps({"user_id": "u1", "candidates": ["i1", "i2", "i3"]}).encode()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

            async def client() -> None:
                while not self._stop.is_set():
                    try:
                        async with http.post(self.url, data=body) as resp:
                            payload = await resp.read()
                            if resp.status == 200:
                                self.ok += 1
                                self.pids.add(int(resp.headers["X-Headwater-Worker"]))
                                if resp.headers.get("Connection", "").lower() == "close":
                                    self.closes.append(time.time())
                            else:
                                self.failed.append(f"{resp.status}: {payload[:200]!r}")
                    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                        self.failed.append(f"{time.time():.3f} {type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.002)

            await asyncio.gather(*(client() for _ in range(self.clients)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)


def _worker_pids(supervisor_pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == supervisor_pid:
                out.add(int(entry))
    return out


def test_rolling_restart_under_load_drops_nothing(publish, settings, seeded_redis,
                                                  kafka_bootstrap, topic_prefix, tmp_path):
    version = publish(0)
    env = service_env(kafka_bootstrap, seeded_redis, topic_prefix, tmp_path,
                      HEADWATER_MODEL_STORE=settings.model_store,
                      HEADWATER_PARTITIONS=settings.partitions,
                      HEADWATER_SERVE_WORKERS=2, HEADWATER_SERVE_DRAIN_SECONDS=1)
    port = int(env["HEADWATER_HTTP_PORT"])

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    sup = Service("serve", env, tmp_path / "logs")
    try:
        wait_until(ready, 90, what="serving ready", on_fail=sup.log)
        # as long as the supervisor itself allows: each worker start may take up to its
        # ready timeout (120 s; torch imports on a loaded machine), each stop its drain
        wait_until(lambda: "with 2 workers" in sup.log(), WORKERS_BOUND, what="2 workers ready",
                   on_fail=sup.log)
        before = _worker_pids(sup.proc.pid)
        with KeepAliveLoad(port) as load:
            wait_until(lambda: load.ok >= 50, 120, what="load running")
            os.kill(sup.proc.pid, signal.SIGHUP)
            # both replaced: two new workers, none of the old ones left
            wait_until(lambda: (p := _worker_pids(sup.proc.pid)) and len(p) == 2
                       and not p & before, WORKERS_BOUND, what="rolling restart done",
                       on_fail=sup.log)
            after = _worker_pids(sup.proc.pid)
            served_before = load.ok
            wait_until(lambda: load.ok >= served_before + 50, 120, what="load after restart")
        assert not load.failed, load.failed[:10]
        # the draining workers told their clients to reconnect elsewhere
        assert load.closes
        # the loop was answered by the old workers and by their replacements
        assert load.pids & before and load.pids & after, (load.pids, before, after)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            assert json.loads(resp.read())["model_version"] == version
        assert sup.alive()
    finally:
        sup.stop()
    assert not _worker_pids(sup.proc.pid)
