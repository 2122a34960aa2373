"""The vectorised prequential metrics read what River's per-row metrics read."""

from __future__ import annotations

import numpy as np
import pytest
from river import metrics, utils

from learner.metrics import PrequentialMetrics


@pytest.mark.parametrize("window", [7, 1000])
def test_batch_metrics_equal_rivers_row_by_row(window):
    rng = np.random.default_rng(3)
    ours = PrequentialMetrics(window=window, n_thresholds=50)
    auc, logloss = metrics.ROCAUC(n_thresholds=50), metrics.LogLoss()
    rolling_auc = utils.Rolling(metrics.ROCAUC, window_size=window, n_thresholds=50)
    rolling_ll = utils.Rolling(metrics.LogLoss, window_size=window)
    for size in [1, 5, 0, 64, 3, 300, 17]:
        y = rng.random(size) < 0.3
        p = np.clip(rng.beta(2, 5, size) + 0.3 * y, 0, 1)
        ours.update(y, p)
        for yt, pt in zip(y.tolist(), p.tolist(), strict=True):
            for m in (auc, logloss, rolling_auc, rolling_ll):
                m.update(yt, pt)
        snap = ours.snapshot()
        assert snap["auc"] == pytest.approx(auc.get(), abs=1e-12)
        assert snap["logloss"] == pytest.approx(logloss.get(), rel=1e-9)
        assert snap["rolling_auc"] == pytest.approx(rolling_auc.get(), abs=1e-9)
        assert snap["rolling_logloss"] == pytest.approx(rolling_ll.get(), rel=1e-6)
    again = PrequentialMetrics(window=window, n_thresholds=50)
    again.load_state(ours.state())
    assert again.snapshot()["auc"] == snap["auc"]
    assert again.snapshot()["logloss"] == pytest.approx(snap["logloss"], rel=1e-12)
