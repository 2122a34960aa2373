"""The C parts of the engine (detection/_fastparse.c, detection/_fastedges.c) against the
Python they replace.

The parser's differential tests over the corpora and their mutants are in test_records.py;
here: the SYSCALL fold (``syscall_values``), an EXECVE with ten or more arguments and the
baseline's generalised path (``generalise``).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from detection import _fastedges, _fastparse, baseline, events
from detection.coalesce import Coalescer
from detection.events import SYSCALLS_X86_64, AuditEvent, _fold_syscall, event_from_records
from detection.records import Record, parse_line

_NUMBERS = st.one_of(
    st.sampled_from(["0", "59", "-2", "-0", "-", "4294967295", "ff", "00FF", "0x1f", "1_0",
                     " 7 ", "+7", "x", "", "c000003e", "40000003", "99999999999999999999",
                     "123456789012345", "1234567890123456", "fffffffffffffff", "١٢"]),
    st.integers(-2**70, 2**70).map(str), st.integers(0, 2**70).map("{:x}".format))
_TEXT = st.sampled_from(["yes", "no", "(null)", "sh", "/bin/sh", "", "exec"])
_FIELDS = st.dictionaries(
    st.sampled_from(["syscall", "arch", "success", "exit", "pid", "ppid", "uid", "euid",
                     "auid", "ses", "comm", "exe", "key", "a0", "a1", "a2", "a3", "items"]),
    st.one_of(_NUMBERS, _TEXT), max_size=18)


def _slots(ev):
    return [(s, getattr(ev, s)) for s in AuditEvent.__slots__]


@settings(max_examples=600, deadline=None)
@given(_FIELDS)
def test_syscall_values_is_the_python_fold(fields):
    """Every value the C fold takes from a SYSCALL record is what the Python fold takes."""
    rec = Record("SYSCALL", 1.0, 1, fields, {})
    want = AuditEvent(1, 1.0)
    _fold_syscall(want, rec, fields)
    got = AuditEvent(1, 1.0)
    (got.syscall, got.success, got.exit, got.pid, got.ppid, got.uid, got.euid, got.auid,
     got.ses, got.comm, got.exe, got.key, got.args) = events._syscall_values(
        fields, SYSCALLS_X86_64)
    assert _slots(got) == _slots(want)


def test_syscall_values_hands_non_text_fields_to_python():
    assert events._syscall_values({"pid": 7, "syscall": "59"}, SYSCALLS_X86_64) is None
    ev = event_from_records([Record("SYSCALL", 1.0, 1, {"pid": 7, "syscall": "59"}, {})])
    assert (ev.pid, ev.syscall) == (7, "execve")
    enriched = Record("SYSCALL", 1.0, 1, {"syscall": "59"}, {"SYSCALL": "execve_enriched"})
    assert event_from_records([enriched]).syscall == "execve_enriched"


def test_execve_with_ten_or_more_arguments_keeps_its_argv():
    """``argc=10`` is a count, not a hex-encoded argument: it used to be decoded to
    ``'\\x10'``, which lost the argv of every command with 10-99 arguments."""
    args = " ".join(f'a{i}="x{i}"' for i in range(10))
    lines = ["type=SYSCALL msg=audit(1.0:5): arch=c000003e syscall=59 success=yes exit=0 "
             'items=0 ppid=1 pid=2 uid=0 comm="echo" exe="/bin/echo" key=(null)',
             f"type=EXECVE msg=audit(1.0:5): argc=10 {args}",
             "type=PROCTITLE msg=audit(1.0:5): proctitle=6563686F",
             "type=EOE msg=audit(1.0:5): "]
    co = Coalescer()
    out = [ev for line in lines for ev in co.add(parse_line(line))]
    assert [ev.argv for ev in out] == [[f"x{i}" for i in range(10)]]
    assert parse_line(lines[1]).fields["argc"] == "10"


def test_the_c_parser_decodes_the_fields_records_names():
    """Which fields are hex-encoded is ``records.ENCODED_FIELDS`` (handed to the C parser by
    ``configure``), not a second list in C."""
    from detection import _fastparse, records

    line = "type=SYSCALL msg=audit(1.0:2): syscall=2 pid=3 comm=6C73"
    assert records._native_parse(line, Record).fields["comm"] == "ls"
    try:
        _fastparse.configure(records.ENCODED_FIELDS - {"comm"}, records._STRICT_HEX,
                             records._SPECIAL)
        assert records._native_parse(line, Record).fields["comm"] == "6C73"
    finally:
        _fastparse.configure(records.ENCODED_FIELDS, records._STRICT_HEX, records._SPECIAL)
    assert records._native_parse(line, Record).fields["comm"] == "ls"


#: pieces of paths that exercise each pass: home and root prefixes, hex ids at and off
#: word boundaries, mkstemp-style tokens, digit runs, word characters that end no word
_PATH_PIECES = st.one_of(
    st.sampled_from(["/home/", "/root/", "/home", "/", "//", ".", "_", "-", "~", " ", "\n",
                     "tmp.", "obj_", "A", "z", "g"]),
    st.text("0123456789abcdef", min_size=10, max_size=16),
    st.text("0123456789abcdefABCXYZgz_", min_size=1, max_size=9),
    st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=6))


@settings(max_examples=3000, deadline=None)
@given(st.lists(_PATH_PIECES, max_size=10).map("".join))
def test_generalise_is_the_python_passes(path):
    """The C generalised path of an ASCII path is the regular expressions' one."""
    assert _fastedges.generalise(path) == baseline._generalise_py(path)


