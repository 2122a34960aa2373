"""Prequential metrics: River's cumulative and rolling ROC AUC / log-loss, ADWIN drift,
an exact AUC for benchmarks, and the cold-item AUC.

River's ``ROCAUC`` is an approximation over ``n_thresholds`` cut points; it is what the
live service reports (cheap, incremental). Benchmarks use :func:`exact_auc`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from river import drift, metrics, utils

__all__ = ["ColdItemTracker", "PrequentialMetrics", "exact_auc", "log_loss"]

_EPS = 1e-15


def exact_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Exact ROC AUC (ties count one half) by the rank-sum identity; NaN if one class.

    >>> exact_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    sp = p[order]
    ranks = np.empty(p.size, dtype=np.float64)
    # average ranks over ties
    _, first, counts = np.unique(sp, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary log-loss with probabilities clipped to ``[1e-15, 1 - 1e-15]``."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    y = np.asarray(y, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


class PrequentialMetrics:
    """Cumulative + rolling AUC and log-loss, and ADWIN on the per-row log-loss.

    ``update`` returns how many drifts ADWIN flagged inside the batch. The cumulative
    numbers survive a restart through :meth:`state` / :meth:`load_state`; the rolling
    window and ADWIN restart empty (they describe the recent past only).
    """

    def __init__(
        self, window: int = 1000, n_thresholds: int = 10, drift_delta: float = 0.002
    ) -> None:
        self.window = window
        self.n_thresholds = n_thresholds
        self.drift_delta = drift_delta
        self.auc = metrics.ROCAUC(n_thresholds=n_thresholds)
        self.logloss = metrics.LogLoss()
        self.rolling_auc = utils.Rolling(
            metrics.ROCAUC, window_size=window, n_thresholds=n_thresholds
        )
        self.rolling_logloss = utils.Rolling(metrics.LogLoss, window_size=window)
        self.adwin = drift.ADWIN(delta=drift_delta)
        self.rows = 0
        self.drift_total = 0

    def update(self, y: np.ndarray, p: np.ndarray) -> int:
        drifts = 0
        p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
        y_list = np.asarray(y).astype(bool).tolist()
        losses = np.where(y_list, -np.log(p), -np.log1p(-p)).tolist()
        for yt, pt, loss in zip(y_list, p.tolist(), losses, strict=True):
            self.auc.update(yt, pt)
            self.logloss.update(yt, pt)
            self.rolling_auc.update(yt, pt)
            self.rolling_logloss.update(yt, pt)
            self.adwin.update(loss)
            if self.adwin.drift_detected:
                drifts += 1
        self.rows += len(y_list)
        self.drift_total += drifts
        return drifts

    def snapshot(self) -> dict[str, float]:
        def val(m: Any) -> float:
            v = float(m.get())
            return v if math.isfinite(v) else float("nan")

        return {
            "rows_scored": float(self.rows),
            "auc": val(self.auc),
            "logloss": val(self.logloss),
            "rolling_auc": val(self.rolling_auc),
            "rolling_logloss": val(self.rolling_logloss),
            "drift_total": float(self.drift_total),
        }

    def state(self) -> dict[str, Any]:
        """Plain numbers only (checkpoints load with ``weights_only=True``)."""
        cms = []
        for cm in self.auc.cms:
            cms.append([float(cm.data[a][b]) for a in (True, False) for b in (True, False)])
        mean = self.logloss._mean
        return {
            "rows": self.rows,
            "drift_total": self.drift_total,
            "auc_cms": cms,
            "logloss_mean": float(mean.get()),
            "logloss_n": float(mean.n),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.rows = int(state["rows"])
        self.drift_total = int(state["drift_total"])
        self.auc = metrics.ROCAUC(n_thresholds=self.n_thresholds)
        if len(state["auc_cms"]) == len(self.auc.cms):
            for cm, cells in zip(self.auc.cms, state["auc_cms"], strict=True):
                for (a, b), w in zip(
                    [(True, True), (True, False), (False, True), (False, False)], cells, strict=True
                ):
                    if w:
                        cm.update(a, b, w)
        self.logloss = metrics.LogLoss()
        if state["logloss_n"]:
            self.logloss._mean.update(state["logloss_mean"], w=state["logloss_n"])


class ColdItemTracker:
    """Collects (label, score) of each item's first ``k`` labelled rows, for a cold AUC.

    Counting always advances; ``record=False`` counts without collecting (so a benchmark
    can report the cold AUC of its test span only).

    >>> t = ColdItemTracker(k=1)
    >>> t.update(np.array([7, 7, 8]), np.array([1, 0, 0]), np.array([0.9, 0.8, 0.2]))
    >>> t.auc()
    1.0
    """

    def __init__(self, k: int = 10) -> None:
        self.k = k
        self.seen: dict[int, int] = {}
        self._y: list[np.ndarray] = []
        self._p: list[np.ndarray] = []

    def update(self, items: np.ndarray, y: np.ndarray, p: np.ndarray, record: bool = True) -> None:
        items = np.asarray(items, dtype=np.int64)
        if items.size == 0:
            return
        order = np.argsort(items, kind="stable")
        sorted_items = items[order]
        starts = np.r_[True, sorted_items[1:] != sorted_items[:-1]]
        group_start = np.maximum.accumulate(np.where(starts, np.arange(items.size), 0))
        rank_in_batch = np.empty(items.size, dtype=np.int64)
        rank_in_batch[order] = np.arange(items.size) - group_start
        uniq, counts = np.unique(items, return_counts=True)
        before = np.array([self.seen.get(i, 0) for i in uniq.tolist()], dtype=np.int64)
        prior = before[np.searchsorted(uniq, items)]
        cold = (prior + rank_in_batch) < self.k
        for i, b, c in zip(uniq.tolist(), before.tolist(), counts.tolist(), strict=True):
            self.seen[i] = b + c
        if record and cold.any():
            self._y.append(np.asarray(y)[cold])
            self._p.append(np.asarray(p)[cold])

    @property
    def rows(self) -> int:
        return int(sum(len(a) for a in self._y))

    def auc(self) -> float:
        if not self._y:
            return float("nan")
        return exact_auc(np.concatenate(self._y), np.concatenate(self._p))
