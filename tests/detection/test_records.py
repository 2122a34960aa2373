"""Parser paths: raw, enriched, hex, quoted/unquoted, split args, sockaddr, errors."""

from __future__ import annotations

import itertools
import lzma
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from detection import records
from detection.coalesce import Coalescer
from detection.events import event_from_records
from detection.records import ParseError, Record, decode_sockaddr, parse_line

from .conftest import BENIGN_DIR

RAW = (
    "type=SYSCALL msg=audit(1795820577.532:25462): arch=c000003e syscall=59 success=yes "
    "exit=0 a0=7fc3328dc790 a1=7fc3324a50f0 a2=7ffd1f61e4e8 a3=8 items=2 ppid=23641 "
    "pid=23720 auid=4294967295 uid=33 gid=33 euid=33 suid=33 fsuid=33 egid=33 sgid=33 "
    'fsgid=33 tty=(none) ses=4294967295 comm="sh" exe="/usr/bin/dash" key="www_exec"'
)


def test_raw_syscall_fields():
    r = parse_line(RAW)
    assert isinstance(r, Record)
    assert (r.rtype, r.ts, r.serial) == ("SYSCALL", 1795820577.532, 25462)
    assert r.fields["exe"] == "/usr/bin/dash"
    assert r.fields["comm"] == "sh"
    assert r.fields["a0"] == "7fc3328dc790"  # syscall args stay hex numbers, not decoded text
    assert r.fields["tty"] == "(none)"
    assert r.enriched == {}


def test_enriched_fields_after_gs():
    line = RAW + '\x1dARCH=x86_64 SYSCALL=execve AUID="unset" UID="www-data"'
    r = parse_line(line)
    assert r.enriched["SYSCALL"] == "execve"
    assert r.enriched["UID"] == "www-data"
    assert r.fields["key"] == "www_exec"


def test_bytes_input_and_crlf():
    r = parse_line((RAW + "\r\n").encode())
    assert isinstance(r, Record) and r.fields["key"] == "www_exec"


def test_hex_proctitle_and_quoted_proctitle():
    r = parse_line("type=PROCTITLE msg=audit(1.0:1): proctitle=2F62696E2F7368002D63006964")
    assert r.fields["proctitle"] == "/bin/sh\x00-c\x00id"
    r2 = parse_line('type=PROCTITLE msg=audit(1.0:1): proctitle="id"')
    assert r2.fields["proctitle"] == "id"


def test_execve_hex_and_quoted_args():
    r = parse_line(
        'type=EXECVE msg=audit(1.0:2): argc=3 a0="/bin/sh" a1="-c" '
        "a2=7461696C202D6E203230206C6F67732F6170702E6C6F673B6964"
    )
    ev = event_from_records([r])
    assert ev.argv == ["/bin/sh", "-c", "tail -n 20 logs/app.log;id"]


def test_execve_numeric_looking_quoted_arg_is_literal():
    r = parse_line('type=EXECVE msg=audit(1.0:2): argc=2 a0="tail" a1="20"')
    assert event_from_records([r]).argv == ["tail", "20"]


def test_execve_split_long_argument():
    r = parse_line(
        'type=EXECVE msg=audit(1.0:3): argc=2 a0="echo" a1_len=10 a1[0]=6162636465 a1[1]=6667686970'
    )
    assert event_from_records([r]).argv == ["echo", "abcdefghip"]


def test_execve_args_over_two_records():
    c = Coalescer()
    c.add(parse_line('type=EXECVE msg=audit(1.0:4): argc=3 a0="a"'))
    c.add(parse_line('type=EXECVE msg=audit(1.0:4): a1="b" a2="c"'))
    ev = c.add(parse_line("type=EOE msg=audit(1.0:4): "))[0]
    assert ev.argv == ["a", "b", "c"]


def test_path_hex_name_with_space():
    r = parse_line(
        "type=PATH msg=audit(1.0:5): item=0 name=2F746D702F6120622E747874 "
        "inode=12 dev=fe:00 mode=0100644 nametype=CREATE"
    )
    assert r.fields["name"] == "/tmp/a b.txt"
    assert r.fields["nametype"] == "CREATE"