def test_generalise_hands_other_paths_to_python():
    assert _fastedges.generalise("/home/zoë/x1234567") is None
    assert _fastedges.generalise(b"/tmp/x") is None
    assert baseline.generalise_path("/home/zoë/tmp.AbC1x9/٣") == "~/tmp.<rand>/#"
    long = "/home/a/" + "x" * 300 + "/0123456789abcdef"  # longer than the stack buffer
    assert _fastedges.generalise(long) == baseline._generalise_py(long) == "~/" + "x" * 300 + "/<hex>"


def _batches(audit_dir):
    """Every dev log, as str lines and as bytes lines, cut into batches with what the C loop
    must hand to Python mixed in: bad lines, LAUREL JSON, several lines in one item, a
    bytearray, a line with a newline, non-ASCII."""
    odd = ["type=garbage", "", b"\xff\xfe", "type=CWD msg=audit(5.0:9): cwd=\"/t\"\n",
           bytearray(b'type=CWD msg=audit(6.0:10): cwd="/u"'), 'type=CWD msg=audit(7.0:11): cwd="/é"',
           '{"ID":"1.0:12","SYSCALL":{"syscall":"openat","pid":7}}',
           "type=EOE msg=audit(5.0:9): \ntype=EOE msg=audit(6.0:10): "]
    for log in sorted(audit_dir.glob("*.log")):
        lines = log.read_text(encoding="utf-8").splitlines()
        for form in (lines, [s.encode() for s in lines]):
            batches = [list(form[i:i + 97]) for i in range(0, len(form), 97)]
            for k, b in enumerate(batches):
                b.insert(k % len(b), odd[k % len(odd)])
            yield log.stem, batches


def test_feed_is_the_python_loop(audit_dir, monkeypatch):
    """``process_lines`` with its common lines fed by C gives the batches' results, the
    counters and the state that the Python loop gives."""
    import pickle
    import zlib

    from detection import engine as engine_mod

    def run(batches):
        eng = engine_mod.DetectionEngine(host="vm")
        out = []
        for b in batches:
            r = eng.process_lines(tuple(b) if len(out) % 2 else b)
            out.append((r.alerts, r.errors, r.stats))
        state = pickle.loads(zlib.decompress(eng.dump_state()))
        return out, eng.stats(), pickle.dumps(state["coalescer"]), pickle.dumps(state["graph"])

    assert engine_mod._feed is not None
    for _, batches in _batches(audit_dir):
        got = run(batches)
        with monkeypatch.context() as m:
            m.setattr(engine_mod, "_feed", None)
            want = run(batches)
        assert got == want


def test_feed_stops_at_what_python_takes():
    events: list = []
    added: list = []
    line = 'type=CWD msg=audit(1.0:2): cwd="/"'
    lines = [line, line.encode(), "type=garbage", line]
    assert _fastparse.feed(lines, 0, Record, lambda r: added.append(r) or [r.serial], events) == (2, 2)
    assert events == [2, 2] and [r.fields for r in added] == [{"cwd": "/"}] * 2
    assert _fastparse.feed(lines, 3, Record, lambda r: [], events) == (4, 1)
    assert _fastparse.feed(lines, 4, Record, lambda r: [], events) == (4, 0)


_SIGHTINGS = st.lists(st.tuples(
    st.one_of(st.tuples(st.sampled_from(["git", "sh", ""]), st.sampled_from(["write", "exec"]),
                        st.sampled_from(["~/.gitconfig", "remote:443", "\x1f"])),
              st.tuples(st.sampled_from(["nc"]), st.sampled_from([7, None]))),
    st.sampled_from([None, 0, 1000, 4294967295, "1000", True]),
    st.one_of(st.floats(0.0, 1e6), st.floats(allow_nan=False), st.sampled_from([0, 5, 1e300]))),
    max_size=40)


@settings(max_examples=400, deadline=None)
@given(_SIGHTINGS, st.sampled_from([3600.0, 1e-300, 7 * 86400.0, 3600]),
       st.lists(st.tuples(st.sampled_from(["h\x1fgit\x1fwrite\x1f~/.gitconfig",
                                           "u1000\x1fsh\x1fexec\x1fremote:443"]),
                          st.sampled_from(["1.0,5.0", "2.5,inf", "3,7", "nan,1.0"])),
                max_size=2))
def test_count_pattern_is_the_python_count(sightings, half_life, stored):
    """The C count of a sighting gives what BehaviourModel._count gives: the familiarity,
    the counts (values and order) and the dirty marks, or an error where Python raises."""
    from detection.baseline import BehaviourModel

    def run(native):
        m = BehaviourModel(half_life=half_life, max_patterns=10**6)
        m.load(dict(stored))
        out = []
        for pattern, auid, ts in sightings:
            before = native(m.counts, m.dirty, pattern, auid, ts, m.half_life) if native else None
            try:
                out.append(m._count(pattern, auid, ts) if before is None else before)
            except OverflowError:
                out.append("overflow")
                break
        return out, list(m.counts.items()), sorted(m.dirty)

    assert repr(run(_fastedges.count_pattern)) == repr(run(None))


