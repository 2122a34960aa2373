"""QARM/EM3 parts through the product path: a real worker's rows, the learner service.

For each seed, each variant runs in turn (alternating, so both see the same machine
load): a real broker, Redis and worker (``python -m headwater worker``) replay
MovieLens-100K (items first, then clicks at full speed: ``bench/pipeline_rows.build``),
with the variant's settings in the worker's environment; every ``train-batches``
payload is then fed, in the order the topic holds them, to a ``LearnerService`` built
with the learner's own recipe (``streams.learner_runner.trainer_settings``) and the seed.

Variants (each adds to the previous one):

- ``codes``   the default product: RQ + VQ codes of the content embedding (identity
              projection); codebooks refreshed every ``--refresh`` seconds;
- ``align``   + ``HEADWATER_ALIGN_ONLINE=1``: pairs mined from the clicks, each refresh
              trains the alignment projection first (QARM);
- ``qformer`` + ``HEADWATER_EM3_QUERIES=2``: Fusion-Q-Former fields over each item's
              stored content in the ranker (EM3), trained by the ranking loss;
- ``cid``     + ``HEADWATER_EM3_CID_WEIGHT=0.1``: EM3's content-ID contrastive loss;
- ``lora``    + ``HEADWATER_EM3_SEQ_LORA_RANK=4``: EM3's content-interest sequence (LoRA
              adapted attention over the content of the user's last ``SEQ_LEN`` clicks,
              the rows' ``seq`` fields, point in time from the online store).

Every replay runs the worker with ``HEADWATER_SEQ_LEN`` = ``SEQ_LEN``; the variants
before ``lora`` learn from the same rows without the ``seq`` fields (exactly what a
worker without them writes: no other column depends on them). ``qformer``, ``cid`` and
``lora`` change only the learner: they learn from the ``align`` replay's rows, reading
item content from a Redis holding that replay's content hash (copied out before the
replay's Redis stops). The replay takes no seed, so each worker configuration replays
once and every seed learns from the same rows (``--replay-per-seed``: replay again per
seed; two replays per seed instead of two in all).

Reported per run: prequential AUC over all rows (score before train), AUC over the
last 20 % of rows in event time, cold-item AUC (rows among their item's first 10
labelled rows: whole stream, and inside the last 20 %), the worker's rows/s (replay
start to the last row on ``train-batches``), the learner service's rows/s, the
alignment trainings and the moved codes the worker logged.

    .venv/bin/python bench/multimodal_product.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import pipeline_rows  # noqa: E402
from learner.batch import decode_batch  # noqa: E402
from learner.metrics import ColdItemTracker, exact_auc  # noqa: E402

#: recent clicks per user in the rows of every replay (``HEADWATER_SEQ_LEN``)
SEQ_LEN = 8

#: variant -> (worker environment, learner settings, keeps the rows' seq fields)
VARIANTS: dict[str, tuple[dict[str, str], dict, bool]] = {
    "codes": ({"HEADWATER_ALIGN_ONLINE": "0"}, {}, False),
    "align": ({"HEADWATER_ALIGN_ONLINE": "1"}, {}, False),
    "qformer": ({"HEADWATER_ALIGN_ONLINE": "1"}, {"em3_queries": 2}, False),
    "cid": ({"HEADWATER_ALIGN_ONLINE": "1"}, {"em3_queries": 2, "em3_cid_weight": 0.1}, False),
    "lora": ({"HEADWATER_ALIGN_ONLINE": "1"},
             {"em3_queries": 2, "em3_cid_weight": 0.1, "em3_seq_lora_rank": 4}, True),
}


def without_seq(payloads: list[bytes]) -> list[bytes]:
    """The payloads as a worker with ``HEADWATER_SEQ_LEN=0`` writes them: the same rows
    without the ``seq`` fields (the sequence changes no other column)."""
    from features.schema import FeatureSchema
    from learner.batch import encode_batch

    out = []
    for p in payloads:
        b = decode_batch(p)
        schema = FeatureSchema.from_json(b.schema_json)
        keep = [j for j, f in enumerate(schema.categorical) if not f.startswith("seq")]
        lean = FeatureSchema([schema.categorical[j] for j in keep], schema.dense, schema.version,
                             schema.definition)
        cols = {"event_id": b.event_ids, "ts": b.ts, "label": b.labels, "offset": b.offsets,
                "sub": b.subs}
        cols.update({f"c:{lean.categorical[k]}": b.categorical[:, j] for k, j in enumerate(keep)})
        cols.update({f"d:{d}": b.dense[:, j] for j, d in enumerate(schema.dense)})
        out.append(encode_batch(cols, lean.to_json(), lean.hash, b.source_topic,
                                b.source_partition, b.offset_start, b.offset_end))
    return out


def replay(variant: str, encoder: str, partitions: int, refresh: float, log: Path
           ) -> tuple[list[bytes], float, dict[bytes, bytes]]:
    """One replay with the variant's worker settings: payloads, seconds, content hash."""
    from core.settings import Settings, default_data_dir
    from streams.item_content import content_key

    saved = dict(os.environ)
    os.environ.update(VARIANTS[variant][0])
    os.environ["HEADWATER_CODEBOOK_REFRESH_SECONDS"] = str(refresh)
    os.environ["HEADWATER_SEQ_LEN"] = str(SEQ_LEN)
    content: dict[bytes, bytes] = {}

    def copy_content(url: str) -> None:
        import redis

        client = redis.Redis.from_url(url)
        content.update(client.hgetall(content_key(Settings(content_encoder=encoder))))
        client.close()

    t0 = time.perf_counter()
    try:
        payloads = pipeline_rows.build(default_data_dir(), encoder, partitions, log_copy=log,
                                       before_stop=copy_content)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return payloads, time.perf_counter() - t0, content


