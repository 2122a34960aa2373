"""Read LAUREL JSON lines (one already-coalesced audit event per line).

LAUREL (threathunters-io/laurel) writes ``{"ID": "TS:SERIAL", "SYSCALL": {...},
"EXECVE": {"ARGV": [...]}, "CWD": {...}, "PATH": [...], "SOCKADDR": [...],
"PROCTITLE": {"ARGV": [...]}, ...}``. Non-printable bytes in strings are
percent-encoded; numbers are JSON numbers or ``"0x..."``/``"0o..."`` strings;
SOCKADDR entries are already decoded objects (``{"family": "inet", "addr":
..., "port": ...}``) or raw hex. This module maps that onto
:class:`~detection.events.AuditEvent`, the shape the graph consumes.
"""

from __future__ import annotations

import json
from urllib.parse import unquote

from .events import SYSCALLS_X86_64, AuditEvent
from .records import ParseError, decode_sockaddr

_KNOWN = frozenset(
    {
        "ID",
        "NODE",
        "SYSCALL",
        "EXECVE",
        "CWD",
        "PATH",
        "PROCTITLE",
        "SOCKADDR",
        "PARENT_INFO",
        "PPID",
        "EOE",
        "BPRM_FCAPS",
        "ENV",
        "CONTAINER_INFO",
    }
)


def _num(v):
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        s = v.strip()
        try:
            if s.startswith(("0x", "0X")):
                return int(s, 16)
            if s.startswith(("0o", "0O")):
                return int(s, 8)
            return int(s)
        except ValueError:
            return None
    return None


def _s(v) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        return str(v)
    return unquote(v) if "%" in v else v


def _sockaddr(entry) -> dict | None:
    sa = entry.get("saddr", entry) if isinstance(entry, dict) else entry
    if isinstance(sa, str):
        return decode_sockaddr(sa)
    if not isinstance(sa, dict):
        return None
    fam = str(sa.get("family", "")).lower()
    if fam in ("inet", "af_inet", "2"):
        return {
            "family": "inet",
            "addr": sa.get("addr") or sa.get("ip"),
            "port": _num(sa.get("port")),
        }
    if fam in ("inet6", "af_inet6", "10"):
        return {
            "family": "inet6",
            "addr": sa.get("addr") or sa.get("ip"),
            "port": _num(sa.get("port")),
        }
    if fam in ("local", "unix", "af_unix", "1"):
        return {"family": "unix", "path": _s(sa.get("path", ""))}
    return {"family": fam or "unknown"}


def parse_laurel(line: str | bytes) -> AuditEvent | ParseError:
    """Parse one LAUREL JSON line into an :class:`AuditEvent`, or a :class:`ParseError`.

    >>> ev = parse_laurel('{"ID":"1700000000.5:9","SYSCALL":{"syscall":"execve","pid":42,'
    ...                   '"ppid":1,"success":"yes","exe":"/usr/bin/id"},"EXECVE":{"ARGV":["id"]}}')
    >>> ev.serial, ev.syscall, ev.pid, ev.argv
    (9, 'execve', 42, ['id'])
    """
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return ParseError(line, f"LAUREL line is not valid JSON: {exc}")
    if not isinstance(doc, dict):
        return ParseError(line, "LAUREL line is not a JSON object")
    ident = doc.get("ID")
    if not isinstance(ident, str) or ":" not in ident:
        return ParseError(line, "LAUREL event without an 'ID' of the form 'TS:SERIAL'")
    ts_s, _, serial_s = ident.partition(":")
    try:
        ev = AuditEvent(int(serial_s), float(ts_s))
    except ValueError:
        return ParseError(line, f"LAUREL 'ID' {ident[:40]!r} is not 'TS:SERIAL'")
    try:
        _fill(ev, doc)
    except (TypeError, AttributeError, ValueError) as exc:
        return ParseError(line, f"LAUREL event {ident}: unexpected structure ({exc})")
    return ev


def _fill(ev: AuditEvent, doc: dict) -> None:
    sc = doc.get("SYSCALL")
    for key in doc:
        if key.isupper() and key not in ("ID", "NODE"):
            ev.types.append(key)
    if isinstance(sc, dict):
        name = sc.get("SYSCALL") or sc.get("syscall")
        if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
            name = SYSCALLS_X86_64.get(int(name), f"syscall_{name}")
        ev.syscall = str(name or "")
        succ = sc.get("success", "yes")
        ev.success = succ in ("yes", True, 1)
        ev.exit = _num(sc.get("exit"))
        ev.pid = _num(sc.get("pid"))
        ev.ppid = _num(sc.get("ppid"))
        if ev.ppid is None and isinstance(sc.get("PPID"), dict):
            ev.ppid = _num(sc["PPID"].get("pid"))
        ev.uid, ev.euid = _num(sc.get("uid")), _num(sc.get("euid"))
        ev.auid, ev.ses = _num(sc.get("auid")), _num(sc.get("ses"))
        ev.comm, ev.exe = _s(sc.get("comm")), _s(sc.get("exe"))
        key = sc.get("key")
        ev.key = _s(key) if key not in (None, "(null)") else None
        argv = sc.get("ARGV")
        if isinstance(argv, list):
            ev.args = tuple((_num(a) or 0) for a in (argv + [0, 0, 0, 0])[:4])
        else:
            ev.args = tuple((_num(sc.get(f"a{i}")) or 0) for i in range(4))
    ex = doc.get("EXECVE")
    if isinstance(ex, dict):
        ev.execve = True
        argv = ex.get("ARGV")
        if isinstance(argv, list):
            ev.argv = [_s(a) or "" for a in argv]
    if not ev.argv:
        pt = doc.get("PROCTITLE")
        if isinstance(pt, dict) and isinstance(pt.get("ARGV"), list):
            ev.argv = [_s(a) or "" for a in pt["ARGV"]]
    cwd = doc.get("CWD")
    if isinstance(cwd, dict):
        ev.cwd = _s(cwd.get("cwd"))
    for p in doc.get("PATH") or ():
        if isinstance(p, dict):
            item = {k: (_s(v) if isinstance(v, str) else v) for k, v in p.items()}
            for k in ("inode", "mode", "dev"):
                if k in item and item[k] is not None and not isinstance(item[k], str):
                    item[k] = str(item[k])
            ev.paths.append(item)
    for s in doc.get("SOCKADDR") or ():
        sa = _sockaddr(s)
        if sa:
            ev.sockaddr = sa
            break
    for key, val in doc.items():
        if key.isupper() and key not in _KNOWN:
            rec = val[0] if isinstance(val, list) and val else val
            if isinstance(rec, dict):
                ev.other = {k: _s(v) if isinstance(v, str) else str(v) for k, v in rec.items()}
                if ev.pid is None:
                    ev.pid = _num(rec.get("pid"))
                    ev.uid, ev.auid = _num(rec.get("uid")), _num(rec.get("auid"))
                    ev.ses = _num(rec.get("ses"))
            break
    ev.nrecords = max(1, len(ev.types))
