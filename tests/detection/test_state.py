"""An engine's state dumped mid-log and loaded into a new engine resumes exactly."""

from __future__ import annotations

import pickle
import zlib
from collections import deque

import pytest

from detection.engine import DetectionEngine
from tests.detection.conftest import corpus_files


def _structure(eng: DetectionEngine):
    """The engine's durable state as plain values: objects by first-visit number, sets
    sorted (a set's iteration order depends on its history, not on its contents)."""
    seen: dict[int, int] = {}

    def walk(x):
        if x is None or isinstance(x, (int, float, str, bytes)):
            return x
        if id(x) in seen:
            return ("@", seen[id(x)])
        seen[id(x)] = len(seen)
        if isinstance(x, (set, frozenset)):
            return ("set", sorted(map(walk, x), key=repr))
        if isinstance(x, dict):
            return (type(x).__name__, [(walk(k), walk(v)) for k, v in x.items()])
        if isinstance(x, (list, tuple, deque)):
            return (type(x).__name__, [walk(v) for v in x])
        return (type(x).__name__, walk(x.__getstate__()))

    return walk(pickle.loads(zlib.decompress(eng.dump_state())))


@pytest.mark.parametrize("log", [p for p in corpus_files() if "benign" not in p.name],
                         ids=lambda p: p.name[:5])
def test_state_dumped_mid_log_resumes_like_one_run(log):
    lines = log.read_text(encoding="utf-8").splitlines()
    whole = DetectionEngine(host="vm")
    whole.process_lines(lines)
    first = DetectionEngine(host="vm")
    cut = len(lines) // 2
    first.process_lines(lines[:cut])
    while not len(first.coalescer):  # cut mid-event: the coalescing window holds records
        first.process_lines(lines[cut:cut + 1])
        cut += 1
    resumed = DetectionEngine.from_state("vm", first.dump_state())
    resumed.process_lines(lines[cut:])
    assert resumed.alerts() == whole.alerts()
    assert resumed.stats()["nodes"] == whole.stats()["nodes"]


def test_state_of_another_host_or_foreign_objects_is_refused():
    eng = DetectionEngine(host="vm")
    with pytest.raises(ValueError, match="not host 'db1'"):
        DetectionEngine.from_state("db1", eng.dump_state())
    evil = zlib.compress(pickle.dumps({"host": "vm", "x": print}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        DetectionEngine.from_state("vm", evil)


def test_nodes_pickled_the_default_slot_way_still_load():
    """States written before nodes pickled their slots as a tuple ((None, {slot: value}))."""
    from detection.nodes import Edge, ProcNode

    proc = ProcNode(7, 1.0, 4)
    proc.exe = "/bin/sh"
    old = ProcNode.__new__(ProcNode)
    old.__setstate__((None, {name: getattr(proc, name) for name in ProcNode._state[0]}))
    assert (old.nid, old.exe, old.pid) == (proc.nid, "/bin/sh", 7)
    edge = Edge.__new__(Edge)
    with pytest.raises(ValueError):  # a tuple of another shape: refused, not half-loaded
        edge.__setstate__((1.0, "read"))


def test_snapshot_plus_journal_resumes_like_one_run():
    """A snapshot, then batches kept only as a journal with the alert chains after them:
    the resumed engine's state is byte-identical to the engine that ran them, and the
    rest of the log gives one uninterrupted run's alerts (learning on: the chains'
    familiarity verdicts come from the stored alerts, not from a replay)."""
    lines = [ln for p in corpus_files() if "benign" not in p.name
             for ln in p.read_text(encoding="utf-8").splitlines()]
    messages = [lines[i:i + 100] for i in range(0, len(lines), 100)]
    whole = DetectionEngine(host="vm")
    for m in messages:
        whole.process_lines(m)
    batches = [messages[i:i + 5] for i in range(0, len(messages), 5)]  # 5 messages a batch
    snap_at, cut = len(batches) // 4, (len(batches) * 3) // 4
    first = DetectionEngine(host="vm")
    for i, batch in enumerate(batches[:cut]):
        for m in batch:
            first.process_lines(m)
        if i + 1 == snap_at:
            snapshot = first.dump_state()
    journal = [DetectionEngine.journal_entry(b) for b in batches[snap_at:cut]]
    resumed = DetectionEngine.resume("vm", snapshot, journal, first.dump_alerts())
    resumed.model = first.model  # the learned baseline has its own store (loaded as it is now)
    assert _structure(resumed) == _structure(first)
    for batch in batches[cut:]:
        for m in batch:
            resumed.process_lines(m)
    assert resumed.alerts() == whole.alerts() and resumed.alerts()
    assert resumed.stats() == whole.stats()
    with pytest.raises(ValueError, match="without its alert chains"):
        DetectionEngine.resume("vm", snapshot, journal, None)
    with pytest.raises(ValueError, match="not host 'db1'"):
        DetectionEngine.resume("db1", None, journal, first.dump_alerts())
