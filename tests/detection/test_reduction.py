"""Edge merging after detection (detection.reduction, ProvenanceGraph._merge_previous).

Each case: a tiny synthetic audit sequence where the reduction drops the edge it
should, and keeps an attack-relevant edge of the same shape; alerts are the same
with and without reduction.
"""

from __future__ import annotations

import os.path

from detection.engine import DetectionEngine, EngineConfig
from tests.detection.test_graph import Log, _login_shell, _unlink


def _run(lines, reduce=True):
    eng = DetectionEngine("h", EngineConfig(reduce=reduce))
    kept = []
    eng.edge_sink = kept.append
    eng.process_lines(lines)
    eng.flush()
    return eng, kept


def _alerts(eng):
    return sorted((a["severity"], tuple(sorted(a["techniques"]))) for a in eng.alerts("low"))


def _retained(node):
    return [op for _, op, _ in node.edges]


def _same_detection(lines):
    on, _ = _run(lines)
    off, _ = _run(lines, reduce=False)
    assert _alerts(on) == _alerts(off)
    return on


def _setid(L: Log, pid, ppid, uid):
    s, t = L._sys(105, pid, ppid, "/usr/sbin/sshd", a1="0", uid=uid)
    L._end(s, t)


def _chmod(L: Log, pid, ppid, exe, path, mode=0o755):
    s, t = L._sys(268, pid, ppid, exe, items=1, a2=f"{mode:x}")
    L._path(s, t, 0, path)
    L._end(s, t)


def test_fork_edge_is_merged_into_the_childs_exec_but_not_into_other_edges():
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/make", ["make"])
    L.open(12, 11, "/usr/bin/make", "/home/u/Makefile", write=False)
    L.fork(11, 10, 13)  # a subshell that connects out without exec
    L.connect(13, 11, "/usr/bin/bash", 4444)
    eng = _same_detection(L.lines)
    g = eng.graph
    assert _retained(g.procs[12]) == ["exec", "read"] and g.procs[12].n == 2
    assert g.procs[12].parent is g.procs[11]  # the fork lives on in the child node
    assert _retained(g.procs[13]) == ["fork", "connect"] and g.procs[13].n == 2
    assert g.stats["edges_merged"] >= 2  # the shell's and make's fork edges
    off, _ = _run(L.lines, reduce=False)
    assert off.graph.stats["edges_merged"] == 0
    assert _retained(off.graph.procs[12])[:2] == ["fork", "exec"]


def test_credential_burst_keeps_the_last_change_and_changes_actions_ran_under():
    L = Log()
    L.login(10)
    for uid in (0, 1000, 0):  # pam: drop and regain privileges, nothing done in between
        _setid(L, 10, 1, uid)
    L.open(10, 1, "/usr/sbin/sshd", "/var/log/wtmp")  # an action under uid 0
    _setid(L, 10, 1, 1000)
    _setid(L, 10, 1, 0)
    eng = _same_detection(L.lines)
    p = eng.graph.procs[10]
    assert _retained(p) == ["login", "setuid", "write", "setuid"]
    assert eng.graph.stats["edges_merged"] == 3


def test_exec_chain_drops_the_replaced_wrapper_unless_a_rule_matched_it():
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/env", ["env", "-i", "make"])
    L.execve(12, 11, "/usr/bin/make", ["make"])
    L.open(12, 11, "/usr/bin/make", "/home/u/Makefile", write=False)
    L.fork(11, 10, 13)
    L.execve(13, 11, "/usr/bin/id", ["id"])  # discovery: explained by an alert
    L.execve(13, 11, "/usr/bin/make", ["make"])
    eng = _same_detection(L.lines)
    g = eng.graph
    assert _retained(g.procs[12]) == ["exec", "read"] and g.procs[12].argv == ["make"]
    assert g.procs[13].keep and _retained(g.procs[13]) == ["exec", "exec"]
    assert any("T1033" in a["techniques"] for a in eng.alerts("low"))