def learn(payloads: list[bytes], seed: int, settings, redis_url: str) -> dict:
    """Feed payloads to the product's learner service; prequential metrics, rows/s and
    the published model's predict p50 for 100 candidates."""
    import dataclasses

    from prometheus_client import CollectorRegistry

    from learner.service import LearnerService
    from learner.store import LocalModelStore
    from streams.learner_runner import trainer_settings

    recipe = dataclasses.replace(trainer_settings(settings, redis_url), seed=seed)
    ys, ps, ts, items = [], [], [], []
    with tempfile.TemporaryDirectory() as d:
        svc = LearnerService(LocalModelStore(d), recipe.factory(), publish_every_seconds=None,
                             registry=CollectorRegistry(), resume=False)
        t0 = time.perf_counter()
        for p in payloads:
            res = svc.process(p)
            if res is None or not res.rows_scored:
                continue
            batch = decode_batch(p)
            keep = res.kept
            ys.append(np.asarray(batch.labels)[keep])
            ps.append(res.scores)
            ts.append(np.asarray(batch.ts)[keep])
            j = batch.categorical_fields.index("item_id")
            items.append(np.asarray(batch.categorical)[keep, j])
        secs = time.perf_counter() - t0
        p50 = predict_p50(svc, settings, redis_url, payloads[-1])
    y, p, t, it = (np.concatenate(a) for a in (ys, ps, ts, items))
    n = len(y)
    test = np.zeros(n, bool)
    test[np.argsort(t, kind="stable")[int(0.8 * n):]] = True
    cold_all, cold_test = ColdItemTracker(10), ColdItemTracker(10)
    for s in range(0, n, 256):  # in processing order; the second records test rows only
        sl = slice(s, s + 256)
        cold_all.update(it[sl], y[sl], p[sl])
        for mask, record in ((~test[sl], False), (test[sl], True)):
            cold_test.update(it[sl][mask], y[sl][mask], p[sl][mask], record=record)
    return {"rows": n, "prequential_auc": exact_auc(y, p), "test_auc": exact_auc(y[test], p[test]),
            "cold_auc": cold_all.auc(), "cold_test_auc": cold_test.auc(),
            "learner_rows_per_s": n / secs, "predict_p50_ms": p50}


