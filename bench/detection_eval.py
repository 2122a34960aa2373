"""Per-scenario evaluation of the APT detector on the audit corpus.

Prints one row per log: detected (medium+ alert on the attacker chain), techniques
found vs labelled, recall, attacker process in the chain, alert latency (first
medium+ alert time minus the attack window start, log time), node/edge reduction
ratios, records, and graph memory (estimate and tracemalloc peak).

    .venv/bin/python bench/detection_eval.py [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from detection.alerts import SEVERITY_RANK  # noqa: E402
from detection.engine import DetectionEngine  # noqa: E402


def data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get("HEADWATER_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


def evaluate(log: Path) -> dict:
    labels = json.loads((log.parent / f"{log.stem}.labels.json").read_text())
    lines = log.read_text(encoding="utf-8").splitlines()
    tracemalloc.start()
    eng = DetectionEngine(host="vm")
    eng.process_lines(lines)
    eng.flush()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    st = eng.stats()
    attacker = set(labels["attacker_pids"])
    want = {t["id"] for t in labels["attack_techniques"]}
    row = {
        "scenario": labels["scenario"],
        "label": labels["label"],
        "records": st["records"],
        "events": st["events"],
        "node_red": st["node_reduction_ratio"],
        "edge_red": st["edge_reduction_ratio"],
        "mem_est": st["memory_bytes"],
        "mem_peak": peak,
        "errors": st["errors"],
    }
    medium = eng.alerts("medium")
    if not attacker:
        row.update(
            detected=None,
            medium_alerts=len(medium),
            got="-",
            want="-",
            recall=None,
            in_chain=None,
            latency=None,
        )
        return row
    hits = [
        a for a in medium if {c["pid"] for c in a["chain"] if c["type"] == "process"} & attacker
    ]
    best = max(hits, key=lambda a: len(set(a["techniques"]) & want), default=None)
    got = set(best["techniques"]) if best else set()
    start = labels["attack_time_window"]["start_epoch"]
    alert = eng.aggregator.alerts.get(
        next((k for k, v in eng.aggregator.alerts.items() if best and v.id == best["id"]), None)
    )
    latency = (alert.first_medium_ts - start) if alert and alert.first_medium_ts else None
    benign = set(labels.get("benign_pids") or ())
    benign_medium = [
        a
        for a in medium
        if {c["pid"] for c in a["chain"] if c["type"] == "process"} & benign
        and not {c["pid"] for c in a["chain"] if c["type"] == "process"} & attacker
    ]
    row.update(
        detected=best is not None,
        severity=best["severity"] if best else "-",
        got=len(got & want),
        want=len(want),
        recall=len(got & want) / len(want),
        missing=sorted(want - got),
        extra=sorted(got - want),
        in_chain=bool(best and SEVERITY_RANK[best["severity"]] >= 1),
        latency=latency,
        benign_medium=len(benign_medium),
    )
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", help="datasets dir (default: $HEADWATER_DATA_DIR or ../shared/datasets)"
    )
    args = ap.parse_args(argv)
    logs = sorted((data_dir(args.data) / "audit").glob("*.log"))
    if not logs:
        print(f"no audit logs under {data_dir(args.data) / 'audit'}", file=sys.stderr)
        return 2
    rows = [evaluate(p) for p in logs]
    print(
        "| scenario | detected | severity | techniques found/labelled | recall | attacker in chain "
        "| latency s | benign medium+ | node red. | edge red. | records | mem est KB | mem peak KB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["detected"] is None:
            print(
                f"| {r['scenario']} | (benign) medium+ alerts: {r['medium_alerts']} | - | - | - | - | - "
                f"| {r['medium_alerts']} | {r['node_red']:.1%} | {r['edge_red']:.1%} | {r['records']} "
                f"| {r['mem_est'] / 1024:.0f} | {r['mem_peak'] / 1024:.0f} |"
            )
            continue
        lat = f"{r['latency']:.1f}" if r["latency"] is not None else "-"
        print(
            f"| {r['scenario']} | {'yes' if r['detected'] else 'NO'} | {r['severity']} "
            f"| {r['got']}/{r['want']} | {r['recall']:.2f} | {'yes' if r['in_chain'] else 'no'} "
            f"| {lat} | {r['benign_medium']} | {r['node_red']:.1%} | {r['edge_red']:.1%} "
            f"| {r['records']} | {r['mem_est'] / 1024:.0f} | {r['mem_peak'] / 1024:.0f} |"
        )
    attacks = [r for r in rows if r["detected"] is not None]
    if attacks:
        mean = sum(r["recall"] for r in attacks) / len(attacks)
        print(
            f"\nmean technique recall {mean:.3f}; detected {sum(r['detected'] for r in attacks)}"
            f"/{len(attacks)}; extra techniques per scenario: "
            + "; ".join(f"{r['scenario'][:5]} {','.join(r['extra']) or '-'}" for r in attacks)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
