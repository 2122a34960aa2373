"""Compile ATT&CK tagging rules (YAML data) and match them against graph edges.

Rules live in ``detection/rules/*.yaml`` (see the header of ``linux.yaml`` for
the schema). Each is compiled once into a list of small predicate closures and
indexed by edge op, so matching an edge only runs the rules for its op.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import tags as T
from .nodes import Edge, FileNode, ProcNode, SockNode
from .prefilter import gated_search, leading_strings, required_literals

RULES_DIR = Path(__file__).parent / "rules"

TACTIC_ORDER = (
    "initial-access",
    "execution",
    "persistence",
    "privilege-escalation",
    "defense-evasion",
    "credential-access",
    "discovery",
    "lateral-movement",
    "collection",
    "command-and-control",
    "exfiltration",
    "impact",
)


@dataclass(frozen=True)
class Match:
    """A rule that fired on an edge: the ATT&CK tag to aggregate into an alert."""

    rule: str
    technique: str
    name: str
    tactic: str
    weight: int
    edge: Edge


@dataclass
class Rule:
    """One compiled rule."""

    id: str
    technique: str
    name: str
    tactic: str
    weight: int
    ops: tuple
    preds: list = field(default_factory=list)
    check: object = None
    mark_proc: int = 0
    mark_obj: int = 0
    #: the program names (``exe`` basename) the rule fires for / never fires for (``None``:
    #: no such condition); :meth:`RuleSet.match` applies them through its index
    exe_in: frozenset | None = None
    exe_not: frozenset | None = None
    #: strings one of which the object's path must hold for the rule's ``path`` condition
    #: to pass (its pattern's :func:`~detection.prefilter.required_literals`; ``None``: no
    #: such condition, or none can be told); :meth:`RuleSet.match` tests them for many
    #: rules at once
    path_literals: tuple | None = None

    def admits(self, program: str) -> bool:
        """Whether the rule's program conditions let it fire for *program*."""
        return ((self.exe_in is None or program in self.exe_in)
                and (self.exe_not is None or program not in self.exe_not))


def _base(path) -> str:
    return path.rsplit("/", 1)[-1] if path else ""


# ---------------------------------------------------------------- named checks
DISCOVERY_TOOLS = {
    "id": ("T1033", "System Owner/User Discovery"),
    "whoami": ("T1033", "System Owner/User Discovery"),
    "logname": ("T1033", "System Owner/User Discovery"),
    "who": ("T1033", "System Owner/User Discovery"),
    "w": ("T1033", "System Owner/User Discovery"),
    "users": ("T1033", "System Owner/User Discovery"),
    "last": ("T1033", "System Owner/User Discovery"),
    "uname": ("T1082", "System Information Discovery"),
    "hostname": ("T1082", "System Information Discovery"),
    "hostnamectl": ("T1082", "System Information Discovery"),
    "lsb_release": ("T1082", "System Information Discovery"),
    "lscpu": ("T1082", "System Information Discovery"),
    "lshw": ("T1082", "System Information Discovery"),
    "dmidecode": ("T1082", "System Information Discovery"),
    "ps": ("T1057", "Process Discovery"),
    "pgrep": ("T1057", "Process Discovery"),
    "pstree": ("T1057", "Process Discovery"),
    "top": ("T1057", "Process Discovery"),
    "ss": ("T1049", "System Network Connections Discovery"),
    "netstat": ("T1049", "System Network Connections Discovery"),
    "lsof": ("T1049", "System Network Connections Discovery"),
    "ifconfig": ("T1016", "System Network Configuration Discovery"),
    "ip": ("T1016", "System Network Configuration Discovery"),
    "route": ("T1016", "System Network Configuration Discovery"),
    "arp": ("T1016", "System Network Configuration Discovery"),
    "find": ("T1083", "File and Directory Discovery"),
    "locate": ("T1083", "File and Directory Discovery"),
    "tree": ("T1083", "File and Directory Discovery"),
    "groups": ("T1069.001", "Permission Groups Discovery: Local Groups"),
    "lastlog": ("T1087.001", "Account Discovery: Local Account"),
}
_READERS = frozenset(
    {
        "cat",
        "head",
        "tail",
        "less",
        "more",
        "grep",
        "cut",
        "awk",
        "sort",
        "strings",
        "tac",
        "nl",
        "od",
        "xxd",
        "base64",
    }
)
_FILE_DISCOVERY = (
    (re.compile(r"/etc/(passwd)(\s|$)"), "T1087.001", "Account Discovery: Local Account"),
    (re.compile(r"/etc/group(\s|$)"), "T1069.001", "Permission Groups Discovery: Local Groups"),
    (
        re.compile(
            r"/etc/(os-release|issue|lsb-release|[\w-]+-release|machine-id)|/proc/(version|cpuinfo)"
        ),
        "T1082",
        "System Information Discovery",
    ),
    (
        re.compile(r"/proc/net/|/etc/(hosts|resolv\.conf)"),
        "T1016",
        "System Network Configuration Discovery",
    ),
)
_GETENT = {
    "passwd": ("T1087.001", "Account Discovery: Local Account"),
    "group": ("T1069.001", "Permission Groups Discovery: Local Groups"),
}
_LS_SENSITIVE_DIRS = re.compile(r"(^|\s)/(home|root|var/www|srv|opt|tmp|etc)(/|\s|$)")


