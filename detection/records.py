"""Parse single auditd text records (raw and ENRICHED formats).

One line of ``audit.log`` is one *record*::

    type=SYSCALL msg=audit(1795820577.532:25462): arch=c000003e syscall=59 ... key="exec"

In the ENRICHED format auditd appends a 0x1d (GS) byte and the fields it
resolved (``AUID="alice" SYSCALL=execve ...``). Values are either quoted
(literal), unquoted (numbers, flags) or *hex-encoded* when they contain spaces
or special characters (``proctitle``, ``EXECVE`` arguments, ``PATH`` names ...).

The parser never raises on input: a bad line yields a :class:`ParseError`
carrying a human-readable reason so the caller can dead-letter it.
Parsing uses ``str.split``/``str.partition`` rather than a regex per field:
that keeps a ~30-field SYSCALL record at a few microseconds.
"""

from __future__ import annotations

import socket
import struct
from operator import methodcaller

from .slots import Slotted

GS = "\x1d"

#: fields whose unquoted value is hex-encoded by auditd (``audit_log_untrustedstring``)
ENCODED_FIELDS = frozenset(
    {
        "proctitle",
        "name",
        "cwd",
        "comm",
        "exe",
        "cmd",
        "path",
        "key",
        "data",
        "acct",
        "new",
        "old",
        "ocomm",
        "watch",
        "dir",
        "root_dir",
        "cgroup",
        "vm",
    }
)
_HEX = frozenset("0123456789ABCDEFabcdef")
_SPECIAL = frozenset({"(null)", "(none)", "?"})
_STRICT_HEX = frozenset({"proctitle", "name", "cwd", "exe"})

try:  # built by the install from _fastparse.c (setup.py); absent without a C compiler
    from ._fastparse import configure as _configure_native
    from ._fastparse import parse as _native_parse
except ImportError:  # pragma: no cover - every line then takes the Python parser below
    _native_parse = None
else:  # the C parser decodes the fields these sets name, as _decode_values does
    _configure_native(ENCODED_FIELDS, _STRICT_HEX, _SPECIAL)


class Record(Slotted):
    """One parsed audit record.

    Attributes
    ----------
    rtype : str
        Record type, e.g. ``"SYSCALL"``.
    ts : float
        Event time (epoch seconds) from ``msg=audit(TS:SERIAL)``.
    serial : int
        Event serial; records of one event share it.
    fields : dict
        Raw fields with quotes removed and hex values decoded.
    enriched : dict
        Upper-case fields after the 0x1d separator (empty for raw logs).
    """

    __slots__ = ("rtype", "ts", "serial", "fields", "enriched")

    def __init__(self, rtype: str, ts: float, serial: int, fields: dict, enriched: dict):
        self.rtype = rtype
        self.ts = ts
        self.serial = serial
        self.fields = fields
        self.enriched = enriched

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Record({self.rtype}, {self.ts}:{self.serial}, {self.fields!r})"


class ParseError:
    """A line that could not be parsed, with the reason (for the dead-letter topic)."""

    __slots__ = ("line", "reason")

    def __init__(self, line, reason: str):
        self.line = line
        self.reason = reason

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"ParseError({self.reason!r})"


def decode_hex(value: str) -> str | None:
    """Decode an auditd hex string; ``None`` when *value* is not valid hex.

    >>> decode_hex("2F62696E2F7368")
    '/bin/sh'
    >>> decode_hex("xyz") is None
    True
    """
    if len(value) % 2 or not value:
        return None
    try:
        return bytes.fromhex(value).decode("utf-8", "replace")
    except ValueError:
        return None


def decode_value(key: str, value: str) -> str:
    """Return the literal text of one field value (quotes removed, hex decoded)."""
    if value[:1] == '"':
        return value[1:-1] if value[-1:] == '"' and len(value) > 1 else value[1:]
    if value in _SPECIAL:
        return value
    if key in ENCODED_FIELDS or (key[:1] == "a" and key[1:2].isdigit()):
        dec = decode_hex(value)
        if dec is not None:
            return dec
    return value


