"""Rule data: schema validation, ATT&CK ids, doctests of the package."""

from __future__ import annotations

import doctest
import functools
import re
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import detection.alerts
import detection.coalesce
import detection.engine
import detection.laurel
import detection.records
import detection.reduction
import detection.rules
import detection.tags
import detection.tail
from detection.rules import TACTIC_ORDER, RuleSet


def test_every_rule_has_attack_id_and_tactic():
    rs = RuleSet.load()
    assert len(rs.rules) > 40
    for r in rs.rules:
        assert r.technique == "_from_check" or re.fullmatch(r"T\d{4}(\.\d{3})?", r.technique), r.id
        assert r.tactic in TACTIC_ORDER
        assert 1 <= r.weight <= 3
    assert len({r.id for r in rs.rules}) == len(rs.rules)


@pytest.mark.parametrize(
    "bad, msg",
    [
        ({"id": "x", "technique": "T1", "tactic": "execution"}, "missing required key 'op'"),
        ({"id": "x", "technique": "T1", "tactic": "nope", "op": ["exec"]}, "unknown tactic"),
        (
            {"id": "x", "technique": "T1", "tactic": "execution", "op": ["exec"], "exe": "@none"},
            "not defined",
        ),
        (
            {"id": "x", "technique": "T1", "tactic": "execution", "op": ["exec"], "check": "zz"},
            "unknown check",
        ),
        (
            {
                "id": "x",
                "technique": "T1",
                "tactic": "execution",
                "op": ["exec"],
                "proc_labels": ["zz"],
            },
            "unknown label",
        ),
    ],
)
def test_bad_rules_are_rejected_with_reason(bad, msg):
    with pytest.raises(ValueError, match=msg):
        RuleSet({"rules": [bad]})


@pytest.mark.parametrize(
    "mod",
    [
        detection.records,
        detection.coalesce,
        detection.laurel,
        detection.tags,
        detection.reduction,
        detection.alerts,
        detection.rules,
        detection.engine,
        detection.tail,
    ],
)
def test_doctests(mod):
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0



def _masquerade_reference(path):
    """The check as first written: every component of the path looked at."""
    if not path or path.startswith(detection.rules._SYSTEM_DIRS):
        return False
    parts = path.split("/")
    if detection.rules._MASQ_NAMES.match(parts[-1]):
        return True
    return any(c.startswith(".") and detection.rules._MASQ_NAMES.match(c)
               and c.lower() not in (".dbus-keyrings",) for c in parts[1:-1])


def test_masquerade_skips_paths_without_a_hidden_directory_exactly():
    from detection.nodes import FileNode

    paths = ["/home/u/.sshd/x", "/home/u/.sshd", "/tmp/.systemd-x/a/b", "/tmp/a/.b", "x",
             "/tmp/sshd", "/tmp/.X/.dbus/f", "/var/tmp/.dbus-keyrings/f", ".sshd/a", "/.crond/",
             "/home/u//.atd/x", "/home/u/./x", "/tmp/.cupsd./f", "/srv/.libfoo.so.1/z", ""]
    for path in paths:
        edge = SimpleNamespace(op="create", obj=FileNode(path, 1.0, 8))
        assert bool(detection.rules.masquerade(edge)) == bool(_masquerade_reference(path)), path
    assert sum(map(_masquerade_reference, paths)) >= 5


def test_rules_are_looked_up_by_program_in_rule_order():
    """``exe`` / ``exe_not`` are applied through the (op, program) index: the rules that
    fire, and their order, are what testing each rule's condition gives; the index is
    bounded and a program it dropped is looked up again."""
    from detection.nodes import Edge, ProcNode

    rs = RuleSet({"rules": [
        {"id": "cron", "technique": "T1053.003", "tactic": "persistence", "op": "exec",
         "exe": ["crontab"]},
        {"id": "not-ls", "technique": "T1059", "tactic": "execution", "op": "exec",
         "exe_not": ["ls"]},
        {"id": "any", "technique": "T1082", "tactic": "discovery", "op": ["exec", "read"]},
    ]})
    rs.ADMITTED_MAX = 3

    def fired(exe, op="exec"):
        proc = ProcNode(7, 1.0, 16)
        proc.exe = exe
        return [m.rule for m in rs.match(Edge(1.0, op, proc, None))]

    want = {"/usr/bin/crontab": ["cron", "not-ls", "any"], "/bin/ls": ["any"],
            "/bin/sh": ["not-ls", "any"], None: ["not-ls", "any"]}
    for _ in range(3):  # first lookups, then from the index, then after it started over
        for exe, ids in want.items():
            assert fired(exe) == ids, exe
        assert len(rs._admitted) <= rs.ADMITTED_MAX
    assert fired("/bin/ls", op="read") == ["any"]  # an op without program conditions