def discovery_tool(e: Edge):
    """ATT&CK discovery technique of an exec'd command line, or ``None``."""
    p = e.proc
    exe = _base(p.exe)
    hit = DISCOVERY_TOOLS.get(exe)
    if hit:
        return hit
    args = " ".join(p.argv[1:]) if len(p.argv) > 1 else ""
    if exe in _READERS and args:
        for rx, tid, name in _FILE_DISCOVERY:
            if rx.search(args):
                return (tid, name)
    if exe == "getent" and len(p.argv) > 1:
        return _GETENT.get(p.argv[1])
    if exe == "ls" and _LS_SENSITIVE_DIRS.search(args):
        return ("T1083", "File and Directory Discovery")
    return None


KNOWN_DOTDIRS = frozenset(
    {
        ".git",
        ".cache",
        ".config",
        ".local",
        ".venv",
        "venv",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        ".tox",
        ".nox",
        ".npm",
        ".yarn",
        ".pnpm-store",
        ".cargo",
        ".rustup",
        ".ssh",
        ".gnupg",
        ".vscode",
        ".vscode-server",
        ".idea",
        ".ipython",
        ".jupyter",
        ".m2",
        ".gradle",
        ".nvm",
        ".pyenv",
        ".github",
        ".gitlab",
        ".docker",
        ".kube",
        ".terraform",
        ".ansible",
        ".hg",
        ".svn",
        ".bundle",
        ".gem",
        ".conda",
        ".dotnet",
        ".eggs",
        ".hypothesis",
        ".coverage",
        ".next",
        ".nuxt",
        ".angular",
        ".mozilla",
        ".thunderbird",
        ".pki",
        ".dbus-keyrings",
        ".java",
        ".composer",
        ".go",
        ".deno",
        ".bun",
        ".husky",
        ".devcontainer",
        ".circleci",
        ".aws",
        ".azure",
        ".gcloud",
        ".minikube",
        ".helm",
        ".android",
        ".vim",
        ".emacs.d",
        ".oh-my-zsh",
        ".tmux",
        ".fonts",
        ".themes",
        ".icons",
        ".sdkman",
        ".poetry",
        ".pdm",
    }
)
_HIDDEN_ROOTS = ("/home/", "/root/", "/var/www/", "/srv/", "/opt/", "/usr/", "/etc/", "/var/")


