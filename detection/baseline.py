"""What is normal on this host: decayed counts of abstract provenance edges, learned online.

Every kept graph edge is reduced to a *pattern* — who (the process's program),
what (the edge op) and on what (the object generalised: home directories become
``~``, digit runs ``#``, hex ids ``<hex>``; sockets become ``loopback:8000`` /
``remote:443`` with ephemeral ports folded; an exec becomes its image) — and
counted per host and per (host, login user), with exponential decay in log time
(NoDoze's transition frequencies, UNICORN's forgetting of old behaviour). A
pattern's decayed count is its *familiarity*; a rule match on an edge whose
pattern is familiar is *routine* for that host or user, one on an edge never or
rarely seen is *rare*. :mod:`detection.alerts` uses both to weigh the evidence and
lists the rare edges in every alert's explanation.

The state is a flat ``{key: (count, last_ts)}`` map, so it serialises to a Redis
hash (:meth:`BehaviourModel.dump_dirty` / :meth:`BehaviourModel.load`) and
survives a worker restart; the lifetime is the decay half-life (counts fade) and
the Redis key's TTL (refreshed on every write; see ``README.md``).

Examples
--------
>>> m = BehaviourModel(half_life=3600.0, routine_count=2.0)
>>> key = ("bash", "write", "~/.bashrc")
>>> [round(m.observe(key, 1000, ts), 2) for ts in (0.0, 10.0, 20.0)]
[0.0, 1.0, 1.99]
>>> m.familiarity(key, 1000, 20.0) >= 2.0, m.familiarity(("nc", "connect", "remote:4444"), 1000, 20.0)
(True, 0.0)
"""

from __future__ import annotations

import re
from functools import lru_cache

from .events import UNSET
from .nodes import Edge, FileNode, ProcNode, SockNode, basename

try:  # built with the engine's C parts (setup.py)
    from ._fastedges import count_pattern as _native_count
    from ._fastedges import generalise as _native_generalise
except ImportError:  # pragma: no cover - every path then takes _generalise_py, every count _count
    _native_count = _native_generalise = None

_DIGITS = re.compile(r"\d+")
_HEX = re.compile(r"\b[0-9a-f]{12,}\b")
_HOME = re.compile(r"^/home/[^/]+")
_TOKEN = re.compile(r"[A-Za-z0-9]{6,}")
_EPHEMERAL = 32768
#: patterns whose object carries the most information about a command line
_OPS_WITH_OBJECT = frozenset({"read", "write", "create", "truncate", "unlink", "rename", "link",
                              "chmod", "chown", "utime", "denied", "exec_load", "load"})


def _fold_random(m: re.Match) -> str:
    # tok is ASCII letters and digits (_TOKEN): it has a lower-case letter when
    # upper-casing changes it, an upper-case one when lower-casing does (str methods in
    # C, not a Python step per character); a digit before its last letter makes the
    # letters-only test fail, and with no digit it passes (so no separate digit test)
    tok = m.group(0)
    lower = tok.upper() != tok
    upper = tok.lower() != tok
    if (lower and upper) or ((lower or upper) and not tok.rstrip("0123456789").isalpha()):
        return "<rand>"  # mkstemp-style names: crontab's tmp.XXXXXX, ln's CuXXXXXX
    return tok



def generalise_path(path: str) -> str:
    """A file path with the per-user and per-run parts folded.

    >>> generalise_path("/var/spool/cron/crontabs/tmp.xZjH5V")
    '/var/spool/cron/crontabs/tmp.<rand>'

    >>> generalise_path("/home/dana/backups/proj-103.tgz")
    '~/backups/proj-#.tgz'
    >>> generalise_path("/tmp/.cache-sys/shadow")
    '/tmp/.cache-sys/shadow'
    >>> generalise_path("/home/erik/work/proj/.git/objects/3f/8a9c0d1e2f3a4b5c6d7e8f9a0b")
    '~/work/proj/.git/objects/#f/<hex>'
    """
    return _generalise(path)


