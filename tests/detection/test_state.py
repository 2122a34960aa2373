"""An engine's state dumped mid-log and loaded into a new engine resumes exactly."""

from __future__ import annotations

import pickle
import zlib

import pytest

from detection.engine import DetectionEngine
from tests.detection.conftest import corpus_files


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