def hidden_unusual(e: Edge):
    """A path with an unusual hidden component below a top-level home dotfile."""
    obj = e.obj
    path = obj.path if isinstance(obj, FileNode) else None
    if not path or "/." not in path or not path.startswith(_HIDDEN_ROOTS):
        return False
    cut = path.rfind("/") + 1
    unusual, deep = _hidden_dir(path[:cut])
    if unusual:
        return True
    # a hidden file deep inside a tree (a top-level dotfile in $HOME is normal)
    return deep and path.startswith(".", cut) and e.op == "exec_load"


#: _hidden_dir's answers by directory (with its trailing "/"): a process writes many files
#: into one directory (git's objects, a build's outputs), bounded, emptied when full
_HIDDEN_DIRS: dict[str, tuple[bool, bool]] = {}


def _hidden_dir(head: str) -> tuple[bool, bool]:
    """Of a path's directory part *head* (up to and with its last "/"): whether a component
    (below the home directory) is hidden and not a known dot-directory, and whether there is
    a component and none of them is a known dot-directory. The path's own beginning (``/home/``,
    ``/root/``) lies in *head*, so both depend on *head* alone."""
    got = _HIDDEN_DIRS.get(head)
    if got is None:
        parts = head.split("/")  # the last part is "": where the file's name goes
        start = 3 if head.startswith("/home/") else 2
        comps = parts[start:-1] if head.startswith(("/home/", "/root/")) else parts[1:-1]
        unusual = any(c.startswith(".") and c not in KNOWN_DOTDIRS and c not in (".", "..")
                      for c in comps)
        deep = len(comps) >= 1 and all(c not in KNOWN_DOTDIRS for c in comps)
        if len(_HIDDEN_DIRS) >= 4096:
            _HIDDEN_DIRS.clear()
        got = _HIDDEN_DIRS[head] = (unusual, deep)
    return got


_MASQ_NAMES = re.compile(
    r"^\.?(sshd|systemd[\w-]*|dbus[\w-]*|kworker[\w/:-]*|kthreadd|ksoftirqd|crond?|udevd?|"
    r"rsyslogd|syslogd|x11[\w-]*|xorg|polkitd?|gvfsd[\w-]*|pulseaudio|networkmanager|"
    r"accounts-daemon|irqbalance|agetty|atd|containerd|dockerd|snapd|init|getty|"
    r"journald|auditd|cupsd|avahi-daemon|acpid|chronyd|ntpd|nscd|sssd|rpcbind|"
    r"lib[\w-]+\.so(\.\d+)*|ld-linux[\w.-]*)$",
    re.IGNORECASE,
)
_SYSTEM_DIRS = ("/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/opt/", "/snap/", "/etc/")
#: the first three characters (lower case) of every name _MASQ_NAMES matches: it runs on the
#: name of most new files, and few of them begin like a system component
_MASQ_STARTS = leading_strings(_MASQ_NAMES, 3)


def _masq_name(name: str) -> bool:
    """``_MASQ_NAMES.match(name)``, tried only on a name that begins like one of its
    matches (ASCII letters compare case-insensitively as the pattern does; a name with
    other characters there always takes the match)."""
    start = name[:3]
    if _MASQ_STARTS is not None and start.isascii() and start.lower() not in _MASQ_STARTS:
        return False
    return _MASQ_NAMES.match(name) is not None


def masquerade(e: Edge):
    """An executable or new file outside system dirs named like a system component."""
    obj = e.obj
    path = obj.path if isinstance(obj, FileNode) else None
    if not path or path.startswith(_SYSTEM_DIRS):
        return False
    last = path.rfind("/")
    if _masq_name(path[last + 1:]):
        return True
    # masquerading location: a dot-dir named after a system component holding the file
    hidden = path.find("/.")
    if hidden == -1 or hidden >= last:  # no directory of the path starts with a dot
        return False
    parts = path.split("/")
    return any(
        c.startswith(".") and _masq_name(c) and c.lower() not in (".dbus-keyrings",)
        for c in parts[1:-1]
    )


