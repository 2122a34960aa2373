"""Prequential metrics: River's cumulative and rolling ROC AUC / log-loss, ADWIN drift,
an exact AUC for benchmarks, and the cold-item AUC.

River's ``ROCAUC`` is an approximation over ``n_thresholds`` cut points; it is what the
live service reports (cheap, incremental). Benchmarks use :func:`exact_auc`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from river import drift

__all__ = ["ColdItemTracker", "PrequentialMetrics", "ThresholdAUC", "exact_auc", "log_loss"]

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


class ThresholdAUC:
    """River's thresholded ``ROCAUC``, vectorised over a batch of rows.

    Same thresholds (``i / (n - 1)``, the ends nudged by 1e-7), same per-threshold
    confusion counts and the same trapezoid, so it reads exactly what ``river.metrics.ROCAUC``
    reads after the same rows; River updates its ``n_thresholds`` confusion matrices one
    row at a time in Python, which cost a fifth of a learner step (bench/results/).
    ``counts[t, y, pred]`` holds rows with label ``y`` scored above threshold ``t`` (``pred``).

    >>> a = ThresholdAUC(10)
    >>> a.update(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    >>> round(a.get(), 4)
    0.875
    """

    def __init__(self, n_thresholds: int = 10) -> None:
        t = np.array([i / (n_thresholds - 1) for i in range(n_thresholds)])
        t[0] -= 1e-7
        t[-1] += 1e-7
        self.thresholds = t
        self.counts = np.zeros((n_thresholds, 2, 2))

    def _batch(self, y: np.ndarray, p: np.ndarray) -> np.ndarray:
        above = p[:, None] > self.thresholds[None, :]  # [n, T]
        pos = y.astype(bool)
        out = np.empty_like(self.counts)
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        tp = above[pos].sum(0)
        fp = above[~pos].sum(0)
        out[:, 1, 1], out[:, 1, 0] = tp, n_pos - tp
        out[:, 0, 1], out[:, 0, 0] = fp, n_neg - fp
        return out

    def update(self, y: np.ndarray, p: np.ndarray) -> None:
        if len(y):
            self.counts += self._batch(y, p)

    def revert(self, y: np.ndarray, p: np.ndarray) -> None:
        if len(y):
            self.counts -= self._batch(y, p)

    def get(self) -> float:
        c = self.counts
        tp, fn, fp, tn = c[:, 1, 1], c[:, 1, 0], c[:, 0, 1], c[:, 0, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            tpr = np.where(tp + fn > 0, tp / np.where(tp + fn > 0, tp + fn, 1), 0.0)
            fpr = np.where(fp + tn > 0, fp / np.where(fp + tn > 0, fp + tn, 1), 0.0)
        return float(-np.trapezoid(tpr, fpr))


class PrequentialMetrics:
    """Cumulative + rolling AUC and log-loss, and ADWIN on the per-row log-loss.

    ``update`` returns how many drifts ADWIN flagged inside the batch. The cumulative
    numbers survive a restart through :meth:`state` / :meth:`load_state`; the rolling
    window and ADWIN restart empty (they describe the recent past only). The AUCs are
    River's thresholded ``ROCAUC`` computed a batch at a time (:class:`ThresholdAUC`);
    the rolling ones cover the last ``window`` rows, as ``river.utils.Rolling`` does.
    """

    def __init__(
        self, window: int = 1000, n_thresholds: int = 10, drift_delta: float = 0.002
    ) -> None:
        self.window = window
        self.n_thresholds = n_thresholds
        self.drift_delta = drift_delta
        self.auc = ThresholdAUC(n_thresholds)
        self.rolling_auc = ThresholdAUC(n_thresholds)
        self._loss_sum = 0.0
        self._loss_n = 0.0
        # the rolling window: labels, scores and losses of the last ``window`` rows
        self._win_y = np.zeros(0, dtype=bool)
        self._win_p = np.zeros(0)
        self._win_loss = np.zeros(0)
        self.adwin = drift.ADWIN(delta=drift_delta)
        self.rows = 0
        self.drift_total = 0

    def update(self, y: np.ndarray, p: np.ndarray) -> int:
        p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
        y = np.asarray(y).astype(bool)
        if not y.size:
            return 0
        losses = np.where(y, -np.log(p), -np.log1p(-p))
        self.auc.update(y, p)
        self._loss_sum += float(losses.sum())
        self._loss_n += y.size
        wy = np.concatenate([self._win_y, y])
        wp = np.concatenate([self._win_p, p])
        wl = np.concatenate([self._win_loss, losses])
        drop = max(0, wy.size - self.window)
        self.rolling_auc.update(y, p)
        if drop:
            self.rolling_auc.revert(wy[:drop], wp[:drop])
        self._win_y, self._win_p, self._win_loss = wy[drop:], wp[drop:], wl[drop:]
        drifts = 0
        for loss in losses.tolist():
            self.adwin.update(loss)
            if self.adwin.drift_detected:
                drifts += 1
        self.rows += int(y.size)
        self.drift_total += drifts
        return drifts

    def snapshot(self) -> dict[str, float]:
        def finite(v: float) -> float:
            return v if math.isfinite(v) else float("nan")

        return {
            "rows_scored": float(self.rows),
            "auc": finite(self.auc.get()),
            "logloss": finite(self._loss_sum / self._loss_n if self._loss_n else 0.0),
            "rolling_auc": finite(self.rolling_auc.get()),
            "rolling_logloss": finite(
                float(self._win_loss.mean()) if self._win_loss.size else 0.0
            ),
            "drift_total": float(self.drift_total),
        }

    def state(self) -> dict[str, Any]:
        """Plain numbers only (checkpoints load with ``weights_only=True``); the layout of
        River's confusion matrices (``[TT, TF, FT, FF]`` per threshold) is kept."""
        c = self.auc.counts
        cms = [[float(c[i, a, b]) for a in (1, 0) for b in (1, 0)] for i in range(len(c))]
        return {
            "rows": self.rows,
            "drift_total": self.drift_total,
            "auc_cms": cms,
            "logloss_mean": self._loss_sum / self._loss_n if self._loss_n else 0.0,
            "logloss_n": float(self._loss_n),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.rows = int(state["rows"])
        self.drift_total = int(state["drift_total"])
        self.auc = ThresholdAUC(self.n_thresholds)
        if len(state["auc_cms"]) == self.n_thresholds:
            for i, (tt, tf, ft, ff) in enumerate(state["auc_cms"]):
                self.auc.counts[i] = [[ff, ft], [tf, tt]]
        self._loss_n = float(state["logloss_n"])
        self._loss_sum = float(state["logloss_mean"]) * self._loss_n


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
