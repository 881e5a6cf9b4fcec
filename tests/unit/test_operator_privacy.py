"""The operator's metrics count a batch once, however often its tick repeats; no
cluster needed (tests/test_operator_privacy.py runs the operator on the real stack)."""

from __future__ import annotations

import os

import pytest
from prometheus_client import REGISTRY

from lethe_operator import control, metrics


def _value(name: str, **labels: str) -> float:
    got = REGISTRY.get_sample_value(name, labels)
    return float(got or 0.0)


def test_a_batch_is_counted_once_however_often_its_tick_repeats() -> None:
    """``count_batch`` as a repeated tick calls it: the second call for the same batch
    adds nothing, nor does a batch whose members status already shows reported."""
    ns, model = "default", f"count-{os.getpid()}"
    result = {
        "cost": {"cpu_seconds": 10.0, "gpu_seconds": 0.0, "usd": 0.25, "full_retrain_usd": 1.0},
        "shards_retrained": 2,
        "shard_runs": [{"slices_trained": 2}, {"slices_trained": 1}],
        "records_erased": 7,
    }
    usd = "lethe_retrain_cost_usd_total"
    assert control.count_batch(ns, model, "batch-1", result, reported=False)
    assert not control.count_batch(ns, model, "batch-1", result, reported=False)  # repeated
    assert _value(usd, namespace=ns, model=model) == pytest.approx(0.25)
    assert _value("lethe_slices_retrained_total", namespace=ns, model=model) == 3
    assert _value("lethe_records_erased_total", namespace=ns, model=model) == 7
    # a restarted process: status says the batch's requests were reported already
    assert not control.count_batch(ns, model, "batch-2", result, reported=True)
    assert _value(usd, namespace=ns, model=model) == pytest.approx(0.25)
    assert control.count_batch(ns, model, "batch-3", result, reported=False)
    assert _value(usd, namespace=ns, model=model) == pytest.approx(0.5)
    assert metrics.first_time("some", "key") and not metrics.first_time("some", "key")