def mode_exec(e: Edge):
    mode = e.detail.get("mode")
    return isinstance(mode, int) and bool(mode & 0o111)


def mode_setid(e: Edge):
    """A chmod that sets the setuid or setgid bit of a file (a directory's setgid bit,
    which shares a group's new files, is ordinary administration)."""
    mode = e.detail.get("mode")
    if not isinstance(mode, int) or not mode & 0o6000:
        return False
    kind = getattr(e.obj, "mode", None)  # the PATH record's inode mode (octal text), if any
    return not (isinstance(kind, str) and kind.startswith("04"))  # 040755: a directory


def setuid_exec(e: Edge):
    """A program outside the system directories that ran as root for a user who is not
    (its setuid bit did it: effective uid 0, real uid a user's)."""
    p = e.proc
    exe = p.exe or ""
    return p.euid == 0 and p.uid not in (None, 0) and not exe.startswith(_SYSTEM_DIRS)


def port_scan(e: Edge, threshold: int = 5):
    """One process touching ``threshold`` or more ports of the same host."""
    s = e.obj
    if not isinstance(s, SockNode):
        return False
    for holder in (e.proc, e.proc.parent):
        ports = holder.ports if holder is not None else None
        if (
            ports
            and len(ports) >= threshold
            and sum(1 for a, _ in ports if a == s.addr) >= threshold
        ):
            return True
    return False


CHECKS = {
    "discovery_tool": discovery_tool,
    "hidden_unusual": hidden_unusual,
    "masquerade": masquerade,
    "mode_exec": mode_exec,
    "mode_setid": mode_setid,
    "port_scan": port_scan,
    "setuid_exec": setuid_exec,
}


