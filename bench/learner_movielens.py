"""MovieLens-100K: Headwater's online learner against River and offline DeepCTR-Torch peers.

Protocol (docs/protocol.md): rating >= 4 -> 1, <= 2 -> 0, 3 dropped; events in time order.
Online models run one pass, test-then-train, in batches of 256 that go through the real
codec (``encode_batch`` -> ``decode_batch``) and the real ``PrequentialTrainer``.
Reported: prequential AUC / log-loss over the whole stream, AUC over the last 20 % in
time ("TEST"), and cold-item AUC (rows that are among their item's first 10 labelled
events, inside TEST).

**Rows are the product's own** (:mod:`bench.pipeline_rows`): a real broker, Redis and
worker replay MovieLens and the rows are read back from ``train-batches``: the worker's
strictly point-in-time counters (docs/point-in-time.md), ``RowBuilder`` and item codes.
Two feature sets:

* ``full``: every field of the product's rows (33 categorical incl. counter buckets and
  item codes, 36 dense counter features);
* ``peers``: the peers' 10 fields only (user, item, age, gender, occupation, zip3, year,
  first genre, hour, weekday; no counters, no codes): like for like.

Tuning budget, the same for every online model: ``--grid`` configurations (learning
rates), the one with the best prequential AUC on the **first 80 %** of the stream is
reported (TEST never selects). Offline DeepCTR peers train on the first 80 % (epochs 1..5
chosen on the last 10 % of it), refit on the full 80 % and score TEST with counters
**frozen at the end of their training data**: the TEST rows' counter fields are rebuilt
by the product's ``RowBuilder`` from the product's store holding only the TRAIN events
(read with the product's reference resolution, decayed to each row's time).

    .venv/bin/pip install -e '.[peers]'    # DeepCTR-Torch for the offline peers
    .venv/bin/python bench/learner_movielens.py --features full peers --seeds 0
    .venv/bin/python bench/learner_movielens.py --only fgcnn river-lr --features peers
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline_rows import pipeline_rows  # noqa: E402
from features.schema import FeatureSchema  # noqa: E402
from learner.batch import decode_batch, encode_batch  # noqa: E402
from learner.metrics import exact_auc, log_loss  # noqa: E402
from learner.protocol import RiverLearner  # noqa: E402
from learner.trainer import PrequentialTrainer, TrainerSettings  # noqa: E402

BATCH = 256
#: The peers' fields, as the product's rows name them.
PEER_FIELDS = ("user_id", "item_id", "age", "gender", "occupation", "zip3", "year", "genre",
               "hour", "weekday")


# ---------------------------------------------------------------------------------------
# rows
@dataclass
class Rows:
    schema: FeatureSchema
    tokens: np.ndarray  # [n, F] int64
    dense: np.ndarray  # [n, D] float32
    labels: np.ndarray  # int8
    ts: np.ndarray
    items: np.ndarray  # item id per row (cold-item mask)
    event_ids: np.ndarray

    def subset(self, fields, dense: bool) -> Rows:
        idx = [self.schema.categorical.index(f) for f in fields]
        schema = FeatureSchema(categorical=list(fields),
                               dense=list(self.schema.dense) if dense else [])
        return Rows(schema, self.tokens[:, idx], self.dense if dense else self.dense[:, :0],
                    self.labels, self.ts, self.items, self.event_ids)


def load_rows(partitions: int = 4, encoder: str = "minilm", refresh: bool = False,
              path: str | None = None) -> Rows:
    """The worker's rows of a full replay, in event-time order (:mod:`bench.pipeline_rows`)."""
    pr = pipeline_rows(partitions=partitions, encoder=encoder, refresh=refresh,
                       path=Path(path) if path else None)
    c = pr.columns()
    schema = FeatureSchema.from_json(pr.schema_json)
    items = np.array([e.split(":", 1)[1] for e in c["event_id"].tolist()], dtype=object)
    return Rows(schema, c["categorical"].astype(np.int64), c["dense"].astype(np.float32),
                c["labels"].astype(np.int8), c["ts"], items, c["event_id"])


