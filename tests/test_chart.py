"""The Helm chart (charts/lethe) with a real helm (built from the helm.sh/helm/v3 Go
module by tools/build-helm.sh): lint and render with default values and with every
optional feature on, values schema rejections, the Deployment's hardening and the RBAC's
shape. No cluster needed (tests/test_helm_install.py installs it); the checks of the
files alone (values, schema, CRD drift) are in tests/unit/test_chart.py."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lethe_dev import kubestack

from .unit.test_chart import ALL_ON

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "lethe"


@functools.cache
def helm_binary() -> str:
    """Build (once, cached under ~/.cache/lethe) and return the helm path."""
    return kubestack.cached_tool("build-helm.sh")


def run_helm(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = None
    if home is not None:  # keep helm's config, cache and data out of the user's home
        env = {
            **os.environ,
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_DATA_HOME": str(home / "data"),
        }
    return subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=120, env=env
    )


def values_file(tmp_path: Path, values: dict[str, Any], name: str = "values.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(values))  # JSON is YAML
    return p


def render(tmp_path: Path, values: dict[str, Any] | None = None, chart: Path = CHART) -> list[dict]:
    args = ["template", "lethe", str(chart), "--namespace", "lethe-system"]
    if values is not None:
        args += ["-f", str(values_file(tmp_path, values))]
    r = run_helm(*args)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def dashboards() -> list[Path]:
    return sorted((CHART / "dashboards").glob("*.json"))


# -- lint and render ----------------------------------------------------------------
def test_lint_strict_default_and_all_on(tmp_path: Path) -> None:
    r = run_helm("lint", "--strict", str(CHART))
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_helm("lint", "--strict", str(CHART), "-f", str(values_file(tmp_path, ALL_ON)))
    assert r.returncode == 0, r.stdout + r.stderr


def test_default_render(tmp_path: Path) -> None:
    docs = render(tmp_path)
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment"]
        + (["ConfigMap"] if dashboards() else [])
    )
    assert not by_kind(docs, "ServiceMonitor") and not by_kind(docs, "ShardedModel")
    assert not by_kind(docs, "Role")  # cluster-wide by default; Secrets only where listed
    for d in docs:
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == "lethe-system", d["metadata"]["name"]
    # a ConfigMap per dashboard, holding the file as is, labelled for the sidecar
    cms = by_kind(docs, "ConfigMap")
    assert len(cms) == len(dashboards())
    for path in dashboards():
        cm = next(c for c in cms if path.name in c["data"])
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["data"][path.name] == path.read_text().rstrip("\n")
        json.loads(cm["data"][path.name])


def test_all_on_render(tmp_path: Path) -> None:
    docs = render(tmp_path, ALL_ON)
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    service = one(docs, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    model = one(docs, "ShardedModel")
    assert model["metadata"]["namespace"] == "team-a"
    assert model["spec"]["dataset"]["uri"] == "builtin:digits"
    dep = one(docs, "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["image"].endswith("@sha256:" + "0123456789abcdef" * 4)
    assert c["args"][-2:] == ["--namespace=team-a", "--namespace=team-b"]
    env = {e["name"]: e for e in c["env"]}
    assert env["LETHE_S3_ENDPOINT"]["value"] == "https://s3.example.com"
    # the allow-list of Ray Jobs APIs, as the operator reads it (comma-separated)
    assert env["LETHE_RAY_ADDRESSES"]["value"] == (
        "http://ray-head-svc.ray:8265,https://ray.example.com/jobs/"
    )
    assert env["EXTRA"]["value"] == "1"
    # the operator's own certificate keys: a read-only Secret volume, as LETHE_KEYS_DIR
    assert env["LETHE_KEYS_DIR"]["value"] == "/etc/lethe/keys"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "keys")
    assert mount == {"name": "keys", "mountPath": "/etc/lethe/keys", "readOnly": True}
    (keys,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "keys"]
    assert keys["secret"]["secretName"] == "lethe-keys"
    assert {i["key"] for i in keys["secret"]["items"]} == {"signing-key.pem", "hmac-key"}
    for cm in by_kind(docs, "ConfigMap"):
        assert cm["metadata"]["namespace"] == "monitoring"
        assert cm["metadata"]["annotations"]["k8s-sidecar-target-directory"] == "Lethe"
    rules = sorted(
        p for p in (CHART / "rules").glob("*.yaml") if "groups" in yaml.safe_load(p.read_text())
    )
    prs = by_kind(docs, "PrometheusRule")
    assert len(prs) == len(rules)
    key = functools.partial(json.dumps, sort_keys=True)
    assert sorted(key(pr["spec"]["groups"]) for pr in prs) == sorted(
        key(yaml.safe_load(p.read_text())["groups"]) for p in rules
    )
    for pr in prs:
        assert pr["metadata"]["labels"]["release"] == "prom"


def test_dashboards_and_rules_are_templated_from_their_files(tmp_path: Path) -> None:
    """With files we control (a copy of the chart): one ConfigMap per dashboard, one
    PrometheusRule per rule file; promtool test files are skipped; a configurable label."""
    chart = tmp_path / "lethe"
    shutil.copytree(CHART, chart)
    shutil.rmtree(chart / "dashboards", ignore_errors=True)
    shutil.rmtree(chart / "rules", ignore_errors=True)
    (chart / "dashboards").mkdir()
    (chart / "rules").mkdir()
    board = {"title": "T {{ not a template }}", "panels": []}
    (chart / "dashboards" / "My_Board.json").write_text(json.dumps(board))
    (chart / "dashboards" / "other.json").write_text("{}")
    group = {"name": "g", "rules": [{"alert": "A", "expr": "up == 0", "for": "5m"}]}
    (chart / "rules" / "alerts.yaml").write_text(yaml.safe_dump({"groups": [group]}))
    (chart / "rules" / "alerts_test.yaml").write_text(
        yaml.safe_dump({"rule_files": ["alerts.yaml"], "tests": []})
    )
    values = {
        "prometheusRule": {"enabled": True},
        "dashboards": {"label": "grafana_dashboard_lethe", "labelValue": "yes"},
    }
    docs = render(tmp_path, values, chart=chart)
    cms = {c["metadata"]["name"]: c for c in by_kind(docs, "ConfigMap")}
    assert sorted(cms) == ["lethe-dashboard-my-board", "lethe-dashboard-other"]
    cm = cms["lethe-dashboard-my-board"]
    assert json.loads(cm["data"]["My_Board.json"]) == board  # not run through templating
    assert cm["metadata"]["labels"]["grafana_dashboard_lethe"] == "yes"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    (pr,) = by_kind(docs, "PrometheusRule")
    assert pr["metadata"]["name"] == "lethe-alerts" and pr["spec"]["groups"] == [group]
    assert not by_kind(render(tmp_path, {"dashboards": {"enabled": False}}), "ConfigMap")


# -- values schema ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicas": 2}, "additional properties 'replicas' not allowed"),
        ({"rbac": {"secretsEverywhere": True}}, "at '/rbac': additional properties"),
        ({"metrics": {"port": "9090"}}, "at '/metrics/port': got string, want integer"),
        ({"watchNamespaces": "team-a"}, "at '/watchNamespaces': got string, want array"),
        ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of"),
        ({"dashboards": {"enabled": "yes"}}, "at '/dashboards/enabled': got string, want boolean"),
        ({"resources": {"requests": {"cpu": "lots"}}}, "at '/resources/requests/cpu'"),
        ({"metrics": {"serviceMonitor": {"interval": 30}}}, "serviceMonitor/interval"),
        ({"exampleModel": {"spec": "digits"}}, "at '/exampleModel/spec': got string, want object"),
        ({"operator": {"keysSecret": "Bad_Name"}}, "at '/operator/keysSecret'"),
        # there are no operator-wide S3 keys any more: the old key fails loudly
        ({"operator": {"s3CredentialsSecret": "s3"}}, "'s3CredentialsSecret' not allowed"),
        ({"operator": {"rayAddresses": "http://r:8265"}}, "got string, want array"),
        ({"operator": {"rayAddresses": ["ray://r:10001"]}}, "at '/operator/rayAddresses/0'"),
        ({"operator": {"rayAddresses": ["http://a,http://b"]}}, "/operator/rayAddresses/0"),
        ({"operator": {"rayAddresses": ["http://u@r:8265"]}}, "/operator/rayAddresses/0"),
    ],
)
def test_schema_rejects_wrong_values(tmp_path: Path, values: dict, message: str) -> None:
    f = values_file(tmp_path, values)
    r = run_helm("template", "lethe", str(CHART), "-f", str(f))
    assert r.returncode != 0
    assert "values don't meet the specifications of the schema" in r.stderr
    assert message in r.stderr, r.stderr
    lint = run_helm("lint", "--strict", str(CHART), "-f", str(f))
    assert lint.returncode != 0 and message in lint.stdout + lint.stderr


def test_service_monitor_needs_the_service(tmp_path: Path) -> None:
    values = {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}
    r = run_helm("template", "lethe", str(CHART), "-f", str(values_file(tmp_path, values)))
    assert r.returncode != 0 and "needs metrics.service.enabled" in r.stderr


# -- the Deployment's hardening -----------------------------------------------------
def test_deployment_is_hardened(tmp_path: Path) -> None:
    for values in (None, ALL_ON):
        dep = one(render(tmp_path, values), "Deployment")
        spec = dep["spec"]
        assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
        pod = spec["template"]["spec"]
        assert pod["serviceAccountName"] == "lethe"
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        (c,) = pod["containers"]
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["privileged"] is False and sc["runAsNonRoot"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
        env = {e["name"]: e.get("value") for e in c["env"]}
        # no S3 keys of its own (models bring theirs); Ray addresses only from the values
        assert not [k for k in env if k.startswith("AWS_") and k != "AWS_DEFAULT_REGION"]
        allowed = "" if values is None else ",".join(ALL_ON["operator"]["rayAddresses"])
        assert env["LETHE_RAY_ADDRESSES"] == allowed  # default: no Jobs API at all
        # kopf's liveness endpoint on the probed port, metrics on the Service's port
        assert env["LETHE_LIVENESS"] == f"http://0.0.0.0:{ports['health']}/healthz"
        assert f"--metrics-port={ports['metrics']}" in c["args"]
        # the read-only root filesystem needs a writable /tmp (datasets are staged there)
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
        assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])


# -- RBAC ---------------------------------------------------------------------------
def _rules(doc: dict) -> list[tuple[str, str, str]]:
    return [
        (g, r, v)
        for rule in doc.get("rules") or []
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    ]


def test_rbac_is_least_privilege(tmp_path: Path) -> None:
    # watching namespaces: everything namespaced; cluster scope is read-only scanning
    docs = render(tmp_path, {"watchNamespaces": ["team-a", "team-b"]})
    (cr,) = by_kind(docs, "ClusterRole")
    assert set(_rules(cr)) == {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
    }
    roles = {r["metadata"]["namespace"]: set(_rules(r)) for r in by_kind(docs, "Role")}
    assert sorted(roles) == ["team-a", "team-b"]
    bindings = by_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings + by_kind(docs, "ClusterRoleBinding"):
        assert b["subjects"] == [
            {"kind": "ServiceAccount", "name": "lethe", "namespace": "lethe-system"}
        ]
    expected = {
        *(("lethe.dev", r, v) for r in ("shardedmodels", "erasurerequests")
          for v in ("get", "list", "watch", "patch")),
        ("lethe.dev", "shardedmodels/status", "patch"),
        ("lethe.dev", "erasurerequests/status", "patch"),
        ("lethe.dev", "erasurerequests", "delete"),
        ("", "events", "create"),
        ("ray.io", "rayjobs", "get"),
        ("ray.io", "rayjobs", "list"),
        ("ray.io", "rayjobs", "watch"),
        ("ray.io", "rayjobs", "create"),
        ("", "secrets", "get"),
    }  # fmt: skip
    assert roles["team-a"] == expected
    for docs_ in (docs, render(tmp_path), render(tmp_path, ALL_ON)):
        for d in by_kind(docs_, "ClusterRole") + by_kind(docs_, "Role"):
            for g, r, v in _rules(d):
                assert "*" not in (g, r, v)
                assert v in ("get", "list", "watch", "create", "patch", "delete")
                if r == "secrets":
                    assert v == "get" and d["kind"] == "Role"  # never list/watch, never all
                if v == "delete":
                    assert r == "erasurerequests"

    # cluster-wide: objects from the ClusterRole, Secrets only in the listed namespaces
    docs = render(tmp_path, {"rbac": {"secretNamespaces": ["team-c"], "rayJobs": False}})
    (cr,) = by_kind(docs, "ClusterRole")
    assert ("lethe.dev", "erasurerequests", "delete") in _rules(cr)
    assert not any(r in ("secrets", "namespaces", "rayjobs") for _, r, _ in _rules(cr))
    (role,) = by_kind(docs, "Role")
    assert role["metadata"]["namespace"] == "team-c"
    assert _rules(role) == [("", "secrets", "get")]
    # opting in to Secrets everywhere puts them in the ClusterRole, get only
    docs = render(tmp_path, {"rbac": {"allNamespaceSecrets": True}})
    assert ("", "secrets", "get") in _rules(one(docs, "ClusterRole"))
    # no scanning, namespaced: no cluster-scope permission at all
    docs = render(tmp_path, {"watchNamespaces": ["team-a"], "rbac": {"kopfScanning": False}})
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    assert not [
        d
        for d in render(tmp_path, {"rbac": {"create": False}, "watchNamespaces": ["a"]})
        if d["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    ]
