"""The detection engine alone, per CPU-second and per instruction: the worker's audit
agent without its state writes (``bench/detection_agent.py`` adds those, and
``bench/detection_e2e.py`` the broker and Faust).

The dev corpus and the first ``--limit`` lines of each recorded benign day, cut into
messages of ``--lines`` lines and interleaved host by host as the agent receives them; one
:class:`detection.engine.DetectionEngine` per host. Prints records, alert updates, CPU
seconds, records per CPU-second and a hash of every alert update and of every engine's
``stats()`` (a speed change must leave both hashes alone). ``--repo`` runs another checkout's
engine (e.g. a worktree at the commit before a change, built with
``python setup.py build_ext --inplace``); run the two alternately.

Per-record instructions, steadier than seconds on a shared VM: run it under callgrind, once
with ``--messages 0`` (imports and start-up only) and once in full, and divide the
difference by the records::

    PYTHONHASHSEED=0 valgrind --tool=callgrind .venv/bin/python bench/detection_engine.py
    PYTHONHASHSEED=0 valgrind --tool=callgrind .venv/bin/python bench/detection_engine.py --messages 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(REPO), help="the checkout whose engine runs")
    ap.add_argument("--limit", type=int, default=60_000, help="lines of each benign day")
    ap.add_argument("--lines", type=int, default=100, help="lines per message")
    ap.add_argument("--messages", type=int, default=None, help="only the first N messages")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    from detection_agent import load_logs, partitions

    msgs = [(host.decode(), value.split(b"\n"))
            for p in partitions(load_logs(args.limit), args.lines).values()
            for _, host, value in p]
    if args.messages is not None:
        msgs = msgs[:args.messages]
    sys.path.insert(0, str(Path(args.repo).resolve()))
    from detection.engine import DetectionEngine

    records = sum(len(lines) for _, lines in msgs)
    engines: dict[str, DetectionEngine] = {}
    out = []
    t0 = time.process_time()
    for host, lines in msgs:
        eng = engines.get(host)
        if eng is None:
            eng = engines[host] = DetectionEngine(host=host)
        out.append(eng.process_lines(lines).alerts)
    for eng in engines.values():
        out.append(eng.flush().alerts)
    cpu = time.process_time() - t0
    if not records:
        return

    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    print(f"{args.repo}: {records} records, {sum(map(len, out))} alert updates, {cpu:.2f} CPU-s, "
          f"{records / max(cpu, 1e-9):,.0f} records/CPU-s, alerts {digest(out)}, "
          f"stats {digest([e.stats() for e in engines.values()])}")


if __name__ == "__main__":
    main()
