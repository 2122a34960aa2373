"""The one build step pyproject.toml cannot declare stably: the detection engine's C parts.

``detection/_fastparse.c`` parses the common audit line (``detection.records.parse_line``
calls it first) and feeds it to the coalescer; ``detection/_fastedges.c`` takes the
per-edge steps of the learned baseline and of the graph's merges. Both are optional:
without a C compiler the install still succeeds and the Python originals run, giving the
same results more slowly; ``tests/detection/test_records.py`` and
``tests/detection/test_native.py`` then fail, so a build that lost them is noticed.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("detection._fastparse", ["detection/_fastparse.c"], optional=True),
    Extension("detection._fastedges", ["detection/_fastedges.c"], optional=True),
])
