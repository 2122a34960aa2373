"""Aggregate the ATT&CK tags of one causal chain into ONE growing alert, ranked by evidence.

A *chain* is identified by its root process (the login session process, the
exploited network service, or the oldest known ancestor; see
:meth:`detection.graph.ProvenanceGraph._root_of`). Every match on a process of
that chain updates the same alert (same ``id``, ``version`` + 1): new
techniques, tactics and the processes, files and sockets that explain it.

Severity follows HOLMES-style stage progression, not the number of matches:

* A match is *strong* when its rule weight is >= 2 and its edge is not
  *routine* for the host or user (the learned :class:`~detection.baseline.BehaviourModel`
  has seen that pattern often enough once the model is warm; routine matches
  count as context, weight 1).
* The chain *enters* the kill chain at its first strong match that is
  *dependent on untrusted or sensitive data* (the process inherited or read
  untrusted data — a downloaded file, an injected command, a reverse shell's
  parent — or holds credential data). Before entry every match is context: an
  admin's ``.bashrc`` edit, ``crontab``, ``base64 -d`` and ``tar`` stay ``low``
  however many there are. Rarity alone never enters: on a warm model every
  user's first ``.bashrc`` edit is rare, and that is not an attack.
* From the entry on, each strong match moves the chain to its stage
  (initial compromise → foothold → escalation → mission, :data:`STAGES`) one
  level above the highest earlier stage below it; the level reached is the
  length of the ordered progression. Severity: not entered ``low``; level 1
  ``medium``; 2 ``high``; 3 or more ``critical``. An entered chain with
  :data:`RARE_BONUS_MATCHES` or more strong matches on edges the warm baseline
  had never seen gets one level more (evidence the chain is also unusual here).

Every alert says why in ``why``: the entry match and its reason, the stages in
the order they were reached, rare edges of the chain (with their familiarity),
and the matches discounted as routine.
"""

from __future__ import annotations

import hashlib

from . import tags as T
from .nodes import FileNode, ProcNode, SockNode
from .reduction import READ_OPS
from .rules import TACTIC_ORDER, Match
from .slots import Slotted

SEVERITIES = ("low", "medium", "high", "critical")
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}

#: kill-chain stages in order (HOLMES's seven, folded to what audit rules can tell apart)
STAGES = ("initial-compromise", "foothold", "escalation", "mission")
STAGE_OF_TACTIC = {
    "initial-access": 0,
    "execution": 1,
    "command-and-control": 1,
    "persistence": 2,
    "privilege-escalation": 2,
    "credential-access": 2,
    "defense-evasion": 2,
    "discovery": 2,
    "lateral-movement": 2,
    "collection": 3,
    "exfiltration": 3,
    "impact": 3,
}
#: strong matches on edges the warm baseline had never seen that add one severity level
RARE_BONUS_MATCHES = 3


def severity_for(entered: bool, level: int) -> str:
    """Severity from entry into the kill chain and the ordered stage level reached.

    >>> severity_for(False, 4)
    'low'
    >>> severity_for(True, 1), severity_for(True, 2), severity_for(True, 3)
    ('medium', 'high', 'critical')
    """
    if not entered or level < 1:
        return "low"
    return SEVERITIES[min(level, 3)]


def dependency(m: Match) -> str | None:
    """Why *m*'s edge depends on untrusted or sensitive data (``None`` when it does not).

    A process that talked to an untrusted endpoint itself is not yet dependent
    (a probe, a download); its children, readers of what it wrote, and processes
    whose parent was already untrusted are.
    """
    e = m.edge
    p = e.proc
    lab = p.labels
    if lab & T.SENSITIVE:
        return "holds sensitive (credential) data"
    if lab & T.UNTRUSTED:
        if not lab & T.NET_IN:
            return "inherited or read untrusted data"
        par = p.parent
        if par is not None and par.labels & T.UNTRUSTED:
            return "child of an untrusted process talking to the network"
    obj = e.obj
    if obj is not None and e.op in READ_OPS and obj.labels & (T.DOWNLOADED | T.UNTRUSTED):
        return "runs or reads downloaded/untrusted content"
    return None


