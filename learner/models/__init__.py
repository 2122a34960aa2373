"""Rankers = a field-embedding table + a head; rebuilt from plain-data specs.

A :class:`ModelSpec` is JSON-able (it is the ``config`` of a published manifest), so a
checkpoint is rebuilt without unpickling any object: ``build_model(spec)`` then
``load_state_dict``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from learner.embeddings import EmbeddingConfig, FieldEmbedding, build_embedding
from learner.models.baselines import DeepFM, DeepFMConfig, LogisticConfig, LogisticRegression
from learner.models.fgcnn import FGCNN, PRESETS, FGCNNConfig

__all__ = ["HEADS", "DenseNorm", "ModelSpec", "Ranker", "build_model", "fgcnn_spec", "preset_head"]

# name -> (config class, head class, extra embedding columns the head needs)
HEADS: dict[str, tuple[Callable[..., Any], Callable[..., nn.Module], int]] = {
    "fgcnn": (FGCNNConfig, FGCNN, 0),
    "ipnn": (FGCNNConfig, FGCNN, 0),
    "lr": (LogisticConfig, LogisticRegression, 0),
    "deepfm": (DeepFMConfig, DeepFM, 1),
}


@dataclass
class ModelSpec:
    """Everything needed to rebuild a ranker: head kind + sizes, tables, input names."""

    kind: str
    categorical: list[str]
    dense: list[str] = field(default_factory=list)
    head: dict[str, Any] = field(default_factory=dict)
    embedding: dict[str, Any] = field(default_factory=dict)
    dense_norm: bool = False
    wide: bool = False
    #: > 0: a linear term over the categorical ids (one weight per table row, the extra
    #: last embedding column, zero at start) scaled by this factor: Adam's steps move it
    #: this many times faster than the embeddings, as a one-hot logistic regression does.
    wide_ids: float = 0.0
    #: EM3 (``learner.em3``): ``{"n_queries", "content_dim", "text_dim", ...}``; empty = off
    em3: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        extra = {"em3": dict(self.em3)} if self.em3 else {}
        return {**extra,
            "kind": self.kind,
            "categorical": list(self.categorical),
            "dense": list(self.dense),
            "head": dict(self.head),
            "embedding": dict(self.embedding),
            "dense_norm": self.dense_norm,
            "wide": self.wide,
            "wide_ids": self.wide_ids,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        missing = {"kind", "categorical"} - set(data)
        if missing:
            raise ValueError(f"model spec is missing {sorted(missing)}")
        return cls(
            kind=data["kind"],
            categorical=list(data["categorical"]),
            dense=list(data.get("dense", [])),
            head=dict(data.get("head", {})),
            embedding=dict(data.get("embedding", {})),
            dense_norm=bool(data.get("dense_norm", False)),
            wide=bool(data.get("wide", False)),
            wide_ids=float(data.get("wide_ids", 0.0)),
            em3=dict(data.get("em3", {})),
        )


def fgcnn_spec(
    categorical: list[str],
    dense: list[str] | None = None,
    preset: str = "compact",
    embedding: EmbeddingConfig | None = None,
    **overrides: Any,
) -> ModelSpec:
    """Spec of an FGCNN from a preset (``"criteo"`` or ``"compact"``) plus overrides.

    >>> spec = fgcnn_spec(["user", "item"], preset="compact", conv_batchnorm=True)
    >>> spec.head["channels"], spec.head["conv_batchnorm"]
    ([14, 16, 18, 20], True)
    """
    if preset not in PRESETS:
        raise ValueError(f"FGCNN preset must be one of {sorted(PRESETS)}, got {preset!r}")
    head = FGCNNConfig(**{**PRESETS[preset], **overrides}).to_dict()
    emb = embedding or EmbeddingConfig()
    emb.dim = head["embedding_dim"]
    return ModelSpec("fgcnn", list(categorical), list(dense or []), head, emb.to_dict())


def preset_head(kind: str, preset: str = "compact") -> dict[str, Any]:
    """Default head sizes for ``kind`` (FGCNN presets; IPNN = compact without generation).

    >>> preset_head("ipnn")["kernels"]
    []
    """
    if kind == "fgcnn":
        if preset not in PRESETS:
            raise ValueError(f"FGCNN preset must be one of {sorted(PRESETS)}, got {preset!r}")
        return dict(PRESETS[preset])
    if kind == "ipnn":
        return {**PRESETS[preset], "kernels": [], "channels": [], "recombination": []}
    if kind == "deepfm":
        return {
            "embedding_dim": PRESETS[preset]["embedding_dim"],
            "mlp": list(PRESETS[preset]["mlp"]),
        }
    if kind == "lr":
        return {}
    raise ValueError(f"model kind must be one of {sorted(HEADS)}, got {kind!r}")


class DenseNorm(nn.Module):
    """Standardises dense features with running mean and variance (buffers, no gradient).

    Counter features mix scales (``log1p`` counts up to ~10 beside CTRs in [0, 1]); one
    pass over a stream gives a network too few steps to learn the scales itself.
    :meth:`update` merges a batch's moments *after* the step that used the old ones, so
    a training forward scores exactly like serving does. ``max_count`` caps the weight of
    the past, so the statistics keep following a drifting stream.

    >>> norm = DenseNorm(1)
    >>> norm.update(torch.tensor([[1.0], [3.0]]))
    >>> norm(torch.tensor([[3.0]])).round(decimals=3).tolist()
    [[1.0]]
    """

    def __init__(self, n: int, max_count: float = 100_000.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.max_count = max_count
        self.eps = eps
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("var", torch.ones(n))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / torch.sqrt(self.var + self.eps)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.shape[0]:
            self.update_moments(x.mean(0), x.var(0, unbiased=False), x.shape[0])

    @torch.no_grad()
    def update_moments(self, m: torch.Tensor, v: torch.Tensor, b: int) -> None:
        """Merge a batch given by its mean ``m``, (biased) variance ``v`` and size ``b``
        (data-parallel learners reduce these over every process's rows first)."""
        if b == 0:
            return
        n = float(self.count)
        tot = n + b
        d = m - self.mean
        if n == 0:
            self.mean.copy_(m)
            self.var.copy_(v)
        else:
            self.mean.add_(d * (b / tot))
            self.var.copy_((self.var * n + v * b + d * d * (n * b / tot)) / tot)
        self.count.fill_(min(tot, self.max_count))


class Ranker(nn.Module):
    """Tokens in, logits out: ``embedding.lookup`` -> ``embedding`` -> ``head``.

    ``spec`` is kept so the model can be published and rebuilt without pickles.
    ``spec.dense_norm`` standardises dense features (:class:`DenseNorm`) before the head;
    ``spec.wide`` adds a linear term over them to the head's logit (Wide & Deep): the
    point-in-time counters carry recency, and a linear part learns to use them within a
    few hundred rows, long before a deep head does.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.kind not in HEADS:
            raise ValueError(f"model kind must be one of {sorted(HEADS)}, got {spec.kind!r}")
        cfg_cls, head_cls, extra = HEADS[spec.kind]
        head_cfg = cfg_cls(**spec.head)
        if spec.kind == "ipnn" and head_cfg.kernels:
            raise ValueError("kind 'ipnn' is FGCNN without generation layers: set kernels=[]")
        emb_cfg = EmbeddingConfig.from_dict(spec.embedding) if spec.embedding else EmbeddingConfig()
        if spec.wide_ids < 0:
            raise ValueError(f"wide_ids must be >= 0, got {spec.wide_ids}")
        emb_cfg.dim = head_cfg.embedding_dim + extra + (1 if spec.wide_ids else 0)
        self.spec = spec
        self.embedding: FieldEmbedding = build_embedding(spec.categorical, emb_cfg)
        self.em3 = None
        if spec.em3:
            from learner.em3 import EM3Fields

            if "item_id" not in spec.categorical:
                raise ValueError("EM3 fields need an item_id field in the rows")
            self.em3 = EM3Fields(out_dim=head_cfg.embedding_dim + extra, **spec.em3)
            self._item_col = spec.categorical.index("item_id")
        #: the ``seq<k>`` columns: the content-interest sequence's input, not id fields
        self._seq_cols = ([j for j, f in enumerate(spec.categorical) if re.fullmatch(r"seq\d+", f)]
                          if self.em3 is not None and self.em3.sequence is not None else [])
        if self.em3 is not None and self.em3.sequence is not None and not self._seq_cols:
            raise ValueError("the EM3 content-interest sequence needs seq fields in the rows "
                             "(HEADWATER_SEQ_LEN > 0)")
        self._id_cols = [j for j in range(len(spec.categorical)) if j not in self._seq_cols]
        n_fields = len(self._id_cols) + (self.em3.n_fields if self.em3 is not None else 0)
        self.head = head_cls(head_cfg, n_fields, len(spec.dense))
        #: the content-ID loss of the last training forward (added by the learner)
        self.aux_loss: torch.Tensor | None = None
        n_dense = len(spec.dense)
        self.dense_norm = DenseNorm(n_dense) if spec.dense_norm and n_dense else None
        self.wide = nn.Linear(n_dense, 1) if spec.wide and n_dense else None
        if self.wide is not None:
            nn.init.zeros_(self.wide.weight)
            nn.init.zeros_(self.wide.bias)
        self.wide_ids = float(spec.wide_ids)
        if self.wide_ids:
            with torch.no_grad():
                self.embedding.table.weight[:, -1] = 0.0

    @property
    def train_equals_eval(self) -> bool:
        return bool(getattr(self.head, "train_equals_eval", False))

    def forward(self, rows: torch.Tensor, dense: torch.Tensor,
                tokens: np.ndarray | None = None) -> torch.Tensor:
        """Logits; ``tokens`` (the raw ``[n, F]`` tokens) are needed with EM3 fields."""
        if self.dense_norm is not None:
            dense = self.dense_norm(dense)
        emb = self.embedding(rows)
        ids_logit = None
        if self.wide_ids:
            ids_logit = emb[..., -1].sum(-1) * self.wide_ids
            emb = emb[..., :-1]
        if self.em3 is not None:
            if tokens is None:
                raise ValueError("a ranker with EM3 fields needs the rows' tokens")
            items = np.asarray(tokens)[:, self._item_col]
            fields = self.em3(items)
            self.aux_loss = (self.em3.cid_loss(fields, emb[:, self._item_col], items)
                             if self.training and self.em3.cid_weight else None)
            parts = [emb[:, self._id_cols] if self._seq_cols else emb, fields]
            if self._seq_cols:
                parts.append(self.em3.interest(items, np.asarray(tokens)[:, self._seq_cols]))
            emb = torch.cat(parts, dim=1)
        logits = self.head(emb, dense)
        if ids_logit is not None:
            logits = logits + ids_logit
        if self.wide is not None:
            logits = logits + self.wide(dense).squeeze(-1)
        return logits

    def observe_dense(self, dense: torch.Tensor) -> None:
        """After a training step: fold the batch into the dense statistics."""
        if self.dense_norm is not None:
            self.dense_norm.update(dense)

    def logits(self, tokens: np.ndarray, dense: np.ndarray) -> torch.Tensor:
        """Logits for raw tokens ``[n, F]`` and dense ``[n, D]`` (read-only mapping)."""
        rows, dense_t = self.inputs(tokens, dense)
        return self(rows, dense_t, tokens if self.em3 is not None else None)

    def inputs(self, tokens: np.ndarray, dense: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward's tensors for raw tokens and dense features: embedding rows (the
        read-only mapping) and dense as float32."""
        return (self.embedding.lookup(tokens),
                torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)))


def build_model(spec: ModelSpec | dict[str, Any]) -> Ranker:
    """Build an untrained ranker from a spec (or its ``to_dict()``)."""
    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    return Ranker(spec)
