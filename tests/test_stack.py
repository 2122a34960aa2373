"""`headwater up` / `down` on the embedded stack, as a newcomer runs it."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

from headwater.servers import pid_alive
from tests.stackutil import REPO, embedded_stack_env, free_port, hw, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def stack_env(tmp_path):
    env = embedded_stack_env(tmp_path, HEADWATER_PUBLISH_EVERY_SECONDS=2)
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
        doc = json.loads(hw(stack_env, "status", "--json", check=False).stdout)
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
                doc = json.loads(resp.read())
        except OSError:
            return None
        # the popularity baseline answers until the first trained model swaps in
        return doc if doc["model_version"] != "baseline" else None

    body = wait_until(scored, 120, interval=1.0, what="a trained model to serve")
    assert body["model_version"] and len(body["scores"]) == 3
    assert all(0.0 <= s <= 1.0 for s in body["scores"])

    text = hw(stack_env, "status").stdout
    for name in ("worker", "learner", "serving"):
        assert f"{name}" in text and "healthy" in text

    feats = json.loads(hw(stack_env, "features", "get", "item:50", "--json").stdout)
    assert feats["impressions_total"] >= 1

    # A new item arriving late gets codes within seconds and is scored with them.
    new_item = tmp_path / "item.json"
    new_item.write_text(json.dumps({"item_id": "late-item-1", "ts": 893_000_000,
                                    "text": "A late space adventure", "tags": ["Sci-Fi"]}))
    hw(stack_env, "produce", "items", "--file", str(new_item))

    def coded():
        doc = json.loads(hw(stack_env, "features", "get", "item:late-item-1", "--json").stdout)
        return doc.get("codes") and doc

    doc = wait_until(coded, 60, interval=1.0, what="codes for the late item")
    assert len(doc["codes"]["rq"]) == 3
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/score", method="POST",
                                 data=json.dumps({"user_id": "1", "candidates": ["late-item-1"]}).encode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert len(json.loads(resp.read())["scores"]) == 1

    # An attack log shipped with `ship-audit` raises an alert served at GET /v1/alerts.
    log = Path(os.environ.get("HEADWATER_DATA_DIR", REPO.parent / "shared" / "datasets")) / "audit" / "dev04_credential_exfil.log"
    hw(stack_env, "ship-audit", str(log), "--host", "vm-stack")

    def alerted():
        url = f"http://127.0.0.1:{port}/v1/alerts?host=vm-stack&min_severity=high"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read()).get("alerts")

    alerts = wait_until(alerted, 90, interval=1.0, what="an alert at /v1/alerts")
    assert "T1003.008" in alerts[0]["techniques"]

    # Nothing listens beyond loopback by default.
    import psutil

    for name, pid in state["pids"].items():
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                assert conn.laddr.ip in ("127.0.0.1", "::1"), (name, conn.laddr)

    hw(stack_env, "down")
    assert not any(pid_alive(p) for p in state["pids"].values())
    assert not (tmp_path / "state" / "run" / "stack.json").exists()

    # `down` keeps Redis's data and the model store, but the embedded broker's log was in
    # memory: the next `up` refuses, naming what does not match and the fix.
    assert (tmp_path / "state" / "redis").is_dir() and (tmp_path / "state" / "models").is_dir()
    refused = hw(stack_env, "up", "--only", "worker", check=False)
    assert refused.returncode != 0, refused.stdout
    assert "does not match" in refused.stderr and "headwater reset" in refused.stderr
    assert "Redis records clicks[" in refused.stderr and "the broker's log ends at 0" in refused.stderr
    assert "model store ranker/" in refused.stderr  # a model was served above: it was published
    assert not (tmp_path / "state" / "run" / "stack.json").exists()  # nothing left running

    # `reset` wipes every piece of kept state; then `up` starts clean.
    hw(stack_env, "reset")
    assert not (tmp_path / "state" / "redis").exists()
    assert not (tmp_path / "state" / "models").exists()
    assert (tmp_path / "state" / "logs").is_dir()  # logs stay
    hw(stack_env, "up", "--only", "worker")


def test_stale_state_file_is_reported_and_replaced(stack_env, tmp_path):
    run = tmp_path / "state" / "run"
    run.mkdir(parents=True)
    (run / "stack.json").write_text(json.dumps({"kafka": "x", "redis": "y", "http": "z",
                                                "pids": {"worker": 2**22 + 12345}}))
    up = hw(stack_env, "up", "--only", "worker")
    assert "stale" in up.stdout


def _free_pair() -> int:
    """A port ``p`` with ``p + 1`` free too (two workers' ``/metrics``)."""
    import socket

    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two adjacent free ports")


def test_up_starts_worker_procs_workers_that_share_the_partitions(tmp_path):
    env = embedded_stack_env(tmp_path, HEADWATER_WORKER_PROCS=2, HEADWATER_PARTITIONS=4,
                             HEADWATER_WORKER_PORT=_free_pair())
    try:
        hw(env, "up", "--only", "worker")
        state = json.loads((tmp_path / "state" / "run" / "stack.json").read_text())
        assert set(state["pids"]) == {"broker", "redis", "worker", "worker-2"}
        assert all(pid_alive(state["pids"][n]) for n in ("worker", "worker-2"))
        logs = tmp_path / "state" / "logs"
        assert (logs / "worker.log").exists() and (logs / "worker-2.log").exists()
        port = int(env["HEADWATER_WORKER_PORT"])
        for p in (port, port + 1):  # each its own /metrics
            with urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=10) as resp:
                assert b"headwater_" in resp.read()
        hw(env, "replay", "movielens", "--limit", "2000", "--no-progress", "--wait-items", "0")

        def split():
            doc = json.loads(hw(env, "status", "--json", check=False).stdout)
            workers = doc["services"].get("worker", [])
            counts = sorted(w.get("events_valid_total", 0) for w in workers)
            # both counted some of the clicks (the group split the partitions), together all
            return len(workers) == 2 and counts[0] > 0 and sum(counts) >= 2000 + 1682 and counts
        wait_until(split, 120, what="two workers to share the replay")
    finally:
        hw(env, "down", check=False)
    assert not any(pid_alive(state["pids"][n]) for n in ("worker", "worker-2"))


def test_worker_procs_that_would_take_another_services_port_are_refused(tmp_path):
    from core.settings import Settings
    from headwater.stack import StackError, up

    settings = Settings(state_dir=tmp_path / "state", worker_port=8010, learner_port=8012,
                        worker_procs=3)
    with pytest.raises(StackError, match="would take port 8012"):
        up(settings, ("worker",))
    assert not (tmp_path / "state" / "run" / "stack.json").exists()
