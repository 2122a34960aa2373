"""Per-field embedding tables that map int64 tokens to rows: hashed and dynamic.

Features never decide table sizes (docs/contracts.md): tokens are 63-bit hashes, token 0
means *missing*. Two mappings are offered behind one small interface:

* :class:`HashedEmbedding` — ``1 + token % buckets`` per field, row 0 for missing; fixed
  memory, collisions share rows.
* :class:`DynamicEmbedding` — Monolith-style (Liu et al., 2022) collisionless tables: an id
  gets its own row once it has been seen ``min_count`` times (before that it shares the
  field's *unadmitted* row), rows expire after an idle time or idle row count, and the
  table never grows past ``capacity`` rows per field (the least recently used id is evicted).

Mapping is split in two on purpose: :meth:`lookup` is read-only (used to score and train
a batch), :meth:`observe` updates admission state *after* the batch, so a batch's rows are
scored and trained with the mapping that existed before it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "DynamicEmbedding",
    "EmbeddingConfig",
    "FieldEmbedding",
    "HashedEmbedding",
    "build_embedding",
]

PAD_ROW = 0
UNADMITTED_ROW = 1


@dataclass
class EmbeddingConfig:
    """How tokens become embedding rows; plain data so it can live in a manifest.

    ``kind`` is ``"hashed"`` or ``"dynamic"``. ``buckets`` (hashed) and ``capacity``
    (dynamic) may be overridden per field with ``per_field``: ``{field: size}``.
    ``idle_seconds`` is measured in event time (row ``ts``), ``idle_rows`` in rows seen.
    Rows start as ``N(0, init_std)`` drawn from ``init_seed`` (from torch's RNG if
    ``None``), which lets checkpoints store only the rows that training changed.
    """

    kind: str = "hashed"
    dim: int = 16
    buckets: int = 100_000
    capacity: int = 100_000
    per_field: dict[str, int] = field(default_factory=dict)
    min_count: int = 1
    idle_seconds: float | None = None
    idle_rows: int | None = None
    filter_size: int = 1 << 19
    init_std: float = 1e-2
    init_seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbeddingConfig:
        return cls(**data)


class FieldEmbedding(nn.Module):
    """Interface: tokens ``[n, F]`` -> row ids -> embeddings ``[n, F, dim]``.

    The rows live in ``self.table`` (an ``nn.Embedding`` with sparse gradients). Its
    ``state_dict`` is *packed*: the init seed plus only the rows training has touched
    (``mark_dirty``), so a checkpoint's size follows the ids seen, not the table size;
    loading regenerates the untouched rows bit for bit.
    """

    fields: list[str]
    dim: int
    table: nn.Embedding

    def _setup_table(self, n_rows: int, config: EmbeddingConfig) -> None:
        seed = config.init_seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.init_seed = int(seed)
        self.init_std = float(config.init_std)
        # Sparse gradients: an optimizer step touches only the rows a batch used, so its
        # cost follows the batch, not the table size.
        self.table = nn.Embedding(n_rows, config.dim, sparse=True)
        with torch.no_grad():
            self.table.weight.copy_(self.initial_rows())
        self.dirty = np.zeros(n_rows, dtype=bool)
        self.register_state_dict_post_hook(_pack_table)
        self.register_load_state_dict_pre_hook(_unpack_table)

    def initial_rows(self) -> torch.Tensor:
        """The table as drawn at construction (seeded): rows never trained hold these."""
        gen = torch.Generator().manual_seed(self.init_seed)
        shape = (self.table.num_embeddings, self.table.embedding_dim)
        return torch.randn(shape, generator=gen) * self.init_std

    def mark_dirty(self, rows: torch.Tensor | np.ndarray) -> None:
        """Record rows whose values differ from their initial draw (trained or copied)."""
        self.dirty[np.asarray(rows).ravel()] = True

    def lookup(self, tokens: np.ndarray) -> torch.Tensor:  # pragma: no cover - interface
        """Row ids (``LongTensor [n, F]``) for ``tokens``, without changing any state."""
        raise NotImplementedError

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.table(rows)

    def observe(self, tokens: np.ndarray, ts: np.ndarray | None = None) -> None:
        """Record that these rows were trained on (admission, recency); no-op if stateless."""

    def attach_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Let the table clear optimizer moments of rows it recycles."""

    def stats(self) -> dict[str, float]:
        return {}


