"""Calibrating a model's full-retrain estimate with a measured monolithic run.

Without a measurement, a full retrain's seconds are extrapolated from the shards'
training rate, and small shards train at another rate than one big model (the
benchmark's extrapolation was 4x the measured run). A measured run of one model
(S=1, R=1) on all the training data, with the same trainer, is recorded on the live
generation and carried to every successor; cost estimates then scale it by rows.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from lethe.core.manifest import Generation, Monolithic
from lethe.errors import UserError
from lethe.generations import read_live, update
from lethe.layout import ModelLayout
from lethe.store import Store


class CalibrationError(UserError, ValueError):
    """The measurement cannot calibrate this model; the message says why."""


def record_monolithic(
    store: Store,
    layout: ModelLayout,
    seconds: float,
    rows: int,
    overhead_seconds: float | None = None,
    measured_at: float | None = None,
) -> Generation:
    """Record a measured monolithic run on the model (a new generation, by CAS):
    ``seconds`` of in-worker training on ``rows`` training rows, and the run's fixed
    start-up if known. Recording the same measurement again changes nothing."""
    try:
        m = Monolithic(
            float(seconds),
            int(rows),
            None if overhead_seconds is None else float(overhead_seconds),
            time.time() if measured_at is None else float(measured_at),
        )
    except ValueError as e:
        raise CalibrationError(str(e)) from None

    def change(g: Generation) -> Generation | None:
        if g.monolithic == m:
            return None
        nxt = g.successor("calibrate")
        nxt.monolithic = m
        return nxt

    return update(store, layout, change).generation


def _timing(gen: Generation) -> dict[str, object]:
    """The trainer settings that decide how long training takes (the seed does not)."""
    return {k: v for k, v in asdict(gen.config.trainer).items() if k != "seed"}


def measured_by(store: Store, layout: ModelLayout, model: ModelLayout) -> Monolithic:
    """The measurement a trained monolithic model (``layout``: S=1, R=1, the same
    trainer as ``model``) gives: its run's training seconds, start-up and rows."""
    mono = read_live(store, layout).generation
    target = read_live(store, model).generation
    if len(mono.shards) != 1 or mono.config.slices != 1:
        raise CalibrationError(
            f"{layout.prefix} has {len(mono.shards)} shard(s) x {mono.config.slices} "
            "slice(s): a monolithic model has one of each"
        )
    if _timing(mono) != _timing(target):
        raise CalibrationError(
            f"{layout.prefix} was trained with another trainer configuration than "
            f"{model.prefix}: its seconds would not say what a full retrain costs"
        )
    shard = mono.shards[0]
    if not shard.trained or shard.train_seconds <= 0:
        raise CalibrationError(f"{layout.prefix} has no recorded training run (lethe train)")
    return Monolithic(
        shard.train_seconds,
        shard.rows,
        shard.overhead_seconds if shard.overhead_seconds > 0 else None,
        mono.created,
    )


def record_from_model(store: Store, layout: ModelLayout, monolithic: ModelLayout) -> Generation:
    """Calibrate ``layout`` with the run of a trained monolithic model (``measured_by``)."""
    m = measured_by(store, monolithic, layout)
    return record_monolithic(
        store, layout, m.train_seconds, m.rows, m.overhead_seconds, m.measured_at
    )
