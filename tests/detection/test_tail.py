"""AuditTailer: resume, partial lines, rename+create and copytruncate rotation."""

from __future__ import annotations

import os

from detection.tail import AuditTailer


def _all(t, **kw):
    return [line for batch in t.batches(follow=False, **kw) for line in batch]


def test_resume_from_committed_position(tmp_path):
    log, state = tmp_path / "audit.log", tmp_path / "pos.json"
    log.write_text("".join(f"l{i}\n" for i in range(10)))
    t = AuditTailer(log, state)
    it = t.batches(max_lines=4)
    assert next(it) == ["l0", "l1", "l2", "l3"]
    t.commit()
    assert next(it) == ["l4", "l5", "l6", "l7"]  # read but not committed: must replay
    t2 = AuditTailer(log, state)
    assert _all(t2) == [f"l{i}" for i in range(4, 10)]


def test_partial_line_waits_for_newline(tmp_path):
    log, state = tmp_path / "audit.log", tmp_path / "pos.json"
    log.write_text("a\nhalf")
    t = AuditTailer(log, state)
    assert _all(t) == ["a"]
    with open(log, "a") as fh:
        fh.write("-done\nb\n")
    assert _all(t) == ["half-done", "b"]


def test_rename_and_create_rotation(tmp_path):
    log, state = tmp_path / "audit.log", tmp_path / "pos.json"
    log.write_text("a\nb\n")
    t = AuditTailer(log, state)
    assert _all(t) == ["a", "b"]
    t.commit()
    with open(log, "a") as fh:
        fh.write("c\n")
    os.rename(log, tmp_path / "audit.log.1")
    log.write_text("d\ne\n")
    assert _all(t) == ["c", "d", "e"]


def test_rotation_while_down_drains_old_file(tmp_path):
    log, state = tmp_path / "audit.log", tmp_path / "pos.json"
    log.write_text("a\n")
    t = AuditTailer(log, state)
    assert _all(t) == ["a"]
    t.commit()
    t.close()
    with open(log, "a") as fh:
        fh.write("b\n")
    os.rename(log, tmp_path / "audit.log.1")
    log.write_text("c\n")
    assert _all(AuditTailer(log, state)) == ["b", "c"]


def test_copytruncate(tmp_path):
    log, state = tmp_path / "audit.log", tmp_path / "pos.json"
    log.write_text("a\nb\nc\n")
    t = AuditTailer(log, state)
    assert _all(t) == ["a", "b", "c"]
    t.commit()
    with open(log, "w") as fh:  # copytruncate: same inode, size 0, then new lines
        fh.write("x\n")
    assert _all(t) == ["x"]


def test_missing_file_yields_nothing(tmp_path):
    assert _all(AuditTailer(tmp_path / "none.log", tmp_path / "pos.json")) == []
