"""QARM alignment online on the real stack (issue 21, point 1).

A real worker process on the real broker and a persistent Redis: MovieLens items, then
MovieLens clicks; the worker mines ``<trigger, target>`` pairs from the clicks, a
scheduled codebook refresh trains the alignment projection on them and publishes it in
the new codebook version; the projection survives a kill -9 of the worker and a Redis
restart, and the restarted worker codes new items with it.
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import redis

from core.settings import Settings
from features.alignment import PairMiner
from features.codebook_store import CodebookStore
from features.codes_service import CodeAssigner, CodesConfig
from features.movielens import click_events, load_movielens
from streams.item_path import make_encoder
from tests.faults.stackops import (
    movielens_items,
    restart_redis,
    send_envelopes,
    send_items,
    stored_codes,
    worker_statuses,
)
from tests.stackutil import wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration]

PARTITIONS = 4
CLICKS = 3000  # MovieLens rows replayed (about 2.2k clicks)


def _send_clicks(kafka: str, topic: str, events: list[dict]) -> None:
    send_envelopes(kafka, topic, events, "user_id", 500, PARTITIONS)


def _version_arrays(client, books: CodebookStore, version: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(client.get(books.version_key(version))), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def test_pairs_mined_from_clicks_train_a_projection_that_survives_restarts(stack, data_dir):
    kafka, prefix, url = stack["kafka"], stack["prefix"], stack["url"]
    settings = Settings(topic_prefix=prefix, partitions=PARTITIONS, content_encoder="hashing")
    client = redis.Redis.from_url(url)
    cfg = CodesConfig(levels=settings.code_levels, codebook_size=settings.codebook_size,
                      vq_k=settings.vq_k)
    books = CodebookStore(client, CodebookStore.config_name("hashing", cfg.levels,
                                                            cfg.codebook_size, cfg.vq_k), 1.0, str)
    items = movielens_items(data_dir)
    env = {"HEADWATER_ALIGN_ONLINE": 1, "HEADWATER_ALIGN_MIN_PAIRS": 500,
           "HEADWATER_ALIGN_MAX_PAIRS": 100_000, "HEADWATER_CODEBOOK_REFRESH_SECONDS": 4}
    worker = stack["start_worker"](**env)
    wait_until(lambda: worker_statuses(client), 90, what="the worker's heartbeat",
               on_fail=stack["logs"])
    send_items(kafka, settings.topics["items"], items)
    ids = [it["item_id"] for it in items]
    wait_until(lambda: len(stored_codes(client, ids)) == len(ids), 120,
               what="codes of every MovieLens item", on_fail=stack["logs"])
    first = client.hget(books.current_key, "version").decode()
    assert first.endswith(".identity")  # no pairs yet: the projection is the identity
    assert "projection_weight" not in _version_arrays(client, books, first)

    ml = load_movielens(data_dir / "ml-100k")
    events = click_events(ml, 0, CLICKS)
    _send_clicks(kafka, settings.topics["clicks"], events)

    # The pairs are exactly the paper's, mined in stream order from each user's clicks
    # (users are partitioned by key, so each user's order is kept): for every click, the
    # most similar of the user's previous clicks (window 20) by content embedding.
    stored_ids, content = [], None

    def reference_pairs() -> Counter:
        nonlocal stored_ids, content
        stored_ids, content = _all_content(client, books)
        row = {i: r for r, i in enumerate(stored_ids)}
        miner = PairMiner(lambda xs: content[[row[str(x)] for x in xs]], window=20)
        clicks = [e for e in events if e["label"] == 1]
        miner.observe([e["user_id"] for e in clicks], [e["item_id"] for e in clicks])
        return Counter((str(p.trigger), str(p.target)) for p in miner.pairs)

    expected = reference_pairs()
    assert sum(expected.values()) > 1000
    wait_until(lambda: client.llen(books.pairs_key) >= sum(expected.values()), 120,
               what="pairs mined by the worker", on_fail=stack["logs"])
    stored = Counter(tuple(r.decode().split("\t")) for r in client.lrange(books.pairs_key, 0, -1))
    assert stored == expected

    # A refresh trains the projection on them (all of them: a refresh re-trains only
    # once enough new pairs came) and publishes it with the codebooks.
    n_pairs = sum(expected.values())

    def aligned_version():
        v = client.hget(books.current_key, "version").decode()
        arrays = _version_arrays(client, books, v)
        return v if int(arrays["align_pairs_total"]) == n_pairs else None

    wait_until(aligned_version, 120, what="a refresh with a projection trained on every pair",
               on_fail=stack["logs"])
    version = aligned_version()
    arrays = _version_arrays(client, books, version)
    weight, bias = arrays["projection_weight"], arrays["projection_bias"]
    assert weight.shape == (content.shape[1], content.shape[1])
    assert not np.allclose(weight, np.eye(len(weight)))
    assert str(arrays["projection_version"]) == version.rsplit(".", 1)[1] != "identity"
    assert f"alignment: projection trained on {n_pairs} pairs" in worker.log()

    # Aligned: the in-batch contrastive loss of the click pairs fell (what QARM trains).
    def pair_loss(w, b):
        import torch

        from learner.multimodal import info_nce

        x = torch.as_tensor(content @ np.asarray(w).T + b)
        row = {i: r for r, i in enumerate(stored_ids)}
        a = torch.as_tensor([row[t] for t, _ in expected.elements()])
        c = torch.as_tensor([row[t] for _, t in expected.elements()])
        return float(np.mean([info_nce(x[a[k:k + 512]], x[c[k:k + 512]], 0.07, c[k:k + 512])
                              for k in range(0, len(a) - 511, 512)]))

    assert pair_loss(weight, bias) < pair_loss(np.eye(len(weight), dtype=np.float32), 0.0)

    # Every stored code is the current version's (refreshes go on every 4 s; only items
    # whose codes moved are rewritten, so code ids keep their meaning).
    def reference_for(v: str) -> CodeAssigner:
        ref = CodeAssigner(make_encoder("hashing"), cfg)
        ref.import_codebooks(_version_arrays(client, books, v))
        return ref

    def codes_settled() -> bool:
        v = client.hget(books.current_key, "version").decode()
        want = {str(i): ([int(x) for x in c["rq"]], [int(x) for x in c["vq"]])
                for i, c in reference_for(v).quantize(stored_ids, content).items()}
        return {i: c[:2] for i, c in stored_codes(client, ids).items()} == want

    wait_until(codes_settled, 60, what="stored codes = the current version's codes",
               on_fail=stack["logs"])

    # kill -9 the worker and restart Redis: the projection comes back with the version.
    worker.kill9()
    version = client.hget(books.current_key, "version").decode()
    weight = _version_arrays(client, books, version)["projection_weight"]
    restart_redis(stack, "redis-restarted.log")
    client.close()
    client = redis.Redis.from_url(url)
    assert client.hget(books.current_key, "version").decode() == version
    np.testing.assert_array_equal(_version_arrays(client, books, version)["projection_weight"],
                                  weight)
    restarted = stack["start_worker"](**dict(env, HEADWATER_CODEBOOK_REFRESH_SECONDS=3600))
    cold = [{"item_id": f"new{k}", "ts": 890_000_000.0, "text": f"{it['text']} (remake)",
             "tags": it["tags"]} for k, it in enumerate(items[:20])]
    send_items(kafka, settings.topics["items"], cold)
    cold_ids = [it["item_id"] for it in cold]
    wait_until(lambda: len(stored_codes(client, cold_ids)) == len(cold_ids), 90,
               what="codes of new items after the restart", on_fail=restarted.log)
    reference = reference_for(version)
    got = reference.quantize(*reference.encode_content(cold))
    assert stored_codes(client, cold_ids) == {
        str(i): ([int(v) for v in c["rq"]], [int(v) for v in c["vq"]], version)
        for i, c in got.items()}
    assert f"using version {version}" in restarted.log()
    client.close()


def _all_content(client, books: CodebookStore) -> tuple[list[str], np.ndarray]:
    raw = client.hgetall(books.content_key)
    ids = sorted(k.decode() for k in raw)
    return ids, np.stack([np.frombuffer(raw[i.encode()], dtype="<f4") for i in ids])
