"""Quantized item codes (QARM): RQ-Kmeans codebooks and VQ nearest-item codes.

Two code kinds turn an (aligned) item embedding into discrete ids the ranker embeds
with ordinary, trainable tables:

- **RQ-Kmeans** (:class:`RQKMeans`): ``L`` levels of residual k-means; level ``l``
  quantizes what levels ``0..l-1`` left unexplained, so the code ``(c0, .., c_{L-1})``
  goes from coarse to fine and similar items share prefixes.
- **VQ** (:class:`VQIndex`): the ids of an item's top-``k`` nearest items (cosine) in a
  fixed pool of item embeddings.

Everything is vectorised numpy (one matrix product per assignment pass, sparse
one-hot products for centroid updates); k-means++ seeds, and empty clusters are
re-seeded at the worst-reconstructed points so no code stays dead.

Refresh and the meaning of code ids
-----------------------------------
The ranker learns one embedding per code id. Re-fitting k-means on recent items
(the catalogue drifts, the alignment projection is re-trained) yields centroids in an
arbitrary order: code 17 would suddenly mean another region and every learned code
embedding would be wrong at once. :meth:`RQKMeans.refresh` (default
``mode="hungarian"``) keeps ids meaningful in two steps, level by level:

1. Lloyd's algorithm warm-started from the old centroids competes with a fresh
   k-means++ fit (best of ``n_init``). The fresh fit wins only if it lowers the level's
   inertia by more than ``stability_margin``: k-means has many near-equal local optima,
   and swapping one for another that is no better would move codes for nothing.
2. A winning fresh fit is permuted onto the old centroids with the Hungarian algorithm
   (``scipy.optimize.linear_sum_assignment`` on squared centroid distances), so the id
   of every region that still exists is kept. Permuting a level does not change which
   items fall together, so the next level's residuals are unaffected.

Dead codes are re-seeded at the worst-reconstructed points in either case. The
codebook **generation** (part of :attr:`RQKMeans.version`) is bumped at every refresh
and travels with the codes, so rows and checkpoints can say which codebooks produced
them. ``mode="warm"`` (step 1 without the fresh competitor) and ``mode="none"`` (fresh
fit, arbitrary ids: the baseline) exist for comparison; :class:`RefreshReport` counts
the items whose codes changed so the effect is measured, not assumed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment

__all__ = [
    "KMeansResult",
    "RQKMeans",
    "RefreshReport",
    "VQIndex",
    "exact_affine",
    "kmeans",
    "kmeans_plus_plus",
    "match_centroids",
    "nearest_centroid",
    "rowwise_dot",
]

_CHUNK = 32_768  # rows per distance block: bounds memory at ~CHUNK*K floats

RefreshMode = Literal["hungarian", "warm", "none"]


#: candidates a BLAS ranking hands to the exact one (see :func:`rowwise_dot`)
_RERANK = 4


def rowwise_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a * b).sum(-1)`` in float64, the same value for a row whatever batch it is in.

    A matrix product (BLAS) sums in an order that follows the shapes (blocking, kernels
    for edge rows), so one item's similarity to another could differ in the last bits
    between a batch of 1 and a batch of 2,000, and two near-equal neighbours swap places:
    an item's codes would depend on which batch quantized it, and two processes holding
    the same codebooks would disagree. Here the float32 products are exact in float64 and
    numpy sums each row's products over the contiguous last axis by one fixed scheme.

    >>> a = np.random.default_rng(0).normal(size=(5, 1, 64)).astype(np.float32)
    >>> b = np.random.default_rng(1).normal(size=(5, 3, 64)).astype(np.float32)
    >>> bool((rowwise_dot(a, b)[2:3] == rowwise_dot(a[2:3], b[2:3])).all())
    True
    """
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64)).sum(axis=-1)