def test_user_record_nested_msg_is_flattened():
    r = parse_line(
        "type=USER_CMD msg=audit(1.0:6): pid=1 uid=1501 auid=1501 ses=51 "
        'msg=\'cwd="/home/d" cmd=7461696C202D6E2033 exe="/usr/bin/sudo" '
        "terminal=pts/0 res=success'"
    )
    assert r.fields["cmd"] == "tail -n 3"
    assert r.fields["exe"] == "/usr/bin/sudo"
    assert r.fields["res"] == "success"


def test_sockaddr_families():
    assert decode_sockaddr("020011517F0000010000000000000000") == {
        "family": "inet",
        "addr": "127.0.0.1",
        "port": 4433,
    }
    v6 = decode_sockaddr("0A001F9000000000" + "00000000000000000000000000000001" + "00000000")
    assert v6 == {"family": "inet6", "addr": "::1", "port": 8080}
    assert decode_sockaddr("01002F72756E2F782E736F636B00") == {
        "family": "unix",
        "path": "/run/x.sock",
    }
    assert decode_sockaddr("0100006162") == {"family": "unix", "path": "@ab"}
    assert decode_sockaddr("100000000000000000000000")["family"] == "netlink"
    assert decode_sockaddr("zz")["family"] == "invalid"


def test_sockaddr_in_event():
    c = Coalescer()
    c.add(parse_line(RAW.replace("syscall=59", "syscall=42").replace("items=2", "items=0")))
    c.add(
        parse_line(
            "type=SOCKADDR msg=audit(1795820577.532:25462): saddr=0200115C7F0000010000000000000000"
        )
    )
    (ev,) = c.add(parse_line('type=PROCTITLE msg=audit(1795820577.532:25462): proctitle="bash"'))
    assert ev.syscall == "connect"
    assert ev.sockaddr == {"family": "inet", "addr": "127.0.0.1", "port": 4444}


def _reason(line):
    r = parse_line(line)
    assert isinstance(r, ParseError), r
    return r.reason


def test_errors_have_reasons():
    assert "empty" in _reason("")
    assert "type=" in _reason("garbage line")
    assert "msg=audit(" in _reason("type=SYSCALL foo=bar")
    assert "unterminated header" in _reason("type=SYSCALL msg=audit(1795820577.532:2546")
    assert "timestamp/serial" in _reason('type=CWD msg=audit(abc:12): cwd="/"')
    assert "garbled field" in _reason(RAW[:200] + " succ")
    assert "unterminated quoted" in _reason('type=CWD msg=audit(1.0:1): cwd="/tm')
    assert "neither quoted nor valid hex" in _reason(
        "type=PROCTITLE msg=audit(1.0:1): proctitle=2F62696"
    )
    assert "pid" in _reason("type=SYSCALL msg=audit(1.0:1): arch=c000003e syscall=59")
    assert "UTF-8" in _reason(b'type=CWD msg=audit(1.0:1): cwd="\xff\xfe"')
    assert "NUL" in _reason('type=CWD msg=audit(1.0:1): cwd="/\x00"')


