"""The learned per-host baseline: familiarity, decay, bounds, persistence, and its use."""

from __future__ import annotations

import pytest

from detection.baseline import BehaviourModel, edge_pattern, edge_user, generalise_path
from detection.engine import DetectionEngine, EngineConfig

from .conftest import run_log

PAT = ("bash", "write", "~/.bashrc")


def test_familiarity_counts_sightings_before_this_one():
    m = BehaviourModel(half_life=86400.0)
    assert m.observe(PAT, 1001, 0.0) == 0.0
    assert m.observe(PAT, 1001, 0.0) == 1.0
    assert m.familiarity(PAT, 1001, 0.0) == 2.0
    # another user on the same host inherits the host's familiarity
    assert m.familiarity(PAT, 1002, 0.0) == 2.0
    assert m.familiarity(("nc", "connect", "remote:4444"), 1001, 0.0) == 0.0


def test_counts_decay_with_the_half_life():
    m = BehaviourModel(half_life=100.0)
    for _ in range(4):
        m.observe(PAT, None, 0.0)
    assert m.familiarity(PAT, None, 100.0) == pytest.approx(2.0)
    assert m.familiarity(PAT, None, 300.0) == pytest.approx(0.5)


def test_state_is_bounded_by_forgetting_the_least_familiar():
    m = BehaviourModel(max_patterns=100)
    for _ in range(5):
        m.observe(PAT, None, 0.0)
    for i in range(200):
        m.observe(("cat", "read", f"/srv/f{i}x"), None, 0.0)
    assert len(m) <= 100
    assert m.familiarity(PAT, None, 0.0) == 5.0


def test_dump_and_load_round_trip_and_deletions():
    m = BehaviourModel(max_patterns=4)
    m.observe(PAT, 7, 10.0)
    put, gone = m.dump_dirty()
    assert set(put) == {BehaviourModel.host_key(PAT), BehaviourModel.user_key(PAT, 7), "_observed"}
    assert gone == []
    assert m.dump_dirty()[0].keys() == {"_observed"}  # nothing changed since
    m2 = BehaviourModel()
    m2.load({k.encode(): v.encode() for k, v in put.items()})  # bytes, as from Redis
    assert m2.familiarity(PAT, 7, 10.0) == 1.0
    assert m2.observed == 1.0
    for i in range(4):
        m.observe(("cat", "read", f"/srv/f{i}x"), None, 11.0)
    _, gone = m.dump_dirty()
    assert gone, "forgotten patterns are deleted from the stored hash"


def test_bad_stored_field_names_what_is_wrong():
    with pytest.raises(ValueError, match="baseline field 'h.x': bad value 'oops'"):
        BehaviourModel().load({"h.x": "oops"})
    with pytest.raises(ValueError, match="half_life must be > 0"):
        BehaviourModel(half_life=0)


def test_generalisation_folds_per_user_and_per_run_parts():
    assert generalise_path("/home/dana/.bashrc") == generalise_path("/home/erik/.bashrc")
    assert generalise_path("/var/spool/cron/crontabs/tmp.AbC1x9") == generalise_path(
        "/var/spool/cron/crontabs/tmp.ZZq7Pw"
    )
    assert generalise_path("/tmp/.cache-sys/shadow") == "/tmp/.cache-sys/shadow"


def test_engine_learns_and_the_model_survives_a_restart(audit_dir):
    log = audit_dir / "dev01_benign_admin_dev.log"
    eng = run_log(log)
    assert eng.stats()["baseline_patterns"] > 100
    put, gone = eng.baseline_delta()
    fresh = DetectionEngine(host="vm")
    assert fresh.load_baseline(put) == len(eng.model)
    pats = []
    eng2 = DetectionEngine(host="vm")
    eng2.edge_sink = lambda e: pats.append((edge_pattern(e), edge_user(e), e.ts))
    eng2.process_lines(log.read_text(encoding="utf-8").splitlines()[:3000])
    assert pats
    # what the first engine learned, the restored one knows: same familiarity for every edge
    for pat, auid, ts in pats[:300]:
        assert fresh.model.familiarity(pat, auid, ts) == eng.model.familiarity(pat, auid, ts)
    off = DetectionEngine(host="vm", config=EngineConfig(learn=False))
    assert off.model is None and off.baseline_delta() == ({}, [])


def _fold_random_by_character(tok: str) -> str:
    """The definition :func:`detection.baseline._fold_random` computes with str methods."""
    lower = any(c.islower() for c in tok)
    upper = any(c.isupper() for c in tok)
    digit = any(c.isdigit() for c in tok)
    if (lower and upper) or (digit and (lower or upper) and not tok.rstrip("0123456789").isalpha()):
        return "<rand>"
    return tok


def test_random_name_folding_agrees_with_its_per_character_definition(audit_dir):
    import random
    import re

    from detection.baseline import _TOKEN, _fold_random

    rng = random.Random(7)
    alphabets = ("abc", "ABC", "0123456789", "aB1", "abcdefghijklmnopqrstuvwxyz0", "Z9")
    toks = ["".join(rng.choice(a) for _ in range(rng.randint(6, 12)))
            for a in alphabets for _ in range(400)]
    toks += ["abc123", "123abc", "ABC123", "x86abc", "tmp123", "Mozilla", "py3abc"]
    toks += _TOKEN.findall(" ".join(re.findall(r'name="([^"]+)"', "".join(
        p.read_text() for p in sorted(audit_dir.glob("*.log"))))))
    for tok in toks:
        m = _TOKEN.fullmatch(tok)
        assert m is not None and _fold_random(m) == _fold_random_by_character(tok), tok
