from __future__ import annotations

import numpy as np
import pytest

from features.codes_service import (
    CodeAssigner,
    CodesConfig,
    code_fields,
    code_tokens,
    save_item_codes,
)
from features.content import ContentEncoder, HashingTextEncoder

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


def items(start: int, n: int):
    return [
        {
            "item_id": i,
            "text": f"{GENRES[i % 6].lower()} story part {i % 7}",
            "tags": [GENRES[i % 6]],
        }
        for i in range(start, start + n)
    ]


@pytest.fixture
def assigner():
    cfg = CodesConfig(levels=2, codebook_size=8, vq_k=3, min_fit_items=40)
    return CodeAssigner(ContentEncoder(HashingTextEncoder(32), tag_dim=8), cfg)


def test_no_codes_before_threshold_then_all_items_at_first_fit(assigner):
    assert assigner.assign(items(0, 30)) == {}
    out = assigner.assign(items(30, 10))
    assert sorted(out) == list(range(40))
    assert all(len(c["rq"]) == 2 and len(c["vq"]) == 3 for c in out.values())


def test_brand_new_item_gets_codes_immediately_like_its_twin(assigner):
    assigner.assign(items(0, 60))
    twin = items(0, 60)[6]  # item 6: "action story part 6", tag Action
    cold = {"item_id": 9999, "text": twin["text"], "tags": twin["tags"]}
    out = assigner.assign([cold])
    assert list(out) == [9999]
    assert out[9999]["rq"] == assigner.codes_of([6])[0]["rq"]
    assert 6 in out[9999]["vq"]  # its nearest pool item is its content twin
    assert out[9999]["version"] == assigner.version


def test_projection_waits_for_refresh_and_refresh_reports_changes(assigner):
    assigner.assign(items(0, 40))  # first fit on 40 items
    assigner.assign(items(40, 40))
    first = assigner.refresh()  # the catalogue doubled: codebooks adapt to all 80
    assert first.n_items == 80 and first.report.generation == 1
    before = assigner.version
    d = assigner.encoder.dim
    assigner.set_projection({"weight": np.eye(d, dtype=np.float32), "bias": np.zeros(d)})
    assert assigner.version == before  # pending until refresh
    res = assigner.refresh()
    assert res.n_changed <= 8  # an identity projection: same geometry, codes kept
    assert assigner.version != before and assigner.projection_version != "identity"
    unmatched = assigner.refresh(mode="none")
    assert unmatched.n_changed > res.n_changed
    with pytest.raises(ValueError, match="do not fit content dim"):
        assigner.set_projection({"weight": np.eye(3), "bias": np.zeros(3)})


def test_observe_clicks_mines_pairs_for_training(assigner):
    assigner.assign(items(0, 60))
    n = assigner.observe_clicks(["u"] * 4, [0, 6, 12, 1], [1, 1, 1, 0])
    assert n == 2
    trig, tgt, tid = assigner.training_pairs()
    assert trig.shape == tgt.shape == (2, assigner.encoder.dim)
    np.testing.assert_allclose(tgt[1], assigner.content_of([12])[0])
    assert tid.tolist() == [0, 1]


def test_code_tokens_match_row_builder_and_missing_is_zero():
    from features.hashing import hash_tokens

    a = {"rq": [1, 2], "vq": [5, 6]}
    b = {"rq": [3, 2], "vq": [6, 5]}
    toks = code_tokens([a, b, None], levels=2, vq_k=2)
    assert list(toks) == code_fields(2, 2)
    assert toks["rq1"][0] == toks["rq1"][1] == hash_tokens("rq1", [2])[0]
    assert toks["vq1"][0] == hash_tokens("vq1", [6])[0]
    assert all(toks[f][2] == 0 for f in toks)
    assert not code_tokens([a], 2, 2, use_vq=False)["vq0"].any()


def test_codes_round_trip_through_the_online_store(assigner, redis_url):
    import uuid

    from prometheus_client import CollectorRegistry

    from features.store import SyncOnlineStore

    store = SyncOnlineStore.from_url(
        redis_url, partitions=1, registry=CollectorRegistry(), prefix=f"t{uuid.uuid4().hex[:8]}"
    )
    try:
        out = assigner.assign(items(0, 40))
        assert save_item_codes(store, out) == 40
        got = store.get_item_codes_many([3, 4, "no-such-item"])
        assert got[0] == {"rq": out[3]["rq"], "vq": out[3]["vq"]}
        assert got[1]["rq"] == out[4]["rq"] and got[2] is None
    finally:
        store.close()


def test_an_items_codes_do_not_depend_on_the_batch_that_encoded_it():
    """Two processes holding one codebook version give every item the same codes whether
    it came alone, in a small batch or with the whole catalogue (a matrix product's
    last bits follow its shapes, and near-equal neighbours once swapped places: a real
    stack's stored codes disagreed with a reference process for 7 of 1,682 items)."""
    rng = np.random.default_rng(3)
    cfg = CodesConfig(levels=3, codebook_size=16, vq_k=8, min_fit_items=40)
    a = CodeAssigner(ContentEncoder(HashingTextEncoder(48), tag_dim=8), cfg)
    catalogue = [{"item_id": str(i), "text": f"{GENRES[i % 6].lower()} story {i % 40} part {i % 9}",
                  "tags": [GENRES[i % 6], GENRES[(i * 7) % 6]]} for i in range(900)]
    a.assign(catalogue)  # many items share their text: exact and near-exact ties abound
    d = a.encoder.dim
    a.set_projection({"weight": (np.eye(d) + 0.3 * rng.normal(size=(d, d))).astype(np.float32),
                      "bias": rng.normal(size=d).astype(np.float32) * 0.1})
    a.refresh()
    b = CodeAssigner(ContentEncoder(HashingTextEncoder(48), tag_dim=8), cfg)
    b.import_codebooks(a.export_codebooks())
    ids, content = a.encode_content(catalogue)
    whole = b.quantize(ids, content)
    alone = {}
    for k in rng.permutation(len(ids))[:150]:
        alone.update(b.quantize([ids[k]], content[k:k + 1]))
    for s in range(0, len(ids), 37):
        small = b.quantize(ids[s:s + 37], content[s:s + 37])
        assert small == {i: whole[i] for i in small}
    assert alone == {i: whole[i] for i in alone}
    assert {i: {**a.codes_of([i])[0], "vq": [str(v) for v in a.codes_of([i])[0]["vq"]]}
            for i in ids} == whole
