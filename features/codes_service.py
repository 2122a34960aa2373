"""Items-side façade for quantized multimodal codes: encode -> align -> quantize.

The Faust items agent calls :meth:`CodeAssigner.assign` on a batch of item events and
writes what it returns to Redis (:func:`asave_item_codes`, through the online store); the clicks side feeds
:meth:`CodeAssigner.observe_clicks` so alignment pairs are mined online; a scheduler
calls :meth:`CodeAssigner.refresh` (new projection and/or drifted catalogue).

Invariants
----------
- **Cold start**: an item gets codes in the same call that delivers its content,
  once the codebooks exist. Before the first fit (fewer than ``min_fit_items``
  items seen) items have no codes (token 0 = missing); the call that reaches the
  threshold fits and returns codes for every item seen so far.
- **Causality**: codes depend on the item's content and on the alignment projection
  in force; the projection only changes through :meth:`set_projection` (weights
  trained on pairs mined from clicks already seen), and codes move only at
  :meth:`refresh`, which matches new centroids to old ones (see
  ``features.codebooks``) and reports how many items changed codes.
- **Bounded state**: content embeddings of at most ``max_items`` most recently updated
  items are kept (they are re-projected at refresh); the pair miner is bounded too.

Codes reach rows as categorical fields ``rq0..rq{L-1}`` and ``vq0..vq{k-1}``
(:func:`code_fields`, :func:`code_tokens`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from features.alignment import PairMiner
from features.codebooks import RefreshMode, RefreshReport, RQKMeans, VQIndex, exact_affine
from features.content import ContentEncoder, l2_normalize
from features.hashing import hash_tokens

__all__ = [
    "CodeAssigner",
    "CodesConfig",
    "ItemCodes",
    "RefreshResult",
    "code_fields",
    "code_tokens",
    "asave_item_codes",
    "save_item_codes",
]

ItemCodes = dict[str, Any]  # {"rq": [L ints], "vq": [k ids], "version": str}


@dataclass
class CodesConfig:
    """Sizes and schedules of the code pipeline (all configurable, see docs/protocol.md).

    ``codebook_size`` should follow the catalogue: 64 for ~1.7k items, 256+ for
    large catalogues. ``min_fit_items`` defaults to ``4 * codebook_size``.
    """

    levels: int = 3
    codebook_size: int = 64
    vq_k: int = 8
    min_fit_items: int | None = None
    max_items: int = 100_000
    refresh_mode: RefreshMode = "hungarian"
    pair_window: int = 20
    max_users: int = 100_000
    max_pairs: int = 50_000
    n_iter: int = 25
    seed: int = 0

    @property
    def fit_threshold(self) -> int:
        return self.min_fit_items or max(4 * self.codebook_size, self.vq_k + 1)


@dataclass
class RefreshResult:
    """Outcome of :meth:`CodeAssigner.refresh`: the RQ report and every item's codes."""

    report: RefreshReport
    codes: dict[Hashable, ItemCodes]
    n_changed: int
    n_items: int
    vq_changed_fraction: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    #: items whose RQ or VQ codes moved (the ones a store has to rewrite)
    changed_ids: list[Hashable] = field(default_factory=list)


def code_fields(levels: int, vq_k: int) -> list[str]:
    """Categorical field names carried by rows, in order.

    >>> code_fields(2, 3)
    ['rq0', 'rq1', 'vq0', 'vq1', 'vq2']
    """
    return [f"rq{i}" for i in range(levels)] + [f"vq{i}" for i in range(vq_k)]


def code_tokens(
    codes: Sequence[ItemCodes | None], levels: int, vq_k: int, use_vq: bool = True
) -> dict[str, np.ndarray]:
    """Per-field int64 tokens for a column of item codes; ``None`` (no codes) -> ``0``.

    Same tokens as ``features.rows.RowBuilder`` builds for code fields (field ``rq1``
    hashes element 1 of ``rq``, ``vq3`` element 3 of ``vq``), so benchmarks and live rows
    agree. RQ-Kmeans shares each level's codebook across all parents, so a level's raw
    code has one meaning on its own. ``use_vq=False`` leaves the ``vq`` fields missing.

    >>> toks = code_tokens([{"rq": [3, 1], "vq": [7]}, None], levels=2, vq_k=1)
    >>> [bool(toks[f][0] > 0) for f in ("rq0", "rq1", "vq0")], int(toks["rq0"][1])
    ([True, True, True], 0)
    """
    out: dict[str, np.ndarray] = {}
    for lv in range(levels):
        out[f"rq{lv}"] = hash_tokens(f"rq{lv}", [None if c is None else c["rq"][lv] for c in codes])
    for j in range(vq_k):
        vals = [None if (c is None or not use_vq) else c["vq"][j] for c in codes]
        out[f"vq{j}"] = hash_tokens(f"vq{j}", vals)
    return out


