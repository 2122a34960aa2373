"""Provenance-graph reduction (arXiv 2112.09008): two sound filters, GC and merging.

* **Non-viable node pruning**: entities that can never lie on an attack chain
  are not materialised. A shared library, the loader, the locale or ld.so
  caches, ``/proc`` and ``/sys`` pseudo files that a process only *reads or
  maps* carry no attacker-controlled information unless someone writes them,
  so a read of them is dropped. A *write* to such a path is always kept (it is
  then viable: library hijacking, ``ld.so.preload``).
* **Redundant-semantics skipping**: an edge that repeats an earlier edge between
  the same two nodes and carries no new information flow is dropped. A repeated
  read is redundant while the file is at the same version; a repeated write or
  connect is redundant while the process's labels are unchanged since the last
  identical edge (labels are the only state that flows); a repeated ``ptrace`` (the
  same request of the same tracer on the same tracee: ``strace`` and ``gdb`` issue one
  per traced syscall) is redundant while both processes' labels are unchanged.
  State-changing edges (fork, exec, unlink, rename, chmod with another mode ...) are
  never skipped.

Skipping never changes labels or alerts: the skipped edge would have or-ed in
labels that are already present.

A third pass is LogGC-style garbage collection of edges already used for
detection (:meth:`detection.graph.ProvenanceGraph.collect`): edges of idle,
label-free processes on which no rule matched and that never changed anything
outside themselves (``id``, ``ps``, ``cat`` in a clean session), and edges of
temporary files created and deleted (or renamed away) unread by anyone else (git
objects and lock files, ``crontab``'s and ``ln``'s temp files). They can no longer
be on an attack's causal path: nothing flowed out of them. A name made by ``link`` or
``symlink`` starts such a lifetime as a ``create`` does (``git init`` probing symlink
support: ``symlink``, then ``unlink``): a link nobody outside the chain used before it
went led nowhere, and one that anyone else opened stays (``FileNode.read_other``).

Collection also takes, without waiting for the idle window, a process whose only
retained edges are its ``exec`` and credential-change (``setuid`` family) edges
(``date``, ``dircolors``, a ``clear_console`` whose failed open went): the window keeps
a live process's *inputs* in case a later output makes them part of an attack's path,
and such a process has none (neither edge has an object: no data moves over it); its
node keeps image, argv, ids, parent and start time, and it is active again at its next
edge. A process with retained children loses only those edges (``sh -c`` and
``run-parts`` between a service and what it runs, ``sshd``'s privilege-separated child
that changes to the user's ids and forks the shell): the children point to its node.
A credential change that anything ran under is an edge before that action, so the
process is not down to its spawn; no rule matches ``setuid`` edges (a rule-matched
process is never collected), and every edge was matched before it could go.

A fourth pass merges edges that a later edge of the same process makes redundant
(CPR-style: same entities, no information flow in between), also after detection:
the dropped edge came in an earlier event and went through the rules and the learned
baseline already, so no alert, technique or label can change
(:meth:`detection.graph.ProvenanceGraph._merge_previous`). It never touches an edge
of a labelled process, parent included for a fork (those edges are the information-flow
path an investigation follows), except the spawn fold below, nor an edge whose file
carries a label or was matched by a rule. ``bench/detection_eval.py`` checks that no
labelled attack edge goes (an attacker's folded ``exec`` counts as lost unless its
fork edge stays and the node still shows that exec's image and argv):

* **Spawn**: a child's ``fork`` edge when the child's first action is ``exec`` or a
  credential change (also when the audit log records the clone after the child's
  exec). The fork carries no data; the parent and start time stay on the child node,
  the exec edge keeps image and argv, and nothing ran in the child under the parent's
  ids before a ``setuid`` (``sshd``'s privilege-separated child, ``sudo``'s child). A
  child that does anything else first (``cat > f`` opening its redirection) keeps it.
* **Spawn of a labelled process** (or of a labelled parent's child): the other way
  round, the ``fork`` edge (parent -> child, the path the label flowed along) stays
  and the child's first ``exec`` folds into it, when the two are all the child has.
  The stored exec edge names no object; image and argv are on the node while it is
  the only exec (a second exec keeps both).
* **Repeats**: the same change (create, write, truncate, rename, chmod, chown, utime,
  link, unlink) by the same process on the same file again, every edge of the file
  since the first being the process's own (``git`` renaming a new ``config.lock``
  onto ``config`` several times): nobody read the version in between.
* **Bursts** (NodeMerge-style): the same change by one process on another file of a
  directory where it made that change before, or of a directory below it (unless that
  directory is a top-level one such as ``/tmp`` or ``/home``), the file having no edge of
  anyone else (``git init``'s hook samples and ``info/exclude`` beside ``description``,
  ``git commit``'s ``logs/HEAD`` beside ``index``, ``tar x``, a build's outputs). One
  edge stands for the burst; each file keeps its writer (``FileNode.writer``), so a later
  reader of one of them still leads back to the process. Why a subtree is as sound as
  one directory: what makes the dropped edge redundant is that the file has no edge of
  anyone else and keeps its writer, not where it lies; the directory only bounds which
  edge stands for the burst. A file a rule matched (``.ssh/authorized_keys``, a shell
  startup file, a unit file) or that carries a label is never merged, wherever it is.
* **Credential bursts**: a ``setuid``-family edge followed by another one with no
  edge of the process in between. No recorded action ran under the earlier ids;
  the last change and every change an action ran under stay. (No rule matches
  ``setuid`` edges.)
* **Exec chains**: an ``exec`` replaced by another ``exec`` of the same process
  with nothing in between (``env``, ``nice``, ``sh -c cmd``), when no rule matched
  the process. Its image ran no recorded action.
* **Failed opens**: a ``denied`` open of an unlabelled, unmatched file, once the
  process has moved on (or at the next collection), whoever used the file since.
  Nothing flows either way; a failed open of a credential store is labelled and stays.
* **Follow-ups of a write**: ``utime``, ``chmod``, ``chown`` or ``write`` right after
  the same process created, wrote or truncated the same file (and a ``read`` right
  after it loaded it as an image), with no other edge on the file in between: the
  creator setting its own file's metadata adds no source of information. A
  timestomp or ``chmod +x`` that a rule matched stays (the file is marked).
"""

