"""Every ``>>>`` example in the product's packages runs as a test (River's practice).

Modules are discovered, not listed, so a new example is tested the day it is written.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("headwater", "streams", "features", "learner", "detection", "serving")


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
            if info.name.endswith("__main__"):
                continue
            names.append(info.name)
    return sorted(names)


MODULES = _modules()


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_the_domain_packages_have_examples():
    with_examples = {
        name for name in MODULES
        if doctest.DocTestFinder().find(importlib.import_module(name)) and any(
            t.examples for t in doctest.DocTestFinder().find(importlib.import_module(name)))
    }
    for package in ("streams", "features", "learner", "detection"):
        assert any(n.startswith(package + ".") for n in with_examples), package
