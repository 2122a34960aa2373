"""Nodes and edges of the provenance graph: processes, files, sockets and timed edges.

Split from :mod:`detection.graph`, which builds and bounds the graph.
"""

from __future__ import annotations

from collections import deque

from . import tags as T
from .events import UNSET
from .slots import Slotted

__all__ = ["Edge", "FileNode", "Node", "ProcNode", "SockNode"]


class Node(Slotted):
    """Base graph node: id, kind, labels, activity times, bounded recent edges."""

    __slots__ = ("nid", "kind", "labels", "first_ts", "last_ts", "edges", "n", "keep",
                 "__weakref__")

    def __init__(self, nid: str, kind: str, ts: float, max_edges: int):
        self.nid = nid
        self.kind = kind
        self.labels = 0
        self.first_ts = ts
        self.last_ts = ts
        self.edges: deque = deque(maxlen=max_edges)
        self.n = 0  # retained edges this node owns (garbage collection counts them)
        self.keep = False  # a rule matched on one of its edges: never collected


class ProcNode(Node):
    """A process, identified by pid and start (first-seen) time."""

    __slots__ = (
        "pid",
        "ppid",
        "parent",
        "root",
        "exe",
        "comm",
        "argv",
        "uid",
        "euid",
        "auid",
        "ses",
        "cwd",
        "service",
        "login",
        "ports",
        "last_file",
        "written",
        "touched",
        "kids",
        "recent_kids",
        "collected",
        "last_event",
    )

    def __init__(self, pid: int, ts: float, max_edges: int):
        super().__init__(f"proc:{pid}:{ts:.3f}", "process", ts, max_edges)
        self.pid = pid
        self.ppid = None
        self.parent: ProcNode | None = None
        self.root: ProcNode = self
        self.exe = None
        self.comm = None
        self.argv: list[str] = []
        self.uid = self.euid = self.auid = self.ses = None
        self.cwd = None
        self.service = False
        self.login = False
        self.ports: set | None = None
        self.last_file: tuple | None = None
        self.written: list | None = None
        self.touched = 0  # edges by which it changed something outside itself (still retained)
        self.kids = 0  # children not yet collected
        self.recent_kids: list | None = None  # last few children (pipeline siblings)
        self.collected = False
        self.last_event = -1  # graph event number of its last own edge (merges wait for the next)

    def describe(self) -> dict:
        """JSON-ready summary used in alert chains."""
        return {
            "type": "process",
            "id": self.nid,
            "pid": self.pid,
            "ppid": self.ppid,
            "exe": self.exe,
            "argv": self.argv[:16],
            "uid": self.uid,
            "euid": self.euid,
            "auid": self.auid if self.auid != UNSET else None,
            "first_ts": self.first_ts,
        }


class FileNode(Node):
    """A file (by path, with inode); ``version`` grows with every write."""

    __slots__ = ("path", "inode", "version", "mode", "existed", "writer", "creator", "read_other",
                 "touchers", "general")

    def __init__(self, path: str, ts: float, max_edges: int):
        super().__init__(f"file:{path}", "file", ts, max_edges)
        self.path = path
        self.inode = None
        self.version = 0
        self.mode = None
        self.existed = False
        self.writer = None
        self.creator = None  # chain root (nid) of the process that created it in this graph
        self.read_other = False  # used by a process outside its creator's chain
        self.touchers: dict | None = None  # created files: proc -> [edges, outside edges]
        self.general: str | None = None  # generalised path (detection.baseline), cached
        self.labels = T.initial_file_labels(path)

    def describe(self) -> dict:
        return {
            "type": "file",
            "id": self.nid,
            "path": self.path,
            "version": self.version,
            "first_ts": self.first_ts,
        }


class SockNode(Node):
    """A remote socket endpoint (ip:port or unix path)."""

    __slots__ = ("family", "addr", "port", "trusted")

    def __init__(self, family: str, addr: str, port, ts: float, max_edges: int, trusted: bool):
        super().__init__(
            f"sock:{addr}:{port}" if port is not None else f"sock:{addr}", "socket", ts, max_edges
        )
        self.family = family
        self.addr = addr
        self.port = port
        self.trusted = trusted
        if not trusted:
            self.labels = T.UNTRUSTED

    def describe(self) -> dict:
        return {
            "type": "socket",
            "id": self.nid,
            "family": self.family,
            "addr": self.addr,
            "port": self.port,
            "trusted": self.trusted,
            "first_ts": self.first_ts,
        }


class Edge(Slotted):
    """One kept edge: ``proc`` did ``op`` on ``obj`` at ``ts`` (``obj`` may be a process)."""

    __slots__ = ("ts", "op", "proc", "obj", "detail", "inferred")

    def __init__(
        self,
        ts: float,
        op: str,
        proc: ProcNode,
        obj: Node | None,
        detail: dict | None = None,
        inferred: bool = False,
    ):
        self.ts = ts
        self.op = op
        self.proc = proc
        self.obj = obj
        self.detail = detail or {}
        self.inferred = inferred

    def key(self) -> tuple:
        """Identity of the edge without its time: (process, op, object)."""
        return (self.proc.nid, self.op, self.obj.nid if self.obj is not None else None)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Edge({self.ts} {self.proc.nid} {self.op} {self.obj.nid if self.obj else None})"


def basename(path) -> str:
    return path.rsplit("/", 1)[-1] if path else ""