def _pack_table(module: FieldEmbedding, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    weight = state.pop(prefix + "table.weight")
    rows = torch.from_numpy(np.flatnonzero(module.dirty))
    state[prefix + "table.packed_rows"] = rows
    state[prefix + "table.packed_values"] = weight.detach()[rows].clone()
    state[prefix + "table.init"] = torch.tensor(
        [module.init_seed, weight.shape[0], weight.shape[1]], dtype=torch.int64
    )
    state[prefix + "table.init_std"] = torch.tensor(module.init_std, dtype=torch.float64)


def _unpack_table(
    module: FieldEmbedding,
    state: dict[str, Any],
    prefix: str,
    _meta: Any,
    _strict: bool,
    _missing: list[str],
    _unexpected: list[str],
    error_msgs: list[str],
) -> None:
    key = prefix + "table.init"
    if key not in state:
        return  # an unpacked state dict (table.weight present): load it as is
    seed, n_rows, dim = (int(x) for x in state.pop(key).tolist())
    std = float(state.pop(prefix + "table.init_std"))
    rows = state.pop(prefix + "table.packed_rows")
    values = state.pop(prefix + "table.packed_values")
    if (n_rows, dim) != tuple(module.table.weight.shape):
        error_msgs.append(
            f"{prefix}table: checkpoint has {n_rows}x{dim} rows, the model {tuple(module.table.weight.shape)}"
        )
        return
    module.init_seed, module.init_std = seed, std
    full = module.initial_rows()
    full[rows] = values
    state[prefix + "table.weight"] = full
    module.dirty = np.zeros(n_rows, dtype=bool)
    module.dirty[rows.numpy()] = True


class HashedEmbedding(FieldEmbedding):
    """One concatenated table; field ``f`` owns rows ``[base_f, base_f + buckets_f + 1)``.

    >>> emb = HashedEmbedding(["user", "item"], EmbeddingConfig(dim=4, buckets=10))
    >>> emb.lookup(np.array([[0, 23], [10, 7]])).tolist()
    [[0, 15], [1, 19]]

    With a power of two buckets per field, the row is the token's low bits (the same
    as ``%`` for every int64, negative ones too; several times faster):

    >>> emb = HashedEmbedding(["user", "item"], EmbeddingConfig(dim=4, buckets=8))
    >>> emb.lookup(np.array([[0, 23], [-1, -8]])).tolist()
    [[0, 17], [8, 10]]
    """

    def __init__(self, fields: list[str], config: EmbeddingConfig) -> None:
        super().__init__()
        self.fields = list(fields)
        self.dim = config.dim
        sizes = [int(config.per_field.get(f, config.buckets)) for f in self.fields]
        if any(s < 1 for s in sizes):
            raise ValueError(f"hashed embedding buckets must be >= 1, got {sizes}")
        self._buckets = np.array(sizes, dtype=np.int64)
        self._base = np.concatenate([[0], np.cumsum(self._buckets + 1)[:-1]]).astype(np.int64)
        #: buckets - 1 when every field has a power of two: ``token & mask == token % buckets``
        self._mask = (self._buckets - 1 if not (self._buckets & (self._buckets - 1)).any()
                      else None)
        self._setup_table(int((self._buckets + 1).sum()), config)

    def lookup(self, tokens: np.ndarray) -> torch.Tensor:
        tokens = np.asarray(tokens, dtype=np.int64)
        if self._mask is None:
            rows = np.where(tokens == 0, 0, 1 + tokens % self._buckets) + self._base
            return torch.from_numpy(rows)
        rows = tokens & self._mask  # a new array: filled in place from here
        rows += 1
        rows[tokens == 0] = 0
        rows += self._base
        return torch.from_numpy(rows)


class DynamicEmbedding(FieldEmbedding):
    """Collisionless per-field tables with admission, expiry and bounded capacity.

    Per field: row 0 is *missing*, row 1 is the shared *unadmitted* row, rows
    ``2 .. capacity + 1`` are slots. A newly admitted id starts from a copy of the
    unadmitted row (what the model already believed about rare ids of that field).

    >>> emb = DynamicEmbedding(["item"], EmbeddingConfig(kind="dynamic", dim=2, capacity=4, min_count=2))
    >>> toks = np.array([[5], [5], [9]])
    >>> emb.lookup(toks).ravel().tolist()     # nothing admitted yet
    [1, 1, 1]
    >>> emb.observe(toks)                     # id 5 seen twice: admitted
    >>> emb.lookup(toks).ravel().tolist()
    [2, 2, 1]
    """

    def __init__(self, fields: list[str], config: EmbeddingConfig) -> None:
        super().__init__()
        self.fields = list(fields)
        self.dim = config.dim
        self.config = config
        self._cap = [int(config.per_field.get(f, config.capacity)) for f in self.fields]
        if any(c < 1 for c in self._cap):
            raise ValueError(f"dynamic embedding capacity must be >= 1, got {self._cap}")
        sizes = np.array([c + 2 for c in self._cap], dtype=np.int64)
        self._base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._setup_table(int(sizes.sum()), config)
        self._optimizer: torch.optim.Optimizer | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        cfg = self.config
        self._slot_token = [np.zeros(c, dtype=np.int64) for c in self._cap]
        self._last_ts = [np.full(c, -np.inf) for c in self._cap]
        self._last_row = [np.zeros(c, dtype=np.int64) for c in self._cap]
        self._slot_of: list[dict[int, int]] = [{} for _ in self._cap]
        self._free: list[list[int]] = [list(range(c - 1, -1, -1)) for c in self._cap]
        self._counts = np.zeros(cfg.filter_size if cfg.min_count > 1 else 1, dtype=np.int32)
        self.rows_seen = 0
        self.admitted_total = 0
        self.evicted_total = 0
        self.expired_total = 0

    def attach_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        self._optimizer = optimizer

    def lookup(self, tokens: np.ndarray) -> torch.Tensor:
        tokens = np.asarray(tokens, dtype=np.int64)
        rows = np.empty(tokens.shape, dtype=np.int64)
        for j, slot_of in enumerate(self._slot_of):
            col = tokens[:, j]
            uniq, inverse = np.unique(col, return_inverse=True)
            mapped = np.fromiter(
                (2 + slot_of[t] if t in slot_of else UNADMITTED_ROW for t in uniq.tolist()),
                dtype=np.int64,
                count=len(uniq),
            )
            mapped[uniq == 0] = PAD_ROW
            rows[:, j] = mapped[inverse] + self._base[j]
        return torch.from_numpy(rows)

    def observe(self, tokens: np.ndarray, ts: np.ndarray | None = None) -> None:
        tokens = np.asarray(tokens, dtype=np.int64)
        n = tokens.shape[0]
        self.rows_seen += n
        now_ts = float(np.max(ts)) if ts is not None and len(ts) else -np.inf
        cfg = self.config
        for j in range(len(self.fields)):
            self._expire(j, now_ts)
            col = tokens[:, j]
            col = col[col != 0]
            if col.size == 0:
                continue
            uniq, counts = np.unique(col, return_counts=True)
            if cfg.min_count > 1:
                h = uniq % self._counts.size
                np.add.at(self._counts, h, counts.astype(np.int32))
                ready = self._counts[h] >= cfg.min_count
            else:
                ready = np.ones(len(uniq), dtype=bool)
            slot_of = self._slot_of[j]
            touched: list[int] = []
            for t, ok in zip(uniq.tolist(), ready.tolist(), strict=True):
                slot = slot_of.get(t)
                if slot is None and ok:
                    slot = self._admit(j, t)
                if slot is not None:
                    touched.append(slot)
            if touched:
                idx = np.array(touched, dtype=np.int64)
                self._last_row[j][idx] = self.rows_seen
                self._last_ts[j][idx] = now_ts

    def _admit(self, j: int, token: int) -> int:
        if not self._free[j]:
            # Full: recycle the least recently used id (bounded memory beats unbounded growth).
            victim = int(np.argmin(self._last_row[j]))
            self._release(j, victim)
            self.evicted_total += 1
        slot = self._free[j].pop()
        self._slot_of[j][token] = slot
        self._slot_token[j][slot] = token
        self.admitted_total += 1
        row = int(self._base[j]) + 2 + slot
        src = int(self._base[j]) + UNADMITTED_ROW
        with torch.no_grad():
            self.table.weight[row] = self.table.weight[src]
        self.dirty[row] = True
        self._clear_optimizer_rows(row)
        return slot

    def _release(self, j: int, slot: int) -> None:
        token = int(self._slot_token[j][slot])
        self._slot_of[j].pop(token, None)
        self._slot_token[j][slot] = 0
        self._last_row[j][slot] = 0
        self._last_ts[j][slot] = -np.inf
        if self._counts.size > 1:
            self._counts[token % self._counts.size] = 0
        self._free[j].append(slot)

    def _expire(self, j: int, now_ts: float) -> None:
        cfg = self.config
        if cfg.idle_rows is None and cfg.idle_seconds is None:
            return
        used = self._slot_token[j] != 0
        idle = np.zeros_like(used)
        if cfg.idle_rows is not None:
            idle |= (self.rows_seen - self._last_row[j]) > cfg.idle_rows
        if cfg.idle_seconds is not None and np.isfinite(now_ts):
            idle |= (now_ts - self._last_ts[j]) > cfg.idle_seconds
        for slot in np.flatnonzero(used & idle).tolist():
            self._release(j, slot)
            self.expired_total += 1

    def _clear_optimizer_rows(self, row: int) -> None:
        opt = self._optimizer
        if opt is None:
            return
        state = opt.state.get(self.table.weight)
        if not state:
            return
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                value[row].zero_()

    def stats(self) -> dict[str, float]:
        return {
            "admitted_total": float(self.admitted_total),
            "evicted_total": float(self.evicted_total),
            "expired_total": float(self.expired_total),
            "live_ids": float(sum(len(s) for s in self._slot_of)),
        }

    def get_extra_state(self) -> dict[str, Any]:
        # Tensors and plain numbers only, so checkpoints load with weights_only=True.
        return {
            "slot_token": [torch.from_numpy(a.copy()) for a in self._slot_token],
            "last_ts": [torch.from_numpy(a.copy()) for a in self._last_ts],
            "last_row": [torch.from_numpy(a.copy()) for a in self._last_row],
            "counts": torch.from_numpy(self._counts.copy()),
            "rows_seen": int(self.rows_seen),
            "totals": [self.admitted_total, self.evicted_total, self.expired_total],
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._reset_state()
        for j in range(len(self.fields)):
            self._slot_token[j] = state["slot_token"][j].numpy().copy()
            self._last_ts[j] = state["last_ts"][j].numpy().copy()
            self._last_row[j] = state["last_row"][j].numpy().copy()
            used = np.flatnonzero(self._slot_token[j])
            self._slot_of[j] = {int(self._slot_token[j][s]): int(s) for s in used}
            used_set = set(used.tolist())
            self._free[j] = [s for s in range(self._cap[j] - 1, -1, -1) if s not in used_set]
        self._counts = state["counts"].numpy().copy()
        self.rows_seen = int(state["rows_seen"])
        self.admitted_total, self.evicted_total, self.expired_total = (
            int(x) for x in state["totals"]
        )


def build_embedding(fields: list[str], config: EmbeddingConfig) -> FieldEmbedding:
    """Build the table named by ``config.kind``; raises ``ValueError`` on an unknown kind."""
    if config.kind == "hashed":
        return HashedEmbedding(fields, config)
    if config.kind == "dynamic":
        return DynamicEmbedding(fields, config)
    raise ValueError(f"embedding kind must be 'hashed' or 'dynamic', got {config.kind!r}")
