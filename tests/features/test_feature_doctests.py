"""The ``>>>`` examples of the features modules run as tests."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "features.hashing",
    "features.schema",
    "features.counters",
    "features.rows",
    "features.movielens",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