def predict_p50(svc, settings, redis_url: str, payload: bytes, candidates: int = 100,
                rounds: int = 200) -> float:
    """Median ms of ``ServedModel.predict`` for ``candidates`` rows on the version serving
    would load (``ModelHolder.load``: EM3 item fields computed once at load)."""
    from features.schema import FeatureSchema
    from serving.holder import ModelHolder
    from streams.item_content import item_content_table

    manifest = svc.publish()
    schema = FeatureSchema.from_json(svc.trainer.schema_json)
    content = item_content_table(settings, redis_url) if settings.em3_queries else None
    holder = ModelHolder(svc.store, schema, item_content=content)
    served = holder.load(manifest["version"])
    batch = decode_batch(payload)
    reps = -(-candidates // len(batch))
    cat = np.tile(batch.categorical, (reps, 1))[:candidates]
    dense = np.tile(batch.dense, (reps, 1))[:candidates]
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        served.predict(cat, dense)
        times.append(time.perf_counter() - t)
    holder.close()
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--refresh", type=float, default=10.0,
                    help="HEADWATER_CODEBOOK_REFRESH_SECONDS of the worker (both variants)")
    ap.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    ap.add_argument("--summarize", type=Path, default=None,
                    help="only print the table of an --out file (runs split over processes)")
    ap.add_argument("--keep-replays", type=Path, default=None,
                    help="keep each replay here (one file per worker configuration, per seed with "
                         "--replay-per-seed) and learn from a kept "
                         "one instead of replaying again")
    ap.add_argument("--replay-per-seed", action="store_true",
                    help="replay the worker again for every seed (the replay takes no seed: "
                         "by default each worker configuration replays once, shared by seeds)")
    args = ap.parse_args()
    if args.summarize:
        results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        seen = set()
        for line in args.summarize.read_text().splitlines():
            r = json.loads(line)
            if (r["variant"], r["seed"]) not in seen:  # a repeated run: the first counts
                seen.add((r["variant"], r["seed"]))
                results[r["variant"]].append(r)
        table(results)
        return
    from core.settings import Settings
    from headwater.servers import start_redis
    from streams.item_content import content_key

    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        learner_redis = start_redis(log_path=Path(tmp) / "learner-redis.log")
        url = learner_redis.extra["url"]
        try:
            replays: dict[tuple, tuple] = {}
            for seed in args.seeds:
                if args.replay_per_seed:
                    replays = {}
                for variant in args.variants:
                    worker_env, learner, keep_seq = VARIANTS[variant]
                    key = tuple(sorted(worker_env.items()))
                    log = Path(tmp) / f"{variant}-{seed}.log"
                    config = "-".join(f"{k.removeprefix('HEADWATER_').lower()}{v}" for k, v in key)
                    name = f"{config}-{seed}" if args.replay_per_seed else config
                    saved = args.keep_replays / f"{name}.pkl" if args.keep_replays else None
                    if key not in replays:  # one replay per worker configuration
                        if saved is not None and saved.exists():  # a replay kept earlier
                            payloads, secs, content, text = pickle.loads(saved.read_bytes())
                            log.write_text(text)
                        else:
                            payloads, secs, content = replay(variant, args.encoder,
                                                             args.partitions, args.refresh, log)
                            if saved is not None:
                                saved.parent.mkdir(parents=True, exist_ok=True)
                                saved.write_bytes(pickle.dumps(
                                    (payloads, secs, content, log.read_text(errors="replace"))))
                        replays[key] = (payloads, without_seq(payloads), secs, content, log)
                    payloads, lean, secs, content, log = replays[key]
                    payloads = payloads if keep_seq else lean
                    settings = Settings(content_encoder=args.encoder, **learner)
                    import redis

                    client = redis.Redis.from_url(url)
                    client.delete(content_key(settings))
                    client.hset(content_key(settings), mapping=content)
                    client.close()
                    r = learn(payloads, seed, settings, url)
                    text = log.read_text(errors="replace")
                    r.update(variant=variant, seed=seed, worker_rows_per_s=r["rows"] / secs,
                             load=os.getloadavg()[0],
                             alignments=text.count("alignment: projection trained"),
                             refreshes=text.count("refreshed to"))
                    results[variant].append(r)
                    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                      for k, v in r.items()}), flush=True)
                    if args.out:
                        with args.out.open("a") as fh:
                            fh.write(json.dumps(r) + "\n")
        finally:
            learner_redis.stop()
    table(results)


def table(results: dict[str, list[dict]]) -> None:
    """Mean ± population spread over seeds per variant (cost columns: mean; load: range)."""
    keys = ["prequential_auc", "test_auc", "cold_auc", "cold_test_auc", "worker_rows_per_s",
            "learner_rows_per_s", "predict_p50_ms"]
    print("| variant | seeds | " + " | ".join(keys) + " | load |")
    for variant, rs in results.items():
        if not rs:
            continue
        cells = []
        for k in keys:
            vals = [r[k] for r in rs]
            sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.4f} ± {sd:.4f}" if "auc" in k
                         else f"{statistics.mean(vals):.1f}" if "p50" in k
                         else f"{statistics.mean(vals):.0f}")
        loads = [r["load"] for r in rs]
        seeds = ",".join(str(r["seed"]) for r in rs)
        print(f"| {variant} | {seeds} | " + " | ".join(cells)
              + f" | {min(loads):.0f}–{max(loads):.0f} |")


if __name__ == "__main__":
    main()
