"""Benchmark: what a delta publication costs the learner, and serving's load of it, patched vs rebuilt.

In one process, on the default model (``headwater learner``'s own recipe,
``streams.learner_runner.trainer_settings``: FGCNN ``lean``, hashed tables of
``HEADWATER_EMBEDDING_BUCKETS`` rows per field) and the default feature schema (the
worker's row builder): a ``LearnerService`` trains on synthetic steps of
``--step-rows`` rows (random tokens, 1 % new ids per field per step) and publishes a full
checkpoint, then a delta after every ``--steps-per-delta`` steps, ``--deltas`` times.
Each delta is loaded by serving's own :class:`serving.loader.ModelLoader` on the
loaded base both ways, alternating: **patched** (the product: a copy of the base's model
with only what changed replaced) and **rebuilt** (the baseline: base + delta weights
rebuilt like a full checkpoint). The two must give the same ``state_dict``. Reported:
wall and CPU seconds (this thread) per load, p50, and the ratio; the learner's seconds
per delta and per full publication; delta and full bytes; the load average.

    .venv/bin/python bench/delta_apply.py --deltas 10
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import Settings  # noqa: E402
from features.defaults import row_builder  # noqa: E402
from learner.batch import encode_batch  # noqa: E402
from learner.service import LearnerService  # noqa: E402
from learner.store import LocalModelStore  # noqa: E402
from serving import loader as loader_module  # noqa: E402
from serving.loader import ModelLoader  # noqa: E402
from streams.learner_runner import trainer_settings  # noqa: E402


def payload(schema, rng: np.random.Generator, n: int, offset: int, vocab: int) -> bytes:
    """A train batch of ``n`` rows: tokens from a vocabulary that grows by 1 % a step."""
    cols = {
        "event_id": np.array([f"e{offset + i}" for i in range(n)]),
        "ts": 1e9 + offset + np.arange(n, dtype=np.float64),
        "label": (rng.random(n) < 0.2).astype(np.int8),
        "offset": offset + np.arange(n, dtype=np.int64),
        "sub": np.zeros(n, dtype=np.int32),
    }
    for f in schema.categorical:
        cols[f"c:{f}"] = rng.integers(1, vocab, n) * 1_000_003 + hash(f) % 997
    for d in schema.dense:
        cols[f"d:{d}"] = rng.uniform(0, 5, n).astype(np.float32)
    js = schema.to_json()
    return encode_batch(cols, js, hashlib.sha256(js.encode()).hexdigest(), "clicks", 0,
                        offset, offset + n)


def timed(fn):
    w0, c0 = time.perf_counter(), time.thread_time()
    out = fn()
    return out, time.perf_counter() - w0, time.thread_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deltas", type=int, default=10)
    ap.add_argument("--step-rows", type=int, default=256)
    ap.add_argument("--steps-per-delta", type=int, default=1,
                    help="training steps between deltas (200 events/s, 1 s deltas: about 1)")
    ap.add_argument("--warm-steps", type=int, default=20, help="steps before the full checkpoint")
    args = ap.parse_args()

    settings = Settings()
    torch.set_num_threads(settings.torch_threads)
    schema = row_builder(settings).schema
    recipe = trainer_settings(settings)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="hw-delta-apply-") as tmp:
        store = LocalModelStore(Path(tmp), "ranker", keep=3)
        svc = LearnerService(store, recipe.factory(), publish_every_seconds=None, resume=False,
                             step_rows=args.step_rows, delta_every_seconds=1e-9)
        offset, vocab = 0, 500
        for _ in range(args.warm_steps):
            svc.process(payload(schema, rng, args.step_rows, offset, vocab))
            offset, vocab = offset + args.step_rows, int(vocab * 1.01) + 1
        full, full_s, _ = timed(svc.publish)
        loader = ModelLoader(store, schema)
        base = loader.load(full["version"])
        rebuild_only = mock.patch.object(loader_module, "patch_model", lambda *_: None)
        res = {"patched": [], "rebuilt": []}
        cpu = {"patched": [], "rebuilt": []}
        pub_s, sizes = [], []
        for k in range(args.deltas):
            for _ in range(args.steps_per_delta):
                svc.process(payload(schema, rng, args.step_rows, offset, vocab))
                offset, vocab = offset + args.step_rows, int(vocab * 1.01) + 1
            d, s, _ = timed(svc.maybe_publish)
            assert d is not None and d["kind"] == "delta", d
            pub_s.append(s)
            sizes.append(d["bytes"])
            order = ("patched", "rebuilt") if k % 2 == 0 else ("rebuilt", "patched")
            states = {}
            load = functools.partial(loader.load, d["version"], base_of=lambda _: base)
            for how in order:
                if how == "rebuilt":
                    with rebuild_only:
                        served, wall, c = timed(load)
                else:
                    served, wall, c = timed(load)
                assert served.patched == (how == "patched")
                res[how].append(wall)
                cpu[how].append(c)
                states[how] = served.model.state_dict()
            a, b = states["patched"], states["rebuilt"]
            assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)

    print(f"default model ({settings.model_kind} {settings.model_preset}, "
          f"{len(schema.categorical)} fields x {settings.embedding_buckets} rows x "
          f"{settings.embedding_dim}), {args.deltas} deltas, {args.steps_per_delta} step(s) of "
          f"{args.step_rows} rows between deltas; load average {os.getloadavg()[0]:.1f} "
          f"{os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}")
    print("\n| serving's load of a delta | wall p50 s | wall mean s | CPU p50 s |")
    print("|---|---:|---:|---:|")
    for how in ("rebuilt", "patched"):
        print(f"| {how} | {statistics.median(res[how]):.4f} | {statistics.mean(res[how]):.4f} | "
              f"{statistics.median(cpu[how]):.4f} |")
    print(f"\npatched / rebuilt: wall p50 {statistics.median(res['patched']) / statistics.median(res['rebuilt']):.2f}x, "
          f"CPU p50 {statistics.median(cpu['patched']) / statistics.median(cpu['rebuilt']):.2f}x")
    print(f"\nlearner: full publication {full_s:.3f} s, {full['bytes'] / 1e6:.2f} MB; delta p50 "
          f"{statistics.median(pub_s):.3f} s, {statistics.median(sizes) / 1e6:.2f} MB "
          f"(last {sizes[-1] / 1e6:.2f} MB: cumulative since the full one)")


if __name__ == "__main__":
    main()
