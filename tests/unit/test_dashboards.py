"""The chart's Grafana dashboards as files: well formed, every panel scoped by the
dashboard's variables. tests/test_dashboards.py runs every panel against a real Prometheus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "charts" / "lethe" / "dashboards").glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_dashboards_are_well_formed() -> None:
    assert {p.stem for p in DASHBOARDS} == {"cost", "latency", "backlog", "outcomes"}
    uids = set()
    for path in DASHBOARDS:
        dash = load(path)
        uids.add(dash["uid"])
        assert dash["schemaVersion"] >= 39 and dash["title"].startswith("Lethe / ")
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        for name in ("namespace", "model"):
            assert variables[name]["type"] == "query"
            assert variables[name]["definition"].startswith("label_values(")
            assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in dash["panels"]:
            where = f"{path.name} panel {panel['id']} ({panel['title']})"
            assert panel["datasource"]["uid"] == "${datasource}", where
            assert panel["targets"], where
            g = panel["gridPos"]
            assert g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, where
            assert panel["fieldConfig"]["defaults"]["unit"], where
            for t in panel["targets"]:
                assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", where
                # every series is scoped by the dashboard's variables
                assert '$namespace"' in t["expr"] and '$model"' in t["expr"], where
    assert len(uids) == len(DASHBOARDS)
    cost = load(ROOT / "charts" / "lethe" / "dashboards" / "cost.json")
    assert {p["fieldConfig"]["defaults"]["unit"] for p in cost["panels"]} >= {"currencyUSD", "h"}
