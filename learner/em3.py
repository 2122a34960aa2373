"""EM3 in the ranker: Fusion-Q-Former fields over an item's content, content-ID loss.

With a spec's ``em3`` set (``HEADWATER_EM3_QUERIES`` > 0 in the service) the ranker gets
``n_queries`` extra fields per row: :class:`EM3Fields` runs EM3's Fusion-Q-Former
(``learner.multimodal.FusionQFormer``: trainable queries cross-attending to the item's
modality tokens, here the frozen text embedding and the tag embedding of the item's
stored content) and is trained end to end by the ranking loss. With ``cid_weight`` > 0
the content-ID contrastive loss (in-batch InfoNCE between the mean Q-Former output and
the item-ID embedding) is added to the log-loss.

Item content reaches the model through an :class:`ItemContentTable` keyed by the
``item_id`` field's token (rows carry tokens, not ids): whoever builds the table hashes
the ids (``streams.learner_runner`` and serving read the items' stored content from
Redis). An item with no content yet gets a zero row (the Q-Former's null token keeps
its fields defined).

Serving computes an item's fields once per model version: :meth:`EM3Fields.freeze`
precomputes them for every item of the table (and caches later ones on first use); a
loaded version is never trained, so its cache never goes stale.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from learner.multimodal import FusionQFormer, content_id_infonce

__all__ = ["ContentSequence", "EM3Fields", "ItemContentTable", "sequence_content"]

#: (item_id tokens, content rows) of every stored item
ContentLoader = Callable[[], tuple[np.ndarray, np.ndarray]]


class ItemContentTable:
    """Item content by ``item_id`` token; row 0 is "no content".

    ``loader`` (optional) returns every stored item's tokens and content; it is called
    when a lookup meets an unknown token, at most once per ``reload_seconds``.

    >>> t = ItemContentTable(3)
    >>> t.update(np.array([11, 12]), np.eye(3, dtype=np.float32)[:2])
    >>> t.rows(np.array([12, 99, 11])).tolist()
    [2, 0, 1]
    """

    def __init__(self, dim: int, loader: ContentLoader | None = None,
                 reload_seconds: float = 5.0) -> None:
        self.dim = dim
        self.loader = loader
        self.reload_seconds = reload_seconds
        self.index: dict[int, int] = {}
        self.content = np.zeros((1, dim), np.float32)
        self._loaded_at = -np.inf
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.index)

    def __deepcopy__(self, memo: dict) -> ItemContentTable:
        # External data, not model state: a copied model (ServedLag's snapshot) reads
        # the same items' content.
        return self

    def update(self, tokens: np.ndarray, content: np.ndarray) -> None:
        """Add or replace items' content."""
        content = np.asarray(content, np.float32)
        if content.ndim != 2 or content.shape[1] != self.dim:
            raise ValueError(f"item content has shape {content.shape}, expected (n, {self.dim})")
        with self._lock:
            new = [int(t) for t in tokens if int(t) not in self.index]
            base = len(self.content)
            for k, t in enumerate(new):
                self.index[t] = base + k
            if new:
                self.content = np.concatenate([self.content, np.zeros((len(new), self.dim),
                                                                      np.float32)])
            rows = [self.index[int(t)] for t in tokens]
            self.content[rows] = content

    def reload(self) -> None:
        if self.loader is not None:
            self._loaded_at = time.monotonic()
            tokens, content = self.loader()
            if len(tokens):
                self.update(tokens, content)

    def rows(self, tokens: np.ndarray) -> np.ndarray:
        """Row of each token (0: no content known)."""
        tokens = np.asarray(tokens, np.int64)
        get = self.index.get
        out = np.fromiter((get(int(t), 0) for t in tokens), np.int64, len(tokens))
        if (out == 0).any() and time.monotonic() - self._loaded_at >= self.reload_seconds:
            self.reload()
            out = np.fromiter((get(int(t), 0) for t in tokens), np.int64, len(tokens))
        return out


