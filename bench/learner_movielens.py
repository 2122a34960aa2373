"""MovieLens-100K: Headwater's online learner against River and offline DeepCTR-Torch peers.

Protocol (docs/protocol.md): rating >= 4 -> 1, <= 2 -> 0, 3 dropped; events in time order.
Online models run one pass, test-then-train, in batches of 256 that go through the real
codec (``encode_batch`` -> ``decode_batch``) and the real ``PrequentialTrainer``.
Reported: prequential AUC / log-loss over the whole stream, AUC over the last 20 % in
time ("TEST"), and cold-item AUC (rows that are among their item's first 10 labelled
events, inside TEST). Offline peers train on the first 80 % (epochs 1..5 chosen on the
last 10 % of it), retrain on the full 80 % and are scored on TEST.

Rows are built here, in time order, with point-in-time counters (each row sees the
user's and item's impressions and clicks *before* it): fields user, item, age, gender,
occupation, zip3, year, first genre, hour, weekday + bucketized counters, and dense
smoothed CTRs / log counts.

    .venv/bin/python bench/learner_movielens.py --seeds 0 1 2
    .venv/bin/python bench/learner_movielens.py --only fgcnn river-lr --seeds 0
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from features.hashing import hash_tokens  # noqa: E402
from features.movielens import load_movielens  # noqa: E402
from features.schema import FeatureSchema  # noqa: E402
from learner.batch import decode_batch, encode_batch  # noqa: E402
from learner.metrics import exact_auc, log_loss  # noqa: E402
from learner.protocol import RiverLearner  # noqa: E402
from learner.trainer import PrequentialTrainer, TrainerSettings  # noqa: E402

BATCH = 256
ALPHA = 5.0  # smoothing strength of the CTR features (pseudo-impressions at the global rate)


# ---------------------------------------------------------------------------------------
# rows
def _bucket_count(n: np.ndarray) -> np.ndarray:
    return np.where(n == 0, 0, 1 + np.floor(np.log2(np.maximum(n, 1)))).astype(np.int64)


def build_rows(path: str | None = None):
    """Point-in-time rows; returns (schema, categorical [n,F], dense [n,D], labels, ts, item)."""
    ml = load_movielens(path)
    c = ml.clicks
    n = len(c["ts"])
    y = c["label"].astype(np.int64)
    users, items = c["user_id"], c["item_id"]
    u_imp = np.zeros(n)
    u_clk = np.zeros(n)
    i_imp = np.zeros(n)
    i_clk = np.zeros(n)
    g_rate = np.zeros(n)
    uc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    ic: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    tot, pos = 0.0, 0.0
    # Per-event loop on purpose: the counters must be exactly "before this event".
    for k, (u, i, lab) in enumerate(zip(users.tolist(), items.tolist(), y.tolist(), strict=True)):
        su, si = uc[u], ic[i]
        u_imp[k], u_clk[k], i_imp[k], i_clk[k] = su[0], su[1], si[0], si[1]
        g_rate[k] = (pos + 1.0) / (tot + 2.0)
        su[0] += 1
        su[1] += lab
        si[0] += 1
        si[1] += lab
        tot += 1
        pos += lab
    u_ctr = (u_clk + ALPHA * g_rate) / (u_imp + ALPHA)
    i_ctr = (i_clk + ALPHA * g_rate) / (i_imp + ALPHA)

    def attr(table, ids, key, fn=lambda v: v):
        return np.array([fn(table.get(x, {}).get(key)) for x in ids.tolist()], dtype=object)

    ts = c["ts"]
    gm = time_parts(ts)
    cat = {
        "user": users,
        "item": items,
        "age": attr(ml.users, users, "age"),
        "gender": attr(ml.users, users, "gender"),
        "occupation": attr(ml.users, users, "occupation"),
        "zip3": attr(ml.users, users, "zip_code", lambda z: (z or "")[:3] or None),
        "year": attr(ml.items, items, "year"),
        "genre": attr(ml.items, items, "genres", lambda g: g[0] if g else None),
        "hour": gm["hour"],
        "weekday": gm["weekday"],
        "u_imp_b": _bucket_count(u_imp),
        "i_imp_b": _bucket_count(i_imp),
        "u_ctr_b": np.minimum((u_ctr * 10).astype(np.int64), 9) + 1,
        "i_ctr_b": np.minimum((i_ctr * 10).astype(np.int64), 9) + 1,
    }
    dense = {
        "u_ctr": u_ctr,
        "i_ctr": i_ctr,
        "u_log_imp": np.log1p(u_imp) / 8,
        "i_log_imp": np.log1p(i_imp) / 8,
    }
    schema = FeatureSchema(categorical=list(cat), dense=list(dense))
    tokens = np.stack([hash_tokens(f, v) for f, v in cat.items()], axis=1)
    dense_arr = np.stack(list(dense.values()), axis=1).astype(np.float32)
    return schema, tokens, dense_arr, y.astype(np.int8), ts, tokens[:, 1].copy()


def time_parts(ts: np.ndarray) -> dict[str, np.ndarray]:
    t = ts.astype(np.int64)
    return {"hour": (t // 3600) % 24, "weekday": ((t // 86400) + 4) % 7}  # 1970-01-01 = Thu


def encode_all(schema, tokens, dense, labels, ts) -> list[bytes]:
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
def online_variants() -> dict[str, dict]:
    # Ids get 2^17 buckets (~1 % of items share a row), low-cardinality fields 4096.
    big = {"buckets": 4096, "per_field": {"user": 1 << 17, "item": 1 << 17, "zip3": 1 << 17}}
    return {
        "fgcnn": dict(kind="fgcnn", embedding=big),
        "fgcnn-bn": dict(kind="fgcnn", embedding=big, head={"conv_batchnorm": True}),
        "fgcnn-hash2k": dict(kind="fgcnn", embedding={"buckets": 2000}),
        "fgcnn-hash500": dict(kind="fgcnn", embedding={"buckets": 500}),
        "fgcnn-dyn": dict(kind="fgcnn", embedding={"kind": "dynamic", "capacity": 5000}),
        "fgcnn-dyn-adm5": dict(
            kind="fgcnn", embedding={"kind": "dynamic", "capacity": 5000, "min_count": 5}
        ),
        "ipnn": dict(kind="ipnn", embedding=big),
        "deepfm": dict(kind="deepfm", embedding=big),
        "lr": dict(kind="lr", embedding=big),
    }


def run_online(name, spec, payloads, schema, seed, lr, threads, emb_lr=None):
    if name.startswith("river-"):
        from river import facto, linear_model, optim

        if name == "river-lr":
            model = linear_model.LogisticRegression(optimizer=optim.AdaGrad(0.3))
            learner = RiverLearner(model, schema.categorical, schema.dense, one_hot=True)
        else:
            model = facto.FFMClassifier(
                n_factors=8,
                weight_optimizer=optim.AdaGrad(0.3),
                latent_optimizer=optim.AdaGrad(0.3),
                seed=seed,
            )
            learner = RiverLearner(model, schema.categorical, schema.dense, one_hot=False)
        trainer = PrequentialTrainer(learner, num_threads=threads)
    else:
        settings = TrainerSettings(
            lr=lr, embedding_lr=emb_lr, seed=seed, num_threads=threads, **spec
        )
        trainer = settings.build(schema.to_json())
    scores = []
    t0 = time.perf_counter()
    for p in payloads:
        res = trainer.step(decode_batch(p))
        scores.append(res.scores)
    return np.concatenate(scores), time.perf_counter() - t0


def run_offline(name, tokens, dense, labels, schema, seed, threads, max_epochs=5):
    """DeepCTR-Torch peer: epochs chosen on the last 10 % of the first 80 %, refit, score TEST."""
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models import PNN, DeepFM

    torch.set_num_threads(threads)
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
    ap.add_argument("--data", default=None, help="ml-100k directory or datasets root")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--limit", type=int, default=None, help="use only the first N batches")
    ap.add_argument("--only", nargs="+", default=None, help="model names to run")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (online torch)")
    ap.add_argument("--emb-lr", type=float, default=1e-2, help="embedding (SparseAdam) lr")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    t0 = time.perf_counter()
    schema, tokens, dense, labels, ts, items = build_rows(args.data)
    if args.limit:
        keep = args.limit * BATCH
        tokens, dense, labels, ts, items = (a[:keep] for a in (tokens, dense, labels, ts, items))
    payloads = encode_all(schema, tokens, dense, labels, ts)
    n = len(labels)
    test = np.arange(n) >= int(n * 0.8)
    cold = cold_mask(items)
    print(
        f"rows {n}, positives {labels.mean():.3f}, fields {len(schema.categorical)} cat + "
        f"{len(schema.dense)} dense, {len(payloads)} batches of {BATCH}, "
        f"built in {time.perf_counter() - t0:.1f}s; TEST {test.sum()} rows, "
        f"cold TEST {(test & cold).sum()}",
        flush=True,
    )
    names = list(online_variants()) + ["river-lr", "river-ffm", "deepctr-pnn", "deepctr-deepfm"]
    if args.only:
        names = [m for m in names if m in args.only]
    results: dict[str, list[dict]] = defaultdict(list)
    for name in names:
        for seed in args.seeds:
            if name.startswith("river-") and seed != args.seeds[0]:
                continue  # River LR is deterministic; FFM runs at ~150 rows/s: one run each
            t = time.perf_counter()
            if name.startswith("deepctr-"):
                with contextlib.redirect_stdout(io.StringIO()):  # DeepCTR prints per fit
                    p_test, best = run_offline(
                        name, tokens, dense, labels, schema, seed, args.threads
                    )
                r = {
                    "preq_auc": float("nan"),
                    "preq_logloss": float("nan"),
                    "test_auc": exact_auc(labels[test], p_test),
                    "cold_auc": exact_auc(labels[test & cold], p_test[cold[test]]),
                    "note": f"epochs={best}",
                }
            else:
                spec = online_variants().get(name, {})
                p, secs = run_online(
                    name, spec, payloads, schema, seed, args.lr, args.threads, args.emb_lr
                )
                r = summarize(labels.astype(np.int64), p, cold, test) | {
                    "note": f"{n / secs:,.0f} rows/s"
                }
            results[name].append(r)
            print(
                f"{name:16s} seed {seed}: preq AUC {r['preq_auc']:.4f} logloss "
                f"{r['preq_logloss']:.4f} TEST AUC {r['test_auc']:.4f} cold {r['cold_auc']:.4f} "
                f"({r['note']}, {time.perf_counter() - t:.0f}s)",
                flush=True,
            )

    print(
        "\n| model | prequential AUC | prequential log-loss | TEST AUC (last 20 %) | cold-item AUC (TEST) | runs |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, rs in results.items():
        print(
            f"| {name} | {fmt([r['preq_auc'] for r in rs])} | {fmt([r['preq_logloss'] for r in rs])} "
            f"| {fmt([r['test_auc'] for r in rs])} | {fmt([r['cold_auc'] for r in rs])} | {len(rs)} |"
        )
    med = {k: float(np.median([r["test_auc"] for r in v])) for k, v in results.items()}
    pre = {k: float(np.median([r["preq_auc"] for r in v])) for k, v in results.items()}
    offline = [v for k, v in med.items() if k.startswith("deepctr-")]
    if "fgcnn" in med and offline:
        print(f"\nfgcnn TEST AUC - best offline peer: {med['fgcnn'] - max(offline):+.4f}")
    for peer in ("river-lr", "river-ffm"):
        if "fgcnn" in pre and peer in pre:
            print(f"fgcnn prequential AUC - {peer}: {pre['fgcnn'] - pre[peer]:+.4f}")
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