def exact_affine(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``x @ weight.T + bias`` as float32, each row independent of the batch
    (:func:`rowwise_dot`).

    >>> x = np.random.default_rng(0).normal(size=(7, 16)).astype(np.float32)
    >>> w = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
    >>> y = exact_affine(x, w, np.zeros(8, np.float32))
    >>> bool(np.allclose(y, x @ w.T, atol=1e-5)), bool((y[3] == exact_affine(x[3:4], w, np.zeros(8))[0]).all())
    (True, True)
    """
    x = np.asarray(x, dtype=np.float32)
    w = np.asarray(weight, dtype=np.float32)
    out = np.empty((len(x), len(w)), dtype=np.float32)
    step = max(1, (2 << 20) // max(1, w.size))  # ~16 MB of float64 products per block
    for s in range(0, len(x), step):
        out[s : s + step] = rowwise_dot(x[s : s + step, None, :], w[None, :, :]) + bias
    return out


def nearest_centroid(x: np.ndarray, centroids: np.ndarray,
                     exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest centroid of each row and the squared distance to it.

    ``exact``: the few nearest by the matrix product are re-ranked by exact distances
    (:func:`rowwise_dot`'s reason; ties: the lower index), so a row's label does not
    depend on the rows beside it. Encoding uses it; fitting, which runs in one process
    on one batch, does not need it.

    >>> lab, d2 = nearest_centroid(np.array([[0.0], [0.9]]), np.array([[0.0], [1.0]]))
    >>> lab.tolist(), [round(float(v), 3) for v in d2]
    ([0, 1], [0.0, 0.01])
    >>> nearest_centroid(np.array([[0.5]]), np.array([[0.0], [1.0]]), exact=True)[0].tolist()
    [0]
    """
    x = np.asarray(x, dtype=np.float32)
    c = np.asarray(centroids, dtype=np.float32)
    c_sq = np.einsum("kd,kd->k", c, c)
    labels = np.empty(len(x), dtype=np.int64)
    d2 = np.empty(len(x), dtype=np.float32)
    rerank = min(_RERANK, len(c)) if exact else 1
    for s in range(0, len(x), _CHUNK):
        xb = x[s : s + _CHUNK]
        # |x|^2 is constant per row, so the argmin needs only -2x.c + |c|^2.
        scores = c_sq[None, :] - 2.0 * (xb @ c.T)
        if rerank > 1:
            cand = np.argpartition(scores, rerank - 1, axis=1)[:, :rerank]
            cand.sort(axis=1)  # index order first: argmin takes the first of equals
            diff = np.asarray(xb, np.float64)[:, None, :] - np.asarray(c, np.float64)[cand]
            dist = rowwise_dot(diff, diff)
            pick = np.argmin(dist, axis=1)
            rows = np.arange(len(xb))
            labels[s : s + _CHUNK] = cand[rows, pick]
            d2[s : s + _CHUNK] = dist[rows, pick]
            continue
        lab = np.argmin(scores, axis=1)
        labels[s : s + _CHUNK] = lab
        best = scores[np.arange(len(xb)), lab] + np.einsum("nd,nd->n", xb, xb)
        d2[s : s + _CHUNK] = np.maximum(best, 0.0)
    return labels, d2


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centroid drawn with probability ∝ squared distance.

    Raises ``ValueError`` when ``x`` has fewer than ``k`` rows.
    """
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    centers[0] = x[rng.integers(n)]
    closest = np.einsum("nd,nd->n", x - centers[0], x - centers[0])
    for j in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:  # fewer distinct points than k: duplicates are all we have
            idx = int(rng.integers(n))
        else:
            idx = int(rng.choice(n, p=closest / total))
        centers[j] = x[idx]
        diff = x - centers[j]
        closest = np.minimum(closest, np.einsum("nd,nd->n", diff, diff))
    return centers


@dataclass
class KMeansResult:
    """Fitted centroids, the labels of the fitting points, and how the fit went."""

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float
    n_iter: int
    n_reseeded: int


def _reseed_empty(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, d2: np.ndarray) -> int:
    """Move centroids that own no point onto the worst-reconstructed points (in place)."""
    counts = np.bincount(labels, minlength=len(centroids))
    dead = np.flatnonzero(counts == 0)
    if len(dead) == 0:
        return 0
    worst = np.argsort(-d2, kind="stable")[: len(dead)]
    centroids[dead[: len(worst)]] = x[worst]
    labels[worst] = dead[: len(worst)]
    d2[worst] = 0.0
    return len(worst)


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    n_iter: int = 25,
    seed: int = 0,
    init: np.ndarray | None = None,
    tol: float = 1e-6,
    n_init: int = 1,
) -> KMeansResult:
    """Lloyd's k-means with k-means++ seeding and dead-cluster re-seeding.

    Parameters
    ----------
    x
        ``(n, d)`` points.
    k
        Number of clusters.
    n_iter
        Maximum Lloyd iterations.
    seed
        Seed of the k-means++ draw: same data and seed give the same centroids.
    init
        Optional ``(k, d)`` starting centroids (warm start) instead of k-means++.
    tol
        Stop when the relative inertia improvement falls below it.
    n_init
        Independent k-means++ runs (seeds ``seed .. seed + n_init - 1``); the lowest
        inertia wins. More runs give better and more reproducible optima, which is
        what keeps a refresh from landing in a different local optimum.

    >>> pts = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    >>> res = kmeans(pts, 2, seed=0)
    >>> sorted(np.bincount(res.labels).tolist())
    [2, 2]
    """
    x = np.asarray(x, dtype=np.float32)
    if init is None and n_init > 1:
        runs = [kmeans(x, k, n_iter=n_iter, seed=seed + r, tol=tol) for r in range(n_init)]
        return min(runs, key=lambda r: r.inertia)
    if init is None:
        centroids = kmeans_plus_plus(x, k, np.random.default_rng(seed))
    else:
        centroids = np.array(init, dtype=np.float32, copy=True)
    n = len(x)
    rows = np.arange(n)
    reseeded = 0
    prev = np.inf
    done = 0
    labels, d2 = nearest_centroid(x, centroids)
    for _ in range(n_iter):
        done += 1
        reseeded += _reseed_empty(x, centroids, labels, d2)
        onehot = sparse.csr_matrix((np.ones(n, dtype=np.float32), (labels, rows)), shape=(k, n))
        counts = np.asarray(onehot.sum(axis=1)).ravel()
        sums = onehot @ x
        owned = counts > 0
        centroids[owned] = sums[owned] / counts[owned, None]
        labels, d2 = nearest_centroid(x, centroids)
        inertia = float(d2.sum())
        if np.isfinite(prev) and prev - inertia <= tol * max(prev, 1e-12):
            break
        prev = inertia
    # A final pass so that no centroid ends dead even if the last update emptied one.
    n_final = _reseed_empty(x, centroids, labels, d2)
    reseeded += n_final
    if n_final:
        labels, d2 = nearest_centroid(x, centroids)
    return KMeansResult(centroids, labels, float(d2.sum()), done, reseeded)


def match_centroids(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Permutation ``p`` such that ``new[p]`` lines up with ``old`` (min total sq. distance).

    >>> old = np.array([[0.0], [10.0], [20.0]])
    >>> new = np.array([[19.0], [1.0], [11.0]])
    >>> match_centroids(old, new).tolist()
    [1, 2, 0]
    """
    old = np.asarray(old, dtype=np.float64)
    new = np.asarray(new, dtype=np.float64)
    cost = (old**2).sum(1)[:, None] - 2.0 * old @ new.T + (new**2).sum(1)[None, :]
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(old), dtype=np.int64)
    perm[rows] = cols
    return perm


