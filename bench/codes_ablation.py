"""Ablation of QARM/EM3 item codes on MovieLens-100K with the FGCNN ranker, test-then-train.

Protocol (docs/protocol.md): rating >= 4 -> 1, <= 2 -> 0, 3 dropped, time order; one pass,
each batch of 256 rows is scored before it is learned from. Reported: prequential AUC
and log-loss over all rows, AUC over the last 20 % in time, and cold-item AUC (each
item's first 10 labelled rows, whole stream and last 20 %).

Variants (each adds to the previous one):

- ``ids``     user_id, item_id, age, gender, occupation, zip3, year, genre, hour, weekday;
- ``rq``      + RQ-Kmeans codes rq0..rq{L-1} of the (unaligned) content embedding;
- ``rqvq``    + VQ codes vq0..vq{k-1};
- ``align``   + alignment: pairs mined online from the clicks seen so far, the tower
              re-fitted every ``--refit-every`` rows, codes refreshed (Hungarian);
- ``qformer`` + Fusion-Q-Former fields (queries over text embedding + genre tags);
- ``cid``     + content-ID InfoNCE between the Q-Former output and the item-ID embedding.

Causality: item content (title, genres) is published on the items topic before clicks,
so the first codebooks are fitted on content alone; the projection only ever sees pairs
mined from clicks already scored and learned; codes change only at a refresh and a row
always uses the codes in force when it is scored.

Run: ``.venv/bin/python bench/codes_ablation.py [--seeds 0 1 2] [--variants ids rq ...]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Per-batch matrices here are small: multi-threaded BLAS on a shared 2-core machine was
# measured 25x slower than one thread (5.3 ms vs 0.2 ms for a 64x416 @ 416x64 pass).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.codes_service import CodeAssigner, CodesConfig, code_fields, code_tokens  # noqa: E402
from features.content import ContentEncoder, SentenceTextEncoder, TagEncoder  # noqa: E402
from features.hashing import hash_tokens  # noqa: E402
from features.movielens import load_movielens  # noqa: E402
from learner.embeddings import EmbeddingConfig, build_embedding  # noqa: E402
from learner.metrics import ColdItemTracker, exact_auc, log_loss  # noqa: E402
from learner.models.fgcnn import FGCNN, PRESETS, FGCNNConfig  # noqa: E402
from learner.multimodal import AlignmentTower, FusionQFormer, content_id_infonce  # noqa: E402

VARIANTS = ["ids", "rq", "rqvq", "align", "qformer", "cid"]
BASE_FIELDS = [
    "user_id",
    "item_id",
    "age",
    "gender",
    "occupation",
    "zip3",
    "year",
    "genre",
    "hour",
    "weekday",
]


class LookupTextEncoder:
    """Text encoder over precomputed embeddings (the model ran once for the catalogue)."""

    def __init__(self, table: dict[str, np.ndarray], dim: int) -> None:
        self.table, self.dim = table, dim

    def encode(self, texts):
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def base_tokens(ml) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token matrix of the base fields, item index per row, labels."""
    c = ml.clicks
    users = [ml.users.get(u, {}) for u in c["user_id"]]
    items = [ml.items.get(i, {}) for i in c["item_id"]]
    ts = c["ts"].astype(np.int64)
    age_edges = np.array([18, 25, 35, 45, 50, 56])
    cols = {
        "user_id": c["user_id"],
        "item_id": c["item_id"],
        "age": np.searchsorted(age_edges, [u.get("age", 0) for u in users], side="right"),
        "gender": [u.get("gender") for u in users],
        "occupation": [u.get("occupation") for u in users],
        "zip3": [str(u.get("zip_code", ""))[:3] or None for u in users],
        "year": [it.get("year") for it in items],
        "genre": [(it.get("genres") or [None])[0] for it in items],
        "hour": (ts // 3600) % 24,
        "weekday": ((ts // 86400) + 3) % 7,
    }
    toks = np.stack([hash_tokens(f, np.asarray(cols[f], dtype=object)) for f in BASE_FIELDS], 1)
    return toks, np.asarray(c["item_id"]), np.asarray(c["label"], dtype=np.float32)


class CodesRanker(nn.Module):
    """Field embeddings (+ optional Fusion-Q-Former fields) -> the learner's FGCNN head."""

    def __init__(self, fields: list[str], n_queries: int, text_dim: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        head = FGCNNConfig(**PRESETS["compact"])
        emb = EmbeddingConfig(dim=head.embedding_dim, buckets=5000)
        self.embedding = build_embedding(fields, emb)
        self.n_queries = n_queries
        self.qformer = (
            FusionQFormer(
                out_dim=head.embedding_dim,
                text_dim=text_dim,
                n_queries=n_queries,
                d_model=32,
                n_heads=4,
                tag_buckets=256,
            )
            if n_queries
            else None
        )
        self.head = FGCNN(head, len(fields) + n_queries, 0)

    def forward(self, rows, text, tags):
        emb = self.embedding(rows)
        fused = None
        if self.qformer is not None:
            fused = self.qformer(text, tags)
            emb = torch.cat([emb, fused], dim=1)
        return self.head(emb, torch.zeros(len(rows), 0)), emb, fused


def run_variant(variant: str, ml, data: dict, args, seed: int) -> dict:
    level = VARIANTS.index(variant)
    use_rq, use_vq, use_align = level >= 1, level >= 2, level >= 3
    n_queries = args.queries if level >= 4 else 0
    cid_weight = args.cid_weight if level >= 5 else 0.0
    toks, item_ids, labels = data["tokens"], data["item_ids"], data["labels"]
    item_index = data["item_index"]  # item id -> row in the catalogue arrays
    cfg = CodesConfig(levels=args.levels, codebook_size=args.codebook, vq_k=args.vq_k, seed=seed)
    assigner = CodeAssigner(ContentEncoder(data["text_encoder"], tag_dim=32), cfg)
    catalogue = data["catalogue"]
    assigner.assign(catalogue)  # items topic first: the codebooks fit on content alone
    cat_ids = [it["item_id"] for it in catalogue]
    fields = list(BASE_FIELDS)
    cfields = code_fields(args.levels, args.vq_k) if use_rq else []
    if use_rq and not use_vq:
        cfields = cfields[: args.levels]
    fields += cfields

    def code_table() -> np.ndarray:
        if not cfields:
            return np.zeros((len(cat_ids), 0), dtype=np.int64)
        t = code_tokens(assigner.codes_of(cat_ids), args.levels, args.vq_k, use_vq=use_vq)
        return np.stack([t[f] for f in cfields], axis=1)

    ctab = code_table()
    model = CodesRanker(fields, n_queries, data["text"].shape[1], seed)
    # As learner.protocol.TorchLearner: lazy (sparse) Adam for the tables, Adam for the rest.
    table = model.embedding.table.weight
    opt = torch.optim.Adam([p for p in model.parameters() if p is not table], lr=1e-3)
    sparse_opt = torch.optim.SparseAdam([table], lr=1e-3)
    tower = (
        AlignmentTower(assigner.encoder.dim, temperature=args.temperature) if use_align else None
    )
    text_t = torch.from_numpy(data["text"])
    tags_t = torch.from_numpy(data["tag_tokens"])
    n = len(labels)
    scores = np.empty(n)
    cold_all, cold_test = ColdItemTracker(10), ColdItemTracker(10)
    test_start = int(0.8 * n)
    refreshes: list[dict] = []
    since_refit = 0
    t0 = time.perf_counter()
    for s in range(0, n, args.batch):
        sl = slice(s, min(s + args.batch, n))
        rows_idx = item_index[sl]
        tok = np.concatenate([toks[sl], ctab[rows_idx]], axis=1)
        rows = model.embedding.lookup(tok)
        model.train()
        logits, emb, fused = model(rows, text_t[rows_idx], tags_t[rows_idx])
        y = torch.from_numpy(labels[sl])
        loss = F.binary_cross_entropy_with_logits(logits, y)
        if cid_weight:
            item_emb = emb[:, BASE_FIELDS.index("item_id")]
            ids = torch.from_numpy(rows_idx)
            loss = loss + cid_weight * content_id_infonce(
                fused.mean(1), item_emb, args.cid_temperature, ids
            )
        p = torch.sigmoid(logits.detach()).numpy()  # scored before the step below
        model.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sparse_opt.step()
        scores[sl] = p
        iid = rows_idx.astype(np.int64)
        cold_all.update(iid, labels[sl], p)
        cold_test.update(iid, labels[sl], p, record=s >= test_start)
        if use_align:
            assigner.observe_clicks(list(data["users"][sl]), list(item_ids[sl]), labels[sl])
            since_refit += sl.stop - sl.start
            if since_refit >= args.refit_every:
                since_refit = 0
                trig, tgt, tid = (a[-args.align_pairs :] for a in assigner.training_pairs())
                if len(trig) >= 256:
                    tower.fit(
                        trig,
                        tgt,
                        target_ids=tid,
                        epochs=args.align_epochs,
                        batch_size=512,
                        lr=args.align_lr,
                        seed=seed,
                        weight_decay=args.align_decay,
                    )
                    assigner.set_projection(tower.export_numpy())
                    res = assigner.refresh()
                    ctab = code_table()
                    refreshes.append(
                        {
                            "row": sl.stop,
                            "pairs": len(trig),
                            "rq_changed": res.n_changed,
                            "items": res.n_items,
                            "vq_changed": round(res.vq_changed_fraction, 3),
                            "fresh_levels": res.report.fresh_levels,
                        }
                    )
    secs = time.perf_counter() - t0
    test = slice(test_start, n)
    return {
        "variant": variant,
        "seed": seed,
        "rows": n,
        "seconds": round(secs, 1),
        "prequential_auc": exact_auc(labels, scores),
        "prequential_logloss": log_loss(labels, scores),
        "test_auc": exact_auc(labels[test], scores[test]),
        "cold_auc": cold_all.auc(),
        "cold_rows": cold_all.rows,
        "cold_test_auc": cold_test.auc(),
        "cold_test_rows": cold_test.rows,
        "refreshes": refreshes,
    }


def codebook_quality(assigner: CodeAssigner, cat_ids: list, seed: int) -> dict:
    """Reconstruction error per level, usage, and code stability at refresh by mode."""
    x = assigner.project(assigner.content_of(cat_ids))
    rq = assigner.rq
    out = {
        "level_errors": [round(v, 4) for v in rq.level_errors(x)],
        "usage": [round(v, 3) for v in rq.usage(x)],
        "refresh": {},
    }
    rng = np.random.default_rng(seed)
    # Two refresh situations: the same catalogue, and a drifted one (a random 90 % of
    # items plus small noise, as if some items left and the projection moved a little).
    keep = rng.random(len(x)) < 0.9
    drift = x[keep] + 0.02 * rng.standard_normal(x[keep].shape).astype(np.float32)
    for name, data in (("unchanged", x), ("drifted", drift)):
        # "fresh+hungarian": the fresh fit always wins (margin -1), so the Hungarian
        # step alone is what keeps ids; "none" is the same fresh fit, unmatched.
        for label, mode, margin in (
            ("hungarian", "hungarian", 0.05),
            ("warm", "warm", 0.05),
            ("fresh+hungarian", "hungarian", -1.0),
            ("none", "none", 0.05),
        ):
            clone = type(rq).from_state(
                rq.state(), n_iter=rq.n_iter, seed=rq.seed, stability_margin=margin
            )
            rep = clone.refresh(data, mode=mode)
            out["refresh"][f"{name}/{label}"] = {
                "changed": round(rep.changed_fraction, 3),
                "per_level": [round(v, 3) for v in rep.changed_per_level],
                "errors": [round(v, 4) for v in rep.level_errors],
                "usage": [round(v, 3) for v in clone.usage(data)],
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--codebook", type=int, default=64)
    ap.add_argument("--vq-k", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--refit-every", type=int, default=20000)
    ap.add_argument("--align-epochs", type=int, default=1)
    ap.add_argument("--align-pairs", type=int, default=8192, help="most recent pairs per re-fit")
    ap.add_argument("--align-lr", type=float, default=3e-4)
    ap.add_argument(
        "--align-decay",
        type=float,
        default=10.0,
        help="pull towards the published projection at each re-fit",
    )
    ap.add_argument("--temperature", type=float, default=0.07)
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--cid-weight", type=float, default=0.1)
    ap.add_argument("--cid-temperature", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    ap.add_argument("--quality-only", action="store_true", help="codebook quality, no ranking")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    ml = load_movielens()
    ids = sorted(ml.items, key=int)
    catalogue = [
        {"item_id": i, "text": ml.items[i]["title"], "tags": ml.items[i]["genres"]} for i in ids
    ]
    t0 = time.perf_counter()
    enc = SentenceTextEncoder()
    titles = sorted({it["text"] for it in catalogue})
    vecs = enc.encode(titles)
    print(f"# encoded {len(titles)} titles in {time.perf_counter() - t0:.1f}s (incl. model load)")
    table = dict(zip(titles, vecs, strict=True))
    lookup = LookupTextEncoder(table, vecs.shape[1])
    toks, item_ids, labels = base_tokens(ml)
    pos = {iid: k for k, iid in enumerate(ids)}
    data = {
        "tokens": toks,
        "item_ids": item_ids,
        "labels": labels,
        "users": np.asarray(ml.clicks["user_id"]),
        "item_index": np.array([pos[i] for i in item_ids], dtype=np.int64),
        "catalogue": catalogue,
        "text_encoder": lookup,
        "text": np.stack([table[it["text"]] for it in catalogue]).astype(np.float32),
        "tag_tokens": TagEncoder().tokens([it["tags"] for it in catalogue], max_tags=6),
    }
    print(f"# {len(labels)} labelled rows, {len(ids)} items, positives {labels.mean():.3f}")

    q_assigner = CodeAssigner(
        ContentEncoder(lookup, tag_dim=32),
        CodesConfig(levels=args.levels, codebook_size=args.codebook, vq_k=args.vq_k),
    )
    q_assigner.assign(catalogue)
    quality = codebook_quality(q_assigner, ids, 0)
    print("# codebook quality:", json.dumps(quality))
    if args.quality_only:
        return
    results = []
    for seed in args.seeds:
        for v in args.variants:
            r = run_variant(v, ml, data, args, seed)
            results.append(r)
            brief = {
                k: (round(val, 4) if isinstance(val, float) else val)
                for k, val in r.items()
                if k != "refreshes"
            }
            print(json.dumps(brief), flush=True)
            if r["refreshes"]:
                ch = [f["rq_changed"] for f in r["refreshes"]]
                print(
                    f"#   {len(ch)} refreshes, items with changed RQ codes: {ch}; "
                    f"vq changed: {[f['vq_changed'] for f in r['refreshes']]}",
                    flush=True,
                )
            if args.out:
                with args.out.open("a") as fh:
                    fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
