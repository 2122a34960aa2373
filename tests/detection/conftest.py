"""Fixtures for the detection tests: the audit corpus, run once per session."""

from __future__ import annotations

import json
import lzma
import os
from pathlib import Path

import pytest

from detection.engine import DetectionEngine, EngineConfig

REPO = Path(__file__).resolve().parents[2]


def datasets_dir() -> Path:
    env = os.environ.get("HEADWATER_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


def corpus_files() -> list[Path]:
    d = datasets_dir() / "audit"
    return sorted(d.glob("*.log")) if d.is_dir() else []


@pytest.fixture(scope="session")
def audit_dir() -> Path:
    d = datasets_dir() / "audit"
    if not d.is_dir():
        pytest.skip(f"audit corpus not found at {d}: set HEADWATER_DATA_DIR")
    return d


BENIGN_DIR = REPO / "bench" / "benign_audit" / "data"


def benign_lines(name: str) -> list[str]:
    """Lines of a recorded benign log in the repo (``train`` or ``test``)."""
    with lzma.open(BENIGN_DIR / f"{name}.log.xz", "rt", encoding="utf-8", errors="replace") as fh:
        return fh.read().splitlines()


@pytest.fixture(scope="session")
def benign_runs():
    """{name: engine} for the recorded benign logs, each on a fresh (cold) engine."""
    out = {}
    for name in ("train", "test"):
        eng = DetectionEngine(host="benign")
        eng.process_lines(benign_lines(name))
        eng.flush()
        out[name] = eng
    return out


def run_log(path: Path, reduce: bool = True, sink=None) -> DetectionEngine:
    eng = DetectionEngine(host="vm", config=EngineConfig(reduce=reduce))
    eng.edge_sink = sink
    eng.process_lines(path.read_text(encoding="utf-8").splitlines())
    eng.flush()
    return eng


@pytest.fixture(scope="session")
def corpus_runs(audit_dir):
    """{scenario: (labels, engine)} for every log, processed once with reduction on."""
    out = {}
    for log in sorted(audit_dir.glob("*.log")):
        labels = json.loads((log.parent / (log.stem + ".labels.json")).read_text())
        out[labels["scenario"]] = (labels, run_log(log))
    return out


OWN_ATTACKS_DIR = REPO / "bench" / "attack_audit" / "data"


@pytest.fixture(scope="session")
def own_attack_runs():
    """{scenario: (labels, engine)} for Headwater's own attack recordings (in the repo)."""
    out = {}
    for path in sorted(OWN_ATTACKS_DIR.glob("*.log.xz")):
        name = path.name[: -len(".log.xz")]
        labels = json.loads((OWN_ATTACKS_DIR / f"{name}.labels.json").read_text())
        with lzma.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
        eng = DetectionEngine(host="vm")
        eng.process_lines(lines)
        eng.flush()
        out[name] = (labels, eng)
    return out
