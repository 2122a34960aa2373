"""The import graph keeps its rules (scripts/architecture.py): no module cycle, arrows
down the layers, no private reach-ins, and docs/architecture.md drawn from the code."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from tests.stackutil import REPO

_spec = importlib.util.spec_from_file_location("architecture", REPO / "scripts" / "architecture.py")
architecture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(architecture)


def test_the_product_keeps_the_rules_and_the_page_is_current():
    proc = subprocess.run([sys.executable, "scripts/architecture.py", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_the_checker_sees_a_cycle_an_upward_arrow_and_a_reach_in():
    edges = {"streams.a": {"streams.b"}, "streams.b": {"streams.a"}, "core.x": {"serving.y"},
             "serving.y": set()}
    assert architecture.cycles(edges) == [["streams.a", "streams.b"]]
    found = architecture.problems(edges, ["features.x:3 reaches into other._state"])
    assert "module cycle: streams.a -> streams.b" in found
    assert any(p.startswith("arrow core -> serving") for p in found)
    assert "private reach-in: features.x:3 reaches into other._state" in found


def test_a_reach_in_is_one_even_when_the_module_has_a_private_name_of_its_own(tmp_path):
    # The loophole closed in issue 20: defining ``_claim`` here does not make ``t._claim``
    # (some other object's) ours; only self/cls (as method receivers) and this module's
    # own classes may be reached through.
    path = tmp_path / "mod.py"
    path.write_text(
        "class Local:\n"
        "    def _claim(self):\n"
        "        return self._state, Local._claim\n"
        "\n"
        "def _claim(t):\n"
        "    return t._claim()\n"
        "\n"
        "def sneaky(t):\n"
        "    return getattr(t, '_state')\n"
        "\n"
        "cls = dict\n"
        "cls._hidden\n"
    )
    _, found = architecture.graph({"learner.mod": path})
    assert sorted(found) == ["learner.mod:12 reaches into cls._hidden",
                             "learner.mod:6 reaches into t._claim",
                             "learner.mod:9 reaches into getattr(t, '_state')"], found
