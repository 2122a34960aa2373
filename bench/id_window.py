"""Benchmark: redis-server CPU per event id of the duplicate-id window, in process.

Drives the product's ``features.event_ids.EventIdWindow`` (the tree on ``PYTHONPATH`` /
the working directory, so a base checkout runs its own code) against a throwaway
redis-server started here, with MovieLens-shaped ids (``"<user>:<item>"``) in batches of
``--batch`` per partition call, well past the window's capacity so that eviction is in the
steady state; then the same batches again (a replay). Reports redis-server CPU (user +
system, ``/proc``) per id for new ids and for replayed ids, the client's CPU per id, and
redis-server's memory.

    PYTHONPATH=. .venv/bin/python bench/id_window.py [--ids 600000] [--batch 12500] [--capacity 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path.cwd()))


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(port: int, pid: int, ids: int, batch: int, capacity: int) -> dict:
    import redis.asyncio as aioredis

    from features.event_ids import EventIdWindow

    client = aioredis.Redis(port=port)
    window = EventIdWindow(client, capacity)
    rng = np.random.default_rng(7)
    users, items = rng.integers(1, 300_000, ids), rng.integers(1, 200_000, ids)
    names = [f"{u}:{i}:{n}" for n, (u, i) in enumerate(zip(users.tolist(), items.tolist(), strict=True))]
    batches = []
    for s in range(0, ids, batch):
        n = min(batch, ids - s)
        offs = np.arange(s, s + n) // 200  # envelopes of 200: offset, then the event's place
        subs = np.arange(s, s + n) % 200
        batches.append((names[s:s + n], offs, subs))
    out = {}
    for phase in ("new", "replay"):
        chosen = batches if phase == "new" else batches[-max(1, capacity // batch // 2):]
        server0, client0 = _cpu(pid), time.process_time()
        dups = 0
        for names_, offs, subs in chosen:
            dup, _ = await window.duplicates("clicks", 0, names_, offs, subs)
            dups += int(dup.sum())
        n = sum(len(b[0]) for b in chosen)
        out[phase] = {"ids": n, "duplicates": dups,
                      "server_us": (_cpu(pid) - server0) / n * 1e6,
                      "client_us": (time.process_time() - client0) / n * 1e6}
    out["memory_mb"] = (await client.info("memory"))["used_memory"] / 1e6
    await client.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ids", type=int, default=600_000)
    ap.add_argument("--batch", type=int, default=12_500)
    ap.add_argument("--capacity", type=int, default=200_000)
    args = ap.parse_args()
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="id-window-")
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port),
                               "--save", "", "--appendonly", "no", "--dir", tmp],
                              stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        res = asyncio.run(measure(port, server.pid, args.ids, args.batch, args.capacity))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()[0]
    for phase in ("new", "replay"):
        r = res[phase]
        print(f"{phase:6s} ids {r['ids']:>8,}  duplicates {r['duplicates']}  redis-server CPU "
              f"{r['server_us']:.2f} µs/id  client CPU {r['client_us']:.2f} µs/id")
    print(f"redis used_memory {res['memory_mb']:.1f} MB  load {load:.2f}  tree {Path.cwd()}")


if __name__ == "__main__":
    main()