@dataclass
class RefreshReport:
    """What a codebook refresh did, measured on the items it was fitted on."""

    mode: str
    generation: int
    version: str
    n_items: int
    changed_fraction: float
    changed_per_level: list[float]
    centroid_shift: list[float]
    n_reseeded: int
    fresh_levels: int = 0
    level_errors: list[float] = field(default_factory=list)


class RQKMeans:
    """Residual k-means codebooks: ``levels`` codebooks of ``codebook_size`` centroids.

    Parameters
    ----------
    levels
        Number of levels ``L`` (1..6).
    codebook_size
        Centroids per level ``K``. Size it to the catalogue: about ``sqrt(n_items)`` to
        ``n_items / 25`` keeps clusters populated (64 for MovieLens' 1,682 items;
        256 or more for large catalogues).
    n_iter
        Lloyd iterations per level.
    seed
        Base seed; level ``l`` of generation ``g`` uses ``seed + 1000 g + 10 l``.
    n_init
        k-means++ restarts per level (best inertia kept).
    stability_margin
        At a ``"hungarian"`` refresh, a fresh fit replaces the warm-started one only
        if it lowers the level's inertia by more than this fraction.

    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((300, 8)).astype(np.float32)
    >>> rq = RQKMeans(levels=2, codebook_size=8, seed=0).fit(x)
    >>> rq.encode(x[:2]).shape
    (2, 2)
    >>> errs = rq.level_errors(x)
    >>> bool(errs[0] > errs[1] > errs[2])
    True
    """

    def __init__(
        self,
        levels: int = 3,
        codebook_size: int = 64,
        n_iter: int = 25,
        seed: int = 0,
        n_init: int = 3,
        stability_margin: float = 0.05,
    ) -> None:
        if not 1 <= levels <= 6:
            raise ValueError(f"levels must be in 1..6, got {levels}")
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        self.levels = levels
        self.codebook_size = codebook_size
        self.n_iter = n_iter
        self.seed = seed
        self.n_init = n_init
        self.stability_margin = stability_margin
        self.codebooks: list[np.ndarray] = []
        self.generation = 0
        self.last_reseeded = 0
        self.last_fresh_levels = 0

    @property
    def fitted(self) -> bool:
        """True once :meth:`fit` has run."""
        return len(self.codebooks) == self.levels

    @property
    def version(self) -> str:
        """``<generation>-<hash of the codebooks>``: changes whenever the codebooks do."""
        if not self.fitted:
            return "unfitted"
        h = hashlib.sha256()
        for cb in self.codebooks:
            h.update(np.ascontiguousarray(cb, dtype=np.float32).tobytes())
        return f"{self.generation:06d}-{h.hexdigest()[:8]}"

    def _fresh_fit(self, residual: np.ndarray, level: int) -> KMeansResult:
        return kmeans(
            residual,
            self.codebook_size,
            n_iter=self.n_iter,
            seed=self.seed + 1000 * self.generation + 10 * level,
            n_init=self.n_init,
        )

    def _fit_levels(
        self, x: np.ndarray, old: Sequence[np.ndarray] | None, mode: str = "fresh"
    ) -> list[np.ndarray]:
        """Fit level by level. ``mode``: ``fresh`` (k-means++ restarts), ``warm`` (Lloyd
        from ``old``), ``hungarian`` (warm unless fresh is clearly better, then matched)."""
        residual = np.asarray(x, dtype=np.float32).copy()
        books: list[np.ndarray] = []
        self.last_reseeded = 0
        self.last_fresh_levels = 0
        for level in range(self.levels):
            if mode == "fresh" or old is None:
                res = self._fresh_fit(residual, level)
            else:
                res = kmeans(residual, self.codebook_size, n_iter=self.n_iter, init=old[level])
                if mode == "hungarian":
                    cand = self._fresh_fit(residual, level)
                    if cand.inertia < (1.0 - self.stability_margin) * res.inertia:
                        perm = match_centroids(old[level], cand.centroids)
                        inverse = np.argsort(perm)
                        res = KMeansResult(
                            cand.centroids[perm],
                            inverse[cand.labels],
                            cand.inertia,
                            cand.n_iter,
                            cand.n_reseeded,
                        )
                        self.last_fresh_levels += 1
            self.last_reseeded += res.n_reseeded
            books.append(res.centroids)
            residual -= res.centroids[res.labels]
        return books

    def fit(self, x: np.ndarray) -> RQKMeans:
        """Fit all levels on ``(n, d)`` embeddings (``n >= codebook_size``)."""
        self.codebooks = self._fit_levels(x, None, "fresh")
        return self

    def _check(self) -> None:
        if not self.fitted:
            raise RuntimeError("RQKMeans is not fitted: call fit(x) first")

    def encode(self, x: np.ndarray) -> np.ndarray:
        """``(n, L)`` int64 codes, greedy nearest centroid level by level."""
        self._check()
        residual = np.asarray(x, dtype=np.float32).copy()
        codes = np.empty((len(residual), self.levels), dtype=np.int64)
        for level, cb in enumerate(self.codebooks):
            lab, _ = nearest_centroid(residual, cb, exact=True)
            codes[:, level] = lab
            residual -= cb[lab]
        return codes

    def decode(self, codes: np.ndarray, levels: int | None = None) -> np.ndarray:
        """Reconstruction: the sum of the first ``levels`` (default all) centroids."""
        self._check()
        codes = np.asarray(codes, dtype=np.int64)
        use = self.levels if levels is None else levels
        out = np.zeros((len(codes), self.codebooks[0].shape[1]), dtype=np.float32)
        for level in range(use):
            out += self.codebooks[level][codes[:, level]]
        return out

    def level_errors(self, x: np.ndarray) -> np.ndarray:
        """Mean squared reconstruction error after 0, 1, .., L levels (``L + 1`` values)."""
        x = np.asarray(x, dtype=np.float32)
        codes = self.encode(x)
        residual = x.copy()
        errs = [float(np.mean(np.sum(residual**2, axis=1)))]
        for level, cb in enumerate(self.codebooks):
            residual -= cb[codes[:, level]]
            errs.append(float(np.mean(np.sum(residual**2, axis=1))))
        return np.asarray(errs)

    def usage(self, x: np.ndarray) -> np.ndarray:
        """Fraction of each level's codes used by at least one row of ``x``."""
        codes = self.encode(x)
        return np.array(
            [len(np.unique(codes[:, lv])) / self.codebook_size for lv in range(self.levels)]
        )

    def reseed_dead(self, x: np.ndarray) -> int:
        """Re-seed codes no row of ``x`` uses onto its worst-reconstructed rows.

        Keeps live codes (and their ids) untouched; returns how many were moved.
        """
        self._check()
        residual = np.asarray(x, dtype=np.float32).copy()
        moved = 0
        for cb in self.codebooks:
            # A re-seeded code can steal the only row of a live one; a few passes settle it.
            for _ in range(3):
                lab, d2 = nearest_centroid(residual, cb)
                step = _reseed_empty(residual, cb, lab, d2)
                moved += step
                if step == 0:
                    break
            lab, _ = nearest_centroid(residual, cb)
            residual -= cb[lab]
        return moved

    def refresh(self, x: np.ndarray, mode: RefreshMode = "hungarian") -> RefreshReport:
        """Re-fit the codebooks on recent items ``x`` keeping code ids meaningful.

        ``mode``:

        - ``"hungarian"`` (default): per level, Lloyd warm-started from the old
          centroids competes with a fresh k-means++ fit; the fresh one wins only if it
          lowers inertia by more than ``stability_margin`` (the catalogue really moved),
          and is then permuted onto the old centroids by the Hungarian algorithm;
        - ``"warm"``: Lloyd from the old centroids only (dead codes re-seeded);
        - ``"none"``: fresh fit with arbitrary ids, the baseline that scrambles codes.

        The generation is bumped in every mode.
        """
        self._check()
        if mode not in ("hungarian", "warm", "none"):
            raise ValueError(f"mode must be 'hungarian', 'warm' or 'none', got {mode!r}")
        x = np.asarray(x, dtype=np.float32)
        old_books = [cb.copy() for cb in self.codebooks]
        old_codes = self.encode(x)
        self.generation += 1
        self.codebooks = self._fit_levels(x, old_books, "fresh" if mode == "none" else mode)
        books = self.codebooks
        new_codes = self.encode(x)
        diff = old_codes != new_codes
        shift = [
            float(np.mean(np.linalg.norm(nb - ob, axis=1)))
            for ob, nb in zip(old_books, books, strict=True)
        ]
        return RefreshReport(
            mode=mode,
            generation=self.generation,
            version=self.version,
            n_items=len(x),
            changed_fraction=float(diff.any(axis=1).mean()) if len(x) else 0.0,
            changed_per_level=diff.mean(axis=0).tolist() if len(x) else [0.0] * self.levels,
            centroid_shift=shift,
            n_reseeded=self.last_reseeded,
            fresh_levels=self.last_fresh_levels,
            level_errors=self.level_errors(x).tolist(),
        )

    def state(self) -> dict[str, Any]:
        """Plain-container state (arrays and ints) for saving beside a checkpoint."""
        return {
            "levels": self.levels,
            "codebook_size": self.codebook_size,
            "generation": self.generation,
            "codebooks": [cb.copy() for cb in self.codebooks],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], **kwargs: Any) -> RQKMeans:
        """Rebuild from :meth:`state`."""
        rq = cls(levels=state["levels"], codebook_size=state["codebook_size"], **kwargs)
        rq.generation = int(state["generation"])
        rq.codebooks = [np.asarray(cb, dtype=np.float32) for cb in state["codebooks"]]
        return rq


