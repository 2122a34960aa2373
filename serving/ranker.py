"""What serving scores with, as a protocol: a trained model version or the baseline.

:class:`serving.models.ServedModel` (a published ranker of any kind, rebuilt from its
checkpoint) and :class:`serving.models.BaselineModel` (the item smoothed-CTR ranker
served before the first model) both keep it; ``tests/serving/test_ranker_contract.py``
runs one suite against the baseline and a served model of every ranker kind.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Ranker"]


@runtime_checkable
class Ranker(Protocol):
    """P(click) per scoring row; pure (scoring changes nothing) and row-independent."""

    version: str
    manifest: dict[str, Any]

    @property
    def created_at(self) -> float | None: ...

    def predict(self, categorical: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """Probabilities in [0, 1], one per row, for tokens ``[n, F]`` and dense ``[n, D]``."""
        ...
