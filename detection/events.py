"""Normalised audit events: one object per ``audit(TS:SERIAL)`` group.

Both the text reader (:mod:`detection.coalesce`) and the LAUREL reader
(:mod:`detection.laurel`) produce :class:`AuditEvent`, so the provenance graph
sees one shape whatever the source format.
"""

from __future__ import annotations

from .records import Record, decode_sockaddr
from .slots import Slotted

try:  # built with the audit parser's C part (setup.py)
    from ._fastparse import syscall_values as _syscall_values
except ImportError:  # pragma: no cover - the Python fold below then takes every record
    _syscall_values = None

#: x86_64 syscall numbers of the calls the graph understands (the ENRICHED
#: ``SYSCALL=`` field or LAUREL's name wins when present)
SYSCALLS_X86_64 = {
    0: "read",
    1: "write",
    2: "open",
    9: "mmap",
    17: "pread64",
    40: "sendfile",
    41: "socket",
    42: "connect",
    43: "accept",
    44: "sendto",
    45: "recvfrom",
    46: "sendmsg",
    47: "recvmsg",
    49: "bind",
    50: "listen",
    56: "clone",
    57: "fork",
    58: "vfork",
    59: "execve",
    62: "kill",
    76: "truncate",
    77: "ftruncate",
    82: "rename",
    83: "mkdir",
    84: "rmdir",
    85: "creat",
    86: "link",
    87: "unlink",
    88: "symlink",
    90: "chmod",
    91: "fchmod",
    92: "chown",
    93: "fchown",
    94: "lchown",
    101: "ptrace",
    105: "setuid",
    106: "setgid",
    113: "setreuid",
    114: "setregid",
    117: "setresuid",
    119: "setresgid",
    122: "setfsuid",
    123: "setfsgid",
    132: "utime",
    133: "mknod",
    164: "settimeofday",
    165: "mount",
    166: "umount2",
    170: "sethostname",
    171: "setdomainname",
    175: "init_module",
    176: "delete_module",
    188: "setxattr",
    189: "lsetxattr",
    190: "fsetxattr",
    197: "removexattr",
    198: "lremovexattr",
    199: "fremovexattr",
    227: "clock_settime",
    235: "utimes",
    246: "kexec_load",
    257: "openat",
    258: "mkdirat",
    259: "mknodat",
    260: "fchownat",
    261: "futimesat",
    263: "unlinkat",
    264: "renameat",
    265: "linkat",
    266: "symlinkat",
    268: "fchmodat",
    280: "utimensat",
    288: "accept4",
    310: "process_vm_readv",
    311: "process_vm_writev",
    313: "finit_module",
    316: "renameat2",
    319: "memfd_create",
    320: "kexec_file_load",
    322: "execveat",
    435: "clone3",
    437: "openat2",
    452: "fchmodat2",
}
_ARCH_X86_64 = "c000003e"
UNSET = 4294967295


def _int(v, default=None):
    if v is None:
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        try:
            return int(v, 16)
        except (TypeError, ValueError):
            return default


def _hexint(v) -> int:
    if v.__class__ is str:  # a parsed field (a0..a3): what the general case gives it
        try:
            return int(v, 16)
        except ValueError:
            return 0
    if isinstance(v, int):
        return v
    try:
        return int(str(v), 16)
    except (TypeError, ValueError):
        return 0


class AuditEvent(Slotted):
    """One audit event (all records of one serial), normalised.

    Attributes of interest: ``syscall`` (name, ``""`` for non-syscall events),
    ``success``, ``exit``, ``pid``/``ppid``, ``uid``/``euid``/``auid``/``ses``,
    ``comm``, ``exe``, ``key``, ``args`` (a0..a3 as ints), ``cwd``, ``argv``
    (from EXECVE, else PROCTITLE), ``paths`` (PATH items as dicts), ``sockaddr``
    (decoded dict or ``None``), ``types`` (record types seen) and ``other``
    (fields of the first non-syscall record, e.g. LOGIN).
    """

    __slots__ = (
        "serial",
        "ts",
        "syscall",
        "success",
        "exit",
        "pid",
        "ppid",
        "uid",
        "euid",
        "auid",
        "ses",
        "comm",
        "exe",
        "key",
        "args",
        "cwd",
        "argv",
        "execve",
        "paths",
        "sockaddr",
        "types",
        "other",
        "nrecords",
    )

    def __init__(self, serial: int, ts: float):
        self.serial = serial
        self.ts = ts
        self.syscall = ""
        self.success = True
        self.exit = None
        self.pid = None
        self.ppid = None
        self.uid = self.euid = self.auid = self.ses = None
        self.comm = self.exe = self.key = None
        self.args = (0, 0, 0, 0)
        self.cwd = None
        self.argv: list[str] = []
        self.execve = False
        self.paths: list[dict] = []
        self.sockaddr = None
        self.types: list[str] = []
        self.other: dict = {}
        self.nrecords = 0

    @property
    def kind(self) -> str:
        """``"syscall"`` or the type of the first record (``LOGIN``, ``USER_CMD`` ...)."""
        return "syscall" if self.syscall else (self.types[0] if self.types else "")

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"AuditEvent({self.ts}:{self.serial} {self.kind} pid={self.pid} exe={self.exe})"


