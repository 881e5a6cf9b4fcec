"""`lethe demo --json`: the embedded default (through kube-apiserver and the operator)
ends verified, accuracy kept, and its report is consistent with itself and with the
certificate. Timing is reported, never asserted: a speed-up depends on the machine."""

from __future__ import annotations

import json

import pytest
import yaml

from lethe.store import Store
from lethe_dev.demo import MODEL_EXAMPLE

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
        "retrained_from_slice",
        "time_to_forget_seconds",
        "erasure_seconds",
        "erasure_measures",
        "certified_seconds",
        "full_retrain_seconds",
        "full_retrain_train_seconds",
        "full_retrain_startup_seconds",
        "full_retrain_measures",
        "speedup",
        "accuracy_before",
        "accuracy_after",
        "accuracy_full_retrain",
        "accuracy_gap_points",
        "certificate",
        "certificate_accounting",
        "verified",
        "demo_seconds",
    ):
        assert key in out, key
    spec = yaml.safe_load(MODEL_EXAMPLE.read_text())["spec"]
    assert out["path"] == "operator" and out["verified"] is True
    assert (out["shards"], out["slices"]) == (spec["shards"], spec["slices"])
    assert out["records"] == 1797 and out["records_erased"] == 40
    assert out["shards_retrained"] == 1
    assert 0 <= out["retrained_from_slice"] < out["slices"]

    # the person's shard was out of service before it came back, and certified after
    assert 0 < out["time_to_forget_seconds"] < out["erasure_seconds"]
    assert out["erasure_seconds"] <= out["certified_seconds"] + 0.5

    # the speed-up is what the two measured times say
    full, erasure = out["full_retrain_seconds"], out["erasure_seconds"]
    assert full == pytest.approx(
        out["full_retrain_train_seconds"] + out["full_retrain_startup_seconds"], abs=0.01
    )
    assert out["speedup"] == pytest.approx(full / erasure, rel=0.01)

    # the certificate compares with the measured monolithic run, not an extrapolation
    acc = out["certificate_accounting"]
    assert acc["full_retrain_basis"].startswith("measured")
    assert acc["speedup"] == pytest.approx(
        acc["full_retrain_seconds"] / acc["erasure_seconds"], rel=0.01
    )
    # the same run, scaled from the remaining rows to the rows before the erasure
    assert acc["full_retrain_seconds"] >= out["full_retrain_train_seconds"]
    assert acc["erasure_seconds"] <= erasure + 1.5  # from the request's creation (1 s grain)

    # accuracy: kept by the erasure, and the ensemble against the monolithic model
    assert abs(out["accuracy_after"] - out["accuracy_before"]) <= 0.02
    gap = (out["accuracy_full_retrain"] - out["accuracy_after"]) * 100
    assert out["accuracy_gap_points"] == pytest.approx(gap, abs=0.01)
    assert abs(out["accuracy_gap_points"]) <= 2.0  # seeded training: a regression guard