# ---------------------------------------------------------------- compilation
class RuleSet:
    """All rules of the rule files, indexed by edge op.

    Examples
    --------
    >>> rs = RuleSet.load()
    >>> "T1053.003" in rs.techniques()
    True
    """

    def __init__(self, doc: dict):
        self.lists = {k: tuple(str(x) for x in v) for k, v in (doc.get("lists") or {}).items()}
        self.patterns = {k: re.compile(v) for k, v in (doc.get("patterns") or {}).items()}
        self.rules: list[Rule] = [self._compile(r) for r in doc.get("rules") or ()]
        self.by_op: dict[str, list[Rule]] = {}
        for r in self.rules:
            for op in r.ops:
                self.by_op.setdefault(op, []).append(r)
        #: ops with a rule conditioned on the program, and the rules of such an op that
        #: admit a program, in rule order, by (op, program): one lookup per edge instead
        #: of testing each rule's program condition (bounded; a miss recomputes)
        self._by_program_ops = {op for op, rules in self.by_op.items()
                                if any(r.exe_in is not None or r.exe_not is not None
                                       for r in rules)}
        self._admitted: dict[tuple[str, str], _Candidates] = {}
        self._candidates = {op: _Candidates(rules) for op, rules in self.by_op.items()}

    @classmethod
    def load(cls, paths=None) -> RuleSet:
        """Load and merge YAML rule files (default: every ``detection/rules/*.yaml``)."""
        merged: dict = {"lists": {}, "patterns": {}, "rules": []}
        for path in paths or sorted(RULES_DIR.glob("*.yaml")):
            doc = yaml.safe_load(Path(path).read_text()) or {}
            merged["lists"].update(doc.get("lists") or {})
            merged["patterns"].update(doc.get("patterns") or {})
            merged["rules"].extend(doc.get("rules") or [])
        return cls(merged)

    def techniques(self) -> set[str]:
        """Every technique id the rules can emit."""
        out = {r.technique for r in self.rules if not r.technique.startswith("_")}
        out.update(t for t, _ in DISCOVERY_TOOLS.values())
        return out

    def names(self, key: str) -> frozenset:
        """A named list (``@shells`` ...) as a frozenset."""
        return frozenset(self.lists.get(key, ()))

    def _names(self, v) -> frozenset:
        if isinstance(v, str) and v.startswith("@"):
            if v[1:] not in self.lists:
                raise ValueError(f"rule list {v!r} is not defined under 'lists:'")
            return frozenset(self.lists[v[1:]])
        return frozenset(str(x) for x in (v if isinstance(v, list) else [v]))

    def _rx(self, v: str):
        if v.startswith("%"):
            if v[1:] not in self.patterns:
                raise ValueError(f"rule pattern {v!r} is not defined under 'patterns:'")
            return self.patterns[v[1:]]
        return re.compile(v)

    def _compile(self, d: dict) -> Rule:
        rid = d.get("id", "?")
        for req in ("technique", "tactic", "op"):
            if req not in d:
                raise ValueError(f"rule {rid!r}: missing required key {req!r}")
        if d["tactic"] not in TACTIC_ORDER:
            raise ValueError(
                f"rule {rid!r}: unknown tactic {d['tactic']!r}; use one of {TACTIC_ORDER}"
            )
        preds = []
        exe_in = self._names(d["exe"]) if "exe" in d else None
        exe_not = self._names(d["exe_not"]) if "exe_not" in d else None
        if "proc_labels" in d:
            m = _mask(d["proc_labels"])
            preds.append(lambda e, m=m: bool(e.proc.labels & m))
        if "proc_labels_not" in d:
            m = _mask(d["proc_labels_not"])
            preds.append(lambda e, m=m: not e.proc.labels & m)
        if "obj_labels" in d:
            m = _mask(d["obj_labels"])
            preds.append(lambda e, m=m: e.obj is not None and bool(e.obj.labels & m))
        if "parent_service" in d:
            want = bool(d["parent_service"])
            preds.append(
                lambda e, w=want: (e.proc.parent is not None and e.proc.parent.service) == w
            )
        # the path patterns run on most file edges: each behind its literal prefilter
        path_literals = None
        if "path" in d:
            rx = self._rx(d["path"])
            found = gated_search(rx)
            path_literals = required_literals(rx)
            preds.append(lambda e, found=found: isinstance(e.obj, FileNode) and found(e.obj.path))
        if "path_not" in d:
            found = gated_search(self._rx(d["path_not"]))
            preds.append(
                lambda e, found=found: not (isinstance(e.obj, FileNode) and found(e.obj.path))
            )
        if "argv" in d:
            rx = self._rx(d["argv"])
            preds.append(lambda e, rx=rx: rx.search(" ".join(e.proc.argv[1:])) is not None)
        if "argv_not" in d:
            rx = self._rx(d["argv_not"])
            preds.append(lambda e, rx=rx: rx.search(" ".join(e.proc.argv[1:])) is None)
        if "trusted" in d:
            want = bool(d["trusted"])
            preds.append(lambda e, w=want: isinstance(e.obj, SockNode) and e.obj.trusted == w)
        if "port" in d:
            s = {int(x) for x in self._names(d["port"])}
            preds.append(lambda e, s=s: isinstance(e.obj, SockNode) and e.obj.port in s)
        if "port_not" in d:
            s = {int(x) for x in self._names(d["port_not"])}
            preds.append(lambda e, s=s: isinstance(e.obj, SockNode) and e.obj.port not in s)
        if "success" in d:
            want = bool(d["success"])
            preds.append(lambda e, w=want: bool(e.detail.get("ok", True)) == w)
        if "inferred" in d:
            want = bool(d["inferred"])
            preds.append(lambda e, w=want: e.inferred == w)
        if d.get("auid_set"):
            preds.append(lambda e: e.proc.auid not in (None, 4294967295))
        check = None
        if "check" in d:
            if d["check"] not in CHECKS:
                raise ValueError(
                    f"rule {rid!r}: unknown check {d['check']!r}; known: {sorted(CHECKS)}"
                )
            check = CHECKS[d["check"]]
        ops = tuple(d["op"]) if isinstance(d["op"], list) else (d["op"],)
        return Rule(
            rid,
            str(d["technique"]),
            d.get("name", str(d["technique"])),
            d["tactic"],
            int(d.get("weight", 1)),
            ops,
            preds,
            check,
            _mask(d.get("mark_proc", [])),
            _mask(d.get("mark_obj", [])),
            exe_in,
            exe_not,
            path_literals,
        )

    def match(self, edge: Edge) -> list[Match]:
        """Rules that fire on *edge*; applies their ``mark_*`` labels."""
        op = edge.op
        cand = self._candidates.get(op)
        if cand is None:
            return []
        if op in self._by_program_ops:
            key = (op, _base(edge.proc.exe))
            cand = self._admitted.get(key)
            if cand is None:
                cand = self._admit(key)
        rules = cand.rules
        if cand.literals:
            # most edges are on paths that no path condition can match (a build's outputs,
            # git's objects): one test of every literal instead of a call per rule
            obj = edge.obj
            if not isinstance(obj, FileNode) or not _holds_any(obj.path, cand.literals):
                rules = cand.unlit
        out = []
        for r in rules:
            for pred in r.preds:
                if not pred(edge):
                    break
            else:
                tid, name = r.technique, r.name
                if r.check is not None:
                    res = r.check(edge)
                    if not res:
                        continue
                    if isinstance(res, tuple):
                        if tid.startswith("_"):
                            tid, name = res
                if r.mark_proc:
                    edge.proc.labels |= r.mark_proc
                if r.mark_obj and edge.obj is not None:
                    edge.obj.labels |= r.mark_obj
                out.append(Match(r.id, tid, name, r.tactic, r.weight, edge))
        return out

    #: (op, program) pairs kept by :meth:`match`'s index at most (then it starts over)
    ADMITTED_MAX = 4096

    def _admit(self, key: tuple[str, str]) -> _Candidates:
        op, program = key
        if len(self._admitted) >= self.ADMITTED_MAX:
            self._admitted.clear()
        admitted = self._admitted[key] = _Candidates(
            [r for r in self.by_op[op] if r.admits(program)])
        return admitted