def decode_sockaddr(hexstr: str) -> dict:
    """Decode a ``SOCKADDR`` ``saddr`` hex blob into family, address and port.

    >>> decode_sockaddr("020091047F0000010000000000000000")
    {'family': 'inet', 'addr': '127.0.0.1', 'port': 37124}
    >>> decode_sockaddr("01002F746D702F736F636B00")
    {'family': 'unix', 'path': '/tmp/sock'}
    """
    try:
        raw = bytes.fromhex(hexstr)
    except ValueError:
        return {"family": "invalid"}
    if len(raw) < 2:
        return {"family": "invalid"}
    fam = raw[0] | (raw[1] << 8)
    if fam == 2 and len(raw) >= 8:
        return {
            "family": "inet",
            "addr": socket.inet_ntop(socket.AF_INET, raw[4:8]),
            "port": struct.unpack(">H", raw[2:4])[0],
        }
    if fam == 10 and len(raw) >= 24:
        return {
            "family": "inet6",
            "addr": socket.inet_ntop(socket.AF_INET6, raw[8:24]),
            "port": struct.unpack(">H", raw[2:4])[0],
        }
    if fam == 1:
        body = raw[2:]
        if body[:1] == b"\x00":  # abstract namespace socket
            path = "@" + body[1:].split(b"\x00", 1)[0].decode("utf-8", "replace")
        else:
            path = body.split(b"\x00", 1)[0].decode("utf-8", "replace")
        return {"family": "unix", "path": path}
    if fam == 16:
        return {"family": "netlink"}
    return {"family": f"af{fam}"}


def _tokenize_slow(body: str) -> list[str] | str:
    """Split *body* on spaces outside quotes; returns an error string on bad quoting."""
    out: list[str] = []
    i, n = 0, len(body)
    while i < n:
        while i < n and body[i] == " ":
            i += 1
        if i >= n:
            break
        start = i
        eq = body.find("=", i)
        sp = body.find(" ", i)
        if eq != -1 and (sp == -1 or eq < sp) and eq + 1 < n and body[eq + 1] in "'\"":
            q = body[eq + 1]
            end = body.find(q, eq + 2)
            if end == -1:
                return f"unterminated {q}-quoted value for field {body[start:eq]!r}"
            i = end + 1
        else:
            i = sp if sp != -1 else n
        out.append(body[start:i])
    return out


_split_kv = methodcaller("split", "=", 1)


def _parse_fields(body: str, fields: dict, execve: bool = False,
                  nested: bool = False) -> str | None:
    """Fill *fields* from ``k=v`` tokens; return an error reason or ``None``.

    The reference parser: one Python step per field. :func:`_fields` gives the same
    result with the per-field work done in C and falls back here for every body it
    does not handle (single quotes, EXECVE arguments) and for every error, so the
    reason and which error comes first are this function's. Bodies without single
    quotes split on whitespace into a dict in C (``dict(map(split))``); only bodies
    with single quotes or a token without ``=`` (a quoted value holding spaces) take
    the quote-aware tokenizer.
    """
    quoted = "'" in body
    toks = _tokenize_slow(body) if quoted else body.split()
    if isinstance(toks, str):
        return toks
    try:
        raw = dict(map(_split_kv, toks))
    except ValueError:
        if not quoted:  # a token without '=': split again, quote-aware
            toks = _tokenize_slow(body)
            if isinstance(toks, str):
                return toks
        if nested:  # user-space payloads: ``op=adding group acct=...`` (useradd)
            toks = _join_bare_words(toks)
        for tok in toks:
            if "=" not in tok:
                return f"truncated or garbled field {tok[:40]!r} (expected key=value)"
        raw = dict(map(_split_kv, toks))
    if "" in raw:
        return "field without a name (a token starting with '=')"
    return _decode_values(raw, fields, execve)


