"""What the holder holds: version states, a loaded model, and how a checkpoint becomes one.

Split from :mod:`serving.holder` (which keeps the state machine and the loader thread).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import torch

from learner.store import json_safe, manifest_kind

__all__ = ["HolderError", "LoadFailure", "ServedModel", "VersionInfo", "VersionState"]


class VersionState(StrEnum):
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    FAILED = "FAILED"
    RETIRED = "RETIRED"


class LoadFailure(Exception):
    """A checkpoint refused for ``reason`` (a metric label) with a message for operators."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class HolderError(Exception):
    """An admin action that cannot be done; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, eq=False)
class ServedModel:
    """One loaded, checked model version. Immutable: swapping replaces the whole object."""

    version: str
    model: torch.nn.Module
    manifest: dict[str, Any]
    n_categorical: int
    n_dense: int
    #: a delta's base full checkpoint (kept alive for the deltas that follow; a delta's
    #: model shares every tensor it leaves alone with this base's model)
    base: ServedModel | None = field(default=None, repr=False)
    #: a delta applied by patching a copy of its base's model (``False``: rebuilt)
    patched: bool = False
    #: the forward traced for this model's architecture, bound to its tensors
    #: (serving/traced.py); ``None``: the eager forward
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = field(
        default=None, repr=False)

    @property
    def created_at(self) -> float | None:
        return self.manifest.get("created_at")

    def base_for(self, version: str) -> ServedModel | None:
        """The loaded full checkpoint ``version`` if this model is it or is a delta on it."""
        if self.version == version and manifest_kind(self.manifest) == "full":
            return self
        return self.base if self.base is not None and self.base.version == version else None

    def predict(self, categorical: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """P(click) per row for tokens ``[n, F]`` and dense ``[n, D]``, one forward pass."""
        with torch.inference_mode():
            if self.forward is None:
                logits = self.model.logits(categorical, dense)
            else:
                logits = self.forward(*self.model.inputs(categorical, dense))
            return torch.sigmoid(logits).reshape(-1).to(torch.float64).numpy()


@dataclass(frozen=True, eq=False)
class BaselineModel:
    """Ranks candidates by the item's smoothed CTR from the online counters.

    Serves from the first second of a fresh deployment, before any model has been
    trained and published (``model_version: "baseline"`` in responses); the first good
    checkpoint replaces it by an ordinary hot swap. It reads the same scoring row as a
    trained model: column ``ctr_column`` of the dense features.

    >>> BaselineModel(1).predict(np.zeros((2, 0)), np.array([[0.0, 0.3], [5.0, 0.9]])).tolist()
    [0.3, 0.9]
    """

    ctr_column: int
    version: str = "baseline"
    manifest: dict[str, Any] = field(default_factory=dict)
    created_at: float | None = None

    def predict(self, categorical: np.ndarray, dense: np.ndarray) -> np.ndarray:
        return np.asarray(dense, dtype=np.float64)[:, self.ctr_column].copy()

    @classmethod
    def for_schema(cls, dense_names: list[str], column: str = "item_ctr_total") -> BaselineModel | None:
        """The baseline for a feature schema, or ``None`` if it has no such column."""
        return cls(dense_names.index(column)) if column in dense_names else None


@dataclass(frozen=True)
class VersionInfo:
    """What the holder knows about one version (a snapshot; replaced on every change)."""

    version: str
    state: VersionState
    error: str | None = None
    created_at: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    served: ServedModel | None = None
    load_seconds: float | None = None

    def to_json(self, serving: str | None, pinned: str | None) -> dict[str, Any]:
        return {
            "version": self.version,
            "state": self.state.value,
            "error": self.error,
            "pinned": self.version == pinned,
            "serving": self.version == serving,
            "created_at": self.created_at,
            "metrics": json_safe(self.metrics),
            "load_seconds": self.load_seconds,
        }


def normalize_version(version: str | int) -> str:
    """``7``, ``"7"`` and ``"000007"`` all name version ``000007``."""
    text = str(version).strip()
    if not text.isdigit() or not text.isascii():
        raise HolderError(400, f"version must be digits like 000007, got {str(version)[:40]!r}")
    return f"{int(text):06d}"