class _Candidates:
    """The rules :meth:`RuleSet.match` runs for an op (or an (op, program) pair), in rule
    order, and the same without those whose ``path`` condition needs a literal.

    A rule's path condition is ``isinstance(obj, FileNode) and found(obj.path)``, and its
    search finds nothing in a path that holds none of the pattern's required literals
    (:mod:`detection.prefilter`). Conditions have no side effects and a rule fires only
    when all hold, so on an edge whose object is no file, or whose path holds none of
    ``literals`` (every such rule's literals), ``unlit`` fires exactly what ``rules`` does.
    """

    __slots__ = ("rules", "literals", "unlit")

    def __init__(self, rules: list[Rule]):
        self.rules = tuple(rules)
        self.unlit = tuple(r for r in rules if not r.path_literals)
        lits = {lit for r in rules if r.path_literals for lit in r.path_literals}
        # a literal that holds another is implied by it: test only the other
        self.literals = tuple(sorted(s for s in lits if not any(t != s and t in s for t in lits)))


def _holds_any(text: str, literals: tuple[str, ...]) -> bool:
    for lit in literals:
        if lit in text:
            return True
    return False


def _mask(names) -> int:
    m = 0
    for n in names or ():
        if n not in T.NAME_TO_LABEL:
            raise ValueError(f"unknown label {n!r}; known: {sorted(T.NAME_TO_LABEL)}")
        m |= T.NAME_TO_LABEL[n]
    return m


def is_proc(node) -> bool:
    return isinstance(node, ProcNode)
