"""A measured monolithic run on the model, and what ``status``/``calibrate`` say with it.

Generations need only CURRENT's compare-and-swap, so a dict stands in for S3 here:
no servers."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any

import pytest

from lethe import cli
from lethe.calibration import CalibrationError, measured_by, record_monolithic
from lethe.core.config import TrainerConfig
from lethe.generations import create_first, read_live
from lethe.layout import ModelLayout
from lethe.store import NotFound, PreconditionFailed

from .test_core import _gen


class DictStore:
    """The few Store calls that reading and committing generations make."""

    bucket = "lethe"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def _etag(self, key: str) -> str:
        return hashlib.md5(self.objects[key]).hexdigest()

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        if key not in self.objects:
            raise NotFound(key)
        return self.objects[key], self._etag(key)

    def get(self, key: str) -> bytes:
        return self.get_with_etag(key)[0]

    def get_json(self, key: str) -> Any:
        return json.loads(self.get(key))

    def put_if_absent(self, key: str, body: bytes, retain_days: int | None = None) -> bool:
        if key in self.objects:
            return False
        self.objects[key] = body
        return True

    def put_if_match(self, key: str, body: bytes, etag: str) -> str:
        if key not in self.objects or self._etag(key) != etag:
            raise PreconditionFailed(key)
        self.objects[key] = body
        return self._etag(key)


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> tuple[DictStore, ModelLayout]:
    """'m': 4 shards x 8 slices of 10 rows, 10 s of training and 8 s start-up each."""
    store = DictStore()
    layout = ModelLayout.of("m")
    create_first(store, layout, _gen([[10] * 8] * 4, overhead=8.0))  # type: ignore[arg-type]
    monkeypatch.setattr(cli, "_store", lambda args: store)
    return store, layout


def test_record_monolithic_is_a_new_generation_and_idempotent(
    model: tuple[DictStore, ModelLayout],
) -> None:
    store, layout = model
    gen = record_monolithic(store, layout, 12.0, 320, 5.0, measured_at=7.0)  # type: ignore[arg-type]
    assert (gen.number, gen.reason) == (2, "calibrate")
    assert read_live(store, layout).generation.monolithic == gen.monolithic  # type: ignore[arg-type]
    again = record_monolithic(store, layout, 12.0, 320, 5.0, measured_at=7.0)  # type: ignore[arg-type]
    assert again.number == 2  # the same measurement: nothing to commit
    with pytest.raises(CalibrationError, match="positive"):
        record_monolithic(store, layout, 0.0, 320)  # type: ignore[arg-type]


def test_measured_by_reads_a_monolithic_model_with_the_same_trainer(
    model: tuple[DictStore, ModelLayout],
) -> None:
    store, layout = model
    full = ModelLayout.of("m-full")
    mono = _gen([[320]], secs=12.0, overhead=6.0)
    mono.config = replace(mono.config, slices=1)
    create_first(store, full, mono)  # type: ignore[arg-type]
    m = measured_by(store, full, layout)  # type: ignore[arg-type]
    assert (m.train_seconds, m.rows, m.overhead_seconds) == (12.0, 320, 6.0)
    with pytest.raises(CalibrationError, match="one of each"):
        measured_by(store, layout, layout)  # type: ignore[arg-type]
    other = ModelLayout.of("m-other")
    mono.config = replace(mono.config, trainer=TrainerConfig(epochs=1))
    create_first(store, other, mono)  # type: ignore[arg-type]
    with pytest.raises(CalibrationError, match="another trainer"):
        measured_by(store, other, layout)  # type: ignore[arg-type]


def test_calibrate_from_a_monolithic_model(
    model: tuple[DictStore, ModelLayout], capsys: pytest.CaptureFixture[str]
) -> None:
    store, layout = model
    mono = _gen([[640]], secs=12.0, overhead=6.0)
    mono.config = replace(mono.config, slices=1, trainer=replace(mono.config.trainer, seed=7))
    create_first(store, ModelLayout.of("m-full"), mono)  # type: ignore[arg-type]
    assert cli.main(["calibrate", "--model", "m", "--from-model", "m-full", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["monolithic"]["rows"] == 640 and out["monolithic"]["overhead_seconds"] == 6.0
    # 12 s on 640 rows scales to 6 s on the model's 320, plus the measured 6 s start-up
    assert out["full_retrain_seconds"] == pytest.approx(12.0)
    assert out["full_basis"] == "measured on 640 rows, scaled to 320"
    args = ["calibrate", "--model", "m", "--from-model", "m-full", "--seconds", "3"]
    assert cli.main(args) == 2
    assert "not both" in capsys.readouterr().err
    assert cli.main(["calibrate", "--model", "m", "--from-model", "m"]) == 2
    assert "one of each" in capsys.readouterr().err


def test_status_and_calibrate_say_what_one_erasure_costs(
    model: tuple[DictStore, ModelLayout], capsys: pytest.CaptureFixture[str]
) -> None:
    # extrapolated: the full retrain 4 x 10 s + 8 s; one person: their shard from
    # their slice (on average 17/24 of 10 s) + 8 s
    assert cli.main(["status", "--model", "m", "--json"]) == 0
    shown = capsys.readouterr()
    est = json.loads(shown.out.strip().splitlines()[-1])["erasure_estimate"]
    assert est["full_retrain_seconds"] == pytest.approx(48.0)
    assert est["one_erasure_seconds"] == pytest.approx(10.0 * 17 / 24 + 8.0, rel=0.05)
    assert est["full_basis"] == "extrapolated from the shards' training rate"
    assert "WARNING" not in shown.err

    # a measured monolithic run of 6 s (+ 4 s start-up) on the same rows: an erasure
    # now costs more than retraining everything, and the user is told so
    assert cli.main(["calibrate", "--model", "m", "--seconds", "6", "--rows", "320"]) == 0
    assert cli.main(["calibrate", "--model", "m", "--seconds", "6", "--rows", "320"]) == 0
    shown = capsys.readouterr()
    assert "A full retrain is now estimated at 14.0 s (measured)" in shown.out
    assert "WARNING" in shown.err and "lethe recommend" in shown.err
    assert cli.main(["status", "--model", "m"]) == 0
    shown = capsys.readouterr()
    assert "Measured full retrain: 6.0 s of training on 320 rows." in shown.out
    assert "against 14.0 s for a full retrain (measured)" in shown.out
    assert "WARNING" in shown.err
    assert not shown.out.lstrip().startswith("{")  # for people, not a JSON dump

    # recommend from the model: its rows, measured seconds and start-up
    assert cli.main(["recommend", "--model", "m", "--requests-per-day", "10", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (rec["rows"], rec["full_train_seconds"], rec["run_overhead_seconds"]) == (
        320,
        6.0,
        8.0,
    )
    assert rec["train_seconds_basis"] == "measured"
    assert rec["current"]["shards"] == 4 and rec["current"]["slices"] == 8
    assert rec["recommended"]["shards"] == 1  # 8 s start-up against 6 s of training

    assert cli.main(["calibrate", "--model", "m", "--seconds", "6"]) == 2
    assert "--rows" in capsys.readouterr().err


def test_erase_output_for_people(capsys: pytest.CaptureFixture[str]) -> None:
    from lethe.core.cost import Cost

    result = {
        "model": "m",
        "requests": 1,
        "records_erased": 40,
        "shards_retrained": 1,
        "generation_before": 3,
        "generation_after": 5,
        "accuracy_after": 0.9712,
        "timings": {"time_to_forget_seconds": 0.0521, "erasure_seconds": 13.14159},
        "cost": Cost(13.1, 0.0, 0.000175, 0.0020667).to_json(),
        "estimate": {"full_seconds": 155.0, "full_basis": "measured"},
        "certificates": {"u": "m/certificates/u.json"},
    }
    result["accounting"] = cli._accounting(result)
    assert result["accounting"]["speedup"] == pytest.approx(155.0 / 13.14159, abs=1e-3)
    cli.show_erase(result)
    text = capsys.readouterr().out
    assert "Erased 40 record(s) for 1 request(s)" in text
    assert "erasure 13.1 s" in text and "a full retrain 2.6 min (measured): 11.8x" in text
    assert "Cost $0.00017 against $0.0021 for a full retrain: 11.8x." in text
    assert "lethe verify m/certificates/u.json" in text
    assert "0.000175" not in text and "13.14159" not in text
    assert cli._accounting({**result, "estimate": {"full_seconds": 1.0, "speedup": 3}}) is None
