"""Aggregate the ATT&CK tags of one causal chain into ONE growing alert.

A *chain* is identified by its root process (the login session process, the
exploited network service, or the oldest known ancestor; see
:meth:`detection.graph.ProvenanceGraph._root_of`). Every match on a process of
that chain updates the same alert (same ``id``, ``version`` + 1): new
techniques, tactics and the processes, files and sockets that explain it.

Severity rises with the number of distinct tactic stages, but only once the
chain is *suspicious*: it holds a weight-3 tag, or weight-2 tags of two
tactics. Chains with context tags only (an SSH login, ``id``, ``sudo``,
``tar``) stay ``low``: that is what keeps admins' sessions quiet.
"""

from __future__ import annotations

import hashlib

from .nodes import FileNode, ProcNode, SockNode
from .rules import TACTIC_ORDER, Match

SEVERITIES = ("low", "medium", "high", "critical")
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def severity_for(max_weight: int, strong_tactics: int, stages: int) -> str:
    """Severity from the strongest tag and the number of distinct tactic stages.

    >>> severity_for(1, 0, 5)
    'low'
    >>> severity_for(3, 1, 2), severity_for(3, 1, 4), severity_for(3, 2, 6)
    ('medium', 'high', 'critical')
    """
    if max_weight < 3 and strong_tactics < 2:
        return "low"
    if stages <= 2:
        return "medium"
    if stages <= 4:
        return "high"
    return "critical"


class Alert:
    """One chain's alert; :meth:`to_dict` is the JSON contract."""

    __slots__ = (
        "id",
        "host",
        "root",
        "first_ts",
        "last_ts",
        "techniques",
        "chain",
        "version",
        "severity",
        "max_weight",
        "max_chain",
        "evidence",
        "first_medium_ts",
    )

    def __init__(self, host: str, root: ProcNode, ts: float, max_chain: int):
        self.id = hashlib.sha1(f"{host}|{root.nid}".encode()).hexdigest()[:16]
        self.host = host
        self.root = root.describe()
        self.first_ts = ts
        self.last_ts = ts
        self.techniques: dict[str, dict] = {}
        self.chain: dict[str, dict] = {}
        self.version = 0
        self.severity = "low"
        self.max_weight = 0
        self.max_chain = max_chain
        self.evidence: list[dict] = []
        self.first_medium_ts = None

    def _add_entity(self, node, ts: float, tid: str | None = None) -> bool:
        ent = self.chain.get(node.nid)
        if ent is None:
            if len(self.chain) >= self.max_chain:
                return False
            ent = node.describe()
            ent["ts"] = ts
            ent["techniques"] = []
            self.chain[node.nid] = ent
            grew = True
        else:
            grew = False
            if isinstance(node, ProcNode) and ent.get("argv") != node.argv[:16]:
                ent["argv"] = node.argv[:16]
                ent["exe"] = node.exe
        if tid and tid not in ent["techniques"]:
            ent["techniques"].append(tid)
            grew = True
        return grew

    def add(self, m: Match) -> bool:
        """Fold one match in; True when the alert changed in a way worth re-emitting."""
        e = m.edge
        grew = False
        t = self.techniques.get(m.technique)
        if t is None:
            self.techniques[m.technique] = {
                "id": m.technique,
                "name": m.name,
                "tactic": m.tactic,
                "weight": m.weight,
                "first_ts": e.ts,
                "count": 1,
                "rule": m.rule,
            }
            grew = True
        else:
            t["count"] += 1
            if m.weight > t["weight"]:
                t["weight"] = m.weight
                t["name"] = m.name
                t["rule"] = m.rule
                grew = True
        # the explanation: the process, its ancestors up to the root, and the object
        p = e.proc
        grew |= self._add_entity(p, e.ts, m.technique)
        anc, depth = p.parent, 0
        while anc is not None and depth < 32 and anc.nid not in self.chain:
            self._add_entity(anc, anc.first_ts)
            if anc.nid == self.root["id"]:
                break
            anc, depth = anc.parent, depth + 1
        if isinstance(e.obj, (FileNode, SockNode, ProcNode)):
            grew |= self._add_entity(e.obj, e.ts, m.technique)
        if len(self.evidence) < 200:
            self.evidence.append(
                {
                    "ts": e.ts,
                    "rule": m.rule,
                    "technique": m.technique,
                    "pid": p.pid,
                    "op": e.op,
                    "object": e.obj.nid if e.obj is not None else None,
                }
            )
        if e.ts > self.last_ts:
            self.last_ts = e.ts
        self.max_weight = max(self.max_weight, m.weight)
        sev = self._severity()
        if sev != self.severity:
            self.severity = sev
            grew = True
            if self.first_medium_ts is None and SEVERITY_RANK[sev] >= 1:
                self.first_medium_ts = e.ts
        if grew:
            self.version += 1
        return grew

    def tactics(self) -> list[str]:
        present = {t["tactic"] for t in self.techniques.values()}
        return [t for t in TACTIC_ORDER if t in present]

    def _severity(self) -> str:
        strong = {t["tactic"] for t in self.techniques.values() if t["weight"] >= 2}
        return severity_for(self.max_weight, len(strong), len(self.tactics()))

    def score(self) -> int:
        return sum(t["weight"] for t in self.techniques.values())

    def to_dict(self) -> dict:
        """The alert contract: id, host, ts, severity, techniques, tactics, chain (+ extras)."""
        chain = sorted(self.chain.values(), key=lambda c: c["ts"])
        techs = sorted(self.techniques.values(), key=lambda t: t["first_ts"])
        return {
            "id": self.id,
            "host": self.host,
            "ts": self.last_ts,
            "severity": self.severity,
            "techniques": [t["id"] for t in techs],
            "tactics": self.tactics(),
            "chain": chain,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "root": self.root,
            "score": self.score(),
            "version": self.version,
            "technique_details": techs,
            "evidence": self.evidence[-50:],
        }


class AlertAggregator:
    """Keeps one :class:`Alert` per chain root; bounded by ``max_alerts`` (oldest dropped)."""

    def __init__(
        self, host: str, min_severity: str = "low", max_alerts: int = 10_000, max_chain: int = 256
    ):
        if min_severity not in SEVERITY_RANK:
            raise ValueError(f"min_severity must be one of {SEVERITIES}, got {min_severity!r}")
        self.host = host
        self.min_rank = SEVERITY_RANK[min_severity]
        self.max_alerts = max_alerts
        self.max_chain = max_chain
        self.alerts: dict[str, Alert] = {}

    def add(self, matches: list[Match], changed: dict) -> None:
        """Fold *matches* in; put alerts that grew (and pass ``min_severity``) in *changed*."""
        for m in matches:
            root = m.edge.proc.root
            a = self.alerts.get(root.nid)
            if a is None:
                if len(self.alerts) >= self.max_alerts:
                    self.alerts.pop(next(iter(self.alerts)))
                a = self.alerts[root.nid] = Alert(self.host, root, m.edge.ts, self.max_chain)
            if a.add(m) and SEVERITY_RANK[a.severity] >= self.min_rank:
                changed[a.id] = a

    def all(self) -> list[Alert]:
        return list(self.alerts.values())
