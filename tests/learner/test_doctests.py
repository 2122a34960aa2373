"""The ``>>>`` examples in the learner's docstrings are tests too."""

import doctest
import importlib

import pytest

MODULES = [
    "learner.batch",
    "learner.embeddings",
    "learner.metrics",
    "learner.models",
    "learner.models.fgcnn",
    "learner.protocol",
    "learner.store",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
