"""Unit tests of the lag evaluation: Burrow-style rules and the seconds interpolation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.lag import (
    CommitSample,
    LagTracker,
    Observation,
    OffsetTimeTable,
    Status,
    evaluate_window,
    format_lag_table,
    worst,
)


def window(commits, ends, t0=100.0, step=2.0):
    return [CommitSample(t0 + i * step, c, e) for i, (c, e) in enumerate(zip(commits, ends, strict=True))]


# ---- rules ---------------------------------------------------------------------------
def test_ok_when_any_lag_in_window_is_zero():
    s = window([10, 10, 10], [10, 20, 30])
    assert evaluate_window(s, now=106.0, members=0) is Status.OK


def test_ok_when_lag_goes_down():
    s = window([10, 30, 60], [50, 60, 70])  # lag 40, 30, 10
    assert evaluate_window(s, now=106.0, members=1) is Status.OK


def test_ok_while_window_is_short():
    s = window([10, 10], [20, 40])
    assert evaluate_window(s, now=104.0, members=0, min_samples=3) is Status.OK


def test_rewind_when_committed_offset_goes_back():
    s = window([50, 60, 40], [100, 110, 120])
    assert evaluate_window(s, now=106.0, last_commit_ts=104.0, members=1) is Status.REWIND


def test_rewind_wins_over_a_rising_lag():
    s = window([50, 49, 50], [100, 200, 300])
    assert evaluate_window(s, now=106.0, members=1) is Status.REWIND


def test_stop_when_offsets_frozen_and_no_member():
    s = window([10, 10, 10], [20, 30, 40])
    assert evaluate_window(s, now=106.0, last_commit_ts=None, members=0) is Status.STOP
    # membership unknown (broker cannot describe groups): no evidence of commits either
    assert evaluate_window(s, now=106.0, last_commit_ts=90.0, members=None) is Status.STOP


def test_stop_even_with_constant_lag():
    s = window([10, 10, 10], [20, 20, 20])
    assert evaluate_window(s, now=106.0, members=0) is Status.STOP


def test_stall_when_members_are_alive_but_offsets_do_not_move():
    s = window([10, 10, 10], [20, 30, 40])
    assert evaluate_window(s, now=106.0, members=2) is Status.STALL


def test_stall_when_last_commit_is_recent_compared_to_window_span():
    # A commit change seen within the span (possible with irregular sampling) means the
    # consumer was committing recently: STALL rather than STOP.
    s = [CommitSample(100.0, 10, 20), CommitSample(130.0, 10, 30), CommitSample(131.0, 10, 40)]
    assert evaluate_window(s, now=131.0, last_commit_ts=120.0, members=None) is Status.STALL


def test_warning_when_lag_grows_over_every_sample():
    s = window([10, 20, 30, 40], [20, 35, 55, 80])  # lag 10, 15, 25, 40
    assert evaluate_window(s, now=108.0, members=1) is Status.WARNING


def test_no_warning_when_lag_dips_once():
    s = window([10, 20, 30, 40], [20, 35, 40, 80])  # lag 10, 15, 10, 40
    assert evaluate_window(s, now=108.0, members=1) is Status.OK


def test_worst_orders_statuses():
    assert worst([]) is Status.OK
    assert worst([Status.WARNING, Status.OK]) is Status.WARNING
    assert worst([Status.REWIND, Status.STALL, Status.WARNING]) is Status.STALL
    assert worst(list(Status)) is Status.STOP


# ---- seconds interpolation -----------------------------------------------------------
def test_interpolates_between_points():
    t = OffsetTimeTable()
    for off, ts in [(0, 0.0), (100, 10.0), (200, 30.0)]:
        t.add(off, ts)
    assert t.time_at(50) == pytest.approx(5.0)
    assert t.time_at(150) == pytest.approx(20.0)
    assert t.lag_seconds(150, now=40.0) == pytest.approx(20.0)
    assert t.lag_seconds(200, now=40.0) == 0.0
    assert t.lag_seconds(250, now=40.0) == 0.0


def test_flat_run_keeps_first_and_last_point():
    t = OffsetTimeTable()
    for ts in (0.0, 2.0, 4.0, 6.0):
        t.add(100, ts)
    t.add(200, 8.0)
    assert t.offsets == [100, 100, 200] and t.times == [0.0, 6.0, 8.0]
    assert t.time_at(100) == 0.0  # when the log end reached 100
    assert t.time_at(150) == pytest.approx(7.0)  # the step happened between 6 and 8


def test_extrapolates_below_the_table_at_its_rate():
    t = OffsetTimeTable()
    t.add(1000, 10.0)
    t.add(2000, 20.0)
    assert t.time_at(500) == pytest.approx(5.0)
    assert t.lag_seconds(500, now=20.0) == pytest.approx(15.0)


def test_flat_or_single_point_table_gives_a_lower_bound():
    t = OffsetTimeTable()
    t.add(1000, 10.0)
    assert t.lag_seconds(10, now=15.0) == pytest.approx(5.0)
    assert OffsetTimeTable().lag_seconds(10, now=15.0) is None


def test_table_is_bounded_and_resets_when_log_end_goes_back():
    t = OffsetTimeTable(max_points=5)
    for i in range(20):
        t.add(i * 10, float(i))
    assert len(t) == 5 and t.offsets[0] == 150
    t.add(3, 30.0)  # the topic was recreated
    assert t.offsets == [3] and t.times == [30.0]


@given(st.lists(st.tuples(st.integers(0, 50), st.floats(0.1, 5.0)), min_size=2, max_size=40),
       st.integers(0, 3000))
def test_lag_seconds_is_monotone_and_bounded(steps, probe):
    """More committed never means more seconds behind; never negative."""
    t = OffsetTimeTable(max_points=1000)
    off, ts = 0, 0.0
    for d_off, d_ts in steps:
        off += d_off
        ts += d_ts
        t.add(off, ts)
    now = ts + 1.0
    a, b = t.lag_seconds(probe, now), t.lag_seconds(probe + 7, now)
    assert a is not None and b is not None
    assert 0.0 <= b <= a + 1e-9
    if probe >= t.offsets[0]:
        assert a <= now - t.times[0] + 1e-9


# ---- tracker and table ---------------------------------------------------------------
def test_tracker_reports_lag_seconds_and_group_status():
    tr = LagTracker(window=3)
    tp = ("clicks", 0)
    reports = []
    for i, end in enumerate([100, 200, 300, 400]):
        obs = Observation(ts=10.0 * i, log_ends={tp: end, ("clicks", 1): 50},
                          committed={"g": {tp: 100, ("clicks", 1): 50}}, members={"g": 0})
        reports.append(tr.update(obs))
    last = reports[-1]["groups"][0]
    rows = {r["partition"]: r for r in last["partitions"]}
    assert rows[0]["lag"] == 300 and rows[0]["status"] == "STOP"
    assert rows[0]["lag_seconds"] == pytest.approx(30.0)  # log end was at 100 at t=0
    assert rows[1]["lag"] == 0 and rows[1]["status"] == "OK" and rows[1]["lag_seconds"] == 0.0
    assert last["status"] == "STOP" and last["lag"] == 300
    assert [r["groups"][0]["status"] for r in reports] == ["OK", "OK", "OK", "STOP"]


def test_tracker_drops_partitions_that_disappear():
    tr = LagTracker(window=2)
    tr.update(Observation(0.0, {("a", 0): 5}, {"g": {("a", 0): 1}}))
    rep = tr.update(Observation(1.0, {}, {"g": {("a", 0): 1}}))
    assert rep["groups"][0]["partitions"] == [] and not tr.partitions and not tr.tables


def test_format_lag_table():
    report = {"ts": 0, "groups": [{"group": "headwater-worker", "status": "WARNING", "partitions": [
        {"topic": "clicks", "partition": 0, "committed": 10, "log_end": 15, "lag": 5,
         "lag_seconds": 75.0, "status": "WARNING"},
        {"topic": "clicks", "partition": 1, "committed": 3, "log_end": 3, "lag": 0,
         "lag_seconds": 0.0, "status": "OK"}]}]}
    lines = format_lag_table(report).splitlines()
    assert lines[0].split() == ["GROUP", "TOPIC", "PARTITION", "COMMITTED", "LOG-END", "LAG",
                                "LAG-TIME", "STATUS"]
    assert lines[1].split() == ["headwater-worker", "clicks", "0", "10", "15", "5", "1.2m", "WARNING"]
    assert lines[3].split() == ["headwater-worker", "(total)", "5", "1.2m", "WARNING"]
    assert format_lag_table({"groups": []}) == "no consumer groups with committed offsets"
