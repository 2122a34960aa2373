"""Record a fresh, real kernel audit log with a private ``auditd`` (test helper).

:class:`AuditRecorder` is a context manager: on enter it starts ``auditd -n``
with a private configuration writing an ENRICHED log to ``log_path`` and loads
a small rule set scoped to one audit uid (``auid``); on exit it *always*
disables auditing, deletes the rules, stops its auditd and restores what was
there before (enabled flag, backlog settings, rules). Run the workload with
:meth:`AuditRecorder.popen`, which sets the child's login uid so its whole
process tree carries ``auid`` (and a fresh audit session), like a real login.

Used by ``test_live_audit.py`` and reusable by integration tests that ship the
recorded log through Kafka.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path


class RecorderUnavailable(RuntimeError):
    """Recording is impossible here (not root, no auditctl, auditd already running ...)."""


def _auditctl(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["auditctl", *args], capture_output=True, text=True, check=check, timeout=30
    )


def audit_status() -> dict:
    """``auditctl -s`` as a dict of str -> str."""
    out = _auditctl("-s").stdout
    st = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            st[parts[0]] = parts[1]
    return st


def default_rules(auid: int) -> list[str]:
    """A minimal rule set: exec, process creation, connect, writes, deletes, perms, shadow."""
    a = f"-F auid={auid}"
    return [
        "-a never,exit -F arch=b64 -S clone -F a0&0x10000",  # threads are not processes
        f"-a always,exit -F arch=b64 -S execve,execveat {a} -k exec",
        f"-a always,exit -F arch=b64 -S fork,vfork,clone {a} -k proc_create",
        f"-a always,exit -F arch=b64 -S connect -F a2=16 {a} -k net_connect",
        f"-a always,exit -F arch=b64 -S bind -F a2=16 {a} -k net_bind",
        f"-a always,exit -F arch=b64 -S openat -F a2&03 {a} -k file_write",
        f"-a always,exit -F arch=b64 -S open -F a1&03 {a} -k file_write",
        f"-a always,exit -F arch=b64 -S creat,truncate,ftruncate {a} -k file_write",
        f"-a always,exit -F arch=b64 -S unlink,unlinkat,rename,renameat,renameat2 {a} -k file_delete",
        f"-a always,exit -F arch=b64 -S chmod,fchmod,fchmodat {a} -k perm_mod",
        "-w /etc/shadow -p rwa -k shadow_access",
    ]


class AuditRecorder:
    """Context manager recording a real audit log to *log_path*.

    Parameters
    ----------
    log_path : path
        Where auditd writes (created empty).
    auid : int
        Audit uid the rules are scoped to; :meth:`popen` children carry it.
    rules : list of str, optional
        ``auditctl`` rule lines (default :func:`default_rules`).
    """

    def __init__(self, log_path, auid: int = 4242, rules: list[str] | None = None):
        self.log_path = Path(log_path)
        self.auid = auid
        self.rules = rules if rules is not None else default_rules(auid)
        self._proc: subprocess.Popen | None = None
        self._confdir: str | None = None
        self._prev: dict = {}
        self._prev_rules: list[str] = []

    @staticmethod
    def check_available() -> None:
        """Raise :class:`RecorderUnavailable` with a clear reason when recording can't work."""
        if os.geteuid() != 0:
            raise RecorderUnavailable("recording a kernel audit log needs root")
        for tool in ("auditctl", "auditd"):
            if shutil.which(tool) is None:
                raise RecorderUnavailable(f"{tool} is not installed (apt-get install auditd)")
        st = audit_status()
        if not st:
            raise RecorderUnavailable("auditctl -s failed: kernel audit is not available here")
        if st.get("pid", "0") != "0":
            raise RecorderUnavailable(
                f"another audit daemon (pid {st['pid']}) owns the audit "
                "netlink socket; refusing to take it over"
            )
        if st.get("enabled") == "2":
            raise RecorderUnavailable("audit configuration is locked (enabled 2)")

    def __enter__(self) -> AuditRecorder:
        self.check_available()
        self._prev = audit_status()
        listed = _auditctl("-l").stdout.splitlines()
        self._prev_rules = [r for r in listed if r.strip() and r.strip() != "No rules"]
        self._confdir = tempfile.mkdtemp(prefix="hw-auditd-")
        os.chmod(self._confdir, 0o750)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("")
        os.chmod(self.log_path, 0o600)
        conf = Path(self._confdir) / "auditd.conf"
        conf.write_text(
            "\n".join(
                [
                    f"log_file = {self.log_path}",
                    "log_format = ENRICHED",
                    "log_group = root",
                    "flush = INCREMENTAL_ASYNC",
                    "freq = 50",
                    "num_logs = 1",
                    "max_log_file = 64",
                    "max_log_file_action = IGNORE",
                    "space_left = 10",
                    "space_left_action = IGNORE",
                    "admin_space_left = 5",
                    "admin_space_left_action = IGNORE",
                    "disk_full_action = IGNORE",
                    "disk_error_action = IGNORE",
                    "name_format = NONE",
                    "write_logs = yes",
                    "priority_boost = 0",
                    "disp_qos = lossy",
                    "tcp_listen_queue = 5",
                    "use_libwrap = no",
                    "end_of_event_timeout = 2",
                    "",
                ]
            )
        )
        os.chmod(conf, 0o640)
        try:
            self._proc = subprocess.Popen(
                ["auditd", "-n", "-c", self._confdir, "-s", "enable"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    err = (
                        self._proc.stderr.read().decode(errors="replace")
                        if self._proc.stderr
                        else ""
                    )
                    raise RecorderUnavailable(f"auditd exited at start: {err.strip()[:300]}")
                if audit_status().get("pid") == str(self._proc.pid):
                    break
                time.sleep(0.1)
            else:
                raise RecorderUnavailable("auditd did not register with the kernel within 10 s")
            _auditctl("-b", "8192")
            with tempfile.NamedTemporaryFile("w", suffix=".rules", delete=False) as fh:
                fh.write("\n".join(self.rules) + "\n")
                rules_file = fh.name
            try:
                res = _auditctl("-R", rules_file)
            finally:
                os.unlink(rules_file)
            if res.returncode != 0:
                raise RecorderUnavailable(f"loading audit rules failed: {res.stderr.strip()[:300]}")
        except BaseException:
            self._teardown()
            raise
        return self

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start *argv* with login uid ``auid`` (a new audit session, like a login)."""
        auid = self.auid

        def _set_loginuid():
            with open("/proc/self/loginuid", "w") as fh:
                fh.write(str(auid))

        return subprocess.Popen(argv, preexec_fn=_set_loginuid, **kw)

    def _teardown(self) -> None:
        _auditctl("-e", "0")
        _auditctl("-D")
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=5)
            if self._proc.stderr:
                self._proc.stderr.close()
            self._proc = None
        prev = self._prev
        if prev.get("backlog_limit"):
            _auditctl("-b", prev["backlog_limit"])
        if prev.get("backlog_wait_time"):
            _auditctl("--backlog_wait_time", prev["backlog_wait_time"])
        for rule in self._prev_rules:
            _auditctl(*rule.split())
        if prev.get("enabled") in ("0", "1"):
            _auditctl("-e", prev["enabled"])
        if self._confdir:
            shutil.rmtree(self._confdir, ignore_errors=True)
            self._confdir = None

    def __exit__(self, *exc) -> None:
        self._teardown()
