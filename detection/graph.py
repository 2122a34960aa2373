"""The provenance graph of one host: processes, files and sockets joined by timed edges.

:meth:`ProvenanceGraph.apply` turns one :class:`~detection.events.AuditEvent` into
zero or more :class:`Edge` objects (after reduction), updating nodes and
transferring labels along the information flow (:mod:`detection.tags`).

State is bounded: nodes idle for ``idle_seconds`` (log time) or beyond
``max_nodes`` (least recently active first) are evicted, and each node keeps at
most ``max_edges_per_node`` recent edges for explanations. Alerts keep their own
snapshot of the chain, so eviction never loses what an alert explains.
"""

from __future__ import annotations

import ipaddress
import os.path
import re
from collections import OrderedDict
from collections.abc import Callable
from operator import attrgetter

from . import tags as T
from .events import UNSET, AuditEvent
from .nodes import Edge, FileNode, Node, ProcNode, SockNode, basename
from .reduction import READ_OPS, SKIPPABLE, RedundancyFilter, is_non_viable

try:  # built with the engine's C parts (setup.py)
    from ._fastedges import burst_redundant as _native_burst
except ImportError:  # pragma: no cover - ProvenanceGraph._burst_redundant then decides
    _native_burst = None

_EDGES = attrgetter("edges")

#: approximate bytes per object, calibrated against tracemalloc over the dev corpus
#: (bench/detection_throughput.py prints both); used for the cheap per-host estimate
BYTES_PER_PROC = 2400
BYTES_PER_FILE = 1200
BYTES_PER_SOCK = 1000
BYTES_PER_EDGE = 150

_WRITE_FLAGS = 0o3  # O_WRONLY | O_RDWR
_O_CREAT = 0o100
_O_TRUNC = 0o1000
_FORKS = frozenset({"fork", "vfork", "clone", "clone3"})
_EXECS = frozenset({"execve", "execveat"})
_OPENS = frozenset({"open", "openat", "openat2", "creat"})
_UNLINKS = frozenset({"unlink", "unlinkat", "rmdir"})
_RENAMES = frozenset({"rename", "renameat", "renameat2"})
_LINKS = frozenset({"link", "linkat", "symlink", "symlinkat"})
_CHMODS = frozenset({"chmod", "fchmod", "fchmodat", "fchmodat2"})
_CHOWNS = frozenset({"chown", "fchown", "lchown", "fchownat"})
_SETIDS = frozenset(
    {"setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setfsuid", "setfsgid"}
)
_UTIMES = frozenset({"utimensat", "utimes", "utime", "futimesat"})
_TRUNCS = frozenset({"truncate", "ftruncate"})
_NETOUT = frozenset({"connect", "sendto", "sendmsg"})
_NETIN = frozenset({"accept", "accept4", "recvfrom", "recvmsg"})
_EINPROGRESS = -115
_FD_OPS = frozenset({"ftruncate", "fchmod", "fchown", "utimensat", "futimesat"})
_MODULES = frozenset({"init_module", "finit_module", "delete_module"})
#: edge ops by which a process changes something outside itself (LogGC: it is not garbage)
_OUTSIDE = frozenset({"write", "create", "truncate", "unlink", "rename", "link", "chmod", "chown",
                      "utime", "connect", "accept", "send", "recv", "bind", "module", "ptrace",
                      "mount", "memfd", "kexec", "mknod", "login"})
#: follow-up op -> the ops on the same file it repeats when it comes right after one of them
#: (``ProvenanceGraph._merge_previous``): metadata set by the file's writer, a script re-read
_FOLLOWS = {
    "utime": frozenset({"create", "write", "truncate"}),
    "chmod": frozenset({"create", "write", "truncate"}),
    "chown": frozenset({"create", "write", "truncate"}),
    "write": frozenset({"create", "truncate"}),
    "read": frozenset({"exec_load", "load"}),
}
#: edges that bring a new name into being: a temp file's lifetime starts here (LogGC)
_CREATES = frozenset({"create", "link"})
#: a process's edges that give it an image or credentials and carry no data: what is left
#: of a spawn (garbage collection keeps the node, which shows image, argv and ids)
_SPAWN_OPS = frozenset({"exec", "setuid"})
#: a child's first edge after its fork that makes the fork edge redundant (spawn): a new
#: image (``exec``) or new credentials (``setuid``: nothing ran under the parent's ids)
_SPAWN_INTO = frozenset({"exec", "setuid"})
#: how many of a process's last edges a burst or repeat merge looks back at
_BURST_LOOKBACK = 16
#: file ops merged when the same process repeats them on the same file (CPR) or on
#: files of one directory (a burst)
_REPEAT_OPS = frozenset({"create", "write", "truncate", "rename", "chmod", "chown", "utime",
                         "link", "unlink"})
_SYSTEM_PROGRAMS = ("/usr/bin/", "/bin/", "/usr/sbin/", "/sbin/", "/usr/local/bin/")
_MISC = {
    "ptrace": "ptrace",
    "mount": "mount",
    "umount2": "mount",
    "memfd_create": "memfd",
    "kexec_load": "kexec",
    "kexec_file_load": "kexec",
    "process_vm_readv": "ptrace",
    "process_vm_writev": "ptrace",
    "mknod": "mknod",
    "mknodat": "mknod",
}