def frozen_counter_rows(rows: Rows, cut: int) -> Rows:
    """``rows`` with the counter fields of rows ``cut:`` read from the state at the end of
    TRAIN (rows ``:cut``): the product's store applies the TRAIN events, then each TEST row
    is built by the product's ``RowBuilder`` from that frozen state decayed to its time."""
    from core.settings import Settings
    from features.counters import aggregate, as_columns, decay_state, derive_features, resolve_refs
    from features.defaults import row_builder
    from features.movielens import load_movielens
    from features.store import SyncOnlineStore
    from headwater.servers import start_redis

    ml = load_movielens()
    c = ml.clicks
    where = {e: k for k, e in enumerate(c["event_id"].tolist())}
    pos = np.array([where[e] for e in rows.event_ids.tolist()])

    def events(sel):
        k = pos[sel]
        out = {f: c[f][k] for f in ("event_id", "ts", "user_id", "item_id", "label")}
        out["user"] = [ml.users[u] for u in out["user_id"]]
        return out

    builder = row_builder(Settings())
    server = start_redis()
    try:
        store = SyncOnlineStore.from_url(server.extra["url"], partitions=1)
        attrs = {i: {"genres": a["genres"], "year": a["year"]} for i, a in ml.items.items()}
        store.put_item_attributes(attrs, ts=0)
        for s in range(0, cut, 1000):
            ev = events(np.arange(s, min(s + 1000, cut)))
            ev["offset"] = np.arange(s, s + len(ev["ts"]))
            store.apply_batch("clicks", 0, ev)
        test = events(np.arange(cut, len(pos)))
        test["offset"] = np.arange(cut, len(pos))
        test["sub"] = np.zeros(len(pos) - cut, np.int32)
        cfg = store.counters
        cols = as_columns(test)
        refs = resolve_refs(cfg, cols, attrs)
        blob = b"".join(store._execute(store.read_cmds(refs.entities, cfg.state_fields)))
        states = store.states(blob, cfg.width)
        pre = decay_state(cfg, states[refs.entity], cols["ts"][refs.event])
        feats = derive_features(cfg, aggregate(refs, pre))
        built = builder.build(test, feats, attrs, None)
    finally:
        server.stop()
    counter_fields = [f for f in rows.schema.categorical if f.endswith("_bucket")]
    tokens, dense = rows.tokens.copy(), rows.dense.copy()
    for f in counter_fields:
        tokens[cut:, rows.schema.categorical.index(f)] = built[f"c:{f}"]
    for j, d in enumerate(rows.schema.dense):
        dense[cut:, j] = built[f"d:{d}"]
    # The same builder on the same events must give the same non-counter fields.
    for f in PEER_FIELDS:
        same = built[f"c:{f}"] == rows.tokens[cut:, rows.schema.categorical.index(f)]
        if not same.all():
            raise AssertionError(f"frozen rows: field {f} differs from the worker's rows")
    return Rows(rows.schema, tokens, dense, rows.labels, rows.ts, rows.items, rows.event_ids)


def encode_all(rows: Rows) -> list[bytes]:
    schema, tokens, dense, labels, ts = rows.schema, rows.tokens, rows.dense, rows.labels, rows.ts
    payloads = []
    names = schema.categorical
    for start in range(0, len(labels), BATCH):
        sl = slice(start, start + BATCH)
        n = len(labels[sl])
        cols = {
            "event_id": np.array([f"r{start + j}" for j in range(n)]),
            "ts": ts[sl],
            "label": labels[sl],
            "offset": np.arange(start, start + n, dtype=np.int64),
            "sub": np.zeros(n, dtype=np.int32),
        }
        cols |= {f"c:{f}": tokens[sl, j] for j, f in enumerate(names)}
        cols |= {f"d:{d}": dense[sl, j] for j, d in enumerate(schema.dense)}
        payloads.append(
            encode_batch(cols, schema.to_json(), schema.hash, "clicks", 0, start, start + n)
        )
    return payloads