def test_failed_open_goes_when_the_process_moves_on_unless_labelled_or_matched():
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/git", ["git", "status"])
    L.open(12, 11, "/usr/bin/git", "/home/u/r/.git/index.lock", success="no")
    L.open(12, 11, "/usr/bin/git", "/home/u/r/.git/index", write=True)
    L.fork(11, 10, 13)
    L.execve(13, 11, "/usr/bin/mytool", ["mytool"])
    L.open(13, 11, "/usr/bin/mytool", "/etc/shadow", write=False, success="no")
    L.open(13, 11, "/usr/bin/mytool", "/home/u/out", write=True)
    eng = _same_detection(L.lines)
    g = eng.graph
    assert _retained(g.procs[12]) == ["exec", "write"]
    assert g.files["/home/u/r/.git/index.lock"].n == 0
    assert _retained(g.procs[13]) == ["exec", "denied", "write"]  # credential access attempt
    assert any("T1003.008" in a["techniques"] for a in eng.alerts("low"))


def test_metadata_set_by_the_writer_is_merged_into_the_write_unless_a_rule_matched():
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/mytool", ["mytool"])
    L.open(12, 11, "/usr/bin/mytool", "/home/u/build/a.out", create=True)
    _chmod(L, 12, 11, "/usr/bin/mytool", "/home/u/build/a.out")
    L.open(12, 11, "/usr/bin/mytool", "/home/u/dist/b.out", create=True)
    # the same shape in a hidden temp dir: +x there is an ATT&CK match, so it stays
    L.fork(11, 10, 13)
    L.execve(13, 11, "/usr/bin/mytool", ["mytool"])
    L.open(13, 11, "/usr/bin/mytool", "/tmp/.x/p", create=True)
    _chmod(L, 13, 11, "/usr/bin/mytool", "/tmp/.x/p")
    L.open(13, 11, "/usr/bin/mytool", "/home/u/build/c.out", create=True)
    eng = _same_detection(L.lines)
    g = eng.graph
    assert _retained(g.procs[12]) == ["exec", "create", "create"]
    a_out = g.files["/home/u/build/a.out"]
    assert a_out.n == 1 and [op for _, op, _ in a_out.edges] == ["create"]
    assert a_out.touchers[g.procs[12]] == [1, 1] and g.procs[12].touched == 2
    assert _retained(g.procs[13]) == ["exec", "create", "chmod", "create"]
    assert g.files["/tmp/.x/p"].keep
    assert any("T1222.002" in a["techniques"] for a in eng.alerts("low"))


def test_merged_edges_count_once_when_their_file_or_process_is_collected():
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/mytool", ["mytool"])
    L.open(12, 11, "/usr/bin/mytool", "/tmp/work.tmp", create=True)
    _chmod(L, 12, 11, "/usr/bin/mytool", "/tmp/work.tmp")
    L.open(12, 11, "/usr/bin/mytool", "/tmp/work.tmp", write=False)
    s, t = L._sys(87, 12, 11, "/usr/bin/mytool", items=2)
    L._path(s, t, 0, "/tmp", "PARENT")
    L._path(s, t, 1, "/tmp/work.tmp", "DELETE")
    L._end(s, t)
    eng, kept = _run(L.lines)
    g = eng.graph
    g.collect(idle=0.0, now=10**10)
    st = eng.stats()
    # every emitted edge is either retained or collected exactly once
    retained = sum(p.n for p in g.procs.values()) + sum(
        f.n for f in g.files.values() if f.creator is not None)
    assert st["edges"] - st["edges_collected"] == retained
    assert g.procs[12].collected and st["edges_collected"] == st["edges"] - g.procs[11].n - (
        g.procs[10].n)