class Alert(Slotted):
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
        "entry",
        "stages",
        "path",
        "level",
        "rare_edges",
        "rare_strong",
        "routine",
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
        self.entry: dict | None = None
        self.stages: dict[int, dict] = {}
        self.path: list[dict] = []
        self.level = 0
        self.rare_edges: list[dict] = []
        self.rare_strong = 0
        self.routine: dict[str, int] = {}

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

    def note_rare(self, e, familiarity: float) -> None:
        """Remember a rare edge of this chain for the explanation (bounded)."""
        if len(self.rare_edges) < 32:
            self.rare_edges.append(_edge_summary(e, familiarity))

    def _progress(self, m: Match, familiarity: float | None, routine: bool, rare: bool) -> None:
        """Stage bookkeeping for one match (see the module docstring)."""
        weight = 1 if routine else m.weight
        if routine and m.weight >= 2:
            self.routine[m.technique] = self.routine.get(m.technique, 0) + 1
        if weight < 2:
            return
        if rare:
            self.rare_strong += 1
        stage = STAGE_OF_TACTIC.get(m.tactic, 2)
        if self.entry is None:
            why = dependency(m)
            if why is None:
                return
            self.entry = dict(_edge_summary(m.edge, familiarity), technique=m.technique,
                              rule=m.rule, stage=STAGES[stage], reason=why)
        below = max((s["level"] for k, s in self.stages.items() if k < stage), default=0)
        level = below + 1
        cur = self.stages.get(stage)
        if cur is None or level > cur["level"]:
            step = {"stage": STAGES[stage], "level": level, "ts": m.edge.ts,
                    "technique": m.technique, "rule": m.rule, "pid": m.edge.proc.pid}
            self.stages[stage] = step
            if level > self.level:
                self.level = level
                self.path.append(step)

    def add(self, m: Match, familiarity: float | None = None, routine: bool = False,
            rare: bool = False) -> bool:
        """Fold one match in; True when the alert changed in a way worth re-emitting.

        *familiarity* is the learned count of the edge's pattern before it (``None``
        without a model), *routine* / *rare* the model's verdicts on it.
        """
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
        self._progress(m, familiarity, routine, rare)
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
        bonus = 1 if self.rare_strong >= RARE_BONUS_MATCHES else 0
        return severity_for(self.entry is not None, self.level + bonus)

    def score(self) -> int:
        return sum(t["weight"] for t in self.techniques.values())

    def why(self) -> dict:
        """The explanation: entry, stages in order, rare edges, routine discounts."""
        if self.entry is None:
            summary = "no dependent or rare strong evidence: context only"
        else:
            summary = (f"entered at {self.entry['technique']} ({self.entry['reason']}); "
                       + " -> ".join(f"{s['stage']} ({s['technique']})" for s in self.path))
        return {
            "summary": summary,
            "entry": self.entry,
            "progression": list(self.path),
            "stages": sorted(self.stages.values(), key=lambda s: STAGES.index(s["stage"])),
            "level": self.level,
            "rare_strong_matches": self.rare_strong,
            "rare_edges": self.rare_edges[:20],
            "routine_matches": dict(self.routine),
        }

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
            "why": self.why(),
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

    def add(self, matches: list[Match], changed: dict, familiarity: float | None = None,
            routine: bool = False, rare: bool = False) -> None:
        """Fold *matches* (all on one edge) in; put alerts that grew (and pass
        ``min_severity``) in *changed*."""
        for m in matches:
            root = m.edge.proc.root
            a = self.alerts.get(root.nid)
            if a is None:
                if len(self.alerts) >= self.max_alerts:
                    self.alerts.pop(next(iter(self.alerts)))
                a = self.alerts[root.nid] = Alert(self.host, root, m.edge.ts, self.max_chain)
            if a.add(m, familiarity, routine, rare) and SEVERITY_RANK[a.severity] >= self.min_rank:
                changed[a.id] = a

    def note_rare(self, e, familiarity: float) -> None:
        """A rare edge on a chain that already has an alert goes into its explanation."""
        a = self.alerts.get(e.proc.root.nid)
        if a is not None:
            a.note_rare(e, familiarity)

    def all(self) -> list[Alert]:
        return list(self.alerts.values())


def _edge_summary(e, familiarity: float | None) -> dict:
    obj = e.obj
    return {
        "ts": e.ts,
        "pid": e.proc.pid,
        "exe": e.proc.exe,
        "op": e.op,
        "object": obj.nid if obj is not None else None,
        "familiarity": None if familiarity is None else round(familiarity, 2),
    }