def test_path_literal_gate_fires_what_every_rule_fires(audit_dir, monkeypatch):
    """``RuleSet.match`` skips the rules whose path condition needs a literal the edge's
    path lacks: on the dev logs and a benign day, every match (rule, edge, order), every
    label and every alert is what running every rule gives."""
    import detection.rules as rules_mod
    from detection.engine import DetectionEngine

    from .conftest import benign_lines

    logs = [p.read_text(encoding="utf-8").splitlines() for p in sorted(audit_dir.glob("*.log"))]
    logs.append(benign_lines("test")[:40_000])

    def run():
        out = []
        rs = RuleSet.load()
        match = rs.match

        def traced(edge):
            ms = match(edge)
            out.append([(m.rule, m.technique, edge.key(), edge.proc.labels,
                         edge.obj.labels if edge.obj is not None else None) for m in ms])
            return ms

        rs.match = traced
        for lines in logs:
            eng = DetectionEngine(host="vm", rules=rs)
            for i in range(0, len(lines), 100):
                out.append(eng.process_lines(lines[i:i + 100]).alerts)
            out.append(eng.flush().alerts)
        return out

    gated = run()
    with monkeypatch.context() as m:
        m.setattr(rules_mod, "_holds_any", lambda text, literals: True)  # every rule runs
        assert run() == gated
    assert sum(1 for x in gated if x) > 50


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(["", ".", "..", "ssh", "SSHd", "d", "sy", "Stemd", "x11", "X1",
                                 "lib", "LIBc", "-", ".so", ".so.6", "1", "ſ", "K", "ı", "İ",
                                 "cron", "CrOnD", "kworker/0:1", "atd", "\n", "é", "ld-linux"]),
                max_size=5).map("".join))
def test_masquerade_name_gate_is_the_match(name):
    """The name gate of the masquerade check answers what the pattern's match does."""
    assert detection.rules._masq_name(name) == (detection.rules._MASQ_NAMES.match(name) is not None)


def test_masquerade_name_gate_is_on():
    assert detection.rules._MASQ_STARTS is not None and "ssh" in detection.rules._MASQ_STARTS


def _hidden_unusual_reference(path, op):
    """``hidden_unusual`` as it was before its directory memo."""
    if not path or "/." not in path or not path.startswith(detection.rules._HIDDEN_ROOTS):
        return False
    parts = path.split("/")
    start = 3 if path.startswith("/home/") else 2
    comps = parts[start:-1] if path.startswith(("/home/", "/root/")) else parts[1:-1]
    leaf = parts[-1]
    known = detection.rules.KNOWN_DOTDIRS
    for c in comps:
        if c.startswith(".") and c not in known and c not in (".", ".."):
            return True
    return leaf.startswith(".") and len(comps) >= 1 and op == "exec_load" and all(
        c not in known for c in comps)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(["/", "home", "root", "/home/", "/root/", "/var/", "/tmp/",
                                 ".git", ".x", ".", "..", "a", ".cache", "", "/usr/",
                                 "/home", ".ssh/"]), max_size=8).map("".join),
       st.sampled_from(["create", "exec_load"]))
def test_hidden_unusual_is_the_path_check(path, op):
    """The hidden-component check with its directory memo answers what the per-path
    check did."""
    from detection.nodes import FileNode

    edge = SimpleNamespace(op=op, obj=FileNode(path, 1.0, 8))
    assert bool(detection.rules.hidden_unusual(edge)) == _hidden_unusual_reference(path, op)


@functools.cache
def _rules() -> RuleSet:
    return RuleSet.load()


def _fired(edge) -> set[str]:
    return {m.rule for m in _rules().match(edge)}