from __future__ import annotations

from collections import OrderedDict

_NON_VIABLE_PREFIXES = (
    "/lib/",
    "/lib64/",
    "/usr/lib/",
    "/usr/lib64/",
    "/usr/libexec/",
    "/usr/share/locale/",
    "/usr/lib/locale/",
    "/usr/share/zoneinfo/",
    "/usr/share/i18n/",
    "/usr/share/terminfo/",
    "/usr/share/mime/",
    "/usr/share/fonts/",
    "/usr/share/X11/locale/",
    "/proc/",
    "/sys/",
    "/usr/local/lib/",
    "/var/cache/ldconfig/",
    "/usr/lib/python3",
    "/usr/share/zsh/",
)
_NON_VIABLE_FILES = frozenset(
    {
        "/etc/ld.so.cache",
        "/etc/localtime",
        "/etc/nsswitch.conf",
        "/etc/host.conf",
        "/etc/locale.alias",
        "/dev/null",
        "/dev/urandom",
        "/dev/random",
        "/dev/zero",
        "/dev/tty",
        "/dev/ptmx",
        "/etc/gai.conf",
        "/usr/share/locale/locale.alias",
    }
)
#: edge ops that only read their object
READ_OPS = frozenset({"read", "load", "exec_load"})
#: ops that may be skipped when repeated with no new information
SKIPPABLE = frozenset(
    {
        "read",
        "write",
        "connect",
        "accept",
        "send",
        "recv",
        "utime",
        "chown",
        "chmod",
        "denied",
        "truncate",
        "setuid",
        "ptrace",
    }
)


def is_non_viable(path: str, op: str) -> bool:
    """True when *op* on *path* can be pruned (read-only system data).

    >>> is_non_viable("/lib/x86_64-linux-gnu/libc.so.6", "read")
    True
    >>> is_non_viable("/lib/x86_64-linux-gnu/libc.so.6", "write")
    False
    >>> is_non_viable("/tmp/.x/payload", "read")
    False
    >>> is_non_viable("/proc/412/environ", "denied"), is_non_viable("/etc/shadow", "denied")
    (True, False)
    """
    if op == "denied":
        # a failed open of a kernel pseudo file (ps walking /proc/PID/environ) moves nothing
        return path.startswith(("/proc/", "/sys/"))
    if op not in READ_OPS:
        return False
    if path in _NON_VIABLE_FILES:
        return True
    if path.startswith(_NON_VIABLE_PREFIXES):
        return True
    return ".so" in path and (path.endswith(".so") or ".so." in path) and path.startswith("/")


class RedundancyFilter:
    """Remembers the last information state of each (src, op, dst) edge; bounded LRU.

    >>> f = RedundancyFilter()
    >>> f.is_redundant(("p1", "read", "f1"), 0), f.is_redundant(("p1", "read", "f1"), 0)
    (False, True)
    >>> f.is_redundant(("p1", "read", "f1"), 1)   # file has a new version
    False
    """

    def __init__(self, max_entries: int = 200_000):
        self.max_entries = max_entries
        self._seen: OrderedDict = OrderedDict()

    def is_redundant(self, key: tuple, state) -> bool:
        """True when *key* was seen with the same *state*; records *state* otherwise."""
        seen = self._seen
        old = seen.get(key, _MISSING)
        if old is not _MISSING and old == state:
            return True
        seen[key] = state
        if old is not _MISSING:
            seen.move_to_end(key)
        elif len(seen) > self.max_entries:
            seen.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._seen)


_MISSING = object()
