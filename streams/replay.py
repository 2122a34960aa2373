"""``headwater replay movielens``: real events, in time order, into the ``items`` and
``clicks`` topics.

Items come first (title as text, genres as tags, release year), then every rating as
a click event labelled by the protocol of docs/protocol.md (rating ≥ 4 → 1, ≤ 2 → 0,
3 dropped), carrying the user's attributes. Clicks are partitioned by ``user_id`` (a
user's counters then live in one partition's shard and are exact) and sent as JSON-array
envelopes of up to ``batch`` events, one buffer per partition, so the stream path pays
its per-message cost once per envelope.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from core.settings import Settings
from features.movielens import click_events, load_movielens
from streams.producer import RateLimiter, make_producer
from streams.topics import partition_of

log = logging.getLogger(__name__)

RECBOLE_WHEEL = "recbole==1.2.1"


def fetch_movielens(cache: Path) -> Path:
    """Fetch MovieLens-100K when no local copy exists: the RecBole 1.2.1 wheel on PyPI
    carries it in its atomic-file layout (``recbole/dataset_example/ml-100k``)."""
    target = cache / "ml-100k"
    if (target / "ml-100k.inter").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                        RECBOLE_WHEEL], check=True)
        wheel = next(Path(tmp).glob("recbole-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if "/dataset_example/ml-100k/" in m and not m.endswith("/")]
            target.mkdir(parents=True, exist_ok=True)
            for m in members:
                (target / Path(m).name).write_bytes(zf.read(m))
    return target


def resolve_path(path: Path | None, settings: Settings) -> Path:
    if path is not None:  # an explicit path is used or refused, never silently replaced
        if not path.is_dir():
            raise FileNotFoundError(f"MovieLens directory {path} does not exist")
        return path
    if (settings.data_dir / "ml-100k").exists():
        return settings.data_dir / "ml-100k"
    log.info("no local MovieLens-100K: fetching it from the RecBole wheel")
    return fetch_movielens(settings.state_dir / "datasets")


def progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="ev", desc=desc, disable=not enabled, mininterval=0.5,
                file=sys.stderr)


def wait_for_items(redis_url: str, n_items: int, timeout: float, echo=print) -> int:
    """Wait until the worker has stored codes for ``n_items`` items (or ``timeout``).

    Items come first in the replay so that clicks find their attributes and codes, as
    they would in production where an item exists long before anyone clicks it.
    """
    from core.redis_client import connect

    client = connect(redis_url)
    deadline = time.monotonic() + timeout
    coded = 0
    try:
        while time.monotonic() < deadline:
            coded = sum(1 for _ in client.scan_iter("hw:codes:item:*", count=1000))
            if coded >= n_items:
                break
            time.sleep(0.5)
    finally:
        client.close()
    if coded < n_items:
        echo(f"note: only {coded}/{n_items} items have codes after {timeout:.0f}s; replaying clicks anyway")
    return coded


def replay_items(settings: Settings, producer, ml, redis_url: str | None,
                 wait_items: float) -> tuple[int, int | None]:
    """Every item (title as text, genres as tags, release year) to ``items``, stamped just
    before the first rating; then wait for their codes. Returns (items, items coded)."""
    import msgspec

    enc = msgspec.json.Encoder()
    n_parts = settings.partitions
    first_ts = float(ml.clicks["ts"][0]) if len(ml) else time.time()
    item_ids = list(ml.items)
    item_parts = partition_of(item_ids, n_parts)
    items = [{"item_id": iid, "ts": first_ts - 1.0, "text": doc.get("title") or "",
              "tags": list(doc.get("genres") or []),
              "attributes": {"year": doc.get("year")} if doc.get("year") else {}}
             for iid, doc in ml.items.items()]
    for p in range(n_parts):
        chunk = [it for it, ip in zip(items, item_parts, strict=True) if ip == p]
        for i in range(0, len(chunk), 200):
            producer.send(settings.topics["items"], value=enc.encode(chunk[i:i + 200]), partition=p)
    producer.flush()
    coded = wait_for_items(redis_url, len(items), wait_items) if redis_url and wait_items > 0 else None
    return len(items), coded


def replay_movielens(settings: Settings, bootstrap: str, path: Path | None = None,
                     rate: float = 0.0, limit: int = 0, batch: int = 500,
                     progress: bool = True, redis_url: str | None = None,
                     wait_items: float = 120.0, live: bool = False) -> dict:
    """Replay the dataset; returns counts and the produce rate.

    ``live`` stamps every click with the time it is sent instead of the dataset's
    timestamp (time-of-day features and decayed counters then see the replay's clock,
    as they would see a live producer's).
    """
    ml = load_movielens(resolve_path(path, settings))
    producer = make_producer(bootstrap)
    topics = settings.topics
    n_parts = settings.partitions
    t0 = time.perf_counter()
    import msgspec

    enc = msgspec.json.Encoder()
    n_items, coded = replay_items(settings, producer, ml, redis_url, wait_items)

    t_clicks = time.perf_counter()
    total = len(ml) if not limit else min(limit, len(ml))
    parts = partition_of(ml.clicks["user_id"][:total], n_parts)
    buffers: list[list[dict]] = [[] for _ in range(n_parts)]
    limiter = RateLimiter(rate)
    sent = 0
    with progress_bar(total, progress, "clicks") as bar:
        step = 5000
        for start in range(0, total, step):
            stop = min(start + step, total)
            for ev, p in zip(click_events(ml, start, stop), parts[start:stop], strict=True):
                if live:
                    ev["ts"] = time.time()
                buf = buffers[p]
                buf.append(ev)
                if len(buf) >= batch or (rate and len(buf) >= max(1, int(rate / 20))):
                    producer.send(topics["clicks"], value=enc.encode(buf), partition=int(p))
                    sent += len(buf)
                    bar.update(len(buf))
                    limiter.wait(len(buf))
                    buffers[p] = []
        for p, buf in enumerate(buffers):
            if buf:
                producer.send(topics["clicks"], value=enc.encode(buf), partition=p)
                sent += len(buf)
                bar.update(len(buf))
        producer.flush()
    producer.close()
    seconds = time.perf_counter() - t0
    click_seconds = time.perf_counter() - t_clicks
    return {"items": n_items, "items_coded": coded, "clicks": sent, "seconds": seconds,
            "click_seconds": click_seconds,
            "clicks_per_s": sent / click_seconds if click_seconds else 0.0}
