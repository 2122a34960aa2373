"""Serving killed with -9 under load and restarted: it serves the newest good model at once."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.serving.conftest import tamper
from tests.stackutil import Service, service_env, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration]


class Load:
    """Requests in a loop from a thread, recording (time, status, model_version)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/v1/score"
        self.results: list[tuple[float, int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = json.dumps({"user_id": "u1", "candidates": ["i1", "i2", "i3"]}).encode()
        while not self._stop.is_set():
            req = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    self.results.append((time.monotonic(), resp.status,
                                         json.loads(resp.read())["model_version"]))
            except urllib.error.HTTPError as exc:
                self.results.append((time.monotonic(), exc.code, None))
            except OSError:
                self.results.append((time.monotonic(), 0, None))  # connection refused: down
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def test_serving_restart_serves_newest_good_model_at_once(publish, store, settings, seeded_redis,
                                                          kafka_bootstrap, topic_prefix, tmp_path):
    publish(0)
    newest_good = publish(1)
    env = service_env(kafka_bootstrap, seeded_redis, topic_prefix, tmp_path,
                      HEADWATER_MODEL_STORE=settings.model_store,
                      HEADWATER_PARTITIONS=settings.partitions)
    port = int(env["HEADWATER_HTTP_PORT"])

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    first = Service("serve", env, tmp_path / "logs")
    second = None
    try:
        wait_until(ready, 60, what="serving ready", on_fail=first.log)
        with Load(port) as load:
            time.sleep(1.0)
            bad = publish(2)
            tamper(store, bad)  # the newest version is corrupt: it must never serve
            killed_at = time.monotonic()
            first.kill9()
            time.sleep(0.5)
            second = Service("serve", env, tmp_path / "logs")
            wait_until(ready, 60, what="serving ready again", on_fail=second.log)
            time.sleep(1.0)
        before = [r for r in load.results if r[0] < killed_at]
        after_restart = [r for r in load.results if r[0] > killed_at and r[1] == 200]
        assert before and all(r[1] == 200 for r in before), [r for r in before if r[1] != 200][:5]
        assert after_restart, "no successful request after the restart"
        # The very first answer after the restart already comes from the newest good model.
        assert after_restart[0][2] == newest_good
        assert {r[2] for r in after_restart} == {newest_good}
        # While it was down, requests failed fast (refused), never with a 5xx.
        assert not [r for r in load.results if r[1] >= 500]
    finally:
        for svc in (first, second):
            if svc is not None:
                svc.stop()