def cold_mask(items: np.ndarray, k: int = 10) -> np.ndarray:
    """True where the row is among its item's first ``k`` labelled events (stream order)."""
    seen: dict[int, int] = defaultdict(int)
    out = np.zeros(len(items), dtype=bool)
    for j, it in enumerate(items.tolist()):
        out[j] = seen[it] < k
        seen[it] += 1
    return out


# ---------------------------------------------------------------------------------------
# models
BIG = {"buckets": 4096, "per_field": {"user_id": 1 << 17, "item_id": 1 << 17, "zip3": 1 << 17}}

#: The tuning budget, the same for every online model: this many configurations, the best
#: prequential AUC on the first 80 % wins. Torch: (network lr, embedding lr); River: AdaGrad lr.
TORCH_GRID = [(1e-3, 1e-2), (1e-3, 3e-2), (3e-3, 1e-2), (3e-4, 3e-3)]
RIVER_GRID = [0.3, 0.1, 0.03, 1.0]


def online_variants() -> dict[str, dict]:
    """Torch models, all with the product's hashed tables (2^17 buckets for ids)."""
    return {
        "fgcnn": dict(kind="fgcnn", embedding=BIG),
        "fgcnn-wide": dict(kind="fgcnn", embedding=BIG, wide=True, dense_norm=True),
        "fgcnn-stream-wide": dict(kind="fgcnn", preset="stream", embedding=BIG, wide=True,
                                  dense_norm=True),
        # + a linear term over the ids (Wide & Deep's wide part on the categorical fields)
        "fgcnn-wide-ids": dict(kind="fgcnn", embedding=BIG, wide=True, dense_norm=True,
                               wide_ids=10.0),
        "fgcnn-stream-wide-ids": dict(kind="fgcnn", preset="stream", embedding=BIG, wide=True,
                                      dense_norm=True, wide_ids=10.0),
        "fgcnn-stream-wide-ids2": dict(kind="fgcnn", preset="stream", embedding=BIG, wide=True,
                                       dense_norm=True, wide_ids=2.0),
        "ipnn": dict(kind="ipnn", embedding=BIG),
        "deepfm": dict(kind="deepfm", embedding=BIG),
        "lr": dict(kind="lr", embedding=BIG),
    }


def run_online(name, payloads, schema, seed, threads, config):
    if name.startswith("river-"):
        from river import facto, linear_model, optim

        if name == "river-lr":
            model = linear_model.LogisticRegression(optimizer=optim.AdaGrad(config))
            learner = RiverLearner(model, schema.categorical, schema.dense, one_hot=True)
        else:
            model = facto.FFMClassifier(
                n_factors=8,
                weight_optimizer=optim.AdaGrad(config),
                latent_optimizer=optim.AdaGrad(config),
                seed=seed,
            )
            learner = RiverLearner(model, schema.categorical, schema.dense, one_hot=False)
        trainer = PrequentialTrainer(learner, num_threads=threads)
    else:
        lr, emb_lr = config
        spec = online_variants()[name]
        settings = TrainerSettings(lr=lr, embedding_lr=emb_lr, seed=seed, num_threads=threads,
                                   **spec)
        trainer = settings.build(schema.to_json())
    scores = []
    t0 = time.perf_counter()
    for p in payloads:
        res = trainer.step(decode_batch(p))
        scores.append(res.scores)
    return np.concatenate(scores), time.perf_counter() - t0