def test_fork_logged_after_the_childs_exec_is_merged_at_the_next_collection():
    L = _login_shell()
    L.execve(12, 11, "/usr/bin/make", ["make"])  # the clone's record comes after the child's
    L.fork(11, 10, 12)
    L.open(12, 11, "/usr/bin/make", "/home/u/Makefile", write=False)
    L.fork(11, 10, 13)
    _setid(L, 13, 11, 0)  # sudo's child: credentials first, then the program
    L.execve(13, 11, "/usr/bin/tail", ["tail", "/var/log/syslog"])
    L.open(13, 11, "/usr/bin/tail", "/home/u/notes", write=False)  # an input: not spawn-only
    eng = _same_detection(L.lines)  # flush() collects
    g = eng.graph
    assert _retained(g.procs[12]) == ["exec", "read"] and g.procs[12].n == 2
    # sudo's child: nothing ran under the parent's ids, its fork goes into the setuid
    assert _retained(g.procs[13]) == ["setuid", "exec", "read"]
    assert g.procs[13].parent is g.procs[11]


def test_fork_edge_stays_when_the_child_acts_before_an_exec_or_a_credential_change():
    L = _login_shell()
    L.fork(11, 10, 12)
    L.open(12, 11, "/usr/bin/bash", "/home/u/out.txt", create=True)  # cat > out.txt
    L.execve(12, 11, "/usr/bin/cat", ["cat"])
    eng = _same_detection(L.lines)
    assert _retained(eng.graph.procs[12]) == ["fork", "create", "exec"]


def test_a_failed_open_goes_even_when_another_process_used_the_file_since():
    L = _login_shell()
    for pid in (12, 13):  # two clear_console runs in a row
        L.fork(11, 10, pid)
        L.execve(pid, 11, "/usr/bin/clear_console", ["clear_console"])
        L.open(pid, 11, "/usr/bin/clear_console", "/dev/console", success="no")
    L.open(12, 11, "/usr/bin/clear_console", "/home/u/x", write=False)  # 12 moves on
    eng = _same_detection(L.lines)
    g = eng.graph
    assert _retained(g.procs[12]) == ["exec", "read"]
    assert g.files["/dev/console"].n == 0 and not g.files["/dev/console"].edges


def test_failed_open_that_is_a_process_last_edge_goes_at_collection():
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/clear_console", ["clear_console"])
    L.open(12, 11, "/usr/bin/clear_console", "/dev/console", success="no")
    L.fork(11, 10, 13)
    L.execve(13, 11, "/usr/bin/cat", ["cat"])
    L.open(13, 11, "/usr/bin/cat", "/etc/gshadow", write=False, success="no")
    eng, _ = _run(L.lines)
    g = eng.graph
    # the failed open went, and with it clear_console is down to its spawn: collected
    assert g.procs[12].collected and g.procs[12].n == 0
    assert _retained(g.procs[13]) == ["exec", "denied"]  # labelled sensitive: stays


def test_edges_of_labelled_processes_are_kept_but_the_spawns_exec_folds_into_its_fork():
    """A webshell's children: on the untrusted information-flow path, kept whole, except
    that the child's first exec folds into its fork edge (the node has image and argv)."""
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/curl", ["curl", "http://x/a"])
    L.connect(12, 11, "/usr/bin/curl", 9999)  # untrusted: curl is labelled from here on
    L.fork(12, 11, 13)
    L.execve(13, 12, "/usr/bin/make", ["make"])
    L.open(13, 12, "/usr/bin/make", "/home/u/r/x.lock", success="no")
    L.open(13, 12, "/usr/bin/make", "/home/u/r/y", write=True)
    eng = _same_detection(L.lines)
    g = eng.graph
    assert g.procs[13].labels and g.procs[13].argv == ["make"]
    assert g.procs[13].exe == "/usr/bin/make"
    assert _retained(g.procs[13]) == ["fork", "denied", "write"]


def test_no_merge_inside_one_event_before_its_edges_are_matched():
    """An exec event yields exec, exec_load and argv reads at once: none merges another."""
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/cp", ["cp", "x"])
    L.open(12, 11, "/usr/bin/cp", "/home/u/s.sh", create=True)
    L.open(12, 11, "/usr/bin/cp", "/home/u/t.txt", create=True)
    L.fork(11, 10, 13)
    L.execve(13, 11, "/usr/bin/dash", ["sh", "/home/u/s.sh", "/home/u/t.txt"],
             image="/home/u/s.sh")
    eng = _same_detection(L.lines)
    assert _retained(eng.graph.procs[13]) == ["exec", "exec_load", "read", "read"]
    assert eng.graph.procs[13].last_event == eng.graph.stats["events"]


