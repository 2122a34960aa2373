"""Severity by ordered stage progression and learned rarity, with explanations (issue 16)."""

from __future__ import annotations

from detection.alerts import SEVERITY_RANK, STAGES
from detection.engine import DetectionEngine, EngineConfig

from .conftest import corpus_files

ATTACKS = [p for p in corpus_files() if "benign" not in p.stem]


def _strong(alert):
    return {t["id"] for t in alert["technique_details"] if t["weight"] >= 2}


def test_independent_matches_do_not_add_up(benign_runs):
    """Recorded benign sessions hit several strong rules (.bashrc, crontab, systemd user
    unit, nc/curl probes), but nothing depends on untrusted or sensitive data, so they
    stay low however many techniques they collect."""
    for eng in benign_runs.values():
        alerts = eng.alerts("low")
        busy = [a for a in alerts if len(_strong(a)) >= 3]
        assert len(busy) >= 5, "the benign sessions match many strong rules"
        for a in alerts:
            assert a["severity"] == "low", a["why"]
            assert a["why"]["entry"] is None
            assert a["why"]["summary"].startswith("no dependent")


def test_attack_alerts_explain_entry_and_ordered_progression(corpus_runs):
    for scenario, (labels, eng) in corpus_runs.items():
        if labels["label"] == "benign":
            continue
        attacker = set(labels["attacker_pids"])
        a = next(a for a in eng.alerts("medium")
                 if {c["pid"] for c in a["chain"] if c["type"] == "process"} & attacker)
        why = a["why"]
        assert why["entry"]["reason"], scenario
        assert why["entry"]["technique"] in a["techniques"]
        steps = why["progression"]
        assert [s["level"] for s in steps] == list(range(1, len(steps) + 1)), scenario
        assert [s["ts"] for s in steps] == sorted(s["ts"] for s in steps)
        assert all(s["stage"] in STAGES for s in steps)
        # each step is a later kill-chain stage than the one before it
        idx = [STAGES.index(s["stage"]) for s in steps]
        assert idx == sorted(idx) and len(set(idx)) == len(idx), scenario
        assert len(steps) >= 2, f"{scenario}: {why['summary']}"
        assert why["level"] == len(steps)


def test_learned_routine_discounts_matches_and_lowers_severity():
    """An attack replayed until the host's baseline knows it: its matches become routine."""
    log = next(p for p in ATTACKS if p.stem.startswith("dev05"))
    lines = log.read_text(encoding="utf-8").splitlines()

    def run(model_fields=None):
        eng = DetectionEngine(host="vm", config=EngineConfig(warm_edges=0))
        if model_fields:
            eng.load_baseline(model_fields)
        eng.process_lines(lines)
        eng.flush()
        return eng

    cold = run()
    top_cold = max(cold.alerts("low"), key=lambda a: SEVERITY_RANK[a["severity"]])
    assert SEVERITY_RANK[top_cold["severity"]] >= SEVERITY_RANK["high"]
    fields: dict = {}
    for _ in range(4):  # four "days" on which the same thing happened, each a fresh engine
        fields.update(run(fields).baseline_delta()[0])
    warm = run(fields)
    top_warm = max(warm.alerts("low"), key=lambda a: SEVERITY_RANK[a["severity"]])
    assert SEVERITY_RANK[top_warm["severity"]] < SEVERITY_RANK[top_cold["severity"]]
    assert sum(a["why"]["routine_matches"].get("T1105", 0) for a in warm.alerts("low")) > 0