def test_truncated_corpus_line_is_error(audit_dir):
    line = (audit_dir / "dev03_ingress_revshell.log").read_text().splitlines()[1]
    assert isinstance(parse_line(line), Record)
    bad = line[: len(line) // 2]
    r = parse_line(bad)
    # cut mid-value: either a garbled token or a truncated quoted value
    assert isinstance(r, ParseError) or r.fields.get("pid") is not None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_parser_never_raises_on_text(s):
    parse_line(s)
    parse_line("type=SYSCALL msg=audit(1.0:1): " + s)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parser_never_raises_on_bytes(b):
    parse_line(b)
    parse_line(b"type=PATH msg=audit(1.0:1): " + b)


def _outcome(r):
    if isinstance(r, ParseError):
        return ("error", r.reason)
    return (r.rtype, r.ts, r.serial, list(r.fields.items()), list(r.enriched.items()))


class _NoMemo(dict):
    """A body memo that never remembers: every body goes through the parser."""

    def __setitem__(self, key, value):
        pass


def _reference(lines, monkeypatch):
    """parse_line with every body on the per-field reference parser."""
    with monkeypatch.context() as m:
        m.setattr(records, "_native_parse", None)
        m.setattr(records, "_fields", records._exact_fields)
        m.setattr(records, "_FIELDS_MEMO", _NoMemo())
        m.setattr(records, "_BODY_CUTS", {})  # every body whole, no remembered tails
        return [_outcome(parse_line(line)) for line in lines]


def _mutants(lines, n, seed):
    """*n* lines each cut, spliced or corrupted at 1-3 random places with the characters
    the fast field parser branches on."""
    rng = random.Random(seed)
    alphabet = [" ", "=", '"', "'", "\t", "\x0b", "\x1d", "0", "A", ")", "(", ":", '="', '" ',
                "=22", "name", "2241", '""', "cwd=", "x"]
    for _ in range(n):
        s = rng.choice(lines)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(s) + 1)
            op = rng.random()
            if op < 0.5:
                s = s[:pos] + rng.choice(alphabet) + s[pos:]
            elif op < 0.8:
                s = s[:pos] + s[pos + rng.randint(1, 3):]
            else:
                s = s[:pos] + chr(rng.randrange(1, 256)) + s[pos + 1:]
        yield s


def test_fast_field_parser_matches_reference_on_real_and_mutated_logs(audit_dir, monkeypatch):
    """Every record of the dev corpus and of the benign days, and mutants of them: the
    same fields (values and order) or the same dead-letter reason as the reference."""
    lines = [ln for p in sorted(audit_dir.glob("*.log")) for ln in p.read_text().splitlines()]
    for name in ("train", "test", "long-a", "teamb-1"):
        with lzma.open(BENIGN_DIR / f"{name}.log.xz", "rt", encoding="utf-8") as fh:
            lines += [ln.rstrip("\n") for ln in itertools.islice(fh, 5_000)]
    lines += list(_mutants(lines, 25_000, seed=16))
    path = "type=PATH msg=audit(1.0:1): item=0 inode=1 dev=00:06 mode=0100644 ouid=0 ogid=0 "
    lines += [  # the cases the fast parser must hand over: a repeated key, '="' inside a value
        path + 'name="x" rdev=00:00 name=224122',  # name decodes to '"A"': not to unquote
        path + 'name=224122 rdev=00:00 q="name="y"',
        path + 'name="a\tb" rdev=00:00',
        path + 'name="/x" rdev=00:00\tcwd="/"',
    ]
    sys_ = "type=SYSCALL msg=audit(1.0:2): arch=c000003e syscall=2 success=yes exit=3 a0=1 "
    tail = 'ppid=1 pid=2 auid=0 uid=0 gid=0 comm="sh" exe="/bin/sh" key=(null)'
    item = 'type=PATH msg=audit(1.0:3): item=0 name="/x" inode=7 '
    lines += [  # where the body is cut into a head and a remembered tail (_split_fields)
        sys_ + tail, sys_ + tail,  # the second from the tail memo
        sys_ + 'comm="a ppid=9" ' + tail, sys_ + "a1 " + tail, sys_ + "a1=x " + tail + " junk",
        sys_ + tail.replace("ppid=1", "ppid=1 a0=5"), sys_ + "a1=2 ppid=1 comm='x' pid=2",
        sys_.replace("a0=1 ", "") + tail.replace('"sh"', '"s h"'),
        "type=SYSCALL msg=audit(1.0:2): ppid=1 " + tail, sys_ + "\tppid=1 pid=2",
        item + "dev=00:06 mode=0100644 ouid=0 ogid=0 rdev=00:00 nametype=NORMAL",
        item + "dev=00:06 mode=0100644 ouid=0 ogid=0 rdev=00:00 nametype=NORMAL",
        item.replace('"/x"', '"/a dev=0"') + "dev=1 mode=1",
        item + 'dev=00:06 name="/y"', item + "dev=00:06 mode", item + "dev=00:06 mode=01'7",
        'type=PATH msg=audit(1.0:3): item=0 name=2F78 dev=00:06 inode=7 dev=00:07',
    ]
    want = _reference(lines, monkeypatch)
    monkeypatch.setattr(records, "_FIELDS_MEMO", _NoMemo())
    monkeypatch.setattr(records, "_TAIL_MEMO", {})
    got = [_outcome(parse_line(line)) for line in lines]
    for line, g, w in zip(lines, got, want, strict=True):
        assert g == w, line
    assert sum(g[0] == "error" for g in got) > 5_000  # the mutants reach the error paths
    # the C parser (parse_line's first step) took the real lines and handed the odd ones on
    native = [records._native_parse(line, Record) for line in lines]
    assert sum(r is not None for r in native[:15_000]) > 14_000
    assert sum(r is None for r in native[-25_000:]) > 10_000
    for r, w in zip(native, want, strict=True):
        assert r is None or _outcome(r) == w
    # the worker's lines are bytes: the same records from them
    for line, r, w in zip(lines, native, want, strict=True):
        if line.isascii():
            b = records._native_parse(line.encode(), Record)
            assert (b is None) == (r is None) and (b is None or _outcome(b) == w), line
    # the body memo (bounded, emptied when full) gives the same outcomes, in any order
    # and with repeats; each record gets its own fields dict
    monkeypatch.setattr(records, "_FIELDS_MEMO", {})
    monkeypatch.setattr(records, "FIELDS_MEMO_SIZE", 512)
    order = lines[:20_000] + lines[::-1][:20_000]
    memo = [parse_line(line) for line in order]
    assert [_outcome(r) for r in memo] == want[:20_000] + want[::-1][:20_000]
    assert 0 < len(records._FIELDS_MEMO) <= 512
    firsts = {}
    for r in memo:
        if not isinstance(r, ParseError):
            assert firsts.setdefault(id(r.fields), r) is r  # never shared
    cwd = 'type=CWD msg=audit(1.0:1): cwd="/x"'
    parse_line(cwd).fields["cwd"] = "changed"
    assert parse_line(cwd).fields == {"cwd": "/x"}


