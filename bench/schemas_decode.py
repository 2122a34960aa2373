"""Event decoding: msgspec (what streams/ uses) against pydantic v2 on the same messages.

Decodes and validates real MovieLens click events, single-event messages and a JSON-array
envelope, with each library's typed model (same fields, same types); median of 5 runs.

Run: ``.venv/bin/python bench/schemas_decode.py [--events 20000]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import msgspec
from pydantic import BaseModel, TypeAdapter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from features.movielens import click_events, load_movielens  # noqa: E402
from streams.schemas import ClickEvent, decode_clicks  # noqa: E402

Scalar = str | int | float | bool | None


class PydClick(BaseModel):
    event_id: str | int
    ts: float
    user_id: str | int
    item_id: str | int
    label: int
    context: dict[str, Scalar] = {}
    user: dict[str, Scalar] = {}


def timed(fn, repeat: int = 5) -> float:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000)
    args = ap.parse_args()
    events = click_events(load_movielens(), 0, args.events)
    singles = [json.dumps(e).encode() for e in events]
    envelope = json.dumps(events).encode()
    envelopes = [json.dumps(events[i:i + 200]).encode() for i in range(0, len(events), 200)]
    ms_one = msgspec.json.Decoder(ClickEvent)
    ms_many = msgspec.json.Decoder(list[ClickEvent])
    pyd_many = TypeAdapter(list[PydClick])
    n = len(events)
    rows = [
        ("msgspec typed decode, single-event messages", timed(lambda: [ms_one.decode(b) for b in singles])),
        ("pydantic v2 model_validate_json, single-event messages",
         timed(lambda: [PydClick.model_validate_json(b) for b in singles])),
        ("msgspec typed decode, one envelope", timed(lambda: ms_many.decode(envelope))),
        ("pydantic v2 TypeAdapter.validate_json, one envelope", timed(lambda: pyd_many.validate_json(envelope))),
        ("Headwater decode_clicks (msgspec + semantic checks + columns), envelopes of 200",
         timed(lambda: decode_clicks(envelopes, 1 << 22))),
    ]
    print(f"{n} MovieLens click events, median of 5 runs")
    print("| decoder | events/s | µs/event |")
    print("|---|---:|---:|")
    for name, secs in rows:
        print(f"| {name} | {n / secs:,.0f} | {secs / n * 1e6:.2f} |")


if __name__ == "__main__":
    main()