def _join_bare_words(toks: list[str]) -> list[str]:
    """Words without ``=`` after a ``key=value`` token, joined to its value: user-space
    programs write some values unquoted with spaces inside ``msg='...'`` (shadow-utils'
    ``op=adding group``, ``op=adding home directory``), and auditd keeps them as written.

    >>> _join_bare_words(["op=adding", "group", "acct=x", "res=success"])
    ['op=adding group', 'acct=x', 'res=success']
    >>> _join_bare_words(["garbled", "a=1"])  # nothing before it: left as it is
    ['garbled', 'a=1']
    """
    out: list[str] = []
    for tok in toks:
        if "=" not in tok and out and "=" in out[-1] and out[-1][-1:] not in "\"'":
            out[-1] = f"{out[-1]} {tok}"
        else:
            out.append(tok)
    return out


def _is_argument(key: str) -> bool:
    """An ``EXECVE`` argument field (``a0``, ``a1[2]``; not ``argc`` nor ``a1_len``): its
    unquoted value is hex.

    >>> [k for k in ("a0", "a12[3]", "argc", "a1_len", "acct") if _is_argument(k)]
    ['a0', 'a12[3]']
    """
    return key[1:2].isdigit() and key[0] == "a" and "_" not in key


def _decode_values(raw: dict, fields: dict, execve: bool) -> str | None:
    """Unquote and hex-decode the values of *raw* into *fields*, one field at a time;
    return the first error reason or ``None``."""
    for key, val in raw.items():
        first = val[:1]
        if first == '"':
            if len(val) < 2 or val[-1] != '"':
                return f"unterminated quoted value for field {key!r}"
            val = val[1:-1]
        elif first == "'":
            # user-space records nest their payload in msg='...': flatten it like ausearch
            inner = val[1:-1] if val.endswith("'") and len(val) > 1 else val[1:]
            err = _parse_fields(inner, fields, nested=True)
            if err:
                return f"in msg='...': {err}"
            continue
        elif key in ENCODED_FIELDS or (execve and _is_argument(key)):
            if val and val not in _SPECIAL:
                if len(val) % 2 == 0 and _HEX.issuperset(val):
                    val = bytes.fromhex(val).decode("utf-8", "replace")
                elif key in _STRICT_HEX:
                    return f"field {key!r}: value is neither quoted nor valid hex ({val[:40]!r})"
        fields[key] = val
    return None


def _fields(body: str, execve: bool) -> dict | str:
    """The fields of *body* as :func:`_parse_fields` gives them, or its error reason.

    Common bodies (no single quote, not EXECVE) are split into a dict in C; the values
    that need work are found without a per-field Python step: the hex-encoded fields by
    intersecting the keys with :data:`ENCODED_FIELDS`, the quoted ones by splitting the
    body at each ``="``. Short bodies and those with a repeated key take the reference
    per-field step on the same dict; any anomaly (a token without ``=``, a bad quote, bad
    hex) hands the body to :func:`_parse_fields`, which then reports exactly the error it
    always did.
    """
    if execve or "'" in body:
        return _exact_fields(body, execve)
    toks = body.split()
    try:
        raw = dict(map(_split_kv, toks))
    except ValueError:
        return _exact_fields(body, execve)
    return _split_values(body, toks, raw, execve)


def _split_values(body: str, toks: list[str], raw: dict, execve: bool) -> dict | str:
    """The rest of :func:`_fields` once *body* (no single quote) is split into its
    whitespace-separated tokens *toks*, each with an ``=``, and *raw* maps them."""
    if "" in raw:
        return "field without a name (a token starting with '=')"
    if len(toks) < 8 or len(raw) != len(toks):  # short, or a repeated key
        fields: dict = {}
        return _decode_values(raw, fields, execve) or fields
    for key in ENCODED_FIELDS.intersection(raw):
        val = raw[key]
        if val and val[0] != '"' and val not in _SPECIAL:
            if len(val) % 2 == 0 and _HEX.issuperset(val):
                raw[key] = bytes.fromhex(val).decode("utf-8", "replace")
            elif key in _STRICT_HEX:
                return _exact_fields(body, execve)
    if '"' in body:
        # A quoted value's key runs from the space before a '="' to it: each such key
        # starts a token, and keys are unique here, so each value is unquoted once.
        for piece in (" " + body).split('="')[:-1]:
            _, space, key = piece.rpartition(" ")
            val = raw.get(key) if space else None
            if val is None or val[:1] != '"' or len(val) < 2 or val[-1] != '"':
                return _exact_fields(body, execve)
            raw[key] = val[1:-1]
    return raw


