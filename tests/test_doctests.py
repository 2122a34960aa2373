"""Every ``>>>`` example in the product's packages runs as a test (River's practice).

Examples are discovered, not listed, so a new one is tested the day it is written. One
case per docstring that *has* examples: a module without any contributes no case, so no
case passes without running something.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("core", "headwater", "streams", "features", "learner", "detection", "serving")
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


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


def _examples() -> list[tuple[str, str]]:
    cases = []
    for name in _modules():
        module = importlib.import_module(name)
        for test in doctest.DocTestFinder().find(module):
            if test.examples:
                cases.append((name, test.name))
    return sorted(cases)


EXAMPLES = _examples()


@pytest.mark.parametrize(("module_name", "test_name"), EXAMPLES, ids=[t for _, t in EXAMPLES])
def test_docstring_examples_run(module_name, test_name):
    module = importlib.import_module(module_name)
    (test,) = [t for t in doctest.DocTestFinder().find(module) if t.name == test_name]
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted == len(test.examples) and result.failed == 0


def test_the_domain_packages_have_examples():
    with_examples = {module for module, _ in EXAMPLES}
    for package in ("core", "streams", "features", "learner", "detection", "serving"):
        assert any(n.startswith(package + ".") for n in with_examples), package