class ProvenanceGraph:
    """Per-host provenance graph with label transfer, reduction and bounded state.

    Parameters
    ----------
    policy : GraphPolicy-like
        Object with ``auth_programs``, ``trusted_installers``, ``wrappers``,
        ``metadata_tools`` (sets of exe basenames), ``trusted_networks`` and optionally
        ``shell_startup`` (a regular expression of shell startup file paths).
    reduce : bool
        Apply non-viable pruning and redundant-edge skipping.
    """

    def __init__(
        self,
        policy,
        reduce: bool = True,
        max_nodes: int = 100_000,
        idle_seconds: float = 3600.0,
        max_edges_per_node: int = 64,
        infer_argv_reads: bool = True,
    ):
        self.policy = policy
        self.reduce = reduce
        self.max_nodes = max_nodes
        self.idle_seconds = idle_seconds
        self.max_edges = max_edges_per_node
        self.infer_argv_reads = infer_argv_reads
        self.procs: dict[int, ProcNode] = {}
        self.files: dict[str, FileNode] = {}
        self.inodes: dict[str, FileNode] = {}
        self.socks: dict[str, SockNode] = {}
        self._lru: OrderedDict[str, Node] = OrderedDict()
        self.local_ports: set[int] = set()
        self.redundant = RedundancyFilter()
        self._late_forks: list[ProcNode] = []
        self.now = 0.0
        self.stats = {
            "events": 0,
            "edges": 0,
            "edges_skipped": 0,
            "edges_pruned": 0,
            "edges_collected": 0,
            "edges_merged": 0,
            "nodes_created": 0,
            "nodes_pruned": 0,
            "nodes_evicted": 0,
            "edge_candidates": 0,
        }
        self._trusted_nets = [
            ipaddress.ip_network(n, strict=False) for n in getattr(policy, "trusted_networks", ())
        ]

    # ------------------------------------------------------------------ nodes
    def _touch(self, node: Node, ts: float) -> None:
        if ts > node.last_ts:
            node.last_ts = ts
        lru = self._lru
        if node.nid in lru:
            lru.move_to_end(node.nid)
        else:
            lru[node.nid] = node

    def _new_proc(self, pid: int, ts: float, parent: ProcNode | None, ev: AuditEvent | None):
        p = ProcNode(pid, ts, self.max_edges)
        self.stats["nodes_created"] += 1
        old = self.procs.get(pid)
        if old is not None and not old.collected and old.parent is not None:
            old.parent.kids -= 1  # pid reused: the old process is gone
        if parent is not None:
            parent.kids += 1
            if parent.recent_kids is None:
                parent.recent_kids = []
            parent.recent_kids.append(p)
            if len(parent.recent_kids) > 8:
                del parent.recent_kids[0]
            p.parent = parent
            p.ppid = parent.pid
            p.exe, p.comm, p.argv = parent.exe, parent.comm, parent.argv
            p.uid, p.euid, p.auid, p.ses, p.cwd = (
                parent.uid,
                parent.euid,
                parent.auid,
                parent.ses,
                parent.cwd,
            )
            p.labels = T.on_fork(parent.labels)
        if ev is not None:
            self._update_proc(p, ev)
        p.root = self._root_of(p)
        self.procs[pid] = p
        self._touch(p, ts)
        return p

    def _root_of(self, p: ProcNode) -> ProcNode:
        """Chain root: login session boundary, exploited service, or oldest known ancestor."""
        parent = p.parent
        if parent is None:
            return p
        if parent.service:
            return parent
        if p.ses not in (None, UNSET) and parent.ses != p.ses:
            return p
        return parent.root

    def _update_proc(self, p: ProcNode, ev: AuditEvent) -> None:
        if ev.ppid is not None:
            p.ppid = ev.ppid
        if ev.exe:
            p.exe = ev.exe
        if ev.comm:
            p.comm = ev.comm
        if ev.uid is not None:
            p.uid, p.euid, p.auid, p.ses = ev.uid, ev.euid, ev.auid, ev.ses
        if ev.cwd:
            p.cwd = ev.cwd

    def process(self, ev: AuditEvent) -> ProcNode | None:
        """The process node of *ev*'s pid (created on first sight)."""
        pid = ev.pid
        if pid is None:
            return None
        p = self.procs.get(pid)
        if p is None:
            parent = self.procs.get(ev.ppid) if ev.ppid is not None else None
            p = self._new_proc(pid, ev.ts, parent, None)
            p.labels = T.on_fork(parent.labels) if parent else 0
            self._update_proc(p, ev)
            p.root = self._root_of(p)
            if parent is None:
                p.ppid = ev.ppid
        else:
            if p.collected:  # active again after garbage collection
                p.collected = False
                if p.parent is not None:
                    p.parent.kids += 1
            self._update_proc(p, ev)
            self._touch(p, ev.ts)
        return p

    def file(self, path: str, ts: float, item: dict | None = None) -> FileNode:
        f = self.files.get(path)
        if f is None:
            f = FileNode(path, ts, self.max_edges)
            self.files[path] = f
            self.stats["nodes_created"] += 1
        if item is not None:
            ino = item.get("inode")
            if ino:
                key = f"{item.get('dev', '')}:{ino}"
                f.inode = key
                self.inodes[key] = f
            if item.get("mode"):
                f.mode = item["mode"]
            if item.get("nametype") not in ("CREATE", None):
                f.existed = True
        self._touch(f, ts)
        return f

    def socket(self, sa: dict, ts: float) -> SockNode | None:
        fam = sa.get("family")
        if fam in ("inet", "inet6"):
            key = f"{sa['addr']}:{sa['port']}"
        elif fam == "unix":
            key = sa.get("path", "")
        else:
            return None
        s = self.socks.get(key)
        if s is None:
            trusted = self._is_trusted(sa)
            s = SockNode(
                fam,
                sa.get("addr") or sa.get("path", ""),
                sa.get("port"),
                ts,
                self.max_edges,
                trusted,
            )
            self.socks[key] = s
            self.stats["nodes_created"] += 1
        self._touch(s, ts)
        return s

    def _is_trusted(self, sa: dict) -> bool:
        if sa.get("family") == "unix":
            return True
        try:
            ip = ipaddress.ip_address(sa["addr"])
        except ValueError:
            return False
        if ip.is_loopback and sa.get("port") in self.local_ports:
            return True  # a service this host's audited processes bound themselves
        return any(ip in net for net in self._trusted_nets) or sa.get("port") in getattr(
            self.policy, "trusted_ports", ()
        )

    # ------------------------------------------------------------------ paths
    def _resolve(self, ev: AuditEvent, item: dict, parent_dir: str | None) -> str | None:
        name = item.get("name")
        if not name or name in ("(null)", "?"):
            return None
        if name[0] == "/":
            return os.path.normpath(name) if ("/." in name or "//" in name) else name
        ino = item.get("inode")
        if ino:
            f = self.inodes.get(f"{item.get('dev', '')}:{ino}")
            if f is not None:
                return f.path
        base = parent_dir or ev.cwd or "/"
        return os.path.normpath(os.path.join(base, name))

    def _items(self, ev: AuditEvent) -> list[tuple[str, dict]]:
        out, parent = [], None
        for it in ev.paths:
            if it.get("nametype") == "PARENT":
                n = it.get("name", "")
                parent = n if n.startswith("/") else parent
                continue
            path = self._resolve(ev, it, parent)
            if path:
                out.append((path, it))
        return out

    # ------------------------------------------------------------------ edges
    def _edge(
        self,
        out: list,
        ts: float,
        op: str,
        proc: ProcNode,
        obj: Node | None,
        state=None,
        detail: dict | None = None,
        inferred: bool = False,
        variant=None,
    ) -> Edge | None:
        self.stats["edge_candidates"] += 1
        if self.reduce and op in SKIPPABLE:
            key = (proc.nid, op, obj.nid if obj else None)
            if variant is not None:  # kinds of one op remembered apart (ptrace requests)
                key += (variant,)
            if self.redundant.is_redundant(key, state):
                self.stats["edges_skipped"] += 1
                return None
        if self.reduce:
            # an edge of this same event has not been matched yet: merges wait for the next
            event = self.stats["events"]
            if proc.last_event != event:
                if proc.edges:
                    self._merge_previous(proc, op, obj)
                proc.last_event = event
        e = Edge(ts, op, proc, obj, detail, inferred)
        proc.edges.append((ts, op, obj.nid if obj is not None else None))
        if op == "fork":
            obj.n += 1  # a fork edge belongs to the child: it goes when the child is collected
        else:
            proc.n += 1
        if obj is not None and obj is not proc:
            obj.edges.append((ts, op, proc.nid))
            if obj.kind == "file":
                obj.n += 1
                if op in _CREATES and obj.creator is None:
                    obj.creator = proc.root.nid
                    obj.touchers = {}
                if obj.creator is not None:
                    if obj.creator != proc.root.nid:
                        obj.read_other = True
                    t = obj.touchers.get(proc)
                    if t is None:
                        t = obj.touchers[proc] = [0, 0]
                    t[0] += 1
                    t[1] += op in _OUTSIDE
        if op in _OUTSIDE:
            proc.touched += 1
        self.stats["edges"] += 1
        out.append(e)
        return e

    # ------------------------------------------------------------------ garbage (LogGC)
    def _merge_previous(self, proc: ProcNode, op: str | None, obj: Node | None) -> None:
        """Collect *proc*'s last retained edge when the edge *op* on *obj* makes it redundant.

        Runs before the new edge is kept (or with *op* ``None`` from :meth:`collect`,
        after a batch); the old edge came in an earlier event and has gone through
        the rules and the baseline already, so detection is unchanged. Labelled
        processes are left alone. The cases, and why each is sound:
        :mod:`detection.reduction`.
        """
        edges = proc.edges
        if not edges:
            return
        if proc.labels or (proc.parent is not None and proc.parent.labels):
            self._fold_spawn_exec(proc, op)
            return
        pts, prev, pnid = edges[-1]
        f = None
        if prev == "fork":  # spawn: the child's fork edge, merged into its exec
            parent = proc.parent
            if (op not in _SPAWN_INTO or parent is None or pnid != parent.nid or proc.n != 1
                    or parent.labels):
                return
        elif prev == "setuid":  # credential burst: nothing ran under the earlier ids
            if op != "setuid":
                return
        elif prev == "exec":  # exec chain (env, nice, sh -c): the wrapper image is replaced
            if op != "exec" or proc.keep:
                return
        elif prev == "denied" or prev in _FOLLOWS:
            f = self.files.get(pnid[5:]) if pnid else None
            # the file's last edge must be this one: nothing touched it since, and it
            # was not collected with the file (a temp file gone)
            if f is None or f.keep or f.labels or not f.edges:
                return
            if f.edges[-1] != (pts, prev, proc.nid):
                # a failed open moved nothing: others may have used the file since
                if prev != "denied" or (pts, prev, proc.nid) not in f.edges:
                    return
            if prev != "denied":  # a follow-up of the edge before it on the same file
                if len(edges) < 2 or edges[-2][2] != pnid or edges[-2][1] not in _FOLLOWS[prev]:
                    self._merge_burst(proc)
                    return
        elif prev in _REPEAT_OPS:
            self._merge_burst(proc)
            return
        else:
            return
        edges.pop()
        proc.n -= 1
        outside = prev in _OUTSIDE
        if outside:
            proc.touched -= 1
        if f is not None:
            f.n -= 1
            if f.edges[-1] == (pts, prev, proc.nid):
                f.edges.pop()
            else:
                f.edges.remove((pts, prev, proc.nid))
            if f.touchers is not None:
                t = f.touchers.get(proc)
                if t is not None:
                    t[0] -= 1
                    t[1] -= outside
        self.stats["edges_collected"] += 1
        self.stats["edges_merged"] += 1

    def _fold_spawn_exec(self, proc: ProcNode, op: str | None) -> None:
        """Spawn of a labelled process (or of a labelled parent's child): one edge, not two.

        The edges are the child's ``fork`` edge (parent -> child, the path labels flowed
        along) and its first ``exec`` with nothing else in between (in either order: the
        clone may be logged after the child's exec). The ``fork`` edge stays; the ``exec``
        folds into it. The stored exec edge names no object: what it adds (image and
        argv) is on the node while this is the process's only exec, so a process that
        execs again (*op* ``exec``) keeps both. The rules and the learned baseline saw
        the exec edge already; a non-system image is a separate ``exec_load`` edge (an
        edge after the exec: no fold).
        """
        edges = proc.edges
        parent = proc.parent
        if op == "exec" or parent is None or len(edges) != 2 or proc.n != 2:
            return
        (t0, op0, n0), (t1, op1, n1) = edges
        if op0 == "fork" and op1 == "exec" and n0 == parent.nid:
            entry = edges[1]
        elif op0 == "exec" and op1 == "fork" and n1 == parent.nid:
            entry = edges[0]
        else:
            return
        edges.remove(entry)
        proc.n -= 1
        self.stats["edges_collected"] += 1
        self.stats["edges_merged"] += 1

    def _merge_burst(self, proc: ProcNode) -> None:
        """Collect *proc*'s last edge when it repeats a change it made before (CPR, bursts).

        The last edge is a change (``_REPEAT_OPS``) of file *f*; among the process's last
        ``_BURST_LOOKBACK`` edges the nearest retained one of the same kind decides:

        * on *f* itself (a **repeat**: ``git`` renaming a fresh ``config.lock`` onto
          ``config`` again, a second ``chmod``): every edge of *f* since that one is the
          process's own, so nobody read the version in between;
        * on another file of *f*'s directory (a **burst**, NodeMerge-style: ``git init``
          writing its hook samples, ``tar x``, a build's outputs): *f* has no edge of
          anyone else. The earlier edge stands for the burst, and *f* keeps its writer
          (``FileNode.writer``), so a later reader of *f* still leads back to the process.

        *f* carries no label and no rule match; the process is unlabelled (the caller).
        The dropped edge passed the rules and the baseline in an earlier event.
        """
        edges = proc.edges
        pts, prev, pnid = edges[-1]
        if prev not in _REPEAT_OPS or not pnid or not pnid.startswith("file:"):
            return
        f = self.files.get(pnid[5:])
        nid = proc.nid
        if f is None or f.keep or f.labels or not f.edges or f.edges[-1] != (pts, prev, nid):
            return
        # the look back, a loop of string tests over up to 16 edges, was the engine's
        # costliest Python function on build and git days: C takes the common types
        # (detection/_fastedges.c), _burst_redundant is the reference
        found = None if _native_burst is None else _native_burst(
            edges, f.edges, self.files, prev, pnid, nid, _BURST_LOOKBACK)
        if not (self._burst_redundant(edges, f, prev, pnid, nid) if found is None else found):
            return
        edges.pop()
        proc.n -= 1
        proc.touched -= 1
        f.n -= 1
        f.edges.pop()
        if f.touchers is not None:
            t = f.touchers.get(proc)
            if t is not None:
                t[0] -= 1
                t[1] -= 1
        self.stats["edges_collected"] += 1
        self.stats["edges_merged"] += 1

    def _burst_redundant(self, edges, f: FileNode, prev: str, pnid: str, nid: str) -> bool:
        """Whether the last edge (*prev* on *pnid*, by the process *nid*) repeats a
        retained change among the process's previous :data:`_BURST_LOOKBACK` *edges*
        (:meth:`_merge_burst`)."""
        cut = pnid.rfind("/") + 1
        n = len(edges)
        for i in range(n - 2, max(-1, n - 2 - _BURST_LOOKBACK), -1):
            ts, eop, enid = edges[i]
            if eop != prev or not enid:
                continue
            if enid == pnid:  # a repeat: the process's own edges on f since
                since = False
                for entry in f.edges:
                    if entry == (ts, eop, nid):
                        since = True
                    elif since and entry[2] != nid:
                        return False
                return since  # not since: that edge went with the file (a temp file gone)
            ecut = enid.rfind("/") + 1
            # a burst: the earlier file's directory holds f, or is above f's directory
            # and is not a top-level one (``/tmp``, ``/etc``, ``/home``)
            if pnid.startswith(enid[:ecut]) and (ecut == cut or enid.count("/", 0, ecut) > 2):
                rep = self.files.get(enid[5:])
                if rep is None or (ts, eop, nid) not in rep.edges:
                    continue  # not retained: look further back
                for entry in f.edges:
                    if entry[2] != nid:
                        return False
                return True
        return False

    def _collect_file(self, f: FileNode | None) -> None:
        """Drop the edges of a temporary file that lived and died inside one chain.

        Created and then deleted (or renamed away) by processes of one session or
        service chain, never used outside it, label-free and not matched by a rule:
        a build's ``.s``/``.o`` intermediates, git's object and lock files,
        ``crontab``'s and ``ln``'s temp files. What its writers did to it no longer
        counts as an effect outside themselves.
        """
        if (f is None or not self.reduce or f.creator is None or f.read_other or f.labels
                or f.keep or not f.n):
            return
        self.stats["edges_collected"] += f.n
        for proc, (n_edges, n_outside) in f.touchers.items():
            proc.n -= n_edges  # counted once: with the file
            proc.touched -= n_outside
        f.n = 0
        f.creator = None
        f.touchers = None
        f.edges.clear()

    def collect(self, idle: float = 60.0, now: float | None = None) -> int:
        """Drop the edges of idle processes that never changed anything outside themselves.

        A process is garbage when it has been idle for *idle* seconds (log time) or
        all it has retained is its spawn (its ``exec`` edges: no input to keep for a
        later output, and its node keeps image, argv, parent and start time), it
        wrote, created, deleted, renamed, linked, chmod-ed nothing that is still
        retained (collected temp files do not count) and talked to no socket, it
        carries no label, no rule matched on it, and all its children are collected
        already (leaves first). Its node stays (ancestry,
        chain roots); its edges and the fork edge that created it are gone. A process
        with children still retained loses only its ``exec`` edges, and only when they
        are all it has (``sh -c`` or ``run-parts`` between a service and the program
        it runs): its node, which its children point to, stays the path. Returns
        the number of edges collected.
        """
        if not self.reduce:
            return 0
        self._merge_settled()
        now = self.now if now is None else now
        horizon = now - idle
        total = 0
        changed = True
        while changed:
            changed = False
            for p in self.procs.values():
                if p.collected or p.touched or p.keep or p.labels or p.login or p.service:
                    continue
                if p.kids > 0:
                    if _spawn_only(p):  # an ancestor down to its spawn: the node is the path
                        total += p.n
                        p.n = 0
                        for entry in [e for e in p.edges if e[1] in _SPAWN_OPS]:
                            p.edges.remove(entry)
                    continue
                if p.last_ts > horizon and not _spawn_only(p):
                    continue
                total += p.n
                p.n = 0
                p.edges.clear()
                p.collected = True
                if p.parent is not None:
                    p.parent.kids -= 1
                    changed = True
        self.stats["edges_collected"] += total
        return total

    def _merge_settled(self) -> None:
        """Merges that wait for detection of the current batch (see ``_merge_previous``).

        A fork edge logged after its child's first action, an ``exec``, is merged
        into that exec; a failed open or a follow-up that is a process's last edge
        goes now instead of at its next edge.
        """
        for child in self._late_forks:
            parent = child.parent
            if child.collected or parent is None or child.labels or parent.labels:
                continue
            for entry in child.edges:
                if entry[1] == "fork" and entry[2] == parent.nid:
                    child.edges.remove(entry)
                    child.n -= 1
                    self.stats["edges_collected"] += 1
                    self.stats["edges_merged"] += 1
                    break
        self._late_forks.clear()
        for p in self.procs.values():
            if p.edges and not p.collected:
                self._merge_previous(p, None, None)

    def _pristine_system_file(self, path: str, op: str) -> bool:
        """A read or image load of a system program nobody wrote while we watched.

        Like a shared library, an unmodified ``/usr/bin`` program carries nothing
        an attacker controls; the ``exec`` edge keeps the image path and argv. A
        hidden name, or a file written or labelled in this graph, is kept.
        """
        if op not in READ_OPS or not path.startswith(_SYSTEM_PROGRAMS) or "/." in path:
            return False
        f = self.files.get(path)
        return f is None or (f.version == 0 and not f.labels and not f.keep)

    def _file_op(self, out, ev, proc, path, item, op, detail=None, inferred=False):
        """Read-like or write-like flow between *proc* and the file at *path*."""
        if self.reduce and (is_non_viable(path, op) or self._pristine_system_file(path, op)):
            self.stats["edges_pruned"] += 1
            self.stats["edge_candidates"] += 1
            if path not in self.files:
                self.stats["nodes_pruned"] += 1
            return None
        f = self.file(path, ev.ts, item)
        if op in ("read", "load", "exec_load"):
            e = self._edge(out, ev.ts, op, proc, f, (f.version, f.labels), detail, inferred)
            if e is not None:
                flabels = f.labels
                startup = getattr(self.policy, "shell_startup", None) if flabels & T.UNTRUSTED \
                    else None
                if startup is not None and re.search(startup, path):
                    # Every later shell of the user reads its startup files: passing an
                    # edit's untrusted label on to them would make the whole account
                    # dependent (dependency explosion). The edit itself was seen and
                    # matched when written; a program it starts still carries its own
                    # label (a downloaded file stays DOWNLOADED), and a startup file
                    # fetched verbatim from the network (DOWNLOADED) still taints.
                    flabels &= ~T.UNTRUSTED
                proc.labels = T.on_read(
                    proc.labels, flabels, basename(proc.exe) in self.policy.auth_programs
                )
            return e
        state = (proc.labels, detail.get("flags", detail.get("mode")) if detail else None)
        e = self._edge(out, ev.ts, op, proc, f, state, detail, inferred)
        if e is not None and op in ("write", "create", "truncate"):
            f.version += 1
            f.writer = proc.nid
            if proc.written is None:
                proc.written = []
            if len(proc.written) < 16 and f not in proc.written:
                proc.written.append(f)
            f.labels = T.on_write(
                f.labels, proc.labels, basename(proc.exe) in self.policy.trusted_installers
            )
        return e

    def _relabel_written(self, out, ts: float, proc: ProcNode) -> None:
        """Files written before the download's connect (``wget -O f`` opens f first)."""
        trusted = basename(proc.exe) in self.policy.trusted_installers
        for f in proc.written:
            before = f.labels
            f.labels = T.on_write(f.labels, proc.labels, trusted)
            if f.labels != before:
                self.stats["edge_candidates"] += 1
                self.stats["edges"] += 1
                out.append(Edge(ts, "write", proc, f, {"retro": True}, inferred=True))

    def _taint_pipe_reader(self, proc: ProcNode) -> None:
        """``curl URL | sh``: a shell or interpreter started beside a downloader, reading stdin.

        Pipes are not audited, so the flow is inferred: a sibling forked by the same
        parent within a second of the downloader whose command line names no script
        (``sh``, ``bash -s``, ``python3 -``) runs what the downloader received.
        """
        exe = basename(proc.exe)
        parent = proc.parent
        if exe not in self.policy.downloaders or parent is None or not parent.recent_kids:
            return
        for sib in parent.recent_kids:
            if sib is proc or abs(sib.first_ts - proc.first_ts) > 1.0:
                continue
            if basename(sib.exe) not in self.policy.stdin_runners:
                continue
            args = [a for a in sib.argv[1:] if a not in ("-s", "-", "-i")]
            if not args:
                sib.labels |= T.UNTRUSTED

    def _argv_reads(self, out, ev, proc) -> None:
        """Infer reads of files named on the command line (reads are rarely audited)."""
        exe = basename(proc.exe)
        if exe in self.policy.wrappers or exe in self.policy.metadata_tools:
            return
        cwd = ev.cwd or proc.cwd or "/"
        dirs = [cwd]
        argv = proc.argv
        for i, tok in enumerate(argv[1:], 1):
            if tok in ("-C", "--directory") and i + 1 < len(argv):
                d = argv[i + 1]
                dirs.append(d if d.startswith("/") else os.path.join(cwd, d))
        seen = set()
        for tok in argv[1:]:
            if not tok or len(tok) > 512:
                continue
            cand = tok
            if "=@" in cand:
                cand = cand.split("=@", 1)[1]
            elif cand[0] == "@":
                cand = cand[1:]
            elif cand[0] == "-" and "=" in cand:
                cand = cand.split("=", 1)[1]
            if not cand or cand[0] == "-":
                continue
            for d in dirs if cand[0] != "/" else ("",):
                path = os.path.normpath(os.path.join(d, cand)) if d else os.path.normpath(cand)
                if path in seen:
                    continue
                f = self.files.get(path)
                if f is None and not T.initial_file_labels(path):
                    continue
                seen.add(path)
                self._file_op(out, ev, proc, path, None, "read", {"argv": True}, inferred=True)

    def apply(self, ev: AuditEvent) -> list[Edge]:
        """Apply one event; return the edges it produced after reduction."""
        self.stats["events"] += 1
        if ev.ts > self.now:
            self.now = ev.ts
        out: list[Edge] = []
        proc = self.process(ev)
        if proc is None:
            return out
        if "LOGIN" in ev.types:
            proc.login = True
            auid = ev.other.get("auid")
            if auid is not None and auid.isdigit():
                proc.auid = int(auid)
            ses = ev.other.get("ses")
            if ses is not None and ses.isdigit():
                proc.ses = int(ses)
            proc.root = proc
            self._edge(out, ev.ts, "login", proc, None, detail={"auid": proc.auid})
            return out
        sc = ev.syscall
        handler = _HANDLERS.get(sc) if sc else None
        if handler is None:
            return out
        items = self._items(ev) if ev.paths else []
        if not items and proc.last_file is not None and sc in _FD_OPS:
            items = [proc.last_file]  # fd-based call: the file this process opened last
        handler(self, out, ev, proc, sc, items)
        return out

    # ------------------------------------------------------------------ syscall handlers
    # One per syscall family; ``_HANDLERS`` (below the class) maps each syscall to its own.
    def _on_fork(self, out, ev, proc, sc, items) -> None:
        if ev.success and ev.exit and ev.exit > 0:
            child = self.procs.get(ev.exit)
            if child is None or child.parent is not proc or child.first_ts < ev.ts - 1.0:
                child = self._new_proc(ev.exit, ev.ts, proc, None)
            e = self._edge(out, ev.ts, "fork", proc, child)
            if e is not None and self.reduce and len(child.edges) > 1:
                if child.edges[0][1] == "exec":  # the clone was logged after the child's exec
                    self._late_forks.append(child)

    def _on_exec(self, out, ev, proc, sc, items) -> None:
        if not ev.success:
            return
        proc.argv = ev.argv or proc.argv
        if ev.exe:
            proc.exe = ev.exe
        self._edge(out, ev.ts, "exec", proc, None, detail={"argv": proc.argv})
        for idx, (path, it) in enumerate(items):
            op = "exec_load" if idx == 0 else "load"
            self._file_op(out, ev, proc, path, it, op, {"image": idx == 0})
        if self.infer_argv_reads:
            self._argv_reads(out, ev, proc)

    def _on_open(self, out, ev, proc, sc, items) -> None:
        flags = (
            ev.args[1]
            if sc == "open"
            else (_O_CREAT | _O_TRUNC | 1 if sc == "creat" else ev.args[2])
        )
        for path, it in items:
            if not ev.success:
                self._file_op(out, ev, proc, path, it, "denied", {"exit": ev.exit})
            elif flags & _WRITE_FLAGS:
                existed = it.get("nametype") != "CREATE"
                op = (
                    "truncate"
                    if (flags & _O_TRUNC and existed)
                    else ("write" if existed else "create")
                )
                self._file_op(out, ev, proc, path, it, op, {"flags": flags})
                proc.last_file = (path, it)
            else:
                self._file_op(out, ev, proc, path, it, "read")

    def _on_truncate(self, out, ev, proc, sc, items) -> None:
        for path, it in items:
            self._file_op(out, ev, proc, path, it, "truncate", {"flags": "truncate"})

    def _on_unlink(self, out, ev, proc, sc, items) -> None:
        for path, it in items:
            if it.get("nametype") in ("DELETE", None, "NORMAL"):
                e = self._file_op(out, ev, proc, path, it, "unlink", {"ok": ev.success})
                if e is not None and ev.success:
                    self._collect_file(e.obj)

    def _on_rename(self, out, ev, proc, sc, items) -> None:
        if ev.success and len(items) >= 2:
            (src, _), (dst, dit) = items[0], items[1]
            old = self.files.get(src)
            e = self._file_op(out, ev, proc, dst, dit, "rename",
                              {"from": src, "replaced": dit.get("nametype") == "DELETE"})
            if e is not None and old is not None:
                e.obj.labels |= old.labels
                self._collect_file(old)  # its content lives on under the new name

    def _on_link(self, out, ev, proc, sc, items) -> None:
        for path, it in items:
            if it.get("nametype") == "CREATE":
                argv = proc.argv
                target = argv[-2] if sc.startswith("sym") and len(argv) >= 3 else None
                self._file_op(out, ev, proc, path, it, "link", {"target": target})

    def _on_chmod(self, out, ev, proc, sc, items) -> None:
        mode = ev.args[2] if sc.startswith("fchmodat") else ev.args[1]
        for path, it in items:
            self._file_op(out, ev, proc, path, it, "chmod", {"mode": mode})

    def _on_chown(self, out, ev, proc, sc, items) -> None:
        for path, it in items:
            self._file_op(out, ev, proc, path, it, "chown")

    def _on_utime(self, out, ev, proc, sc, items) -> None:
        for path, it in items:
            self._file_op(out, ev, proc, path, it, "utime")

    def _on_setid(self, out, ev, proc, sc, items) -> None:
        self._edge(out, ev.ts, "setuid", proc, None, (ev.uid, ev.euid, proc.labels),
                   detail={"uid": ev.uid, "euid": ev.euid})

    def _on_bind(self, out, ev, proc, sc, items) -> None:
        sa = ev.sockaddr
        if ev.success and sa and sa.get("port"):
            self.local_ports.add(sa["port"])
            proc.service = True
            self._edge(out, ev.ts, "bind", proc, None, detail={"port": sa["port"]})

    def _on_net(self, out, ev, proc, sc, items) -> None:
        sa = ev.sockaddr
        s = self.socket(sa, ev.ts) if sa else None
        if s is None:
            return
        ok = ev.success or ev.exit == _EINPROGRESS  # non-blocking connect (curl) is a connection
        inbound = sc in _NETIN
        op = (
            "accept"
            if sc.startswith("accept")
            else ("connect" if sc == "connect" else ("recv" if inbound else "send"))
        )
        if inbound and op == "accept":
            proc.service = True
        if s.port is not None:
            # scanners fan out over children (one subshell per port): count at the parent too
            for holder in (proc, proc.parent):
                if holder is None:
                    continue
                if holder.ports is None:
                    holder.ports = set()
                if len(holder.ports) < 4096:
                    holder.ports.add((s.addr, s.port))
        e = self._edge(out, ev.ts, op, proc, s, (proc.labels, ok), {"ok": ok, "exit": ev.exit})
        if e is not None and ok and not s.trusted and op != "accept":
            first = not proc.labels & T.NET_IN
            proc.labels |= T.UNTRUSTED | T.NET_IN
            if first and proc.written:
                self._relabel_written(out, ev.ts, proc)
            if first:
                self._taint_pipe_reader(proc)

    def _on_module(self, out, ev, proc, sc, items) -> None:
        path = items[0][0] if items else None
        obj = self.file(path, ev.ts) if path else None
        self._edge(out, ev.ts, "module", proc, obj, detail={"syscall": sc})

    def _on_misc(self, out, ev, proc, sc, items) -> None:
        op = _MISC[sc]
        target = None
        state = None
        if op == "ptrace":
            if ev.args[1]:
                target = self.procs.get(ev.args[1])
            # a tracer's repeated request on the same tracee, both sides' labels unchanged,
            # is redundant (strace/gdb issue thousands): see detection.reduction
            state = (proc.labels, target.labels if target is not None else 0)
        self._edge(out, ev.ts, op, proc, target, state,
                   {"syscall": sc, "request": ev.args[0]},
                   variant=(sc, ev.args[0], ev.args[1]) if op == "ptrace" else None)

    # ------------------------------------------------------------------ aging
    def expire(self, now: float | None = None) -> int:
        """Evict idle nodes and enforce ``max_nodes``; returns how many were evicted."""
        now = self.now if now is None else now
        horizon = now - self.idle_seconds
        lru = self._lru
        n = 0
        while lru:
            nid, node = next(iter(lru.items()))
            if node.last_ts >= horizon and len(lru) <= self.max_nodes:
                break
            lru.popitem(last=False)
            self._drop(node)
            n += 1
        self.stats["nodes_evicted"] += n
        return n

    def _drop(self, node: Node) -> None:
        if isinstance(node, ProcNode):
            if self.procs.get(node.pid) is node:
                del self.procs[node.pid]
        elif isinstance(node, FileNode):
            if self.files.get(node.path) is node:
                del self.files[node.path]
            if node.inode and self.inodes.get(node.inode) is node:
                del self.inodes[node.inode]
        elif isinstance(node, SockNode):
            key = node.nid[5:]
            if self.socks.get(key) is node:
                del self.socks[key]

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        """Live nodes."""
        return len(self._lru)

    def counts(self) -> dict:
        """Live node and edge counts and an approximate memory footprint in bytes."""
        nedges = sum(map(len, map(_EDGES, self._lru.values())))  # in C: runs per batch
        mem = (
            len(self.procs) * BYTES_PER_PROC
            + len(self.files) * BYTES_PER_FILE
            + len(self.socks) * BYTES_PER_SOCK
            + nedges * BYTES_PER_EDGE
            + len(self.redundant) * 120
        )
        return {
            "nodes": len(self._lru),
            "processes": len(self.procs),
            "files": len(self.files),
            "sockets": len(self.socks),
            "edges_live": nedges,
            "memory_bytes": mem,
        }


