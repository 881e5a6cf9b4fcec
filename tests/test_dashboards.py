"""The Grafana dashboards and Prometheus rules of the chart, against real data.

A real Prometheus (Debian's package, tools/get-prometheus.sh) scrapes the operator,
run as its own process on the real stack, every second while it erases: two
requests in one batch, one more in a second batch, and two that fail with
ModelNotFound. Then every panel's PromQL, exactly as written in
charts/lethe/dashboards/*.json, goes through Prometheus' HTTP API and must return
data; the savings it shows must be the one the requests' statuses show; and the
cost dashboard is plotted into a PNG (LETHE_DASHBOARD_PNG=path keeps a copy).
The dashboards' shape alone is checked in tests/unit/test_dashboards.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lethe.store import Store
from lethe_dev import kubestack
from lethe_dev.localstack import StackState, free_port

from .conftest import kubectl
from .harness import (
    Operator,
    apply,
    digits_model,
    erasure_request,
    get,
    phase,
    remove_model,
    s3_secret,
    train_subjects,
    wait_for,
    wait_ready,
)

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "charts" / "lethe" / "dashboards").glob("*.json"))
RULES = ROOT / "charts" / "lethe" / "rules" / "lethe-rules.yaml"
NS, MODEL, MISSING = "metrics", "digits-metrics", "no-such-model"
SCRAPE_S = 1


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def targets(dash: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            yield panel, t


@pytest.fixture(scope="module")
def prometheus_bin() -> Path:
    return Path(kubestack.cached_tool("get-prometheus.sh"))


# -- the rules, with promtool ----------------------------------------------------------
RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'lethe_nearest_deadline_seconds{{namespace="ns",model="m"}}'
        values: '172800-60x40'
      - series: 'lethe_pending_requests{{namespace="ns",model="m"}}'
        values: '1x20 0x20'
      - series: 'lethe_retrain_cost_usd_total{{namespace="ns",model="m"}}'
        values: '0x10 2x30'
      - series: 'lethe_full_retrain_cost_usd_total{{namespace="ns",model="m"}}'
        values: '0x10 10x30'
      - series: 'lethe_erasure_requests_total{{namespace="ns",model="m",result="failed"}}'
        values: '0x5 1x35'
    alert_rule_test:
      - eval_time: 15m
        alertname: LetheErasureDeadlineApproaching
        exp_alerts:
          - exp_labels: {{severity: warning, namespace: ns, model: m}}
            exp_annotations:
              summary: Erasure deadline of ns/m in under 3 days
              description: >-
                The nearest deadline of a pending ErasureRequest on ShardedModel ns/m
                is 1d 23h 45m 0s away.
      - eval_time: 30m  # nothing pending: the deadline gauge says nothing urgent
        alertname: LetheErasureDeadlineApproaching
        exp_alerts: []
      - eval_time: 15m
        alertname: LetheErasureDeadlineImminent
        exp_alerts: []
      - eval_time: 10m
        alertname: LetheErasureFailed
        exp_alerts:
          - exp_labels: {{severity: warning, namespace: ns, model: m}}
            exp_annotations:
              summary: Erasure requests failed for ns/m
              description: >-
                1 ErasureRequest(s) for ns/m failed in the last 15 minutes;
                `kubectl get erasurerequests -n ns` shows the reason of each.
      - eval_time: 30m
        alertname: LetheErasureFailed
        exp_alerts: []
    promql_expr_test:
      - expr: namespace_model:lethe_savings_ratio:1d
        eval_time: 30m
        exp_samples:
          - labels: 'namespace_model:lethe_savings_ratio:1d{{namespace="ns",model="m"}}'
            value: 5
"""


