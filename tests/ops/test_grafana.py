"""The Grafana dashboard: valid JSON on the provisioned datasource, metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dashboard_queries_known_metrics_on_the_provisioned_datasource():
    dash = json.loads((REPO / "deploy/grafana/dashboards/headwater.json").read_text())
    source = "\n".join(p.read_text() for pkg in ("streams", "learner", "serving", "features")
                       for p in (REPO / pkg).rglob("*.py"))
    declared = set(re.findall(r'"(headwater_[a-z_]+)"', source))
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert panels and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["datasource"]["uid"] == "headwater-prom", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "headwater-prom"
            for name in re.findall(r"\b(headwater_[a-z_]+)", t["expr"]):
                base = re.sub(r"_(total|bucket|sum|count)$", "", name)
                assert name in declared or base in declared, f"{p['title']}: unknown metric {name}"
