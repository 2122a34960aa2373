"""Per-scenario evaluation of the APT detector on the audit corpus and the benign recordings.

Prints one row per dev-corpus log: detected (medium+ alert on the attacker chain),
techniques found vs labelled, recall, attacker process in the chain, alert latency
(first medium+ alert time minus the attack window start, log time), node/edge
reduction ratios, labelled attack edges lost to reduction, records, and graph
memory (estimate and tracemalloc peak).

Then the same for Headwater's own attack recordings (``bench/attack_audit/data``,
recorded with ``bench/attack_audit/record.sh``: other tools, paths and ports than the
dev corpus), and the benign recordings of ``bench/benign_audit/data`` (made on this machine
with ``bench/benign_audit/record.py``): medium+ alerts and false positives per
host-hour (log time), edge reduction, each on a cold engine; and every recording
but ``train`` (all held out) again on an engine whose learned baseline was trained
on ``train`` first (as in production, where the host's baseline persists), with how
many rule matches the baseline discounted as routine; then the host-hours and false
positives per host-hour summed over all recordings and over the held-out ones.

    .venv/bin/python bench/detection_eval.py [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import re
import sys
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from detection.alerts import SEVERITY_RANK  # noqa: E402
from detection.engine import DetectionEngine, EngineConfig  # noqa: E402


def data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get("HEADWATER_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


BENIGN = REPO / "bench" / "benign_audit" / "data"
#: Headwater's own attack recordings (bench/attack_audit/record.sh)
OWN_ATTACKS = REPO / "bench" / "attack_audit" / "data"
_TS = re.compile(r"msg=audit\((\d+\.\d+):")


def attack_edges_lost(lines: list[str], attacker: set) -> int:
    """Labelled attacker edges (process or object carries a label) that reduction drops.

    Counts edges never emitted with reduction on (skipped or pruned), emitted edges that
    are no longer in the retained graph at the end (merged or garbage collected after
    detection; the reduced run keeps every edge entry of a node so that the check is
    exact), and collected labelled or rule-matched attacker processes. Loads of
    unmodified system programs/libraries and failed opens of /proc or /sys pseudo files
    are not counted: nothing flows over them (the exec edge keeps the image path).
    """
    images: dict = {}  # id(exec edge) -> (image, argv) when it was emitted

    def run(reduce):
        got: dict = {}

        def sink(e):
            if e.op == "exec":
                images[id(e)] = (e.proc.exe, e.proc.argv)
            if e.proc.pid in attacker and (e.proc.labels or (e.obj is not None and e.obj.labels)):
                got.setdefault((e.proc.pid, e.op, e.obj.nid if e.obj is not None else None),
                               []).append(e)

        cfg = EngineConfig(reduce=reduce, max_edges_per_node=1 << 30)
        eng = DetectionEngine(host="vm", config=cfg)
        eng.edge_sink = sink
        eng.process_lines(lines)
        eng.flush()
        return got, eng

    def retained(e) -> bool:
        if e.detail.get("retro"):  # a relabel note (wget -O f): never stored, the label is
            return True
        if e.op == "fork":  # a fork edge belongs to the child
            return not e.obj.collected and (e.ts, "fork", e.proc.nid) in e.obj.edges
        obj = e.obj.nid if e.obj is not None else None
        if e.proc.collected:
            return False
        if (e.ts, e.op, obj) in e.proc.edges:
            return True
        # a spawn's exec folded into the fork edge (labelled processes): the fork edge
        # is retained and the node still shows this exec's image and argv
        parent = e.proc.parent
        return (e.op == "exec" and parent is not None
                and images.get(id(e)) == (e.proc.exe, e.proc.argv)
                and any(op == "fork" and nid == parent.nid for _, op, nid in e.proc.edges))

    full, _ = run(False)
    reduced, eng = run(True)
    system = ("file:/lib", "file:/usr/lib", "file:/usr/bin/", "file:/bin/", "file:/usr/sbin/")
    gone = set(full) - {k for k, es in reduced.items() if any(map(retained, es))}
    lost = [e for e in gone
            if (e[2] or e[1] == "exec")
            and not (e[1] in ("exec_load", "load", "read") and (e[2] or "").startswith(system))
            and not (e[1] == "denied" and e[2].startswith(("file:/proc/", "file:/sys/")))]
    collected = [p for p in eng.graph.procs.values()
                 if p.pid in attacker and (p.labels or p.keep) and p.collected]
    return len(lost) + len(collected)


def log_hours(lines: list[str]) -> float:
    first = next(m for m in map(_TS.search, lines) if m)
    last = next(m for m in map(_TS.search, reversed(lines)) if m)
    return (float(last.group(1)) - float(first.group(1))) / 3600.0


def benign_lines(name: str) -> list[str]:
    with lzma.open(BENIGN / f"{name}.log.xz", "rt", encoding="utf-8", errors="replace") as fh:
        return fh.read().splitlines()


def evaluate_benign(name: str, lines: list[str], trained_on: list[str] | None = None,
                    accounts: str | None = None) -> dict:
    eng = DetectionEngine(host="benign")
    if trained_on is not None:
        eng.process_lines(trained_on)
        eng.flush()
        before = {a["id"] for a in eng.alerts("medium")}
        learned = eng.model.observed
        # a new day: fresh graph and chains, the learned baseline carried over
        fields, _ = eng.baseline_delta()
        eng = DetectionEngine(host="benign")
        eng.load_baseline(fields)
        assert not before, "training log raised medium+ alerts"
    else:
        learned = 0.0
    eng.process_lines(lines)
    eng.flush()
    st = eng.stats()
    medium = eng.alerts("medium")
    hours = log_hours(lines)
    blocks = 0
    if accounts is None:
        meta = json.loads((BENIGN / f"{name}.meta.json").read_text())
        accounts = ",".join(meta["accounts"])
        blocks = meta.get("rounds", 0)
    return {
        "name": name + (", baseline trained on train" if trained_on is not None else ", cold"),
        "records": st["records"],
        "events": st["events"],
        "hours": hours,
        "accounts": accounts,
        "blocks": blocks,
        "medium": len(medium),
        "fp_per_host_hour": len(medium) / hours,
        "low": len(eng.alerts("low")) - len(medium),
        "routine": sum(sum(a["why"]["routine_matches"].values()) for a in eng.alerts("low")),
        "edge_red": st["edge_reduction_ratio"],
        "learned": learned,
    }


def evaluate(log: Path) -> dict:
    """One dev-corpus log (its labels beside it, same name)."""
    labels = json.loads((log.parent / f"{log.stem}.labels.json").read_text())
    return evaluate_lines(log.read_text(encoding="utf-8").splitlines(), labels)


def attack_lines(path: Path) -> list[str]:
    with lzma.open(path, "rt", encoding="utf-8") as fh:
        return fh.read().splitlines()


def evaluate_lines(lines: list[str], labels: dict) -> dict:
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
        "lost": attack_edges_lost(lines, attacker) if attacker else 0,
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
    ap.add_argument(
        "--extra-benign", action="append", default=[], metavar="DIR",
        help="also evaluate DIR/benign.log (+ meta.json) from bench/benign_audit/record.py, "
        "cold and with the baseline trained on the repo's train recording",
    )
    args = ap.parse_args(argv)
    logs = sorted((data_dir(args.data) / "audit").glob("*.log"))
    if not logs:
        print(f"no audit logs under {data_dir(args.data) / 'audit'}", file=sys.stderr)
        return 2
    rows = [dict(evaluate(p), source="dev corpus") for p in logs]
    for p in sorted(OWN_ATTACKS.glob("*.log.xz")):
        labels = json.loads((OWN_ATTACKS / (p.name[: -len(".log.xz")] + ".labels.json")).read_text())
        rows.append(dict(evaluate_lines(attack_lines(p), labels), source="own recordings"))
    print(
        "| scenario | detected | severity | techniques found/labelled | recall | attacker in chain "
        "| latency s | benign medium+ | node red. | edge red. | attack edges lost | records "
        "| mem est KB | mem peak KB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["detected"] is None:
            print(
                f"| {r['scenario']} | (benign) medium+ alerts: {r['medium_alerts']} | - | - | - | - | - "
                f"| {r['medium_alerts']} | {r['node_red']:.1%} | {r['edge_red']:.1%} | - "
                f"| {r['records']} | {r['mem_est'] / 1024:.0f} | {r['mem_peak'] / 1024:.0f} |"
            )
            continue
        lat = f"{r['latency']:.1f}" if r["latency"] is not None else "-"
        print(
            f"| {r['scenario']} | {'yes' if r['detected'] else 'NO'} | {r['severity']} "
            f"| {r['got']}/{r['want']} | {r['recall']:.2f} | {'yes' if r['in_chain'] else 'no'} "
            f"| {lat} | {r['benign_medium']} | {r['node_red']:.1%} | {r['edge_red']:.1%} "
            f"| {r['lost']} | {r['records']} | {r['mem_est'] / 1024:.0f} "
            f"| {r['mem_peak'] / 1024:.0f} |"
        )
    for label in ("dev corpus", "own recordings"):
        attacks = [r for r in rows if r["source"] == label and r["detected"] is not None]
        if not attacks:
            continue
        mean = sum(r["recall"] for r in attacks) / len(attacks)
        print(
            f"\n{label}: mean technique recall {mean:.3f}; detected "
            f"{sum(r['detected'] for r in attacks)}/{len(attacks)}; missing per scenario: "
            + "; ".join(f"{r['scenario'][:5]} {','.join(r['missing']) or '-'}" for r in attacks)
            + "; extra per scenario: "
            + "; ".join(f"{r['scenario'][:5]} {','.join(r['extra']) or '-'}" for r in attacks)
        )
    if (BENIGN / "train.log.xz").exists():
        train = benign_lines("train")
        brows = [evaluate_benign("train", train)]
        # every other recording is held out: never used to tune the detector
        for path in sorted(BENIGN.glob("*.log.xz")):
            name = path.name[: -len(".log.xz")]
            if name == "train":
                continue
            lines = benign_lines(name)
            brows.append(evaluate_benign(name, lines))
            brows.append(evaluate_benign(name, lines, trained_on=train))
        for extra in map(Path, args.extra_benign):
            meta = json.loads((extra / "meta.json").read_text())
            lines = (extra / "benign.log").read_text(encoding="utf-8", errors="replace").splitlines()
            tag = f"{extra.name} (seed {meta['seed']}, {meta['rounds']} work blocks)"
            acc = ",".join(meta["accounts"])
            for trained in (None, train):
                brows.append(evaluate_benign(tag, lines, trained_on=trained, accounts=acc))
                brows[-1]["blocks"] = meta["rounds"]
        print("\n| benign recording | records | events | log hours | rounds | accounts "
              "| medium+ alerts | FP per host-hour | low alerts | matches discounted as routine "
              "| edge red. |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in brows:
            print(f"| {r['name']} | {r['records']} | {r['events']} | {r['hours']:.3f} "
                  f"| {r['blocks']} | {r['accounts']} | {r['medium']} "
                  f"| {r['fp_per_host_hour']:.2f} | {r['low']} | {r['routine']} "
                  f"| {r['edge_red']:.1%} |")
        held = [r for r in brows if not r["name"].startswith("train")]
        for label, rows_ in (("all recordings", brows), ("held-out recordings", held)):
            cold = [r for r in rows_ if "trained" not in r["name"]]
            warm = [r for r in rows_ if "trained" in r["name"]]
            hours = sum(r["hours"] for r in cold)
            med = sum(r["medium"] for r in cold)
            print(f"\n{label}: {hours:.2f} host-hours of log time, "
                  f"{sum(r['blocks'] for r in cold)} rounds of work blocks; medium+ alerts "
                  f"{med} cold, {sum(r['medium'] for r in warm)} with the baseline trained on "
                  f"train: {med / hours:.2f} FP per host-hour")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