def _exact_fields(body: str, execve: bool) -> dict | str:
    fields: dict = {}
    return _parse_fields(body, fields, execve) or fields


#: bodies whose fields :func:`parse_line` remembers (process-wide, emptied when full).
#: The same bodies come back all the time (a ``CWD``, a ``PROCTITLE``, the ``PATH`` item
#: of a library or configuration file, a repeated call of one process): on the dev corpus
#: and the benign days about 60 % of the records repeat a body among the last 1,024.
#: Only bodies that parsed are kept, so a bad body is reported as it always was.
FIELDS_MEMO_SIZE = 2048
_FIELDS_MEMO: dict[str, dict] = {}


#: record type -> where its body splits into a part that changes from record to record
#: and a tail that repeats (a ``SYSCALL``'s process identity from ``ppid=`` on, a
#: ``PATH``'s file attributes from ``dev=`` on): :func:`_split_fields` remembers the
#: tails' fields, as many as :data:`FIELDS_MEMO_SIZE` (emptied when full).
_BODY_CUTS = {"SYSCALL": " ppid=", "PATH": " dev="}
_TAIL_MEMO: dict[str, dict] = {}
#: the last ``msg=audit(...)`` header that parsed, with its time stamp and serial
_LAST_STAMP: tuple[str | None, float, int] = (None, 0.0, 0)


def _split_fields(body: str, cut: int) -> dict | None:
    """The fields of *body* as :func:`_fields` gives them, from its part before *cut*
    (a space) and the remembered fields of the tail after it; ``None`` when that is not
    certain to be the same, and for every body that does not parse.

    Without a single quote in the body and with an ``=`` in every whitespace-separated
    token, :func:`_fields` maps each token to its field on its own (unquoting, hex
    decoding, the errors), so the head's fields updated with the tail's are the body's,
    in the body's order (a key in both keeps its first place and takes the last value,
    as a repeated key does in one body). Anything else is left to :func:`_fields`.

    >>> body = ' arch=c000003e syscall=2 ppid=1 pid=2 comm="sh" exe="/bin/sh"'
    >>> _split_fields(body, body.find(" ppid=")) == _fields(body, False)
    True
    >>> _split_fields(' a=1 name="x ppid=2" pid=3', 13) is None  # a quoted space at the cut
    True
    """
    if cut <= 0 or "'" in body:
        return None
    tail = body[cut + 1:]
    tf = _TAIL_MEMO.get(tail)
    if tf is None:
        tf = _token_fields(tail)
        if tf is None:
            return None
        if len(_TAIL_MEMO) >= FIELDS_MEMO_SIZE:
            _TAIL_MEMO.clear()
        _TAIL_MEMO[tail] = tf
    fields = _token_fields(body[:cut])
    if fields is None:
        return None
    fields.update(tf)
    return fields


def _token_fields(text: str) -> dict | None:
    """:func:`_fields` of a part of a body whose every token has an ``=`` (each token is
    then a field on its own); ``None`` for any other part, and for one that does not parse."""
    toks = text.split()
    try:
        raw = dict(map(_split_kv, toks))  # one token without '=' raises: the check and the split
    except ValueError:
        return None
    fields = (_exact_fields(text, False) if "'" in text
              else _split_values(text, toks, raw, False))
    return fields if fields.__class__ is dict else None