class EM3Fields(nn.Module):
    """Fusion-Q-Former fields of an item from its stored content, plus the CID loss.

    The stored (fused) content is split into its text block (first ``text_dim`` values)
    and the rest (hashed tag embedding, given vectors) as a second token.

    >>> m = EM3Fields(out_dim=4, content_dim=10, text_dim=8, n_queries=2, d_model=8, n_heads=2)
    >>> m.attach(ItemContentTable(10))
    >>> m.table.update(np.array([5]), np.ones((1, 10), np.float32))
    >>> m(np.array([5, 6])).shape
    torch.Size([2, 2, 4])
    """

    def __init__(self, out_dim: int, content_dim: int, text_dim: int, n_queries: int = 2,
                 d_model: int = 32, n_heads: int = 4, cid_weight: float = 0.0,
                 cid_temperature: float = 0.1, seq_lora_rank: int = 0) -> None:
        super().__init__()
        if not 0 < text_dim <= content_dim:
            raise ValueError(f"text_dim must be in (0, {content_dim}], got {text_dim}")
        self.text_dim, self.content_dim = text_dim, content_dim
        self.n_queries = n_queries
        self.cid_weight, self.cid_temperature = cid_weight, cid_temperature
        rest = content_dim - text_dim
        self.qformer = FusionQFormer(out_dim=out_dim, text_dim=text_dim, n_queries=n_queries,
                                     d_model=d_model, n_heads=n_heads, tag_buckets=2,
                                     vector_dims={"rest": rest} if rest else None)
        #: the content-interest sequence field (``seq_lora_rank`` > 0), else ``None``
        self.sequence = (ContentSequence(out_dim, content_dim, d_model, seq_lora_rank)
                         if seq_lora_rank else None)
        #: extra fields per row: the queries, then the sequence's
        self.n_fields = n_queries + (1 if self.sequence is not None else 0)
        self.table: ItemContentTable | None = None
        self._frozen: dict[int, torch.Tensor] | None = None
        #: item fields computed by the Q-Former (rows), for tests and metrics
        self.computed = 0

    def attach(self, table: ItemContentTable) -> None:
        """The content the fields are computed from (the learner's or serving's)."""
        if table.dim != self.content_dim:
            raise ValueError(f"item content is {table.dim}-d, the model expects {self.content_dim}")
        self.table = table
        self._frozen = None

    def _compute(self, content: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(content, np.float32))
        vectors = {"rest": x[:, self.text_dim:]} if self.content_dim > self.text_dim else None
        self.computed += len(x)
        return self.qformer(x[:, :self.text_dim], None, vectors)

    def forward(self, item_tokens: np.ndarray) -> torch.Tensor:
        """``(B, n_queries, out_dim)`` fields of the rows' items."""
        if self.table is None:
            raise RuntimeError("EM3 fields need item content: attach an ItemContentTable first")
        if self._frozen is not None:
            return self._lookup(np.asarray(item_tokens, np.int64))
        rows = self.table.rows(item_tokens)
        return self._compute(self.table.content[rows])

    @torch.no_grad()
    def freeze(self) -> int:
        """Serving: compute every known item's fields once for this (never trained)
        version; later items are computed on first use and kept. Returns items computed."""
        if self.table is None:
            raise RuntimeError("attach an ItemContentTable before freezing")
        self.eval()
        tokens = np.fromiter(self.table.index, np.int64, len(self.table.index))
        self._frozen = {}
        self._fill(tokens)
        return len(tokens)

    @torch.no_grad()
    def _fill(self, tokens: np.ndarray) -> None:
        assert self._frozen is not None
        rows = self.table.rows(tokens) if len(tokens) else np.zeros(0, np.int64)
        if 0 not in self._frozen:
            self._frozen[0] = self._compute(self.table.content[:1])[0]
        known = rows > 0
        for start in range(0, int(known.sum()), 4096):
            part_t = tokens[known][start:start + 4096]
            out = self._compute(self.table.content[rows[known][start:start + 4096]])
            for t, o in zip(part_t.tolist(), out, strict=True):
                self._frozen[t] = o

    def _lookup(self, tokens: np.ndarray) -> torch.Tensor:
        frozen = self._frozen
        assert frozen is not None
        missing = np.unique([t for t in tokens.tolist() if t not in frozen])
        if len(missing):
            self._fill(missing)
        null = frozen[0]
        return torch.stack([frozen.get(t, null) for t in tokens.tolist()])

    def interest(self, item_tokens: np.ndarray, seq_tokens: np.ndarray) -> torch.Tensor:
        """``(B, 1, out_dim)``: the content-interest field (per request: the sequence is
        the user's, so nothing is precomputed)."""
        assert self.sequence is not None and self.table is not None
        item = self.table.content[self.table.rows(item_tokens)]
        seq, valid = sequence_content(self.table, seq_tokens)
        return self.sequence(torch.from_numpy(np.ascontiguousarray(item, np.float32)), seq,
                             valid).unsqueeze(1)

    def cid_loss(self, fields: torch.Tensor, id_emb: torch.Tensor,
                 item_tokens: Sequence[int] | np.ndarray) -> torch.Tensor:
        """EM3 content-ID contrastive loss (weighted), repeats of an item not negatives."""
        _, ids = np.unique(np.asarray(item_tokens, np.int64), return_inverse=True)
        return self.cid_weight * content_id_infonce(fields.mean(1), id_emb, self.cid_temperature,
                                                    torch.from_numpy(ids.astype(np.int64)))