def test_fork_edge_of_a_labelled_parent_stays_even_when_logged_late():
    L = _login_shell()
    L.execve(12, 11, "/usr/bin/make", ["make"])  # child seen first, parent still clean
    L.connect(11, 10, "/usr/bin/bash", 4444)  # the shell talks to an untrusted endpoint
    L.fork(11, 10, 12)  # then the clone record: a labelled process's edge
    eng = _same_detection(L.lines)
    g = eng.graph
    assert g.procs[11].labels and not g.procs[12].labels
    assert "fork" in _retained(g.procs[12])


def _ptrace(L: Log, pid, ppid, exe, tracee, request):
    s, t = L._sys(101, pid, ppid, exe, a1=f"{tracee:x}")
    L.lines[-1] = L.lines[-1].replace("a0=ffffff9c", f"a0={request:x}")
    L._end(s, t)


def test_repeated_ptrace_requests_on_one_tracee_are_skipped_but_not_new_ones():
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/strace", ["strace", "-f", "make"])
    L.fork(12, 11, 13)
    L.execve(13, 12, "/usr/bin/make", ["make"])
    for _ in range(50):  # PTRACE_SYSCALL / PTRACE_GETREGS per traced syscall
        _ptrace(L, 12, 11, "/usr/bin/strace", 13, 0x18)
        _ptrace(L, 12, 11, "/usr/bin/strace", 13, 0xc)
    L.fork(11, 10, 14)
    L.execve(14, 11, "/tmp/inj", ["inj"])
    _ptrace(L, 14, 11, "/tmp/inj", 13, 0x10)  # PTRACE_ATTACH by an injector: matched
    _ptrace(L, 14, 11, "/tmp/inj", 13, 0x5)  # PTRACE_POKEDATA: another request, kept
    eng = _same_detection(L.lines)
    g = eng.graph
    assert _retained(g.procs[12]).count("ptrace") == 2  # one per request, not 100
    assert _retained(g.procs[14]).count("ptrace") == 2
    assert any("T1055.008" in a["techniques"] for a in eng.alerts("low"))
    off, _ = _run(L.lines, reduce=False)
    assert _retained(off.graph.procs[12]).count("ptrace") == 64  # bounded by max_edges
    assert off.graph.stats["edge_candidates"] - eng.graph.stats["edge_candidates"] == 0
    assert eng.graph.stats["edges_skipped"] - off.graph.stats["edges_skipped"] >= 98


def _rename(L: Log, pid, ppid, exe, src, dst):
    s, t = L._sys(82, pid, ppid, exe, items=4)
    L._path(s, t, 0, os.path.dirname(src), "PARENT")
    L._path(s, t, 1, os.path.dirname(dst), "PARENT")
    L._path(s, t, 2, src, "DELETE")
    L._path(s, t, 3, dst, "CREATE")
    L._end(s, t)