def test_token_fields_is_fields_of_a_part_with_an_equals_in_every_token():
    """_token_fields: None when a token has no '=' (or the part does not parse), else
    exactly what _fields gives the part."""
    parts = [' arch=c000003e syscall=2 success=yes exit=3 a0=1 a1=2 a2=3 a3=4 items=1',
             ' item=0 name="/etc/x" inode=7', " item=0 name=2F6574632F78 inode=7",
             "ppid=1 pid=2 comm=\"sh\" exe=\"/bin/sh\" key=(null)", "a=1 b=2 a=3",
             ' name="x', " =1 b=2", " name=zz cwd=2F", "a=1\tb=2"]
    for part in parts:
        want = records._fields(part, False)
        assert records._token_fields(part) == (want if isinstance(want, dict) else None), part
    for part in (" a=1 b", "a1 b=2", " syscall=2 items", "x", ' name="x y" inode=7',
                 "a=1\tb=\x0b2"):
        assert records._token_fields(part) is None, part


def test_hexint_of_syscall_arguments():
    from detection.events import _hexint

    assert [_hexint(v) for v in ("7ffd1f61e4e8", "0", "ffffff9c", "0x10", "zz", "", 5, None,
                                 b"ff")] == [0x7ffd1f61e4e8, 0, 0xffffff9c, 16, 0, 0, 5, 0, 0]


_KEYS = st.sampled_from(["pid", "syscall", "name", "proctitle", "comm", "cwd", "key", "a0",
                         "item", "uid", "", "x\"", "k"])
_CLEAN = st.lists(st.sampled_from(["a", "0", "F", "2F", "C3", "A9", "FF", "(null)", "(none)",
                                   "?", "/bin", ")", ":", "="]), max_size=5).map("".join)
