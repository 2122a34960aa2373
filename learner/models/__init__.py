"""Rankers = a field-embedding table + a head; rebuilt from plain-data specs.

A :class:`ModelSpec` is JSON-able (it is the ``config`` of a published manifest), so a
checkpoint is rebuilt without unpickling any object: ``build_model(spec)`` then
``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from learner.embeddings import EmbeddingConfig, FieldEmbedding, build_embedding
from learner.models.baselines import DeepFM, DeepFMConfig, LogisticConfig, LogisticRegression
from learner.models.fgcnn import FGCNN, PRESETS, FGCNNConfig

__all__ = ["HEADS", "ModelSpec", "Ranker", "build_model", "fgcnn_spec", "preset_head"]

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "categorical": list(self.categorical),
            "dense": list(self.dense),
            "head": dict(self.head),
            "embedding": dict(self.embedding),
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


class Ranker(nn.Module):
    """Tokens in, logits out: ``embedding.lookup`` -> ``embedding`` -> ``head``.

    ``spec`` is kept so the model can be published and rebuilt without pickles.
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
        emb_cfg.dim = head_cfg.embedding_dim + extra
        self.spec = spec
        self.embedding: FieldEmbedding = build_embedding(spec.categorical, emb_cfg)
        self.head = head_cls(head_cfg, len(spec.categorical), len(spec.dense))

    @property
    def train_equals_eval(self) -> bool:
        return bool(getattr(self.head, "train_equals_eval", False))

    def forward(self, rows: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(rows), dense)

    def logits(self, tokens: np.ndarray, dense: np.ndarray) -> torch.Tensor:
        """Logits for raw tokens ``[n, F]`` and dense ``[n, D]`` (read-only mapping)."""
        rows = self.embedding.lookup(tokens)
        return self(rows, torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)))


def build_model(spec: ModelSpec | dict[str, Any]) -> Ranker:
    """Build an untrained ranker from a spec (or its ``to_dict()``)."""
    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    return Ranker(spec)
