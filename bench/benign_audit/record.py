"""Record a benign audit corpus on this machine with the kernel audit (run as root).

Several accounts log in over a private OpenSSH server on 127.0.0.1 (real PAM
logins, so ``pam_loginuid`` sets the audit uid and session) and run scripted,
varied developer and admin work blocks (``dev.sh``, ``admin.sh``): git, python
venvs and unit tests, C builds, ``.bashrc`` / ``.profile`` / crontab / systemd
user-unit edits, sudo chores, a local web server probed with ``nc -z`` and
``curl``, ``base64 -d``, ``openssl``, ``ssh-keygen`` and tar backups. Sessions of
two or three accounts overlap, as on a shared build host. Time is compressed:
a work block takes about a minute instead of an hour.

``--accounts team-b`` uses other account names and uids and adds ``sre.sh``, a work
block written after the detector was tuned (cmake/C++ builds, a bare git remote, a
deploy key used for ssh/scp to this host, ``wget`` from a local artefact server, a
netcat port test, gpg/openssl-encrypted backups, strace/gdb, sqlite3, node, an
``@reboot`` crontab line, a systemd user timer, sudo ``install``/``chage``/``visudo``/
``journalctl``), on other ports: held-out days for generalisation. ``--accounts team-c``
adds ``installer.sh``: a tool installed the vendor way (``curl ... | sh`` from an
artefact server this script starts outside the audited scope, which edits ``.bashrc``
and installs into a hidden ``~/.hwtool``).

The audit rules are the dev corpus's ``rules.txt`` (same keys and scopes).
Auditing is always switched off and the rules deleted on exit, also on failure
(:class:`tests.detection.audit_recorder.AuditRecorder`); accounts, the sudoers
drop-in and crontabs are removed too.

    sudo .venv/bin/python bench/benign_audit/record.py --out /tmp/benign --rounds 8 --seed 1
    sudo .venv/bin/python bench/benign_audit/record.py --out /tmp/b2 --rounds 12 --seed 11 \
        --accounts team-b --port 9310

Writes ``OUT/benign.log`` (events of other machine users filtered out, whole
events only, like the dev corpus) and ``OUT/meta.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from tests.detection.audit_recorder import AuditRecorder  # noqa: E402

#: account sets: (name, uid, sudo, work blocks it runs). ``team-a`` made the corpus the
#: detector was developed on; ``team-b`` (other names, uids, the ``sre.sh`` block written
#: afterwards, other ports) records held-out days that test generalisation.
ACCOUNT_SETS = {
    "team-a": (("dana", 1611, True, ("dev.sh", "admin.sh")), ("erik", 1612, False, ("dev.sh",)),
               ("ops", 1613, True, ("admin.sh",))),
    "team-b": (("lena", 1621, True, ("sre.sh", "dev.sh", "admin.sh")),
               ("omar", 1622, False, ("sre.sh", "dev.sh")),
               ("kim", 1623, True, ("admin.sh", "sre.sh"))),
    # installs a tool the vendor way (curl | sh from an endpoint no audited process bound)
    "team-c": (("nina", 1631, False, ("installer.sh", "dev.sh")),
               ("paul", 1632, True, ("installer.sh", "admin.sh"))),
}
#: port of the unaudited artefact server ``installer.sh`` downloads from (team-c)
ARTEFACT_PORT = 9400
ACCOUNTS = ACCOUNT_SETS["team-a"]
SSH_PORT = 2222
_SERIAL = re.compile(r"msg=audit\(\d+\.\d+:(\d+)\)")


def sh(*argv, check=True, **kw):
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


def setup_accounts(keydir: Path) -> None:
    for name, uid, _, _ in ACCOUNTS:
        if sh("id", name, check=False).returncode != 0:
            sh("useradd", "-m", "-u", str(uid), "-s", "/bin/bash", name)
        ssh = Path(f"/home/{name}/.ssh")
        ssh.mkdir(mode=0o700, exist_ok=True)
        shutil.copy(keydir / "client.pub", ssh / "authorized_keys")
        sh("chown", "-R", f"{name}:{name}", str(ssh))
    drop = "".join(f"{n} ALL=(ALL) NOPASSWD: ALL\n" for n, _, s, _ in ACCOUNTS if s)
    Path("/etc/sudoers.d/hw-benign").write_text(drop)
    os.chmod("/etc/sudoers.d/hw-benign", 0o440)


def teardown_accounts() -> None:
    Path("/etc/sudoers.d/hw-benign").unlink(missing_ok=True)
    for name, _, _, _ in ACCOUNTS:
        sh("crontab", "-r", "-u", name, check=False)
        sh("pkill", "-u", name, check=False)
        sh("userdel", "-r", name, check=False)
        shutil.rmtree(f"/var/backups/home-{name}", ignore_errors=True)
        Path(f"/etc/hw-svc-{name}.conf").unlink(missing_ok=True)
    Path("/var/log/hw-admin-notes.log").unlink(missing_ok=True)


def start_sshd(d: Path) -> subprocess.Popen:
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host"))
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client"))
    conf = d / "sshd_config"
    conf.write_text(
        f"Port {SSH_PORT}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nPidFile {d / 'sshd.pid'}\n"
        "UsePAM yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin no\nStrictModes no\nPrintMotd no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    sh("/usr/sbin/sshd", "-t", "-f", str(conf))
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(conf)])
    for _ in range(50):
        if sh("nc", "-z", "127.0.0.1", str(SSH_PORT), check=False).returncode == 0:
            return proc
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("sshd did not start")


def session(keydir: Path, name: str, script: str, env: dict) -> subprocess.Popen:
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    return subprocess.Popen(
        ["ssh", "-q", "-p", str(SSH_PORT), "-i", str(keydir / "client"),
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "BatchMode=yes", f"{name}@127.0.0.1", f"env {exports} bash -s"],
        stdin=open(HERE / script), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def keep_events(raw: Path, out: Path, uids: set) -> dict:
    """Whole events of the recorded accounts, sshd, auditd/auditctl and daemon records."""
    events: dict[str, list[str]] = {}
    order = []
    for line in raw.read_text(errors="replace").splitlines():
        m = _SERIAL.search(line)
        key = m.group(1) if m else f"nokey{len(order)}"
        if key not in events:
            events[key] = []
            order.append(key)
        events[key].append(line)
    kept = dropped = 0
    marks = tuple(f" auid={u} " for u in uids) + tuple(f" uid={u} " for u in uids)
    with out.open("w") as fh:
        for key in order:
            recs = events[key]
            text = "\n".join(recs)
            ok = (any(m in text for m in marks) or 'comm="sshd"' in text
                  or 'comm="auditd"' in text or 'comm="auditctl"' in text
                  or recs[0].startswith(("type=DAEMON_", "type=CONFIG_CHANGE")))
            if ok:
                fh.write(text + "\n")
                kept += 1
            else:
                dropped += 1
    return {"events_kept": kept, "events_dropped": dropped}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--port", type=int, default=8090, help="the developers' docs server port")
    ap.add_argument("--accounts", choices=sorted(ACCOUNT_SETS), default="team-a",
                    help="which account set works (team-b: held-out names, uids and sre.sh)")
    ap.add_argument("--rules", default=str(REPO.parent / "shared/datasets/audit/rules.txt"))
    args = ap.parse_args(argv)
    global ACCOUNTS
    ACCOUNTS = ACCOUNT_SETS[args.accounts]
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rules = [ln for ln in Path(args.rules).read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    keydir = Path(tempfile.mkdtemp(prefix="hw-benign-"))
    raw = out / "raw.log"
    sshd = None
    artefacts = None
    t0 = time.time()
    sessions = 0
    try:
        sshd = start_sshd(keydir)
        setup_accounts(keydir)
        if any("installer.sh" in scripts for _, _, _, scripts in ACCOUNTS):
            # started by this (root, no login uid) process: outside the audited scope,
            # like a vendor's download site
            artefacts = subprocess.Popen(
                [sys.executable, "-m", "http.server", str(ARTEFACT_PORT), "--bind",
                 "127.0.0.1", "--directory", str(HERE / "artefacts")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with AuditRecorder(raw, rules=rules):
            for r in range(1, args.rounds + 1):
                procs = []
                for name, _, _, scripts in ACCOUNTS:
                    if rng.random() < 0.25:
                        continue  # not everyone works every block
                    script = rng.choice(scripts)
                    env = {"ROUND": args.seed * 100 + r, "PORT": args.port + 2 * rng.randrange(3),
                           "SSHPORT": SSH_PORT, "APORT": ARTEFACT_PORT}
                    procs.append(session(keydir, name, script, env))
                    sessions += 1
                    time.sleep(rng.uniform(0.5, 4))
                for p in procs:
                    p.wait(timeout=600)
                time.sleep(rng.uniform(1, 5))
            time.sleep(2.5)  # let auditd flush the last events
    finally:
        if artefacts is not None:
            artefacts.terminate()
            artefacts.wait(timeout=10)
        if sshd is not None:
            sshd.terminate()
            sshd.wait(timeout=10)
        teardown_accounts()
        shutil.rmtree(keydir, ignore_errors=True)
    meta = keep_events(raw, out / "benign.log", {u for _, u, _, _ in ACCOUNTS})
    raw.unlink()
    meta.update(seed=args.seed, rounds=args.rounds, seconds=round(time.time() - t0, 1),
                accounts=[n for n, _, _, _ in ACCOUNTS], account_set=args.accounts,
                sessions=sessions,
                started=t0)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