def test_a_burst_of_files_in_one_directory_keeps_one_edge_unless_someone_else_used_one():
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/git", ["git", "init"])
    for name in ("a", "b", "c", "d"):  # hook samples
        L.open(12, 11, "/usr/bin/git", f"/home/u/r/.git/hooks/{name}.sample", create=True)
    L.fork(11, 10, 13)
    L.execve(13, 11, "/usr/bin/cat", ["cat", "/home/u/r/.git/hooks/d.sample"])
    L.open(13, 11, "/usr/bin/cat", "/home/u/r/.git/hooks/d.sample", write=False)
    L.open(12, 11, "/usr/bin/git", "/home/u/r/.git/description", create=True)  # other dir
    L.open(12, 11, "/usr/bin/git", "/home/u/r/.git/hooks/e.sample", create=True)
    eng = _same_detection(L.lines)
    g = eng.graph
    kept = [nid for _, op, nid in g.procs[12].edges if op == "create"
            and (_, op, g.procs[12].nid) in g.files[nid[5:]].edges]
    # a.sample stands for the burst; d.sample was read by cat before the next event
    # of git, so its create stays; description is in another directory
    assert kept == ["file:/home/u/r/.git/hooks/a.sample", "file:/home/u/r/.git/hooks/d.sample",
                    "file:/home/u/r/.git/description"]
    assert g.files["/home/u/r/.git/hooks/b.sample"].n == 0
    assert g.files["/home/u/r/.git/hooks/b.sample"].writer == g.procs[12].nid
    assert g.procs[12].n == 4 and g.procs[12].touched == 3  # exec + 3 creates
    assert g.stats["edges_merged"] >= 3  # b, c, e


def test_the_same_change_repeated_on_one_file_keeps_one_edge_unless_read_in_between():
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/git", ["git", "config", "x", "y"])
    for _ in range(3):  # config.lock -> config, three times
        L.open(12, 11, "/usr/bin/git", "/home/u/r/.git/config.lock", create=True)
        _rename(L, 12, 11, "/usr/bin/git", "/home/u/r/.git/config.lock", "/home/u/r/.git/config")
    L.open(12, 11, "/usr/bin/git", "/home/u/r/.git/HEAD", write=False)  # git moves on
    L.fork(11, 10, 13)
    L.execve(13, 11, "/usr/bin/git", ["git", "config", "z", "w"])
    L.open(13, 11, "/usr/bin/git", "/home/u/r/.git/config.lock", create=True)
    _rename(L, 13, 11, "/usr/bin/git", "/home/u/r/.git/config.lock", "/home/u/r/.git/config")
    L.fork(11, 10, 14)
    L.execve(14, 11, "/usr/bin/cat", ["cat", "/home/u/r/.git/config"])
    L.open(14, 11, "/usr/bin/cat", "/home/u/r/.git/config", write=False)
    L.open(13, 11, "/usr/bin/git", "/home/u/r/.git/config.lock", create=True)
    _rename(L, 13, 11, "/usr/bin/git", "/home/u/r/.git/config.lock", "/home/u/r/.git/config")
    eng = _same_detection(L.lines)
    g = eng.graph
    cfg = g.files["/home/u/r/.git/config"]
    by = [(op, nid) for _, op, nid in cfg.edges]
    assert by.count(("rename", g.procs[12].nid)) == 1  # three renames: one edge
    # 13's second rename came after cat read the file: a new version someone used
    assert by.count(("rename", g.procs[13].nid)) == 2


def test_a_process_down_to_its_spawn_is_collected_without_waiting_for_idleness():
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/date", ["date", "+%F"])
    L.fork(11, 10, 13)
    L.execve(13, 11, "/usr/bin/mytool", ["mytool"])
    L.open(13, 11, "/usr/bin/mytool", "/home/u/notes.txt", write=False)  # an input: waits
    eng = _same_detection(L.lines)  # the log ends a moment later: inside the idle window
    g = eng.graph
    date = g.procs[12]
    assert date.collected and date.n == 0 and not date.edges
    assert date.parent is g.procs[11] and date.argv == ["date", "+%F"]
    assert not g.procs[13].collected and _retained(g.procs[13]) == ["exec", "read"]
    L.open(12, 11, "/usr/bin/date", "/home/u/out", create=True)  # active again
    eng.process_lines(L.lines[-4:])
    assert not date.collected and _retained(date) == ["create"]


def test_a_labelled_process_that_execs_again_keeps_both_execs():
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/curl", ["curl", "http://x/a"])
    L.connect(12, 11, "/usr/bin/curl", 9999)  # untrusted: curl is labelled from here on
    L.fork(12, 11, 13)
    L.execve(13, 12, "/usr/bin/env", ["env", "make"])
    L.execve(13, 12, "/usr/bin/make", ["make"])
    eng = _same_detection(L.lines)
    assert _retained(eng.graph.procs[13]) == ["fork", "exec", "exec"]


