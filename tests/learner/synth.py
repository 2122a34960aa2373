"""Synthetic train batches over a tiny feature schema, shared by the learner tests."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from learner.batch import encode_batch

FIELDS = ["user", "item", "ctx"]
SCHEMA_JSON = json.dumps(
    {"categorical": FIELDS, "dense": ["x"], "version": 1}, sort_keys=True, separators=(",", ":")
)
SCHEMA_HASH = hashlib.sha256(SCHEMA_JSON.encode()).hexdigest()

TINY_HEAD = {
    "embedding_dim": 4,
    "kernels": [3, 3],
    "channels": [2, 3],
    "recombination": [1, 1],
    "mlp": [16],
}


def synthetic_columns(n: int, offset: int, seed: int, n_items: int = 30) -> dict[str, np.ndarray]:
    """Rows whose label depends on the item (half the items are 'good') and on x.

    One event per source message, so row ``i`` has source offset ``offset + i``, sub 0.
    """
    rng = np.random.default_rng(seed)
    items = rng.integers(1, n_items + 1, n)
    users = rng.integers(1, 50, n)
    x = rng.normal(size=n).astype(np.float32)
    logit = np.where(items % 2 == 0, 2.0, -2.0) + 0.5 * x
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    return {
        "event_id": np.array([f"e{offset + i}" for i in range(n)]),
        "ts": 1e9 + offset + np.arange(n, dtype=np.float64),
        "label": labels,
        "offset": offset + np.arange(n, dtype=np.int64),
        "sub": np.zeros(n, dtype=np.int32),
        "c:user": users * 1_000_003,
        "c:item": items * 7_919 + 11,
        "c:ctx": np.where(rng.random(n) < 0.2, 0, 5),
        "d:x": x,
    }


def make_payload(
    n: int = 64, offset: int = 0, seed: int = 0, partition: int = 0, schema_json: str = SCHEMA_JSON
) -> bytes:
    cols = synthetic_columns(n, offset, seed)
    digest = hashlib.sha256(schema_json.encode()).hexdigest()
    return encode_batch(cols, schema_json, digest, "clicks", partition, offset, offset + n)
