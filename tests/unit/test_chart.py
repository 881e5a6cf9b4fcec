"""The Helm chart's files alone, without helm: every option is on in ``ALL_ON``, the
values schema describes every key, values.yaml is documented, and the chart's CRDs are
the repository's. tests/test_chart.py lints and renders it with a real helm."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lethe"

# Every optional feature on (each `enabled` of values.yaml is true here: see
# test_all_on_values_turn_on_every_option), plus the values that change the RBAC's
# shape and the pod spec. tests/test_chart.py renders the chart with it.
ALL_ON: dict[str, Any] = {
    "watchNamespaces": ["team-a", "team-b"],
    "image": {"digest": "sha256:" + "0123456789abcdef" * 4},
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
    "operator": {
        "s3Endpoint": "https://s3.example.com",
        "rayAddresses": ["http://ray-head-svc.ray:8265", "https://ray.example.com/jobs/"],
        "keysSecret": "lethe-keys",
        "extraEnv": [{"name": "EXTRA", "value": "1"}],
    },
    "metrics": {
        "service": {"enabled": True, "annotations": {"prometheus.io/scrape": "true"}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
    },
    "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
    "dashboards": {
        "enabled": True,
        "namespace": "monitoring",
        "annotations": {"k8s-sidecar-target-directory": "Lethe"},
    },
    "exampleModel": {"enabled": True, "namespace": "team-a"},
    "rbac": {"rayJobs": True, "kopfScanning": True},
    "podAnnotations": {"a": "b"},
    "podLabels": {"c": "d"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {}},
    "priorityClassName": "system-cluster-critical",
}


def test_all_on_values_turn_on_every_option() -> None:
    """Every `enabled` flag and boolean option of values.yaml is true in ALL_ON."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def flags(d: dict[str, Any], path: str = "") -> list[str]:
        out = []
        for k, v in d.items():
            if isinstance(v, dict) and k != "spec":
                out += flags(v, f"{path}{k}.")
            elif isinstance(v, bool) and k not in ("create", "allNamespaceSecrets"):
                out.append(f"{path}{k}")
        return out

    def get(d: dict[str, Any], dotted: str) -> Any:
        for k in dotted.split("."):
            d = d.get(k, {}) if isinstance(d, dict) else {}
        return d

    for flag in flags(defaults):
        if flag.startswith(("podSecurityContext.", "securityContext.")):
            continue  # hardening, not options
        assert get(ALL_ON, flag) is True, flag


def test_schema_describes_every_key() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict[str, Any], values: Any, path: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path}: unknown keys allowed"
            for key, sub in node["properties"].items():
                assert sub.get("description"), f"{path}.{key}: no description"
                walk(sub, (values or {}).get(key) if isinstance(values, dict) else None, key)
            if isinstance(values, dict):
                assert set(values) <= set(node["properties"]), path

    walk(schema, defaults, "")
    assert set(defaults) | {"global"} == set(schema["properties"])


def test_values_are_documented_field_by_field() -> None:
    """Every key in values.yaml has a comment above it, or sits under one that has."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    key = re.compile(r"^(\s*)([A-Za-z][\w.-]*):")
    undocumented: list[str] = []
    documented_at: list[int] = []  # indents of commented ancestors still open
    for i, line in enumerate(lines):
        m = key.match(line)
        if not m:
            continue
        indent = len(m.group(1))
        documented_at = [d for d in documented_at if d < indent]
        commented = i > 0 and lines[i - 1].strip().startswith("#")
        if commented:
            documented_at.append(indent)
        elif not documented_at:
            # a section header without its own comment is fine when its children have one
            nxt = next((x for x in lines[i + 1 :] if x.strip()), "")
            if not nxt.strip().startswith("#"):
                undocumented.append(m.group(2))
    assert not undocumented, undocumented


def test_chart_crds_are_the_repository_crds() -> None:
    """crds/ is the one source of truth: the chart holds byte-identical copies."""
    source = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    copied = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert sorted(copied) == sorted(source), "the chart's crds/ has other files"
    drifted = [n for n in source if copied[n] != source[n]]
    assert not drifted, f"charts/lethe/crds drifted from crds/: cp crds/*.yaml {CHART}/crds/"
