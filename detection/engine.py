"""The detection façade: audit lines in, ATT&CK alerts (and dead letters) out.

One :class:`DetectionEngine` per host (its graph is that host's state). The
Faust agent calls :meth:`DetectionEngine.process_lines` on a batch and
produces ``result.alerts`` to the ``alerts`` topic and ``result.errors`` to
``dead-letter``. Pipeline per line: parse (:mod:`detection.records`, or
:mod:`detection.laurel` for JSON lines) → coalesce into events
(:mod:`detection.coalesce`) → provenance graph with reduction and label
transfer (:mod:`detection.graph`) → the host's learned baseline scores each edge
(:mod:`detection.baseline`) → ATT&CK rules (:mod:`detection.rules`) → one growing
alert per causal chain, ranked by stage progression (:mod:`detection.alerts`).

Examples
--------
>>> eng = DetectionEngine(host="vm")
>>> res = eng.process_lines(["type=garbage"])
>>> res.errors[0][1]
'truncated after record type (no msg=audit(...) header)'
"""

from __future__ import annotations

import io
import pickle
import zlib
from dataclasses import dataclass, field

from .alerts import AlertAggregator
from .baseline import BehaviourModel
from .coalesce import Coalescer
from .events import AuditEvent
from .graph import ProvenanceGraph
from .laurel import parse_laurel
from .records import ParseError, Record, parse_line
from .rules import RuleSet

try:  # built with the audit parser's C part (setup.py)
    from ._fastparse import feed as _feed
except ImportError:  # pragma: no cover - every line then takes DetectionEngine._item
    _feed = None


@dataclass
class EngineConfig:
    """Settings of one host's engine (defaults suit a busy server).

    Attributes
    ----------
    reduce : bool
        Non-viable node pruning and redundant-edge skipping (arXiv 2112.09008).
    max_nodes, idle_seconds : int, float
        Graph bounds: nodes idle longer (log time) or beyond the cap are evicted.
    max_edges_per_node : int
        Recent edges kept per node for explanations.
    max_pending, max_age : int, float
        Coalescing window (open serials, log-time seconds).
    min_severity : str
        Alerts below this are tracked but not returned.
    trusted_networks, trusted_ports : tuple
        Remote endpoints that are not untrusted sources (CIDRs, ports), e.g. the
        package mirror's network. Loopback ports bound by audited processes are
        trusted automatically.
    rule_files : tuple or None
        YAML rule files; ``None`` loads the packaged ``detection/rules/*.yaml``.
    expire_every : int
        Run graph aging every N events.
    gc_idle : float
        Log-time seconds a process must be idle before its edges can be garbage
        collected (:meth:`detection.graph.ProvenanceGraph.collect`).
    learn : bool
        Learn the host's normal behaviour online (:mod:`detection.baseline`) and use it.
    baseline_half_life : float
        Log-time seconds after which a learned count has halved.
    routine_count, rare_below : float
        A rule match on an edge whose pattern has a familiarity >= ``routine_count``
        is routine (context only); one below ``rare_below`` is rare.
    warm_edges : float
        The model judges routine/rare only after it has seen this many (decayed)
        edges of the host; before that it only learns.
    baseline_max_patterns : int
        Bound on learned patterns per host.
    """

    reduce: bool = True
    max_nodes: int = 100_000
    idle_seconds: float = 3600.0
    max_edges_per_node: int = 64
    max_pending: int = 64
    max_age: float = 2.0
    min_severity: str = "low"
    trusted_networks: tuple = ()
    trusted_ports: tuple = ()
    rule_files: tuple | None = None
    infer_argv_reads: bool = True
    expire_every: int = 5000
    max_alerts: int = 10_000
    gc_idle: float = 30.0
    learn: bool = True
    baseline_half_life: float = 7 * 86400.0
    routine_count: float = 3.0
    rare_below: float = 1.0
    warm_edges: float = 20_000.0
    baseline_max_patterns: int = 50_000


@dataclass
class Result:
    """What one batch produced."""

    alerts: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)


class _Policy:
    """Program classes the graph needs, taken from the rule lists plus config."""

    def __init__(self, rules: RuleSet, cfg: EngineConfig):
        self.auth_programs = rules.names("auth_programs")
        self.trusted_installers = rules.names("trusted_installers")
        self.wrappers = rules.names("wrappers")
        self.metadata_tools = rules.names("metadata_tools")
        self.downloaders = rules.names("downloaders")
        startup = rules.patterns.get("shell_startup")  # kept as text: the policy is in the state
        self.shell_startup = startup.pattern if startup is not None else None
        self.stdin_runners = (rules.names("shells") | rules.names("interpreters_python")
                              | rules.names("interpreters_other"))
        self.trusted_networks = tuple(cfg.trusted_networks)
        self.trusted_ports = frozenset(int(p) for p in cfg.trusted_ports)