def run_offline(name, rows: Rows, seed, threads, max_epochs=5):
    """DeepCTR-Torch peer: epochs chosen on the last 10 % of the first 80 %, refit, score TEST."""
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models import PNN, DeepFM

    torch.set_num_threads(threads)
    tokens, dense, labels, schema = rows.tokens, rows.dense, rows.labels, rows.schema
    n = len(labels)
    cut = int(n * 0.8)
    val_cut = int(cut * 0.9)
    names = schema.categorical

    def encode(fit_rows):
        # Vocabulary from the training rows only; unseen test ids share index 0.
        x = {}
        vocab = []
        for j, f in enumerate(names):
            uniq = np.unique(tokens[:fit_rows, j])
            idx = np.searchsorted(uniq, tokens[:, j])
            idx = np.clip(idx, 0, len(uniq) - 1)
            hit = uniq[idx] == tokens[:, j]
            x[f] = np.where(hit, idx + 1, 0).astype(np.int64)
            vocab.append(len(uniq) + 1)
        for j, d in enumerate(schema.dense):
            x[d] = dense[:, j].astype(np.float32)
        cols = [SparseFeat(f, v, embedding_dim=16) for f, v in zip(names, vocab, strict=True)]
        cols += [DenseFeat(d, 1) for d in schema.dense]
        return x, cols

    def build(cols):
        if name == "deepctr-pnn":
            m = PNN(cols, dnn_hidden_units=(400, 400), use_inner=True, seed=seed)
        else:
            m = DeepFM(cols, cols, dnn_hidden_units=(400, 400), seed=seed)
        m.compile("adam", "binary_crossentropy")
        return m

    def part(x, sl):
        return {k: v[sl] for k, v in x.items()}

    torch.manual_seed(seed)
    x, cols = encode(val_cut)
    model = build(cols)
    val_auc = []
    for _ in range(max_epochs):
        model.fit(
            part(x, slice(0, val_cut)), labels[:val_cut], batch_size=BATCH, epochs=1, verbose=0
        )
        p = model.predict(part(x, slice(val_cut, cut)), batch_size=4096).ravel()
        val_auc.append(exact_auc(labels[val_cut:cut], p))
    best = int(np.nanargmax(val_auc)) + 1
    torch.manual_seed(seed)
    x, cols = encode(cut)
    model = build(cols)
    model.fit(part(x, slice(0, cut)), labels[:cut], batch_size=BATCH, epochs=best, verbose=0)
    p = model.predict(part(x, slice(cut, n)), batch_size=4096).ravel()
    return p, best


# ---------------------------------------------------------------------------------------
def summarize(y, p, cold, test):
    return {
        "preq_auc": exact_auc(y, p),
        "preq_logloss": log_loss(y, p),
        "train_auc": exact_auc(y[~test], p[~test]),
        "test_auc": exact_auc(y[test], p[test]),
        "cold_auc": exact_auc(y[test & cold], p[test & cold]),
    }


