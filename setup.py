"""The one build step pyproject.toml cannot declare stably: the audit parser's C part.

``detection/_fastparse.c`` parses the common audit line (``detection.records.parse_line``
calls it first). It is optional: without a C compiler the install still succeeds and
every line is parsed in Python, giving the same records more slowly;
``tests/detection/test_records.py`` then fails, so a build that lost it is noticed.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("detection._fastparse", ["detection/_fastparse.c"], optional=True)])