_ODD = st.sampled_from(['"', "'", " ", "\t", "\x1d", "é", '""', '="'])
_VALUES = st.one_of(_CLEAN, _CLEAN.map(lambda v: f'"{v}"'),
                    st.tuples(_CLEAN, _ODD, _CLEAN).map("".join))
_GOOD_KEYS = st.sampled_from(["pid", "syscall", "name", "proctitle", "comm", "cwd", "key",
                              "a0", "item", "uid"])


def _body(keys, eqs, values):
    return st.lists(st.tuples(keys, eqs, values), max_size=12).map(
        lambda ts: "".join(f" {k}{e}{v}" for k, e, v in ts))


#: bodies of key=value tokens: well formed ones (the C parser's lines: hex or not, quoted
#: or not, repeated keys) and ones with the characters both parsers branch on mixed in
_BODIES = st.one_of(
    _body(_GOOD_KEYS, st.just("="), st.one_of(_CLEAN, _CLEAN.map(lambda v: f'"{v}"'))),
    _body(_KEYS, st.sampled_from(["=", "=", "=", "=", "=", ""]), _VALUES),
)


@settings(max_examples=1_000, deadline=None)
@given(st.sampled_from(["SYSCALL", "PATH", "CWD", "PROCTITLE", "EXECVE", "USER_CMD", ""]),
       st.sampled_from(["1.5:7", "1:0", "1e3:2", "nan:1", "1.0:-3", "1.0:1_0", " 2.0: 3", "1.0:",
                        "x:1", "inf:4"]),
       _BODIES)
def test_native_parser_is_the_python_parser_or_hands_the_line_over(rtype, stamp, body):
    """On generated lines the C parser returns exactly the Python parser's record, or None
    (the line is then parsed in Python); it never returns an error of its own."""
    line = f"type={rtype} msg=audit({stamp}):{body}"
    with_python = _outcome_python(line)
    for given_as in (line, line.encode()):
        native = records._native_parse(given_as, Record)
        assert native is None or _outcome(native) == with_python, line


def _outcome_python(line):
    saved = records._native_parse
    records._native_parse = None
    try:
        return _outcome(parse_line(line))
    finally:
        records._native_parse = saved


def test_native_parser_is_built():
    """The install builds detection/_fastparse.c (setup.py); without it every line takes
    the Python parser, correct but ~3x slower, so a build that lost it fails here."""
    assert records._native_parse is not None
    r = parse_line('type=CWD msg=audit(1.0:7): cwd="/tmp"')
    assert r.fields == {"cwd": "/tmp"} and r.enriched == {} and r.serial == 7
    assert records._native_parse("type=CWD msg=audit(1.0:7): cwd='/tmp'", Record) is None
    r = parse_line(b'type=CWD msg=audit(1.0:7): cwd="/tmp"')  # the worker's lines are bytes
    assert r.fields == {"cwd": "/tmp"} and r.fields["cwd"].__class__ is str


def test_user_space_values_with_spaces_parse_and_garbled_ones_still_fail():
    """shadow-utils writes ``op=adding group`` unquoted inside ``msg='...'`` (recorded by
    ``useradd`` in bench/attack_audit's own01): one field, not a parse error. A payload
    that starts with a bare word is still refused with its reason."""
    line = ("type=ADD_GROUP msg=audit(1796282513.295:4514): pid=4712 uid=0 auid=1502 ses=39 "
            "msg='op=adding group acct=\"sysbackup\" exe=\"/usr/sbin/useradd\" hostname=vm "
            "addr=? terminal=pts/0 res=success'")
    rec = parse_line(line)
    assert rec.fields["op"] == "adding group" and rec.fields["acct"] == "sysbackup"
    assert rec.fields["res"] == "success"
    bad = parse_line("type=USER_CMD msg=audit(1.0:5): pid=1 uid=0 msg='garbled a=1'")
    assert "truncated or garbled field 'garbled'" in bad.reason
