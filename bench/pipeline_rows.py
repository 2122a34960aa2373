"""The product's own training rows for MovieLens-100K, as the worker writes them.

Starts a real broker, a real Redis and a real worker (``python -m headwater worker``),
replays MovieLens-100K through ``headwater replay``'s code path, and reads every message
of ``train-batches`` back. The rows are exactly what the learner consumes in the running
stack: the worker's counters (point in time), ``RowBuilder`` and item codes. Learning
benchmarks that need rows import :func:`pipeline_rows` instead of building their own.

The payloads are cached under ``artifacts/pipeline_rows/`` keyed by the feature schema
settings and the encoder; ``--refresh`` rebuilds them.

    .venv/bin/python bench/pipeline_rows.py            # build (about a minute) and summarise
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from learner.batch import TrainBatch, decode_batch  # noqa: E402

CACHE = REPO / "artifacts" / "pipeline_rows"


@dataclass
class PipelineRows:
    """Every row of one replay, in the order the worker produced them per partition.

    ``order`` sorts rows by event time (ties by partition, offset, sub): the order a
    single learner sees them in when partitions advance together.
    """

    payloads: list[bytes]
    batches: list[TrainBatch]

    @property
    def schema_json(self) -> str:
        return self.batches[0].schema_json

    def columns(self) -> dict[str, np.ndarray]:
        """All rows concatenated in event-time order."""
        b = self.batches
        ts = np.concatenate([x.ts for x in b])
        part = np.concatenate([np.full(len(x), x.source_partition) for x in b])
        off = np.concatenate([x.offsets for x in b])
        sub = np.concatenate([x.subs for x in b])
        order = np.lexsort((sub, off, part, ts))
        return {
            "categorical": np.concatenate([x.categorical for x in b])[order],
            "dense": np.concatenate([x.dense for x in b])[order],
            "labels": np.concatenate([x.labels for x in b])[order],
            "ts": ts[order],
            "partition": part[order],
            "offset": off[order],
            "sub": sub[order],
            "event_id": np.concatenate([np.asarray(x.event_ids, dtype=object) for x in b])[order],
        }


def _key(encoder: str, partitions: int) -> str:
    from core.settings import Settings
    from features.defaults import row_builder

    settings = Settings()
    schema = row_builder(settings).schema
    # The counters' point-in-time semantics shape every row: rows of another are not reused.
    pit = {"semantics": "strict-history-v1", "ties": settings.pit_ties,
           "history": settings.pit_history}
    blob = json.dumps({"schema": schema.hash, "encoder": encoder, "partitions": partitions,
                       "pit": pit})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_all(bootstrap: str, topic: str, want_rows: int, timeout: float) -> list[bytes]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             fetch_max_wait_ms=50, max_partition_fetch_bytes=16 << 20)
    try:
        deadline = time.monotonic() + timeout
        parts: set[int] = set()
        while not parts and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic) or set()
            time.sleep(0.2)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[bytes] = []
        rows = 0
        while rows < want_rows:
            if time.monotonic() > deadline:
                raise TimeoutError(f"train-batches held {rows} of {want_rows} rows after {timeout}s")
            for msgs in consumer.poll(timeout_ms=500).values():
                for m in msgs:
                    out.append(m.value)
                    rows += len(decode_batch(m.value))
        return out
    finally:
        consumer.close()


def build(data_dir: Path, encoder: str, partitions: int, timeout: float = 600,
          log_copy: Path | None = None, before_stop=None) -> list[bytes]:
    """Run broker + Redis + worker, replay MovieLens, return every train-batches payload
    (``log_copy``: where to keep the worker's log; ``before_stop(redis_url)`` runs
    before Redis stops, e.g. to copy state out)."""
    from core.settings import Settings
    from features.movielens import load_movielens
    from headwater.servers import free_port, start_broker, start_redis, stop_pid
    from streams.replay import replay_movielens

    ml = load_movielens(data_dir / "ml-100k")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        broker = start_broker(log_path=t / "broker.log")
        redis_server = start_redis(log_path=t / "redis.log")
        bootstrap = f"{broker.host}:{broker.port}"
        url = redis_server.extra["url"]
        env = dict(os.environ, HEADWATER_KAFKA=bootstrap, HEADWATER_REDIS=url,
                   HEADWATER_STATE_DIR=str(t / "state"), HEADWATER_MODEL_STORE=str(t / "models"),
                   HEADWATER_WORKER_PORT=str(free_port()), HEADWATER_PARTITIONS=str(partitions),
                   HEADWATER_SESSION_TIMEOUT="2", HEADWATER_CONTENT_ENCODER=encoder,
                   HEADWATER_DATA_DIR=str(data_dir))
        with open(t / "worker.log", "wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "headwater", "worker"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                      start_new_session=True)
        try:
            settings = Settings(partitions=partitions, content_encoder=encoder)
            replay_movielens(settings, bootstrap, data_dir / "ml-100k", progress=False,
                             redis_url=url, wait_items=300)
            payloads = _read_all(bootstrap, settings.topics["train-batches"], len(ml), timeout)
            if before_stop is not None:
                before_stop(url)
            return payloads
        except BaseException:
            sys.stderr.write((t / "worker.log").read_text(errors="replace")[-3000:])
            raise
        finally:
            stop_pid(worker.pid, timeout=10, proc=worker)
            if log_copy is not None:
                log_copy.write_bytes((t / "worker.log").read_bytes())
            redis_server.stop()
            broker.stop()


def pipeline_rows(data_dir: Path | None = None, encoder: str = "minilm", partitions: int = 4,
                  refresh: bool = False, path: Path | None = None) -> PipelineRows:
    """The worker's rows for a full MovieLens-100K replay (cached); ``path``: read that
    cache file instead (e.g. rows an older worker wrote), never rebuilt."""
    from core.settings import default_data_dir

    data_dir = data_dir or default_data_dir()
    if path is not None:
        refresh = False
    path = path or CACHE / f"{_key(encoder, partitions)}.bin"
    if refresh or not path.exists():
        payloads = build(data_dir, encoder, partitions)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = b"".join(len(p).to_bytes(8, "little") + p for p in payloads)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)
    blob = path.read_bytes()
    payloads, i = [], 0
    while i < len(blob):
        n = int.from_bytes(blob[i:i + 8], "little")
        payloads.append(blob[i + 8:i + 8 + n])
        i += 8 + n
    return PipelineRows(payloads, [decode_batch(p) for p in payloads])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--refresh", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = pipeline_rows(encoder=args.encoder, partitions=args.partitions, refresh=args.refresh)
    cols = rows.columns()
    print(f"{len(rows.payloads)} messages, {len(cols['labels'])} rows, "
          f"{cols['categorical'].shape[1]} categorical + {cols['dense'].shape[1]} dense fields, "
          f"positive rate {cols['labels'].mean():.3f} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