def test_an_ancestor_down_to_its_spawn_loses_its_exec_edge_but_stays_the_path():
    """``sh -c`` between a shell and the program it runs: only the node is needed."""
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/dash", ["sh", "-c", "mytool"])
    L.fork(12, 11, 13)
    L.execve(13, 12, "/usr/bin/mytool", ["mytool"])
    L.open(13, 12, "/usr/bin/mytool", "/home/u/out", create=True)  # an effect: 13 stays
    L.fork(11, 10, 14)
    L.execve(14, 11, "/usr/bin/dash", ["sh", "-c", "id"])
    L.fork(14, 11, 15)
    L.execve(15, 14, "/usr/bin/id", ["id"])  # discovery: a rule matched on 15
    eng = _same_detection(L.lines)
    g = eng.graph
    sh = g.procs[12]
    assert not sh.collected and sh.n == 0 and "exec" not in _retained(sh)
    assert g.procs[13].parent is sh and sh.parent is g.procs[11] and sh.argv[:2] == ["sh", "-c"]
    assert _retained(g.procs[13]) == ["exec", "create"]
    assert g.procs[15].keep and _retained(g.procs[15]) == ["exec"]  # matched: kept


def test_a_burst_reaches_below_its_directory_but_not_above_it_nor_from_a_top_level_one():
    """``git commit`` writing ``.git/index``, ``.git/logs/HEAD``, ``.git/logs/refs/heads/main``."""
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/git", ["git", "commit"])
    for name in ("index", "logs/HEAD", "logs/refs/heads/main", "refs/heads/x"):
        L.open(12, 11, "/usr/bin/git", f"/home/u/r/.git/{name}", create=True)
    L.fork(11, 10, 13)
    L.execve(13, 11, "/usr/bin/cat", ["cat", "/home/u/r/.git/refs/heads/x"])
    L.open(13, 11, "/usr/bin/cat", "/home/u/r/.git/refs/heads/x", write=False)
    L.open(12, 11, "/usr/bin/git", "/home/u/r/.git/refs/heads/y", create=True)
    L.fork(11, 10, 14)
    L.execve(14, 11, "/usr/bin/mytool", ["mytool"])
    L.open(14, 11, "/usr/bin/mytool", "/home/u/r/sub/out.txt", create=True)
    L.open(14, 11, "/usr/bin/mytool", "/home/u/r/notes.txt", create=True)  # above: kept
    L.open(14, 11, "/usr/bin/mytool", "/tmp/a", create=True)
    L.open(14, 11, "/usr/bin/mytool", "/tmp/sub/b", create=True)  # below /tmp: kept
    L.open(14, 11, "/usr/bin/mytool", "/home/u/r/x/y/z.txt", create=True)
    eng = _same_detection(L.lines)
    g = eng.graph

    def kept(pid):
        p = g.procs[pid]
        return [nid[len("file:/home/u/r/"):] if nid.startswith("file:/home/u/r/") else nid
                for _, op, nid in p.edges
                if op == "create" and (_, op, p.nid) in g.files[nid[5:]].edges]

    # index stands for the burst; refs/heads/x was read by cat before git's next event
    assert kept(12) == [".git/index", ".git/refs/heads/x"]
    assert g.files["/home/u/r/.git/logs/refs/heads/main"].writer == g.procs[12].nid
    assert g.files["/home/u/r/.git/logs/refs/heads/main"].n == 0
    # z.txt is below sub/'s parent /home/u/r/, where notes.txt was the last retained create
    assert kept(14) == ["sub/out.txt", "notes.txt", "file:/tmp/a", "file:/tmp/sub/b"]
    off, _ = _run(L.lines, reduce=False)
    assert off.graph.stats["edges_merged"] == 0