_RULES_CACHE: dict = {}

#: engine attributes a state snapshot leaves out (see DetectionEngine.dump_state)
_NOT_SNAPSHOT = frozenset({"rules", "model", "edge_sink", "config"})


class _StateUnpickler(pickle.Unpickler):
    """Unpickles engine state only: detection's classes and plain containers.

    State comes back from Redis; refusing every other global means a tampered value
    cannot name arbitrary callables (the usual pickle hazard).
    """

    _PLAIN = frozenset({("collections", "OrderedDict"), ("collections", "deque"),
                        ("collections", "defaultdict"), ("builtins", "set"),
                        ("builtins", "frozenset")})

    _MODULES = frozenset({"detection.alerts", "detection.coalesce", "detection.engine",
                          "detection.events", "detection.graph", "detection.nodes",
                          "detection.records", "detection.reduction"})

    def find_class(self, module: str, name: str):
        if (module, name) in self._PLAIN or (module in self._MODULES and not name.startswith("__")):
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        raise pickle.UnpicklingError(f"detection state may not contain {module}.{name}")


def _load_rules(files) -> RuleSet:
    key = tuple(files) if files else None
    rs = _RULES_CACHE.get(key)
    if rs is None:
        rs = _RULES_CACHE[key] = RuleSet.load(files)
    return rs