def test_count_pattern_hands_other_types_to_python():
    counts, dirty = {"h\x1fa": (1, 2.0)}, set()
    for args in [(("a",), None, 1.0, 3600), ((1,), None, 1.0, 3600.0), (("a",), "7", 1.0, 3600.0),
                 (("a",), None, 3, 3600.0), (("a",), None, 5.0, 3600.0)]:
        assert _fastedges.count_pattern(counts, dirty, *args) is None
    assert counts == {"h\x1fa": (1, 2.0)} and not dirty
    # a subnormal decay factor (where float.__pow__ may raise) is Python's to compute
    assert _fastedges.count_pattern({"h\x1fa": (1.0, 0.0)}, dirty, ("a",), None, 1030.5, 1.0) is None
    assert _fastedges.count_pattern({}, dirty, ("a", "b"), 7, 2.0, 3600.0) == 0.0
    assert sorted(dirty) == ["h\x1fa\x1fb", "u7\x1fa\x1fb"]


_NIDS = st.sampled_from(["file:/a/b/x", "file:/a/b/y", "file:/a/b/c/z", "file:/a/w", "file:/t",
                         "file:/a/b/c/d/e", "proc:1:0.000", "proc:2:0.000", "", None, "fil"])
_ENTRIES = st.tuples(st.sampled_from([1.0, 2.0, 3.0]), st.sampled_from(["create", "write", "read"]),
                     _NIDS)


@settings(max_examples=1500, deadline=None)
@given(st.lists(_ENTRIES, min_size=1, max_size=24), st.lists(_ENTRIES, max_size=6),
       st.dictionaries(st.sampled_from(["/a/b/x", "/a/b/y", "/a/b/c/z", "/a/w", "/t", "/a/b/c/d/e"]),
                       st.lists(_ENTRIES, max_size=6), max_size=6),
       st.sampled_from(["create", "write"]), _NIDS.filter(lambda s: bool(s)),
       st.sampled_from(["proc:1:0.000", "proc:2:0.000"]), st.sampled_from([0, 3, 16]))
def test_burst_redundant_is_the_python_look_back(edges, f_edges, files, prev, pnid, nid, lookback):
    """The C look back of a burst or repeat merge answers what the Python one does."""
    from collections import deque
    from types import SimpleNamespace

    from detection import graph as graph_mod

    g = graph_mod.ProvenanceGraph(SimpleNamespace())
    g.files = {path: SimpleNamespace(edges=deque(es)) for path, es in files.items()}
    f = SimpleNamespace(edges=deque(f_edges))
    saved, graph_mod._BURST_LOOKBACK = graph_mod._BURST_LOOKBACK, lookback
    try:
        want = g._burst_redundant(deque(edges), f, prev, pnid, nid)
    finally:
        graph_mod._BURST_LOOKBACK = saved
    got = _fastedges.burst_redundant(deque(edges), f.edges, g.files, prev, pnid, nid, lookback)
    assert got is None or got == want
    if all(e[2] is None or isinstance(e[2], str) for e in edges + f_edges):
        assert got is not None


def test_burst_redundant_hands_other_types_to_python():
    from collections import deque

    assert _fastedges.burst_redundant(deque([(1.0, "create", 7), (1.0, "create", "file:/a")]),
                                      deque(), {}, "create", "file:/a", "proc:1", 16) is None
    assert _fastedges.burst_redundant(deque([[1.0, "create", "file:/b"], (1.0, "create", "file:/a")]),
                                      deque(), {}, "create", "file:/a", "proc:1", 16) is None


def test_graph_merges_with_the_c_look_back_as_with_python(audit_dir, monkeypatch):
    """The dev logs and a benign day (git and builds: many bursts) give the same counters,
    alerts and graph with the look back in C as in Python."""
    import pickle
    import zlib

    from detection import graph as graph_mod
    from detection.engine import DetectionEngine

    from .conftest import benign_lines

    logs = [p.read_text(encoding="utf-8").splitlines() for p in sorted(audit_dir.glob("*.log"))]
    logs.append(benign_lines("test")[:40_000])

    def run():
        out = []
        for lines in logs:
            eng = DetectionEngine(host="vm")
            for i in range(0, len(lines), 100):
                out.append(eng.process_lines(lines[i:i + 100]).alerts)
            out.append(eng.flush().alerts)
            state = pickle.loads(zlib.decompress(eng.dump_state()))
            out.append((eng.stats(), pickle.dumps(state["graph"])))
        return out

    assert graph_mod._native_burst is not None
    got = run()
    with monkeypatch.context() as m:
        m.setattr(graph_mod, "_native_burst", None)
        assert run() == got
    assert sum(s["edges_merged"] for s, _ in (x for x in got if isinstance(x, tuple))) > 1000