def _symlink(L: Log, pid, ppid, exe, target, path):
    s, t = L._sys(88, pid, ppid, exe, items=3)
    L._path(s, t, 0, path.rsplit("/", 1)[0], "PARENT")
    L.lines.append(f'type=PATH msg=audit({t:.3f}:{s}): item=1 name="{target}" nametype=UNKNOWN')
    L._path(s, t, 2, path, "CREATE")
    L._end(s, t)


def test_a_name_made_by_a_link_and_removed_unused_is_a_temp_file():
    """``git init`` probing symlink support: ``symlink``, then ``unlink``, read by nobody."""
    L = _login_shell()
    L.fork(11, 10, 12)
    L.execve(12, 11, "/usr/bin/git", ["git", "init"])
    _symlink(L, 12, 11, "/usr/bin/git", "testing", "/home/u/r/.git/tXYZ")
    _unlink(L, 12, 11, "/usr/bin/git", "/home/u/r/.git/tXYZ")
    _symlink(L, 12, 11, "/usr/bin/git", "/home/u/a", "/home/u/r/.git/kept")  # stays
    L.fork(11, 10, 13)
    L.execve(13, 11, "/usr/bin/ln", ["ln", "-s", "/home/u/x", "/home/u/bin/tool"])
    _symlink(L, 13, 11, "/usr/bin/ln", "/home/u/x", "/home/u/bin/tool")
    L.login(50, ses=6)  # another session reads the link: it was used outside ln's chain
    L.fork(50, 1, 51, exe="/usr/sbin/sshd")
    L.execve(51, 50, "/usr/bin/cat", ["cat", "/home/u/bin/tool"])
    L.open(51, 50, "/usr/bin/cat", "/home/u/bin/tool", write=False)
    _unlink(L, 13, 11, "/usr/bin/ln", "/home/u/bin/tool")
    eng = _same_detection(L.lines)
    g = eng.graph
    assert g.files["/home/u/r/.git/tXYZ"].n == 0  # link + unlink collected with the name
    assert g.files["/home/u/r/.git/kept"].n == 1
    assert g.files["/home/u/bin/tool"].n == 3  # link, cat's read, unlink: someone used it
    assert [op for _, op, _ in g.procs[12].edges if op in ("link", "unlink")] == \
        ["link", "unlink", "link"]  # the node's history, though only one edge is counted
    assert g.procs[12].n == 2 and g.procs[12].touched == 1  # exec + the kept link


def test_a_privilege_separated_child_down_to_its_credential_change_stays_only_as_the_path():
    """``sshd``'s child: ``setuid`` to the user, then forks the shell; no data moved."""
    L = Log()
    L.login(10)
    L.fork(10, 1, 20, exe="/usr/sbin/sshd")
    _setid(L, 20, 10, 1000)
    L.fork(20, 10, 21, exe="/usr/sbin/sshd")
    L.execve(21, 20, "/usr/bin/bash", ["-bash"])
    L.open(21, 20, "/usr/bin/bash", "/home/u/out", create=True)  # an effect: the shell stays
    L.fork(10, 1, 30, exe="/usr/sbin/sshd")
    _setid(L, 30, 10, 1000)
    L.open(30, 10, "/usr/sbin/sshd", "/home/u/.cache/motd", create=True)  # acted under 1000
    L.fork(10, 1, 40, exe="/usr/sbin/sshd")
    _setid(L, 40, 10, 1000)
    L.execve(40, 10, "/usr/bin/true", ["true"])  # a leaf down to its spawn: collected
    eng = _same_detection(L.lines)
    g = eng.graph
    child = g.procs[20]
    assert child.n == 0 and not child.collected and "setuid" not in _retained(child)
    assert child.uid == 1000 and g.procs[21].parent is child and child.parent is g.procs[10]
    assert _retained(g.procs[21])[-1] == "create" and not g.procs[21].collected
    assert "setuid" in _retained(g.procs[30]) and not g.procs[30].collected
    assert g.procs[40].collected and g.procs[40].n == 0
    assert not g.procs[10].collected and _retained(g.procs[10])[0] == "login"
