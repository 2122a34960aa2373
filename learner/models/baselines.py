"""Simpler heads driven by the same trainer: logistic regression and a DeepFM-lite.

IPNN alone is :class:`~learner.models.fgcnn.FGCNN` with no generation layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["DeepFM", "DeepFMConfig", "LogisticRegression", "LogisticConfig"]


@dataclass
class LogisticConfig:
    """Logistic regression: one scalar weight per token row (embedding dim 1) + dense."""

    embedding_dim: int = 1

    def __post_init__(self) -> None:
        if self.embedding_dim != 1:
            raise ValueError("logistic regression uses embedding_dim=1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LogisticRegression(nn.Module):
    """``sum_f w[token_f] + v . dense + b``, over embeddings ``[B, N, 1]``."""

    train_equals_eval = True

    def __init__(self, config: LogisticConfig, n_fields: int, n_dense: int = 0) -> None:
        super().__init__()
        self.config = config
        self.dense = nn.Linear(n_dense, 1) if n_dense else None
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, emb: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        out = emb.sum(dim=(1, 2)) + self.bias
        if self.dense is not None:
            out = out + self.dense(dense).squeeze(-1)
        return out


@dataclass
class DeepFMConfig:
    """DeepFM (Guo et al., 2017) sizes; the last embedding column is the first-order weight."""

    embedding_dim: int = 16
    mlp: list[int] = field(default_factory=lambda: [400, 400])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DeepFM(nn.Module):
    """First order + FM second order + MLP, sharing one table of width ``embedding_dim + 1``."""

    train_equals_eval = True

    def __init__(self, config: DeepFMConfig, n_fields: int, n_dense: int = 0) -> None:
        super().__init__()
        self.config = config
        k = config.embedding_dim
        layers: list[nn.Module] = []
        in_dim = n_fields * k + n_dense
        for width in config.mlp:
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            in_dim = width
        layers.append(nn.Linear(in_dim, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, emb: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        first = emb[..., -1].sum(dim=1)
        v = emb[..., :-1]
        # FM identity: sum_{i<j} <v_i, v_j> = ((sum v)^2 - sum v^2) / 2
        second = 0.5 * (v.sum(dim=1).pow(2) - v.pow(2).sum(dim=1)).sum(dim=1)
        deep = self.mlp(torch.cat([v.flatten(1), dense], dim=1)).squeeze(-1)
        return first + second + deep