class VQIndex:
    """VQ codes: the ids of each item's ``k`` nearest items (cosine) in a fixed pool.

    Codes are pool *item ids*, so they keep their meaning when the pool is rebuilt
    (an id always names the same item). With ``exclude_self`` an item that is in the
    pool does not list itself: its own id is already a feature, and a cold item (never
    in the pool) must get the same kind of code a warm one does.

    >>> pool = np.eye(3, dtype=np.float32)
    >>> vq = VQIndex(k=1).build([10, 20, 30], pool)
    >>> vq.encode(np.array([[0.9, 0.1, 0.0]])).tolist()
    [[10]]
    """

    def __init__(self, k: int = 8, exclude_self: bool = True) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.exclude_self = exclude_self
        self.pool_ids: np.ndarray = np.zeros(0, dtype=np.int64)
        self.pool: np.ndarray = np.zeros((0, 0), dtype=np.float32)
        self._pos: dict[Any, int] = {}

    def __len__(self) -> int:
        return len(self.pool_ids)

    def build(self, ids: Sequence[Any], vectors: np.ndarray) -> VQIndex:
        """Set the pool (rows are L2-normalised); needs more than ``k`` items."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(ids) <= self.k:
            raise ValueError(f"the VQ pool needs more than k={self.k} items, got {len(ids)}")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.pool = vectors / np.maximum(norms, 1e-12)
        self.pool_ids = np.asarray(list(ids))
        self._pos = {item: i for i, item in enumerate(ids)}
        return self

    def load(self, ids: Sequence[Any], pool: np.ndarray) -> VQIndex:
        """Set a pool exported from another index (``pool_ids``, ``pool``) as it is: no
        re-normalisation, so both give bit-identical codes."""
        if len(ids) != len(pool):
            raise ValueError(f"{len(ids)} ids for {len(pool)} pool vectors")
        self.pool = np.asarray(pool, dtype=np.float32)
        self.pool_ids = np.asarray(list(ids))
        self._pos = {item: i for i, item in enumerate(ids)}
        return self

    def topk_positions(self, x: np.ndarray, ids: Sequence[Any] | None = None) -> np.ndarray:
        """``(n, k)`` pool positions, most similar first (ties: lower position first).

        The matrix product picks a few more candidates than ``k``; their exact
        similarities (:func:`rowwise_dot`) rank them, so an item's codes do not depend on
        the batch it was encoded in."""
        if len(self.pool) == 0:
            raise RuntimeError("VQIndex has no pool: call build(ids, vectors) first")
        x = np.asarray(x, dtype=np.float32)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        out = np.empty((len(x), self.k), dtype=np.int64)
        for s in range(0, len(x), _CHUNK):
            sim = x[s : s + _CHUNK] @ self.pool.T
            if self.exclude_self and ids is not None:
                for row, item in enumerate(ids[s : s + _CHUNK]):
                    pos = self._pos.get(item)
                    if pos is not None:
                        sim[row, pos] = -np.inf
            kk = min(self.k + _RERANK, sim.shape[1])
            cand = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
            cand.sort(axis=1)  # position order first, so the stable sort breaks ties by it
            exact = rowwise_dot(x[s : s + _CHUNK, None, :], self.pool[cand])
            exact[np.isneginf(np.take_along_axis(sim, cand, axis=1))] = -np.inf  # itself
            order = np.argsort(-exact, axis=1, kind="stable")[:, : self.k]
            out[s : s + _CHUNK] = np.take_along_axis(cand, order, axis=1)
        return out

    def encode(self, x: np.ndarray, ids: Sequence[Any] | None = None) -> np.ndarray:
        """``(n, k)`` VQ codes (pool item ids) of embeddings ``x`` of items ``ids``."""
        return self.pool_ids[self.topk_positions(x, ids)]
