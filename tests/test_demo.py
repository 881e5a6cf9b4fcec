"""`lethe demo --json`: the embedded default (through kube-apiserver and the operator)
ends verified, accuracy kept."""

from __future__ import annotations

import json

from lethe.store import Store

from .conftest import lethe_cli


def test_demo_json(store: Store) -> None:
    # The session's stack is configured in the environment, so the demo reuses it.
    r = lethe_cli("demo", "--json", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    for key in (
        "records",
        "shards",
        "slices",
        "records_erased",
        "shards_retrained",
        "time_to_forget_seconds",
        "erasure_seconds",
        "full_retrain_seconds",
        "speedup",
        "accuracy_before",
        "accuracy_after",
        "accuracy_full_retrain",
        "certificate",
        "verified",
    ):
        assert key in out
    assert out["path"] == "operator" and out["verified"] is True
    assert out["records"] == 1797 and out["records_erased"] == 40
    assert out["shards_retrained"] == 1
    assert abs(out["accuracy_after"] - out["accuracy_before"]) <= 0.02
    assert 0 < out["time_to_forget_seconds"] < out["erasure_seconds"]