def parse_line(line: str | bytes) -> Record | ParseError:
    """Parse one audit line into a :class:`Record`, or a :class:`ParseError`.

    >>> r = parse_line('type=CWD msg=audit(1700000000.123:42): cwd="/tmp"')
    >>> r.rtype, r.serial, r.fields["cwd"]
    ('CWD', 42, '/tmp')
    >>> parse_line("type=SYSCALL msg=audit(17000").reason
    "unterminated header: no '):' after msg=audit("

    The common line (printable ASCII, no single quote, no enrichment, well formed) is
    parsed in C (``detection/_fastparse.c``), which hands every other line to the Python
    steps below; both give the same records.
    """
    if _native_parse is not None:
        rec = _native_parse(line, Record)  # None for anything but a common str or bytes line
        if rec is not None:
            return rec
    orig = line
    if isinstance(line, (bytes, bytearray)):
        try:
            line = bytes(line).decode("utf-8")
        except UnicodeDecodeError as exc:
            return ParseError(orig, f"not valid UTF-8 at byte {exc.start}")
    if line[-1:] in ("\n", "\r"):
        line = line.rstrip("\r\n")
    if not line or line.isspace():
        return ParseError(orig, "empty line")
    if "\x00" in line:
        return ParseError(orig, "NUL byte inside a record line (corrupted log)")
    if not line.startswith("type="):
        return ParseError(orig, "missing 'type=' prefix: not an auditd record")
    sp = line.find(" ", 5)
    if sp == -1:
        return ParseError(orig, "truncated after record type (no msg=audit(...) header)")
    rtype = line[5:sp]
    if not line.startswith(" msg=audit(", sp):
        return ParseError(orig, f"record {rtype}: missing 'msg=audit(' header")
    close = line.find("):", sp + 11)
    if close == -1:
        return ParseError(orig, "unterminated header: no '):' after msg=audit(")
    global _LAST_STAMP
    stamp = line[sp + 11 : close]
    last = _LAST_STAMP
    if stamp == last[0]:  # the records of one event share their header
        ts, serial = last[1], last[2]
    else:
        when, colon, serial_s = stamp.partition(":")
        try:
            ts = float(when)
            serial = int(serial_s)
        except ValueError:
            return ParseError(orig, f"bad timestamp/serial {stamp!r} in msg=audit(...)")
        if not colon or serial < 0 or ts != ts:
            return ParseError(orig, f"bad timestamp/serial {stamp!r} in msg=audit(...)")
        _LAST_STAMP = (stamp, ts, serial)
    body = line[close + 2 :]
    enriched: dict = {}
    gs = body.find(GS)
    if gs != -1:
        extra = body[gs + 1 :]
        body = body[:gs]
        for tok in extra.split():
            k, eq, v = tok.partition("=")
            if eq:
                enriched[k] = v[1:-1] if v[:1] == '"' and v[-1:] == '"' and len(v) > 1 else v
    if rtype == "EXECVE":
        fields = _fields(body, True)
    else:
        fields = _FIELDS_MEMO.get(body)
        if fields is not None:
            fields = fields.copy()  # each record its own dict, as if parsed
        else:
            cut = _BODY_CUTS.get(rtype)
            fields = _split_fields(body, body.find(cut)) if cut is not None else None
            if fields is None:
                fields = _fields(body, False)
            if fields.__class__ is dict:
                if len(_FIELDS_MEMO) >= FIELDS_MEMO_SIZE:
                    _FIELDS_MEMO.clear()
                _FIELDS_MEMO[body] = fields.copy()
    if fields.__class__ is str:
        return ParseError(orig, f"record {rtype}: {fields}")
    if rtype == "SYSCALL":
        pid = fields.get("pid")
        if pid is None or "syscall" not in fields:
            return ParseError(orig, "record SYSCALL: missing 'pid' or 'syscall' (truncated line?)")
        if not pid.isdigit():
            return ParseError(orig, f"record SYSCALL: pid {pid[:20]!r} is not a number")
    return Record(rtype, ts, serial, fields, enriched)
