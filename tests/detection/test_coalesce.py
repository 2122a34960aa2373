"""Event reassembly: interleaved and out-of-order serials, EOE, window bounds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from detection.coalesce import Coalescer
from detection.records import parse_line


def _sys(serial, ts=1.0, items=0, pid=100):
    return parse_line(
        f"type=SYSCALL msg=audit({ts}:{serial}): arch=c000003e syscall=59 "
        f"success=yes exit=0 items={items} ppid=1 pid={pid} auid=1000 uid=1000 "
        f'euid=1000 ses=3 comm="x" exe="/usr/bin/x" key="exec"'
    )


def _path(serial, ts=1.0, name="/usr/bin/x"):
    return parse_line(
        f'type=PATH msg=audit({ts}:{serial}): item=0 name="{name}" inode=1 '
        f"dev=fe:00 mode=0100755 nametype=NORMAL"
    )


def _pt(serial, ts=1.0):
    return parse_line(f'type=PROCTITLE msg=audit({ts}:{serial}): proctitle="x"')


def test_complete_on_proctitle_without_eoe():
    c = Coalescer()
    assert c.add(_sys(1, items=1)) == []
    assert c.add(_path(1)) == []
    (ev,) = c.add(_pt(1))
    assert ev.serial == 1 and len(ev.paths) == 1 and len(c) == 0


def test_waits_for_missing_path_when_out_of_order():
    c = Coalescer()
    c.add(_sys(1, items=1))
    assert c.add(_pt(1)) == []  # PATH not there yet
    (ev,) = c.add(_path(1))
    assert len(ev.paths) == 1


def test_interleaved_serials():
    c = Coalescer()
    out = []
    for rec in (_sys(1, items=1), _sys(2, items=1), _path(2), _path(1), _pt(2), _pt(1)):
        out += c.add(rec)
    assert [e.serial for e in out] == [2, 1]
    assert all(len(e.paths) == 1 for e in out)


def test_eoe_completes_and_late_records_are_counted():
    c = Coalescer()
    c.add(parse_line('type=CWD msg=audit(1.0:9): cwd="/"'))
    (ev,) = c.add(parse_line("type=EOE msg=audit(1.0:9): "))
    assert ev.cwd == "/"
    assert c.add(parse_line('type=CWD msg=audit(1.0:9): cwd="/x"')) == []
    assert c.late_records == 1


def test_standalone_user_records():
    c = Coalescer()
    (ev,) = c.add(
        parse_line(
            "type=USER_START msg=audit(1.0:5): pid=1 uid=0 auid=1 ses=2 "
            "msg='op=PAM:session_open acct=\"a\" res=success'"
        )
    )
    assert ev.kind == "USER_START" and ev.other["acct"] == "a"


def test_age_and_size_bounds():
    c = Coalescer(max_pending=3, max_age=2.0)
    for s in range(1, 5):
        c.add(_sys(s, items=1))
    assert len(c) == 3 and c.incomplete_events == 1
    out = c.add(_sys(10, ts=10.0, items=1))
    assert len(out) == 3 and len(c) == 1
    assert [e.serial for e in c.flush()] == [10]


@settings(max_examples=60, deadline=None)
@given(st.permutations(list(range(9))))
def test_any_order_within_window_gives_whole_events(order):
    recs = []
    for s in (1, 2, 3):
        recs += [_sys(s, items=1), _path(s), _pt(s)]
    c = Coalescer(max_pending=16)
    out = []
    for i in order:
        out += c.add(recs[i])
    out += c.flush()
    assert sorted(e.serial for e in out) == [1, 2, 3]
    assert all(e.nrecords == 3 for e in out)


class _AlwaysScan(Coalescer):
    """The window before the age scan was skipped: every record scans every open serial."""

    def _expire(self, out):
        self._stale = True
        super()._expire(out)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 40), st.sampled_from("SPTE")),
                max_size=60),
       st.integers(2, 6))
def test_skipping_the_age_scan_emits_the_same_events_at_the_same_records(recs, pending):
    """Late serials (log time behind the horizon), interleaving, overflow, EOE: the
    events each record completes are the same as with a scan at every record."""
    make = {"S": lambda s, t: _sys(s, ts=t, items=1), "P": lambda s, t: _path(s, ts=t),
            "T": lambda s, t: _pt(s, ts=t),
            "E": lambda s, t: parse_line(f"type=EOE msg=audit({t}:{s}): ")}
    fast, ref = Coalescer(max_pending=pending, max_age=2.0), _AlwaysScan(pending, 2.0)
    for serial, tenth, kind in recs:
        rec = make[kind](serial, tenth / 10 * 3)
        got, want = fast.add(rec), ref.add(rec)
        assert [(e.serial, e.nrecords) for e in got] == [(e.serial, e.nrecords) for e in want]
    assert [e.serial for e in fast.flush()] == [e.serial for e in ref.flush()]
    assert (fast.incomplete_events, fast.late_records) == (ref.incomplete_events,
                                                           ref.late_records)
