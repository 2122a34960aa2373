"""The CLI as scripts and people meet it: exit codes, one-line errors, no secrets printed.

Each case runs ``python -m headwater`` as a child process, so the exit code and the
streams are exactly what a shell sees.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from headwater.servers import free_port, start_redis
from tests.stackutil import Service, hw, service_env, wait_until


@pytest.fixture
def nothing_running(tmp_path) -> dict[str, str]:
    """An environment whose broker and Redis addresses are closed ports."""
    return service_env(f"127.0.0.1:{free_port()}", f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0",
                       "cli-", tmp_path)


def _one_line_error(proc, *words: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("headwater")]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_version_and_unknown_setting(nothing_running):
    out = hw(nothing_running, "--version")
    assert out.stdout.startswith("headwater ") and out.stdout.split()[1][0].isdigit()
    bad = hw(nothing_running, "--set", "htp_port=1", "settings", check=False)
    assert bad.returncode == 2 and "unknown setting 'htp_port'" in bad.stderr
    bad_value = hw(nothing_running, "settings", "--set", "partitions=zero", check=False)
    assert bad_value.returncode == 2 and "partitions" in bad_value.stderr


def test_status_is_nonzero_and_redacts_the_password_when_nothing_runs(nothing_running):
    proc = hw(nothing_running, "status", "--json", check=False)
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["healthy"] is False and doc["kafka"]["reachable"] is False
    assert "s3cret-pw" not in proc.stdout and ":***@" in doc["redis"]["address"]
    text = hw(nothing_running, "status", check=False)
    assert text.returncode == 1 and "s3cret-pw" not in text.stdout + text.stderr
    assert "UNREACHABLE" in text.stdout


def test_status_is_nonzero_while_services_are_down(kafka_bootstrap, tmp_path):
    # its own Redis: other tests' services publish heartbeats into the session's one
    redis_server = start_redis(log_path=tmp_path / "redis.log")
    try:
        env = service_env(kafka_bootstrap, redis_server.extra["url"], "cli-", tmp_path)
        proc = hw(env, "status", check=False)
    finally:
        redis_server.stop()
    assert proc.returncode == 1
    assert "reachable" in proc.stdout and "worker   DOWN" in proc.stdout


@pytest.mark.parametrize(("args", "words"), [
    (("lag",), ("no broker reachable",)),
    (("features", "get", "user:1"), ("Redis at redis://:***@", "unreachable")),
    (("replay", "movielens", "--path", "/nonexistent/ml"), ("no such directory", "/nonexistent/ml")),
    (("produce", "clicks", "--file", "/missing/clicks.jsonl"), ("no such file", "/missing/clicks.jsonl")),
    (("models", "unpin"), ("unreachable",)),
])
def test_failures_are_one_line_errors(nothing_running, args, words):
    proc = hw(nothing_running, *args, check=False, timeout=60)
    _one_line_error(proc, *words)
    assert "s3cret-pw" not in proc.stdout + proc.stderr


def test_models_unpin_and_pin_through_a_running_serving(kafka_bootstrap, redis_db, tmp_path):
    env = service_env(kafka_bootstrap, redis_db, "cli-models-", tmp_path, HEADWATER_ADMIN_TOKEN="t0ken")
    serving = Service("serve", env, tmp_path / "logs")
    try:
        base = f"http://127.0.0.1:{env['HEADWATER_HTTP_PORT']}"

        def ready():
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_until(ready, 60, what="serving ready (baseline ranker)",
                   on_fail=lambda: serving.log_path.read_text()[-3000:])
        unpin = hw(env, "models", "unpin", check=False)
        assert unpin.returncode == 0, unpin.stderr
        assert json.loads(unpin.stdout)["pinned"] is None
        missing = hw(env, "models", "pin", "999", check=False)
        _one_line_error(missing, "serving answered 4")
    finally:
        serving.stop()