@lru_cache(maxsize=1 << 16)
def _generalise(path: str) -> str:
    """:func:`generalise_path` itself, memoised: a pure function of the path, and the same
    paths (libraries, configuration, caches) come back in almost every process. Most do
    not (a build's outputs, git's objects and temp files), and four regular expression
    passes per new path were a large part of the engine's time, so an ASCII path takes
    the same passes in C (``detection/_fastedges.c``), any other :func:`_generalise_py`."""
    if _native_generalise is not None:
        out = _native_generalise(path)
        if out is not None:
            return out
    return _generalise_py(path)


def _generalise_py(path: str) -> str:
    """The reference passes: what the C ``generalise`` gives for an ASCII path."""
    p = _HOME.sub("~", path, count=1)
    if p.startswith("/root/"):
        p = "~" + p[5:]
    p = _HEX.sub("<hex>", p)
    p = _TOKEN.sub(_fold_random, p)
    return _DIGITS.sub("#", p)


def edge_pattern(e: Edge) -> tuple:
    """(program, op, generalised object) of an edge: what "the same thing again" means.

    The program is the process image's basename; an ``exec`` edge's object is the
    new image and its parent's program is the subject (which program starts which).
    """
    proc = e.proc
    op = e.op
    obj = e.obj
    if op == "exec":
        parent = proc.parent
        return (basename(parent.exe) if parent is not None else "?", "exec", proc.exe or "?")
    prog = basename(proc.exe) or proc.comm or "?"
    if isinstance(obj, FileNode):
        if op not in _OPS_WITH_OBJECT:
            return (prog, op, "")
        general = obj.general
        if general is None:
            general = obj.general = generalise_path(obj.path)
        return (prog, op, general)
    if isinstance(obj, SockNode):
        if obj.port is None:
            return (prog, op, "unix:" + generalise_path(obj.addr))
        if obj.addr.startswith(("127.", "::1")):
            # local services come and go on changing high ports (dev servers, test runs)
            return (prog, op, f"loopback:{obj.port if obj.port < 1024 else 'user'}")
        port = obj.port if obj.port < _EPHEMERAL else "ephemeral"
        return (prog, op, f"remote:{port}")
    if isinstance(obj, ProcNode):
        return (prog, op, basename(obj.exe) or "?")
    return (prog, op, "")


def edge_user(e: Edge):
    """The login uid an edge is learned under (``None`` for daemons without one)."""
    auid = e.proc.auid
    return None if auid in (None, UNSET) else auid