def _execve_argv(fields: dict) -> list[str]:
    argc = _int(fields.get("argc"), 0) or 0
    out: list[str] = []
    for i in range(argc):
        k = f"a{i}"
        if k in fields:
            out.append(fields[k])
            continue
        if f"a{i}_len" in fields:  # long argument split over a{i}[0], a{i}[1], ...
            parts, j = [], 0
            while f"a{i}[{j}]" in fields:
                parts.append(fields[f"a{i}[{j}]"])
                j += 1
            out.append("".join(parts))
            continue
        break  # remaining args are in a later EXECVE record or were lost
    return out


def _fold_syscall(ev: AuditEvent, rec: Record, f: dict) -> None:
    """A SYSCALL record's fields into *ev* (``syscall_values`` does it in C for str fields)."""
    name = rec.enriched.get("SYSCALL")
    nr = _int(f.get("syscall"), -1)
    if not name:
        arch = f.get("arch", _ARCH_X86_64)
        name = (
            SYSCALLS_X86_64.get(nr, f"syscall_{nr}")
            if arch == _ARCH_X86_64
            else f"syscall_{nr}"
        )
    ev.syscall = name
    ev.success = f.get("success", "yes") == "yes"
    ev.exit = _int(f.get("exit"))
    ev.pid = _int(f.get("pid"))
    ev.ppid = _int(f.get("ppid"))
    ev.uid = _int(f.get("uid"))
    ev.euid = _int(f.get("euid"))
    ev.auid = _int(f.get("auid"))
    ev.ses = _int(f.get("ses"))
    ev.comm = f.get("comm")
    ev.exe = f.get("exe")
    key = f.get("key")
    ev.key = None if key in (None, "(null)") else key
    ev.args = (
        _hexint(f.get("a0", 0)),
        _hexint(f.get("a1", 0)),
        _hexint(f.get("a2", 0)),
        _hexint(f.get("a3", 0)),
    )


def event_from_records(records: list[Record]) -> AuditEvent:
    """Fold the records of one serial into an :class:`AuditEvent`."""
    r0 = records[0]
    ev = AuditEvent(r0.serial, r0.ts)
    ev.nrecords = len(records)
    execve_fields: dict = {}
    proctitle = None
    for rec in records:
        t = rec.rtype
        f = rec.fields
        ev.types.append(t)
        if t == "SYSCALL":
            got = None if rec.enriched or _syscall_values is None else _syscall_values(
                f, SYSCALLS_X86_64)
            if got is None:
                _fold_syscall(ev, rec, f)
            else:  # the same values, taken in C (detection/_fastparse.c)
                (ev.syscall, ev.success, ev.exit, ev.pid, ev.ppid, ev.uid, ev.euid, ev.auid,
                 ev.ses, ev.comm, ev.exe, ev.key, ev.args) = got
        elif t == "EXECVE":
            ev.execve = True
            execve_fields.update(f)
        elif t == "PATH":
            ev.paths.append(f)
        elif t == "CWD":
            ev.cwd = f.get("cwd")
        elif t == "SOCKADDR":
            sa = f.get("saddr")
            if sa:
                ev.sockaddr = decode_sockaddr(sa)
        elif t == "PROCTITLE":
            proctitle = f.get("proctitle")
        elif not ev.other and t not in ("EOE", "BPRM_FCAPS"):
            ev.other = f
            if ev.pid is None:
                ev.pid = _int(f.get("pid"))
                ev.uid = _int(f.get("uid"))
                ev.auid = _int(f.get("auid"))
                ev.ses = _int(f.get("ses"))
    if execve_fields:
        ev.argv = _execve_argv(execve_fields)
    elif proctitle:
        # proctitle joins argv with NUL (decoded as \x00) and is capped at 128 bytes
        ev.argv = proctitle.split("\x00")
    return ev