def fmt(values: list[float]) -> str:
    v = np.array([x for x in values if x == x])
    if v.size == 0:
        return "—"
    if v.size == 1:
        return f"{v[0]:.4f}"
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--features", nargs="+", default=["full", "peers"],
                    choices=["full", "peers"])
    ap.add_argument("--only", nargs="+", default=None, help="model names to run")
    ap.add_argument("--grid", type=int, default=4, help="configurations tried per online model")
    ap.add_argument("--torch-grid", default=None,
                    help="override the torch grid: 'lr:emb_lr,lr:emb_lr,...'")
    ap.add_argument("--river-grid", default=None, help="override River's AdaGrad lrs: 'a,b,...'")
    ap.add_argument("--partitions", type=int, default=4, help="worker partitions of the replay")
    ap.add_argument("--refresh", action="store_true", help="rebuild the worker's rows")
    ap.add_argument("--rows-file", default=None,
                    help="a pipeline_rows cache file to learn from instead (e.g. an older worker's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch_grid = TORCH_GRID if not args.torch_grid else [
        tuple(float(x) for x in c.split(":")) for c in args.torch_grid.split(",")]
    river_grid = RIVER_GRID if not args.river_grid else [
        float(x) for x in args.river_grid.split(",")]
    if min(len(torch_grid), len(river_grid)) < args.grid:
        raise SystemExit("--grid is larger than a grid: every model gets the same budget")
    t0 = time.perf_counter()
    all_rows = load_rows(args.partitions, refresh=args.refresh, path=args.rows_file)
    n = len(all_rows.labels)
    cut = int(n * 0.8)
    test = np.arange(n) >= cut
    cold = cold_mask(all_rows.items)
    y = all_rows.labels.astype(np.int64)
    print(
        f"rows {n} (the worker's, {args.partitions} partitions), positives {y.mean():.3f}; "
        f"TEST {test.sum()} rows, cold TEST {(test & cold).sum()}; "
        f"loaded in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    names = list(online_variants()) + ["river-lr", "river-ffm", "deepctr-pnn", "deepctr-deepfm"]
    names = [m for m in names if m in args.only] if args.only else [
        "fgcnn", "fgcnn-wide", "lr", "river-lr", "deepctr-deepfm"]
    for fs in args.features:
        rows = all_rows if fs == "full" else all_rows.subset(PEER_FIELDS, dense=False)
        payloads = encode_all(rows)
        print(f"\n== features: {fs} ({len(rows.schema.categorical)} categorical + "
              f"{len(rows.schema.dense)} dense)", flush=True)
        results: dict[str, list[dict]] = defaultdict(list)
        frozen = None
        for name in names:
            for seed in args.seeds:
                if name.startswith("river-") and seed != args.seeds[0]:
                    continue  # River is deterministic here: one run
                t = time.perf_counter()
                if name.startswith("deepctr-"):
                    if frozen is None:
                        frozen = frozen_counter_rows(rows, cut) if rows.dense.shape[1] else rows
                    with contextlib.redirect_stdout(io.StringIO()):  # DeepCTR prints per fit
                        p_test, best = run_offline(name, frozen, seed, args.threads)
                    r = {
                        "preq_auc": float("nan"), "preq_logloss": float("nan"),
                        "train_auc": float("nan"),
                        "test_auc": exact_auc(y[test], p_test),
                        "cold_auc": exact_auc(y[test & cold], p_test[cold[test]]),
                        "note": f"epochs={best}" + (", counters frozen at TRAIN end"
                                                    if rows.dense.shape[1] else ""),
                    }
                else:
                    grid = (river_grid if name.startswith("river-") else torch_grid)[: args.grid]
                    tried = []
                    for config in grid:
                        p, secs = run_online(name, payloads, rows.schema, seed, args.threads,
                                             config)
                        tried.append((summarize(y, p, cold, test), config, secs))
                        print(f"  {name} {config}: first-80 % AUC {tried[-1][0]['train_auc']:.4f}",
                              flush=True)
                    best_r, config, secs = max(tried, key=lambda x: x[0]["train_auc"])
                    r = best_r | {"note": f"selected {config} of {len(grid)}; {n / secs:,.0f} rows/s"}
                results[name].append(r)
                print(
                    f"{name:16s} seed {seed}: preq AUC {r['preq_auc']:.4f} logloss "
                    f"{r['preq_logloss']:.4f} TEST AUC {r['test_auc']:.4f} cold "
                    f"{r['cold_auc']:.4f} ({r['note']}, {time.perf_counter() - t:.0f}s)",
                    flush=True,
                )
        print(f"\n| model ({fs} features) | prequential AUC | prequential log-loss | "
              "TEST AUC (last 20 %) | cold-item AUC (TEST) | runs | note |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for name, rs in results.items():
            print(
                f"| {name} | {fmt([r['preq_auc'] for r in rs])} | "
                f"{fmt([r['preq_logloss'] for r in rs])} | {fmt([r['test_auc'] for r in rs])} | "
                f"{fmt([r['cold_auc'] for r in rs])} | {len(rs)} | {rs[0]['note']} |"
            )
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