def test_rules_pass_promtool(prometheus_bin: Path, tmp_path: Path) -> None:
    promtool = str(prometheus_bin / "promtool")
    check = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = tmp_path / "rules-test.yaml"
    unit.write_text(RULE_TESTS.format(rules=json.dumps(str(RULES))))
    run = subprocess.run(
        [promtool, "test", "rules", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


# -- a real Prometheus on the running operator ---------------------------------------
class Prometheus:
    """``prometheus`` in a subprocess, scraping the operator every second."""

    def __init__(self, binary: Path, workdir: Path, target_port: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        config = workdir / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML: no YAML writer needed
                {
                    "global": {
                        "scrape_interval": f"{SCRAPE_S}s",
                        "evaluation_interval": "1s",
                    },
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {
                            "job_name": "lethe-operator",
                            "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                        }
                    ],
                }
            )
        )
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(binary / "prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for("prometheus ready", self.ready, timeout=60, every=0.5)

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.loads(r.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.api("query", query=expr)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def substitute(expr: str, namespace: str, model: str, window: str) -> str:
    """Grafana's interpolation for one choice of the variables."""
    for name, value in (
        ("$__rate_interval", window),
        ("$__range", window),
        ("$__interval", f"{SCRAPE_S}s"),
        ("${namespace}", namespace),
        ("$namespace", namespace),
        ("${model}", model),
        ("$model", model),
    ):
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def clear_requests(kube: kubestack.KubeState) -> None:
    """Delete the namespace's ErasureRequests (a rerun starts clean), finalizers first."""
    listed = kubectl(kube, "-n", NS, "get", "erasurerequests", "-o", "name")
    for name in listed.stdout.split():
        kubectl(
            kube, "-n", NS, "patch", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}'
        )
        kubectl(kube, "-n", NS, "delete", name, "--timeout=30s")


def scraped_outcome(prom: Prometheus) -> dict[str, float | None]:
    """Requests succeeded and failed, pending requests and quarantined shards, as scraped."""
    return {
        "succeeded": prom.value(
            f'sum(lethe_erasure_requests_total{{namespace="{NS}",result="succeeded"}})'
        ),
        "failed": prom.value(
            f'sum(lethe_erasure_requests_total{{namespace="{NS}",result="failed"}})'
        ),
        "pending": prom.value(f'sum(lethe_pending_requests{{namespace="{NS}"}})'),
        "quarantined": prom.value(f'sum(lethe_quarantined_shards{{namespace="{NS}"}})'),
    }


def finished_after_scrape(prom: Prometheus, succeeded: int, failed: int) -> bool:
    """Prometheus has scraped the outcome and the idle gauges that follow it."""
    want = {"succeeded": succeeded, "failed": failed, "pending": 0, "quarantined": 0}
    return scraped_outcome(prom) == want


def test_every_panel_returns_data_from_a_real_prometheus(
    kube: kubestack.KubeState,
    stack: StackState,
    store: Store,
    prometheus_bin: Path,
    tmp_path: Path,
) -> None:
    apply(kube, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    clear_requests(kube)
    apply(kube, s3_secret(stack, namespace=NS), digits_model(MODEL, stack, store, namespace=NS))
    op = Operator(kube.kubeconfig, free_port(), tmp_path / "operator.log", args=("--namespace", NS))
    op.start()
    prom: Prometheus | None = None
    try:
        prom = Prometheus(prometheus_bin, tmp_path, op.port)
        t0 = time.time()
        wait_ready(kube, MODEL, NS)

        # a request for a model that does not exist: the failed rate has data
        apply(kube, erasure_request("for-nobody-0", ["person-0001"], MISSING, NS))
        wait_for("Failed", lambda: phase(kube, "for-nobody-0", NS) == "Failed", timeout=60)
        wait_for(
            "the failure scraped",
            lambda: prom.value(f'lethe_erasure_requests_total{{model="{MISSING}"}}') == 1,
            timeout=30,
        )
        # batch 1: two requests applied together
        subjects = train_subjects(3, offset=20)
        first = [f"erase-{i}" for i in range(2)]
        apply(
            kube,
            *(erasure_request(n, [s], MODEL, NS) for n, s in zip(first, subjects[:2], strict=True)),
        )
        # the second failure: the failed series counts up while Prometheus watches
        apply(kube, erasure_request("for-nobody-1", ["person-0002"], MISSING, NS))
        wait_for(
            "batch 1",
            lambda: all(phase(kube, n, NS) == "Succeeded" for n in first),
            timeout=300,
        )
        # batch 2: one more, so the cost moves twice
        apply(kube, erasure_request("erase-2", [subjects[2]], MODEL, NS))
        names = [*first, "erase-2"]
        wait_for("batch 2", lambda: phase(kube, "erase-2", NS) == "Succeeded", timeout=300)
        wait_for(
            "the outcome scraped",
            lambda: finished_after_scrape(prom, 3, 2),
            timeout=60,
            state=lambda: scraped_outcome(prom),
        )
        time.sleep(3 * SCRAPE_S)  # a few idle samples after the last change, for the plot
        window = f"{math.ceil(time.time() - t0) + 10}s"

        # every target of every panel returns data, for All and for one model
        for path in DASHBOARDS:
            for panel, t in targets(load(path)):
                for model in (".*", MODEL):
                    expr = substitute(t["expr"], NS, model, window)
                    body = prom.api("query", query=expr)
                    where = f"{path.name} panel {panel['id']} {panel['title']!r} model={model}"
                    assert body["status"] == "success", (where, body)
                    result = body["data"]["result"]
                    assert result, f"{where}: no data for {expr}"
                    values = [float(r["value"][1]) for r in result]
                    assert any(math.isfinite(v) for v in values), (where, expr, values)

        # the template variables' label_values() find the model and the namespace
        models = prom.api(
            "label/model/values",
            **{"match[]": f'lethe_erasure_requests_total{{namespace=~"{NS}"}}'},
        )["data"]
        assert MODEL in models and MISSING in models
        assert NS in prom.api("label/namespace/values")["data"]

        # the savings the dashboard shows are the ones the statuses show
        statuses = [get(kube, "erasurerequest", n, NS)["status"] for n in names]
        spent = sum(s["cost"]["usd"] for s in statuses)
        full_by_batch = {s["batchId"]: s["cost"]["fullRetrainUSD"] for s in statuses}
        assert len(full_by_batch) == 2 and spent > 0
        expected = sum(full_by_batch.values()) / spent
        cost = {p["title"]: p for p in load(ROOT / "charts/lethe/dashboards/cost.json")["panels"]}

        def panel_value(title: str, ref: int = 0) -> float:
            expr = substitute(cost[title]["targets"][ref]["expr"], NS, ".*", window)
            result = prom.query(expr)
            assert len(result) == 1, (title, result)
            return float(result[0]["value"][1])

        assert panel_value("Savings ratio (full retrain / spent)") == pytest.approx(expected)
        assert panel_value("Saved") == pytest.approx(1 - 1 / expected)
        assert panel_value("Cumulative USD: spent vs full retrain", 0) == pytest.approx(spent)
        assert panel_value("Cumulative USD: spent vs full retrain", 1) == pytest.approx(
            sum(full_by_batch.values())
        )
        outcomes = {
            p["title"]: p for p in load(ROOT / "charts/lethe/dashboards/outcomes.json")["panels"]
        }
        got = prom.query(substitute(outcomes["Succeeded"]["targets"][0]["expr"], NS, ".*", window))
        assert round(float(got[0]["value"][1])) == 3

        # the rules loaded, evaluate cleanly, and agree with the dashboard
        groups = prom.api("rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == 9 and all(r["health"] == "ok" for r in rules), rules
        assert prom.value(
            f'namespace_model:lethe_savings_ratio:1d{{namespace="{NS}",model="{MODEL}"}}'
        ) == pytest.approx(expected)
        wait_for(
            "LetheErasureFailed firing",
            lambda: prom.query(
                f'ALERTS{{alertname="LetheErasureFailed",alertstate="firing",model="{MISSING}"}}'
            ),
            timeout=30,
        )
        assert not prom.query('ALERTS{alertname=~"LetheErasureDeadline.*"}')

        # the cost dashboard, plotted from the same queries
        png = tmp_path / "cost-dashboard.png"
        render = subprocess.run(
            [
                sys.executable,
                str(ROOT / "tools" / "render_dashboard.py"),
                str(ROOT / "charts/lethe/dashboards/cost.json"),
                "--prometheus",
                prom.url,
                "--start",
                f"{t0:.0f}",
                "--scrape-interval",
                str(SCRAPE_S),
                "--var",
                f"namespace={NS}",
                "--out",
                str(png),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert render.returncode == 0, render.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
        if os.environ.get("LETHE_DASHBOARD_PNG"):
            shutil.copyfile(png, os.environ["LETHE_DASHBOARD_PNG"])
    finally:
        if prom:
            prom.stop()
        op.stop()
        clear_requests(kube)
        remove_model(kube, MODEL, NS)
        print(op.tail())
