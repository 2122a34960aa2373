"""Information-flow labels and their transfer policy (the paper's *tag transfer*).

Labels are bits on graph nodes, so transfer is an ``|=`` on the hot path:

* ``UNTRUSTED`` (integrity): data or control that came from an untrusted network
  endpoint, a downloaded file or an injected command.
* ``SENSITIVE`` (confidentiality): holds credential material (``/etc/shadow`` ...).
* ``DOWNLOADED`` (files only): written by a process that received network data
  from an untrusted endpoint (package managers and VCS excluded: they are the
  host's trusted installers).
* ``NET_IN`` (processes only, not inherited): talked to an untrusted endpoint.
* ``SERVICE`` (processes): runs on behalf of a network-facing service (a web app
  spawning ``sh``); inherited by descendants.

Transfer follows the direction of information flow: object → process on
read/exec/connect, process → object on write, parent → child on fork.
"""

from __future__ import annotations

import re

from .prefilter import gated_search

UNTRUSTED = 1
SENSITIVE = 2
DOWNLOADED = 4
NET_IN = 8
SERVICE = 16

LABEL_NAMES = {
    UNTRUSTED: "untrusted",
    SENSITIVE: "sensitive",
    DOWNLOADED: "downloaded",
    NET_IN: "net_in",
    SERVICE: "service",
}
NAME_TO_LABEL = {v: k for k, v in LABEL_NAMES.items()}

#: what a child inherits from its parent at fork
FORK_MASK = UNTRUSTED | SENSITIVE | SERVICE
#: what flows from a file into the process reading or executing it
READ_MASK = UNTRUSTED | SENSITIVE
#: what flows from a process into the file it writes
WRITE_MASK = UNTRUSTED | SENSITIVE


def label_names(bits: int) -> list[str]:
    """Names of the set label bits.

    >>> label_names(UNTRUSTED | SENSITIVE)
    ['untrusted', 'sensitive']
    """
    return [name for bit, name in LABEL_NAMES.items() if bits & bit]


def on_read(proc_labels: int, file_labels: int, reader_is_auth: bool = False) -> int:
    """Labels of a process after it reads or executes a file."""
    if reader_is_auth:
        # sshd/sudo/PAM read shadow by design: their children must not all become "sensitive"
        return proc_labels | (file_labels & UNTRUSTED)
    gained = file_labels & READ_MASK
    if file_labels & DOWNLOADED:
        gained |= UNTRUSTED
    return proc_labels | gained


def on_write(file_labels: int, proc_labels: int, trusted_installer: bool = False) -> int:
    """Labels of a file after a process writes it."""
    out = file_labels | (proc_labels & WRITE_MASK)
    if proc_labels & NET_IN and not trusted_installer:
        out |= DOWNLOADED | UNTRUSTED
    return out


def on_fork(parent_labels: int) -> int:
    """Labels a child inherits."""
    return parent_labels & FORK_MASK


_SENSITIVE_RE = re.compile(
    r"^/etc/(g?shadow|master\.passwd|security/opasswd|sudoers)(-|$)"
    r"|/\.ssh/id_[a-z0-9]+$|/\.aws/credentials$|/\.docker/config\.json$|\.kdbx$"
)


#: the search of :data:`_SENSITIVE_RE`, tried only on a path that holds one of the literals
#: every match needs (:mod:`detection.prefilter`): it runs for every new file node, and
#: almost no path holds one
_sensitive = gated_search(_SENSITIVE_RE)


def initial_file_labels(path: str) -> int:
    """Initial labels of a file from its path (credential stores are SENSITIVE).

    >>> initial_file_labels("/etc/shadow") == SENSITIVE
    True
    >>> initial_file_labels("/home/a/notes.md")
    0
    """
    return SENSITIVE if _sensitive(path) else 0
