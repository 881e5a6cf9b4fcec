"""An ErasureRequest's status, derived from its targets, and the words of its outcome;
no cluster needed (tests/test_operator_integrity.py runs the operator on the real stack)."""

from __future__ import annotations

from lethe_operator.control import outcome_message
from lethe_operator.erasures import aggregate, selector_string, settled


def test_top_level_status_aggregates_the_targets() -> None:
    t = [{"model": "a", "phase": "Succeeded", "outcome": "Erased", "affectedRecords": 3}]
    t.append({"model": "b", "phase": "Retraining", "batchId": "x"})
    out = aggregate({}, t)
    assert out["phase"] == "Retraining" and out["models"] == "a,b"
    assert out["affectedRecords"] == 3 and out["batchId"] is None  # not one target's
    t[1] |= {"phase": "Failed", "reason": "RetrainFailed", "message": "Ray said no"}
    out = aggregate({}, t)
    assert (out["phase"], out["reason"]) == ("Failed", "RetrainFailed")
    assert out["message"] == "ShardedModel b: Ray said no"
    assert not settled(t[1])  # failed in a batch: retried until certified, kept
    t[1] |= {"phase": "Succeeded", "outcome": "NothingHeld", "reason": "NothingHeld"}
    out = aggregate(out, t)
    assert (out["phase"], out["reason"]) == ("Succeeded", "Certified")
    failed = next(c for c in out["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("False", "Retrained")
    one = aggregate({}, [{"model": "a", "phase": "DataErased", "batchId": "x"}])
    assert one["batchId"] == "x" and one["phase"] == "DataErased"


def test_selectors_and_outcome_words() -> None:
    sel = {
        "matchLabels": {"team": "a", "env": "prod"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["gold", "silver"]},
            {"key": "legacy", "operator": "DoesNotExist"},
        ],
    }
    assert selector_string(sel) == "env=prod,team=a,tier in (gold,silver),!legacy"
    words = outcome_message(
        {"outcome": "NothingHeld", "subjects_unmatched": 2, "records_unmatched": 0}
    )
    assert words.startswith("none of the 2 subject(s) named by this request was held")
    words = outcome_message(
        {"outcome": "Erased", "records_erased": 5, "subjects_unmatched": 1, "records_unmatched": 0}
    )
    assert words == (
        "5 record(s) erased and certified; 1 subject(s) named by this request matched nothing here"
    )