class DetectionEngine:
    """Stateful per-host detector.

    Parameters
    ----------
    host : str
        Host name put on alerts.
    config : EngineConfig, optional
    rules : RuleSet, optional
        Pre-loaded rules (default: the packaged rule files, loaded once per process).
    """

    def __init__(self, host: str, config: EngineConfig | None = None, rules: RuleSet | None = None):
        self.host = host
        self.config = cfg = config or EngineConfig()
        self.rules = rules or _load_rules(cfg.rule_files)
        self.graph = ProvenanceGraph(
            _Policy(self.rules, cfg),
            reduce=cfg.reduce,
            max_nodes=cfg.max_nodes,
            idle_seconds=cfg.idle_seconds,
            max_edges_per_node=cfg.max_edges_per_node,
            infer_argv_reads=cfg.infer_argv_reads,
        )
        self.coalescer = Coalescer(max_pending=cfg.max_pending, max_age=cfg.max_age)
        self.aggregator = AlertAggregator(host, cfg.min_severity, cfg.max_alerts)
        self.model = (
            BehaviourModel(cfg.baseline_half_life, cfg.routine_count, cfg.baseline_max_patterns)
            if cfg.learn
            else None
        )
        self.edge_sink = None  # optional callable(edge) for tests/benchmarks
        self._totals = {"lines": 0, "records": 0, "errors": 0, "laurel_events": 0, "matches": 0}
        self._since_expire = 0

    # ------------------------------------------------------------------ input
    def process_lines(self, lines) -> Result:
        """Parse and detect on a batch of raw auditd / LAUREL lines (mixed is fine)."""
        res = Result()
        changed: dict = {}
        nrec = 0
        events: list[AuditEvent] = []
        add = self.coalescer.add
        seq = lines if lines.__class__ in (list, tuple) else list(lines)
        i, n = 0, len(seq)
        while i < n:
            if _feed is not None:
                # the common line (one raw auditd record) parsed and handed to the
                # coalescer in C, as _item would: no Python step per line
                i, fed = _feed(seq, i, Record, add, events)
                nrec += fed
                if i == n:
                    break
            nrec += self._item(seq[i], res, events)
            i += 1
        nerr = len(res.errors)
        self._totals["lines"] += len(lines)
        self._totals["records"] += nrec
        self._totals["errors"] += nerr
        self._detect(events, changed)
        res.alerts = [a.to_dict() for a in changed.values()]
        res.stats = self._batch_stats(nrec, len(events), nerr)
        return res

    def _item(self, item, res: Result, events: list[AuditEvent]) -> int:
        """One item of :meth:`process_lines`' batch (a line, or several joined by newlines):
        its events into *events*, its errors into ``res.errors``; returns its records."""
        nrec = 0
        cls = item.__class__
        if ((cls is bytes and b"\n" not in item and item[:1] != b"{")
                or (cls is str and "\n" not in item and item[:1] != "{")):
            # one raw auditd line (what the worker's messages hold): what the
            # general case below finds for it, without copying it
            multi = is_json = False
            parts = (item,)
        elif isinstance(item, (bytes, bytearray)):
            head = bytes(item[:1])
            multi = b"\n" in item.rstrip(b"\n")
            parts = bytes(item).split(b"\n") if multi else (item,)
            is_json = head == b"{"
        else:
            head = item[:1]
            multi = "\n" in item.rstrip("\n")
            parts = item.split("\n") if multi else (item,)
            is_json = head == "{"
        for line in parts:
            if multi and not line.strip():
                continue
            if is_json or (multi and line[:1] in ("{", b"{")):
                ev = parse_laurel(line)
                if isinstance(ev, ParseError):
                    res.errors.append((line, ev.reason))
                else:
                    self._totals["laurel_events"] += 1
                    nrec += ev.nrecords
                    events.append(ev)
                continue
            rec = parse_line(line)
            if rec.__class__ is ParseError:
                res.errors.append((line, rec.reason))
                continue
            nrec += 1
            done = self.coalescer.add(rec)
            if done:
                events.extend(done)
        return nrec

    def process_events(self, events: list[AuditEvent]) -> Result:
        """Detect on already-coalesced events (e.g. from another reader)."""
        changed: dict = {}
        self._detect(events, changed)
        return Result(
            [a.to_dict() for a in changed.values()], [], self._batch_stats(0, len(events), 0)
        )

    def flush(self) -> Result:
        """Emit events still open in the coalescing window (end of file / shutdown)."""
        res = self.process_events(self.coalescer.flush())
        self.graph.collect(self.config.gc_idle)
        return res

    # ------------------------------------------------------------------ core
    def _detect(self, events: list[AuditEvent], changed: dict) -> None:
        g = self.graph
        match = self.rules.match
        agg = self.aggregator
        sink = self.edge_sink
        model = self.model
        cfg = self.config
        nm = 0
        fam = None
        routine = rare = False
        for ev in events:
            edges = g.apply(ev)
            for e in edges:
                if sink is not None:
                    sink(e)
                if model is not None:
                    warm = model.observed >= cfg.warm_edges
                    fam = model.observe_edge(e)
                    routine = warm and fam >= cfg.routine_count
                    rare = warm and fam < cfg.rare_below
                ms = match(e)
                if ms:
                    nm += len(ms)
                    e.proc.keep = True  # explained by an alert: never garbage
                    if e.obj is not None:
                        e.obj.keep = True
                    agg.add(ms, changed, fam, routine, rare)
                    if rare:
                        agg.note_rare(e, fam)
                elif rare:
                    agg.note_rare(e, fam)
        self._totals["matches"] += nm
        self._since_expire += len(events)
        if self._since_expire >= self.config.expire_every:
            self._since_expire = 0
            g.collect(cfg.gc_idle)
            g.expire()

    # ------------------------------------------------------------------ learned state
    def baseline_delta(self) -> tuple[dict, list]:
        """Learned-baseline fields changed since the last call (for a Redis hash)."""
        return self.model.dump_dirty() if self.model is not None else ({}, [])

    def load_baseline(self, fields: dict) -> int:
        """Restore learned state saved with :meth:`baseline_delta` (e.g. after a restart)."""
        return self.model.load(fields) if self.model is not None else 0

    # ------------------------------------------------------------------ durable state
    def dump_state(self) -> bytes:
        """The host's detection state as bytes: graph, open coalescing window, alerts.

        The rules, the settings and the learned baseline are left out: rules and
        settings come from the process that loads the state, the baseline has its own
        store (:mod:`detection.baseline_store`). :meth:`from_state` reads it back.
        """
        state = {k: v for k, v in self.__dict__.items() if k not in _NOT_SNAPSHOT}
        return zlib.compress(pickle.dumps(state, protocol=5), 1)

    @classmethod
    def from_state(cls, host: str, blob: bytes, config: EngineConfig | None = None,
                   rules: RuleSet | None = None) -> DetectionEngine:
        """An engine that resumes where :meth:`dump_state` left off (its model empty:
        load the baseline with :meth:`load_baseline`).

        Only detection's own classes and plain containers are accepted in *blob*
        (:class:`_StateUnpickler`); a state of another host is refused.

        >>> eng = DetectionEngine(host="vm")
        >>> _ = eng.process_lines(["type=garbage"])
        >>> DetectionEngine.from_state("vm", eng.dump_state()).stats()["errors"]
        1
        """
        eng = cls(host, config, rules)
        state = _StateUnpickler(io.BytesIO(zlib.decompress(blob))).load()
        if not isinstance(state, dict) or state.get("host") != host:
            raise ValueError(f"stored detection state is not host {host!r}'s")
        eng.__dict__.update(state)
        return eng

    # ------------------------------------------------------------------ journal
    def dump_alerts(self) -> bytes:
        """The alert chains alone as bytes (what a journal replay cannot recompute:
        they depend on the learned baseline as it was when the batch ran)."""
        return zlib.compress(pickle.dumps(self.aggregator, protocol=5), 1)

    @staticmethod
    def journal_entry(messages: list) -> bytes:
        """One batch's input for a host's journal: its messages' line lists, in order
        (:meth:`resume` feeds each to :meth:`process_lines` again).

        >>> eng = DetectionEngine.resume("vm", None, [DetectionEngine.journal_entry([["type=garbage"]])],
        ...                              DetectionEngine(host="vm").dump_alerts())
        >>> eng.stats()["errors"], eng.alerts()
        (1, [])
        """
        return zlib.compress(pickle.dumps(messages, protocol=5), 1)

    @classmethod
    def resume(cls, host: str, snapshot: bytes | None, journal: list[bytes],
               alerts: bytes | None, config: EngineConfig | None = None,
               rules: RuleSet | None = None) -> DetectionEngine:
        """An engine at the end of ``journal``: the ``snapshot`` (:meth:`dump_state`, or
        ``None`` for a fresh engine), the journal's batches (:meth:`journal_entry`)
        replayed in order, then the alert chains as the last batch left them
        (:meth:`dump_alerts`). The replay rebuilds the graph, the coalescing window and
        the counters exactly (they depend on the input and the rules only); it runs
        without the learned model and into a discarded aggregator, because the alerts'
        familiarity verdicts came from the baseline as it was then, which is stored
        with them instead."""
        eng = (cls.from_state(host, snapshot, config, rules) if snapshot is not None
               else cls(host, config, rules))
        if not journal:
            return eng
        if alerts is None:
            raise ValueError(f"host {host!r}: a detection journal without its alert chains")
        stored = _StateUnpickler(io.BytesIO(zlib.decompress(alerts))).load()
        if not isinstance(stored, AlertAggregator) or stored.host != host:
            raise ValueError(f"stored alert chains are not host {host!r}'s")
        model = eng.model
        eng.model = None
        eng.aggregator = AlertAggregator(host)  # discarded: the stored chains replace it
        try:
            for entry in journal:
                messages = _StateUnpickler(io.BytesIO(zlib.decompress(entry))).load()
                if not isinstance(messages, list):
                    raise ValueError(f"host {host!r}: a detection journal entry is not a list")
                for lines in messages:
                    eng.process_lines(lines)
        finally:
            eng.model = model
        eng.aggregator = stored
        return eng

    # ------------------------------------------------------------------ views
    def _batch_stats(self, nrec: int, nev: int, nerr: int) -> dict:
        # O(1): this runs for every message the worker hands over. The memory estimate
        # walks every node's edges, so it is in stats() only, not in a batch's figures.
        gs = self.graph.stats
        return {
            "records": nrec,
            "events": nev,
            "errors": nerr,
            "nodes": len(self.graph),
            "edges": gs["edges"],
            "edges_skipped": gs["edges_skipped"],
            "nodes_pruned": gs["nodes_pruned"],
            "pending_events": len(self.coalescer),
        }

    def alerts(self, min_severity: str = "low") -> list[dict]:
        """Current state of every alert at or above *min_severity*."""
        from .alerts import SEVERITY_RANK

        rank = SEVERITY_RANK[min_severity]
        return [a.to_dict() for a in self.aggregator.all() if SEVERITY_RANK[a.severity] >= rank]

    def stats(self) -> dict:
        """Cumulative counters, graph sizes and reduction ratios."""
        gs = dict(self.graph.stats)
        c = self.graph.counts()
        cand = gs["edge_candidates"] or 1
        created = gs["nodes_created"] + gs["nodes_pruned"] or 1
        out = dict(self._totals)
        out.update(gs)
        out.update(c)
        out.update(
            {
                "edge_reduction_ratio": (
                    gs["edges_skipped"] + gs["edges_pruned"] + gs["edges_collected"]
                ) / cand,
                "edges_retained": gs["edges"] - gs["edges_collected"],
                "node_reduction_ratio": gs["nodes_pruned"] / created,
                "late_records": self.coalescer.late_records,
                "incomplete_events": self.coalescer.incomplete_events,
                "pending_events": len(self.coalescer),
                "alerts": len(self.aggregator.alerts),
                "baseline_patterns": len(self.model) if self.model is not None else 0,
                "baseline_observed": self.model.observed if self.model is not None else 0.0,
            }
        )
        return out
