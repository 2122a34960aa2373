"""The ``>>>`` examples of the codes modules run as tests."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "features.content",
    "features.codebooks",
    "features.alignment",
    "features.codes_service",
    "learner.multimodal",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