def test_setuid_rules_fire_on_files_and_foreign_roots_only():
    """A setuid/setgid bit on a file and a user's process running as root from a program
    outside the system directories are T1548.001; a directory's setgid bit (shared group
    directories), a plain chmod and root's own or sudo's processes are not."""
    from detection.nodes import Edge, FileNode, ProcNode

    proc = ProcNode(9, 1.0, 16)
    proc.exe, proc.uid, proc.euid = "/usr/bin/chmod", 0, 0

    def chmod(mode, inode_mode):
        f = FileNode("/var/tmp/.sysd", 1.0, 8)
        f.mode = inode_mode
        return Edge(1.0, "chmod", proc, f, {"mode": mode})

    assert "setid-bit" in _fired(chmod(0o4755, "0100755"))
    assert "setid-bit" in _fired(chmod(0o2755, "0100755"))
    assert "setid-bit" not in _fired(chmod(0o2775, "040775"))  # a directory
    assert "setid-bit" not in _fired(chmod(0o755, "0100755"))
    shell = ProcNode(10, 1.0, 16)
    for exe, uid, euid, want in [("/var/tmp/.sysd", 1502, 0, True), ("/usr/bin/passwd", 1502, 0, False),
                                 ("/var/tmp/.sysd", 0, 0, False), ("/var/tmp/.sysd", 1502, 1502, False)]:
        shell.exe, shell.uid, shell.euid = exe, uid, euid
        assert ("setuid-exec" in _fired(Edge(1.0, "exec", shell, None))) is want, (exe, uid, euid)


def test_an_untrusted_http_client_is_web_c2_on_any_port_and_a_socket_turned_shell_is_t1095():
    from detection import tags as T
    from detection.nodes import Edge, ProcNode, SockNode

    curl = ProcNode(11, 1.0, 16)
    curl.exe, curl.labels = "/usr/bin/curl", T.UNTRUSTED | T.NET_IN
    sock = SockNode("inet", "10.1.2.3", 8123, 1.0, 8, trusted=False)
    assert "c2-web-client" in _fired(Edge(1.0, "connect", curl, sock, {"ok": True}))
    curl.labels = 0  # not dependent on anything untrusted: a probe or a download
    assert "c2-web-client" not in _fired(Edge(1.0, "connect", curl, sock, {"ok": True}))
    sh = ProcNode(12, 1.0, 16)
    sh.exe, sh.labels = "/usr/bin/dash", T.UNTRUSTED | T.NET_IN  # perl connected, then exec sh
    assert "shell-on-socket" in _fired(Edge(1.0, "exec", sh, None))
    sh.labels = T.UNTRUSTED  # a shell forked by such a process: not this rule
    assert "shell-on-socket" not in _fired(Edge(1.0, "exec", sh, None))


@pytest.mark.parametrize("exe, argv, want", [
    ("/usr/bin/tail", ["tail", "-5", "/home/a/.bash_history"], True),
    ("/usr/bin/cp", ["cp", "/home/a/.zsh_history", "/tmp/x"], True),
    ("/usr/bin/shred", ["shred", "-u", "/home/a/.bash_history"], False),  # tampering
    ("/usr/bin/tail", ["tail", "/home/a/.bash_history_old.txt"], False),
])
def test_history_read_by_name(exe, argv, want):
    from detection.nodes import Edge, ProcNode

    p = ProcNode(13, 1.0, 16)
    p.exe, p.argv = exe, argv
    assert ("history-read" in _fired(Edge(1.0, "exec", p, None, {"argv": argv}))) is want


@pytest.mark.parametrize("exe, argv, want", [
    ("/usr/bin/python3.11", ["python3", "/tmp/.x/xmrig", "--url", "stratum+tcp://10.0.0.1:3333"], "miner"),
    ("/opt/m/xmrig", ["xmrig", "-o", "pool:443", "--donate-level", "1"], "miner"),
    ("/usr/bin/openssl", ["openssl", "enc", "-aes-256-cbc", "-in", "a.py", "-out", "a.enc"],
     "encrypt-files-openssl"),
    ("/usr/bin/openssl", ["openssl", "enc", "-d", "-aes-256-cbc", "-in", "a.enc"], None),
    ("/usr/bin/openssl", ["openssl", "rand", "-hex", "8"], None),
    ("/usr/bin/gpg", ["gpg", "--symmetric", "backup.tar"], "encrypt-files-gpg"),
    ("/usr/bin/gpg", ["gpg", "--decrypt", "backup.tar.gpg"], None),
])
def test_impact_rules(exe, argv, want):
    """A coin miner (pool URL or name) and files encrypted with openssl or gpg (context:
    encrypted backups are ordinary work); decryption matches nothing."""
    from detection.nodes import Edge, ProcNode

    p = ProcNode(14, 1.0, 16)
    p.exe, p.argv = exe, argv
    fired = {r for r in _fired(Edge(1.0, "exec", p, None, {"argv": argv}))
             if r in ("miner", "encrypt-files-openssl", "encrypt-files-gpg")}
    assert fired == ({want} if want else set())