class BehaviourModel:
    """Per-host (and per-user) decayed pattern counts; serialisable, bounded.

    Parameters
    ----------
    half_life : float
        Seconds (log time) after which a count has halved.
    routine_count : float
        Familiarity at or above which a pattern is routine.
    max_patterns : int
        Bound on stored keys; on overflow the least familiar half is forgotten.
    """

    def __init__(self, half_life: float = 7 * 86400.0, routine_count: float = 3.0,
                 max_patterns: int = 50_000):
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0 seconds, got {half_life!r}")
        self.half_life = half_life
        self.routine_count = routine_count
        self.max_patterns = max_patterns
        self.counts: dict[str, tuple[float, float]] = {}
        self.dirty: set[str] = set()
        self.observed = 0.0  # decayed number of edges seen (how much the model knows)
        self.observed_ts = 0.0

    # ----------------------------------------------------------------- keys
    @staticmethod
    def host_key(pattern: tuple) -> str:
        return "h\x1f" + "\x1f".join(map(str, pattern))

    @staticmethod
    def user_key(pattern: tuple, auid) -> str:
        return f"u{auid}\x1f" + "\x1f".join(map(str, pattern))

    def _decayed(self, key: str, ts: float) -> float:
        cur = self.counts.get(key)
        if cur is None:
            return 0.0
        count, last = cur
        if ts <= last:
            return count
        return count * 0.5 ** ((ts - last) / self.half_life)

    # ----------------------------------------------------------------- online use
    def familiarity(self, pattern: tuple, auid, ts: float) -> float:
        """Decayed count of *pattern* for this user, or on the host if higher."""
        h = self._decayed(self.host_key(pattern), ts)
        if auid is None:
            return h
        return max(h, self._decayed(self.user_key(pattern, auid), ts))

    def observe(self, pattern: tuple, auid, ts: float) -> float:
        """Familiarity of *pattern* before this sighting, then count the sighting."""
        # every kept edge comes here: the counting is done in C for the common types
        # (detection/_fastedges.c), which hands anything else to _count
        before = (None if _native_count is None
                  else _native_count(self.counts, self.dirty, pattern, auid, ts, self.half_life))
        if before is None:
            before = self._count(pattern, auid, ts)
        if ts > self.observed_ts:
            self.observed *= 0.5 ** ((ts - self.observed_ts) / self.half_life)
            self.observed_ts = ts
        self.observed += 1.0
        if len(self.counts) > self.max_patterns:
            self._forget(ts)
        return before

    def _count(self, pattern: tuple, auid, ts: float) -> float:
        """:meth:`familiarity` of *pattern*, then its host and user counts plus one
        (marked dirty); the reference of the C ``count_pattern``."""
        # each key built and decayed once (host_key and user_key share the joined pattern)
        counts = self.counts
        dirty = self.dirty
        joined = "\x1f".join(map(str, pattern))
        key = "h\x1f" + joined
        before = self._decayed(key, ts)
        counts[key] = (before + 1.0, max(ts, counts.get(key, (0, ts))[1]))
        dirty.add(key)
        if auid is not None:
            key = f"u{auid}\x1f" + joined
            user = self._decayed(key, ts)
            counts[key] = (user + 1.0, max(ts, counts.get(key, (0, ts))[1]))
            dirty.add(key)
            before = max(before, user)
        return before

    def observe_edge(self, e: Edge) -> float:
        """:meth:`observe` for a graph edge (its pattern and the process's login user)."""
        return self.observe(edge_pattern(e), edge_user(e), e.ts)

    def _forget(self, ts: float) -> None:
        ranked = sorted(self.counts, key=lambda k: self._decayed(k, ts))
        for k in ranked[: len(ranked) // 2]:
            del self.counts[k]
            self.dirty.add(k)

    # ----------------------------------------------------------------- persistence
    def dump_dirty(self) -> tuple[dict[str, str], list[str]]:
        """(fields to set, fields to delete) changed since the last dump; clears the marks."""
        put, gone = {}, []
        for k in self.dirty:
            cur = self.counts.get(k)
            if cur is None:
                gone.append(k)
            else:
                put[k] = f"{cur[0]!r},{cur[1]!r}"
        put["_observed"] = f"{self.observed!r},{self.observed_ts!r}"
        self.dirty.clear()
        return put, gone

    def load(self, fields: dict) -> int:
        """Merge a stored hash (``dump_dirty`` format, str or bytes); returns keys loaded.

        >>> m = BehaviourModel()
        >>> m.observe(("git", "write", "~/.gitconfig"), 7, 5.0)
        0.0
        >>> put, _ = m.dump_dirty()
        >>> m2 = BehaviourModel(); m2.load(put)
        2
        >>> m2.familiarity(("git", "write", "~/.gitconfig"), 7, 5.0)
        1.0
        """
        n = 0
        for k, v in fields.items():
            k = k.decode() if isinstance(k, bytes) else k
            v = v.decode() if isinstance(v, bytes) else v
            try:
                count, last = (float(x) for x in v.split(","))
            except ValueError as exc:
                raise ValueError(f"baseline field {k!r}: bad value {v!r} "
                                 "(want 'count,last_ts')") from exc
            if k == "_observed":
                self.observed, self.observed_ts = count, last
                continue
            self.counts[k] = (count, last)
            n += 1
        return n

    def __len__(self) -> int:
        return len(self.counts)
