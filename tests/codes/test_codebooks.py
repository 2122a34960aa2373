from __future__ import annotations

import numpy as np
import pytest

from features.codebooks import RQKMeans, VQIndex, kmeans, match_centroids


def test_rq_error_drops_level_by_level(catalogue):
    x, _ = catalogue
    rq = RQKMeans(levels=4, codebook_size=16, seed=0).fit(x)
    errs = rq.level_errors(x)
    assert len(errs) == 5
    assert np.all(np.diff(errs) < 0), errs
    # Decoding all levels reconstructs exactly what level_errors measured.
    recon = rq.decode(rq.encode(x))
    assert np.isclose(np.mean(np.sum((x - recon) ** 2, axis=1)), errs[-1], rtol=1e-4)


def test_rq_codes_deterministic_for_a_seed(catalogue):
    x, _ = catalogue
    a = RQKMeans(levels=3, codebook_size=16, seed=7).fit(x)
    b = RQKMeans(levels=3, codebook_size=16, seed=7).fit(x)
    c = RQKMeans(levels=3, codebook_size=16, seed=8).fit(x)
    np.testing.assert_array_equal(a.encode(x), b.encode(x))
    assert a.version == b.version != c.version
    assert a.encode(x).shape == (len(x), 3) and a.encode(x).max() < 16


def test_rq_first_level_recovers_clusters(catalogue):
    x, lab = catalogue
    codes = RQKMeans(levels=1, codebook_size=12, seed=0).fit(x).encode(x)[:, 0]
    # Every true cluster maps (almost) entirely to one code.
    purity = np.mean([np.bincount(codes[lab == c]).max() / np.sum(lab == c) for c in range(12)])
    assert purity > 0.95


def test_rq_rejects_bad_sizes():
    with pytest.raises(ValueError, match="levels"):
        RQKMeans(levels=7)
    with pytest.raises(ValueError, match="at least k=64"):
        RQKMeans(codebook_size=64).fit(np.zeros((10, 3), dtype=np.float32))


def test_vq_codes_equal_brute_force_topk():
    rng = np.random.default_rng(1)
    pool = rng.standard_normal((200, 12)).astype(np.float32)
    ids = np.arange(1000, 1200)
    query = rng.standard_normal((30, 12)).astype(np.float32)
    vq = VQIndex(k=5, exclude_self=False).build(ids, pool)
    got = vq.encode(query)
    pn = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    for row in range(len(query)):
        sims = [float(qn[row] @ pn[j]) for j in range(len(pool))]
        brute = sorted(range(len(pool)), key=lambda j: -sims[j])[:5]
        assert got[row].tolist() == [int(ids[j]) for j in brute]


def test_vq_excludes_the_item_itself():
    pool = np.eye(4, dtype=np.float32) + 0.01
    vq = VQIndex(k=2).build([1, 2, 3, 4], pool)
    codes = vq.encode(pool[:2], ids=[1, 2])
    assert 1 not in codes[0] and 2 not in codes[1]
    assert VQIndex(k=2, exclude_self=False).build([1, 2, 3, 4], pool).encode(pool[:1])[0, 0] == 1


def test_refresh_with_matching_keeps_codes_and_baseline_scrambles(make_clustered):
    x, _ = make_clustered(n=800, d=16, centers=12, seed=3)
    rng = np.random.default_rng(5)
    perturbed = x + 0.01 * rng.standard_normal(x.shape).astype(np.float32)
    results = {}
    for mode in ("hungarian", "warm", "none"):
        for name, data in (("same", x), ("perturbed", perturbed)):
            rq = RQKMeans(levels=1, codebook_size=12, seed=0).fit(x)
            before = rq.encode(data)
            report = rq.refresh(data, mode=mode)
            after = rq.encode(data)
            assert report.generation == 1
            assert report.changed_fraction == pytest.approx(np.mean((before != after).any(1)))
            results[mode, name] = report.changed_fraction
    for name in ("same", "perturbed"):
        assert results["hungarian", name] < 0.05, results
        assert results["warm", name] < 0.05, results
        assert results["none", name] > 0.5, results


def test_refresh_multi_level_matching_beats_unmatched(catalogue):
    x, _ = catalogue
    frac = {}
    for mode in ("hungarian", "none"):
        rq = RQKMeans(levels=3, codebook_size=12, seed=0).fit(x)
        frac[mode] = rq.refresh(x, mode=mode).changed_per_level
    assert frac["hungarian"][0] < 0.05
    assert all(h < n for h, n in zip(frac["hungarian"], frac["none"], strict=True))


def test_match_centroids_undoes_a_permutation():
    rng = np.random.default_rng(0)
    old = rng.standard_normal((20, 5))
    perm = rng.permutation(20)
    new = old[perm] + 1e-3
    assert np.allclose(new[match_centroids(old, new)], old, atol=1e-2)


def test_kmeans_reseeds_dead_clusters(make_clustered):
    x, _ = make_clustered(n=300, d=4, centers=6, spread=0.05, seed=2)
    # Start with every centroid stacked in one place: all but one would stay empty.
    init = np.repeat(x[:1], 6, axis=0)
    res = kmeans(x, 6, init=init, n_iter=30)
    assert res.n_reseeded >= 5
    assert len(np.unique(res.labels)) == 6


def test_reseed_dead_codes_after_drift(catalogue):
    x, _ = catalogue
    rq = RQKMeans(levels=2, codebook_size=16, seed=0).fit(x)
    # The catalogue moves: only half of its regions remain, far away.
    shifted = x[: len(x) // 2] + 5.0
    usage_before = rq.usage(shifted)
    moved = rq.reseed_dead(shifted)
    assert moved > 0
    assert rq.usage(shifted)[0] > usage_before[0]
    assert rq.usage(shifted)[0] == 1.0


def test_usage_has_no_dead_codes_on_fit_data(catalogue):
    x, _ = catalogue
    rq = RQKMeans(levels=3, codebook_size=32, seed=0).fit(x)
    assert np.all(rq.usage(x) >= 0.9)