def _spawn_only(p: ProcNode) -> bool:
    """True when every edge *p* still owns is one of its own ``exec`` edges.

    The idle window of garbage collection keeps what a live process read in case a
    later output of it makes those inputs part of an attack's path; a process whose
    retained edges are only its spawn has no such input (a pristine system image is
    not an edge, a non-system image is an ``exec_load`` edge and keeps it).
    """
    n = p.n
    if not n:
        return False
    for _, op, _ in p.edges:
        if op in _SPAWN_OPS:
            n -= 1
    return n == 0


def _handlers() -> dict[str, Callable[..., None]]:
    """Syscall -> handler. Families are listed in precedence order: a syscall in two
    families is handled by the first (``setdefault``)."""
    families = (
        (_FORKS, ProvenanceGraph._on_fork),
        (_EXECS, ProvenanceGraph._on_exec),
        (_OPENS, ProvenanceGraph._on_open),
        (_TRUNCS, ProvenanceGraph._on_truncate),
        (_UNLINKS, ProvenanceGraph._on_unlink),
        (_RENAMES, ProvenanceGraph._on_rename),
        (_LINKS, ProvenanceGraph._on_link),
        (_CHMODS, ProvenanceGraph._on_chmod),
        (_CHOWNS, ProvenanceGraph._on_chown),
        (_UTIMES, ProvenanceGraph._on_utime),
        (_SETIDS, ProvenanceGraph._on_setid),
        (("bind",), ProvenanceGraph._on_bind),
        (_NETOUT | _NETIN, ProvenanceGraph._on_net),
        (_MODULES, ProvenanceGraph._on_module),
        (_MISC, ProvenanceGraph._on_misc),
    )
    table: dict[str, Callable[..., None]] = {}
    for names, handler in families:
        for name in names:
            table.setdefault(name, handler)
    return table


#: The dispatch table :meth:`ProvenanceGraph.apply` looks syscalls up in.
_HANDLERS = _handlers()