class CodeAssigner:
    """Encoder + alignment projection + codebooks, behind a batch API.

    Parameters
    ----------
    encoder
        Content encoder (text model, tags, vectors).
    config
        Code sizes and schedules.
    projection
        ``{"weight": (out, in), "bias": (out,)}`` from ``AlignmentTower.export_numpy``;
        ``None`` = identity (no published alignment model yet).

    Not thread-safe: the items agent should call it from one worker thread (off the
    event loop, ``run_in_executor``), including :meth:`refresh`.

    >>> from features.content import HashingTextEncoder
    >>> cfg = CodesConfig(levels=2, codebook_size=4, vq_k=2)
    >>> ca = CodeAssigner(ContentEncoder(HashingTextEncoder(16), tag_dim=4), cfg)
    >>> out = ca.assign([{"item_id": i, "text": f"movie {i}"} for i in range(16)])
    >>> sorted(out[3])
    ['rq', 'version', 'vq']
    >>> len(out[3]["rq"]), len(out[3]["vq"])
    (2, 2)
    """

    def __init__(
        self,
        encoder: ContentEncoder,
        config: CodesConfig | None = None,
        projection: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.encoder = encoder
        self.config = config or CodesConfig()
        cfg = self.config
        self.rq = RQKMeans(cfg.levels, cfg.codebook_size, n_iter=cfg.n_iter, seed=cfg.seed)
        self.vq = VQIndex(k=cfg.vq_k)
        self._content: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._codes: dict[Hashable, ItemCodes] = {}
        self.miner = PairMiner(
            self.content_of,
            window=cfg.pair_window,
            max_users=cfg.max_users,
            max_pairs=cfg.max_pairs,
        )
        self._weight: np.ndarray | None = None
        self._bias: np.ndarray | None = None
        self.projection_version = "identity"
        self.set_projection(projection)

    # -- projection -------------------------------------------------------------------

    def set_projection(self, weights: Mapping[str, np.ndarray] | None) -> None:
        """Install alignment weights (``None`` = identity).

        Before the first fit they apply at once; afterwards at the next :meth:`refresh`,
        so that one codebook generation always quantizes one projection's outputs.
        """
        if weights is None:
            self._pending: tuple[np.ndarray | None, np.ndarray | None, str] = (
                None,
                None,
                "identity",
            )
        else:
            w = np.asarray(weights["weight"], dtype=np.float32)
            b = np.asarray(weights.get("bias", np.zeros(w.shape[0])), dtype=np.float32)
            if w.ndim != 2 or w.shape[1] != self.encoder.dim or b.shape != (w.shape[0],):
                raise ValueError(
                    f"projection weight {w.shape} / bias {b.shape} do not fit content "
                    f"dim {self.encoder.dim}: expected weight (out, {self.encoder.dim})"
                )
            digest = hashlib.sha256(w.tobytes() + b.tobytes()).hexdigest()[:8]
            self._pending = (w, b, digest)
        if not self.rq.fitted:  # nothing quantized yet: nothing to keep consistent
            self._weight, self._bias, self.projection_version = self._pending

    def projection(self) -> dict[str, np.ndarray] | None:
        """The projection in force (``None`` = identity), as :meth:`set_projection` takes it."""
        if self._weight is None:
            return None
        return {"weight": self._weight.copy(), "bias": self._bias.copy()}

    def load_projection(self, path: str | Path) -> None:
        """Load ``weight``/``bias`` from an ``.npz`` exported by the alignment tower."""
        with np.load(path) as data:
            self.set_projection({"weight": data["weight"], "bias": data["bias"]})

    def project(self, content: np.ndarray) -> np.ndarray:
        """Aligned, L2-normalised embeddings of fused content vectors."""
        if self._weight is None:
            return l2_normalize(content)
        # row by row as in any batch: an item's codes must not depend on its batch
        return l2_normalize(exact_affine(content, self._weight, self._bias))

    # -- state ------------------------------------------------------------------------

    @property
    def version(self) -> str:
        """Code version: codebook generation and hash, and the projection in force."""
        return f"{self.rq.version}.{self.projection_version}"

    def __len__(self) -> int:
        return len(self._content)

    def content_of(self, item_ids: Sequence[Hashable]) -> np.ndarray:
        """Stored fused content embeddings (zero rows for unknown items)."""
        out = np.zeros((len(item_ids), self.encoder.dim), dtype=np.float32)
        for row, item in enumerate(item_ids):
            vec = self._content.get(item)
            if vec is not None:
                out[row] = vec
        return out

    def codes_of(self, item_ids: Sequence[Hashable]) -> list[ItemCodes | None]:
        """Current codes of items (``None`` where an item has none yet)."""
        return [self._codes.get(item) for item in item_ids]

    # -- the three entry points -------------------------------------------------------

    def assign(self, items: Sequence[Mapping[str, Any]]) -> dict[Hashable, ItemCodes]:
        """Encode, align and quantize a batch of item events; return their codes.

        Returns codes for the batch's items once codebooks exist; the call that first
        reaches ``min_fit_items`` fits them and returns codes for *all* stored items.
        """
        if not items:
            return {}
        ids, _ = self.encode_content(items)
        if not self.rq.fitted:
            if len(self._content) < self.config.fit_threshold:
                return {}
            self._fit_all()
            return dict(self._codes)
        return self._quantize(ids, self.content_of(ids))

    def encode_content(self, items: Sequence[Mapping[str, Any]]) -> tuple[list[Hashable], np.ndarray]:
        """Encode a batch of item events and keep their fused content; returns the
        distinct item ids and their content (a batch may update an item twice: last wins)."""
        batch = self.encoder.encode(items)
        for item, vec in zip(batch.item_ids, batch.fused(), strict=True):
            self._content[item] = vec
            self._content.move_to_end(item)
        while len(self._content) > self.config.max_items:
            old, _ = self._content.popitem(last=False)
            self._codes.pop(old, None)
        ids = list(dict.fromkeys(batch.item_ids))
        return ids, self.content_of(ids)

    # -- shared codebooks (features.codebook_store) ------------------------------------

    def quantize(self, ids: Sequence[Hashable], content: np.ndarray) -> dict[Hashable, ItemCodes]:
        """Codes of items with the given fused content, with the codebooks in force."""
        if not self.rq.fitted:
            raise RuntimeError("no codebooks yet: fit them or import a stored version")
        return self._quantize(list(ids), np.asarray(content, dtype=np.float32))

    def fit_on(self, ids: Sequence[Hashable], content: np.ndarray,
               mode: RefreshMode | None = None) -> None:
        """Fit the codebooks on these items (every item of the catalogue, from the shared
        store), or refresh them if fitted: the first fit or :meth:`refresh` on them."""
        content = np.asarray(content, dtype=np.float32)
        self._content = OrderedDict(zip(ids, content, strict=True))
        self._codes = {i: c for i, c in self._codes.items() if i in self._content}
        if self.rq.fitted:
            self.refresh(mode)
        else:
            self._fit_all()

    def export_codebooks(self) -> dict[str, np.ndarray]:
        """Everything another process needs to quantize exactly like this one: the RQ
        codebooks and generation, the VQ pool, the projection in force (plain arrays)."""
        if not self.rq.fitted:
            raise RuntimeError("no codebooks to export: not fitted")
        out = {f"rq{i}": cb for i, cb in enumerate(self.rq.codebooks)}
        out["generation"] = np.array(self.rq.generation, np.int64)
        out["vq_ids"] = np.asarray([str(i) for i in self.vq.pool_ids])
        out["vq_pool"] = self.vq.pool
        out["projection_version"] = np.array(self.projection_version)
        if self._weight is not None:
            out["projection_weight"], out["projection_bias"] = self._weight, self._bias
        return out

    def import_codebooks(self, arrays: Mapping[str, np.ndarray]) -> str:
        """Install codebooks from :meth:`export_codebooks`; returns their :attr:`version`.

        >>> from features.content import HashingTextEncoder
        >>> cfg = CodesConfig(levels=2, codebook_size=4, vq_k=2)
        >>> a = CodeAssigner(ContentEncoder(HashingTextEncoder(16), tag_dim=4), cfg)
        >>> _ = a.assign([{"item_id": str(i), "text": f"movie {i}"} for i in range(16)])
        >>> b = CodeAssigner(ContentEncoder(HashingTextEncoder(16), tag_dim=4), cfg)
        >>> b.import_codebooks(a.export_codebooks()) == a.version
        True
        """
        levels = self.config.levels
        books = [np.asarray(arrays[f"rq{i}"], np.float32) for i in range(levels)]
        if f"rq{levels}" in arrays or any(b.shape[0] != self.config.codebook_size for b in books):
            raise ValueError(f"stored codebooks do not match {levels} levels of "
                             f"{self.config.codebook_size} codes")
        self.rq.codebooks = books
        self.rq.generation = int(arrays["generation"])
        ids = [str(i) for i in np.asarray(arrays["vq_ids"]).tolist()]
        self.vq.load(ids, arrays["vq_pool"])
        if "projection_weight" in arrays:
            w = np.asarray(arrays["projection_weight"], np.float32)
            b = np.asarray(arrays["projection_bias"], np.float32)
        else:
            w = b = None
        self._weight, self._bias = w, b
        self.projection_version = str(arrays["projection_version"])
        self._pending = (w, b, self.projection_version)
        self._codes = {}
        return self.version

    def observe_clicks(
        self,
        user_ids: Sequence[Hashable],
        item_ids: Sequence[Hashable],
        labels: Sequence[int] | None = None,
    ) -> int:
        """Feed click events (stream order) to pair mining; returns pairs mined."""
        return len(self.miner.observe(user_ids, item_ids, labels))

    def training_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Buffered pairs as ``(trigger content, target content, target ids)`` arrays,
        skipping pairs whose items were evicted. Ids are positions of distinct targets
        (so repeats of a target are not in-batch negatives of each other)."""
        trig, tgt = self.miner.pair_ids()
        keep = [
            i
            for i, (a, b) in enumerate(zip(trig, tgt, strict=True))
            if a in self._content and b in self._content
        ]
        trig = [trig[i] for i in keep]
        tgt = [tgt[i] for i in keep]
        index: dict[Hashable, int] = {}
        tid = np.fromiter((index.setdefault(t, len(index)) for t in tgt), np.int64, len(tgt))
        return self.content_of(trig), self.content_of(tgt), tid

    def refresh(self, mode: RefreshMode | None = None) -> RefreshResult:
        """Apply the pending projection, re-fit codebooks on stored items, re-code all.

        Returns the refresh report (items whose RQ codes changed, per level, with the
        matching mode used) and the new codes of every stored item.
        """
        if not self.rq.fitted:
            raise RuntimeError(
                f"no codebooks yet: {len(self._content)} items seen, "
                f"{self.config.fit_threshold} needed before the first fit"
            )
        ids = list(self._content)
        before = {item: self._codes.get(item) for item in ids}
        self._weight, self._bias, self.projection_version = self._pending
        x = self.project(self.content_of(ids))
        report = self.rq.refresh(x, mode or self.config.refresh_mode)
        self.vq.build(ids, x)
        codes = self._quantize(ids, self.content_of(ids))
        n_changed = sum(1 for i in ids if before[i] is None or before[i]["rq"] != codes[i]["rq"])
        vq_changed = [
            len(set(before[i]["vq"]) ^ set(codes[i]["vq"])) / (2 * self.config.vq_k)
            for i in ids
            if before[i] is not None
        ]
        moved = [
            i for i in ids
            if before[i] is None or (before[i]["rq"], before[i]["vq"]) != (codes[i]["rq"], codes[i]["vq"])
        ]
        return RefreshResult(
            report, codes, n_changed, len(ids), float(np.mean(vq_changed)) if vq_changed else 0.0,
            changed_ids=moved,
        )

    # -- internals --------------------------------------------------------------------

    def _fit_all(self) -> None:
        ids = list(self._content)
        x = self.project(self.content_of(ids))
        self.rq.fit(x)
        self.vq.build(ids, x)
        self._quantize(ids, self.content_of(ids))

    def _quantize(self, ids: list[Hashable], content: np.ndarray) -> dict[Hashable, ItemCodes]:
        x = self.project(content)
        rq = self.rq.encode(x)
        vq = self.vq.encode(x, ids)
        version = self.version
        out: dict[Hashable, ItemCodes] = {}
        for row, item in enumerate(ids):
            codes = {"rq": rq[row].tolist(), "vq": vq[row].tolist(), "version": version}
            self._codes[item] = codes
            out[item] = codes
        return out


def _split(codes: ItemCodes) -> tuple[dict[str, list[int]], str]:
    return {"rq": list(codes["rq"]), "vq": list(codes["vq"])}, str(codes["version"])


def save_item_codes(store: Any, codes: Mapping[Hashable, ItemCodes]) -> int:
    """Write :meth:`CodeAssigner.assign` output through ``SyncOnlineStore.set_item_codes``.

    The store owns the key layout (``hw:codes:item:<id>``, docs/contracts.md).
    """
    for item, c in codes.items():
        store.set_item_codes(item, *_split(c))
    return len(codes)


async def asave_item_codes(store: Any, codes: Mapping[Hashable, ItemCodes]) -> int:
    """Async twin of :func:`save_item_codes` for ``OnlineStore`` (the items agent)."""
    for item, c in codes.items():
        await store.set_item_codes(item, *_split(c))
    return len(codes)
