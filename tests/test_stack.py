"""`headwater up` / `down` on the embedded stack, as a newcomer runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from headwater.servers import free_port, pid_alive
from tests.stackutil import REPO, wait_until

pytestmark = pytest.mark.integration


def hw(env, *args, timeout=180, check=True):
    return subprocess.run([sys.executable, "-m", "headwater", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture
def stack_env(tmp_path):
    env = dict(os.environ)
    env.update({
        "HEADWATER_STATE_DIR": str(tmp_path / "state"),
        "HEADWATER_MODEL_STORE": str(tmp_path / "state" / "models"),
        "HEADWATER_KAFKA_PORT": "0", "HEADWATER_REDIS_PORT": "0",
        "HEADWATER_HTTP_PORT": str(free_port()), "HEADWATER_WORKER_PORT": str(free_port()),
        "HEADWATER_LEARNER_PORT": str(free_port()), "HEADWATER_CONTENT_ENCODER": "hashing",
        "HEADWATER_PUBLISH_EVERY_SECONDS": "2",
    })
    env.pop("HEADWATER_KAFKA", None)
    env.pop("HEADWATER_REDIS", None)
    yield env
    hw(env, "down", check=False)


def test_up_replay_status_score_down(stack_env, tmp_path):
    up = hw(stack_env, "up")
    assert "broker" in up.stdout and "(embedded Tansu)" in up.stdout
    state = json.loads((tmp_path / "state" / "run" / "stack.json").read_text())
    assert set(state["pids"]) == {"broker", "redis", "worker", "learner", "serve"}

    # A second `up` while the first runs is refused, not silently reused.
    again = hw(stack_env, "up", check=False)
    assert again.returncode != 0 and "still running" in again.stderr

    replay = hw(stack_env, "replay", "movielens", "--limit", "3000", "--no-progress")
    assert "3000 click events" in replay.stdout and "coded" in replay.stdout

    def counted():
        doc = json.loads(hw(stack_env, "status", "--json").stdout)
        workers = doc["services"].get("worker", [])
        return workers and workers[0]["events_valid_total"] >= 3000 + 1682 and doc

    doc = wait_until(counted, 120, what="the worker to count the replay")
    assert doc["kafka"]["reachable"] and doc["redis"]["reachable"]

    port = stack_env["HEADWATER_HTTP_PORT"]

    def scored():
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/score", method="POST",
                                     data=json.dumps({"user_id": "1", "candidates": ["50", "181", "no-such-item"]}).encode())
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        except OSError:
            return None

    body = wait_until(scored, 120, interval=1.0, what="a model to serve")
    assert body["model_version"] and len(body["scores"]) == 3
    assert all(0.0 <= s <= 1.0 for s in body["scores"])

    text = hw(stack_env, "status").stdout
    for name in ("worker", "learner", "serving"):
        assert f"{name}" in text and "healthy" in text

    feats = json.loads(hw(stack_env, "features", "get", "item:50", "--json").stdout)
    assert feats["impressions_total"] >= 1

    hw(stack_env, "down")
    assert not any(pid_alive(p) for p in state["pids"].values())
    assert not (tmp_path / "state" / "run" / "stack.json").exists()


def test_stale_state_file_is_reported_and_replaced(stack_env, tmp_path):
    run = tmp_path / "state" / "run"
    run.mkdir(parents=True)
    (run / "stack.json").write_text(json.dumps({"kafka": "x", "redis": "y", "http": "z",
                                                "pids": {"worker": 2**22 + 12345}}))
    up = hw(stack_env, "up", "--only", "worker")
    assert "stale" in up.stdout