class ContentSequence(nn.Module):
    """EM3's content-interest field: attention from the candidate item's content over the
    content of the user's recent clicks (the rows' ``seq`` fields). Every projection is a
    frozen linear map adapted with LoRA (Hu et al. 2021) by ``peft``: only the rank-``rank``
    adapters train (``B`` starts at zero, so training starts at the frozen maps). One field
    of ``out_dim`` per row; a row without clicks gets the output of a zero vector.

    >>> torch.manual_seed(0) and None
    >>> m = ContentSequence(out_dim=4, content_dim=5, d_model=8, rank=2)
    >>> sorted({n.split(".")[1] for n, p in m.named_parameters() if p.requires_grad})
    ['lora_A', 'lora_B']
    >>> item, seq = torch.randn(3, 5), torch.randn(3, 2, 5)
    >>> valid = torch.tensor([[True, True], [True, False], [False, False]])
    >>> m(item, seq, valid).shape
    torch.Size([3, 4])
    """

    def __init__(self, out_dim: int, content_dim: int, d_model: int = 32, rank: int = 4) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.query = nn.Linear(content_dim, d_model)
        self.key = nn.Linear(content_dim, d_model)
        self.value = nn.Linear(content_dim, d_model)
        self.out = nn.Linear(d_model, out_dim)
        self.d_model = d_model
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                           target_modules=["query", "key", "value", "out"]), self)

    def forward(self, item: torch.Tensor, seq: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        q = self.query(item).unsqueeze(1)                              # (B, 1, d)
        scores = (self.key(seq) * q).sum(-1) / self.d_model ** 0.5     # (B, L)
        scores = scores.masked_fill(~valid, float("-inf"))
        weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # no clicks: 0
        return self.out((weights.unsqueeze(-1) * self.value(seq)).sum(1))


def sequence_content(table: ItemContentTable, seq_tokens: np.ndarray
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, L, content_dim)`` content of the clicked items and the ``(B, L)`` mask of
    known ones (token 0 = no click: never looked up)."""
    seq_tokens = np.asarray(seq_tokens, np.int64)
    rows = np.zeros(seq_tokens.shape, np.int64)
    some = seq_tokens != 0
    if some.any():
        rows[some] = table.rows(seq_tokens[some])
    content = torch.from_numpy(np.ascontiguousarray(table.content[rows], np.float32))
    return content, torch.from_numpy(rows > 0)
