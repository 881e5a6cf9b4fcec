"""Resource usage of a retrain and what it cost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lethe.core.config import Prices


@dataclass
class ShardRun:
    """One shard's Ray Train run. ``cpu_seconds``/``gpu_seconds`` are allocated
    resources times wall time, which is what a cloud bill charges."""

    shard: int
    run_id: str
    first_slice: int
    wall_seconds: float
    cpu_seconds: float
    gpu_seconds: float
    slices_trained: int = 0
    train_seconds: float = 0.0  # inside the worker, optimiser steps only
    peak_rss_bytes: int = 0
    attempt: str = ""  # one Ray Train run; a retried or killed run is another attempt
    submitted_at: float = 0.0
    finished: bool = True  # False: the run's last report before it ended or was killed

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardRun:
        return cls(**d)


@dataclass
class Cost:
    cpu_seconds: float
    gpu_seconds: float
    usd: float
    full_retrain_usd: float  # what retraining the monolithic model would have cost

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def total_cost(
    runs: list[ShardRun],
    prices: Prices,
    full_retrain_cpu_seconds: float,
    full_retrain_gpu_seconds: float,
) -> Cost:
    cpu = sum(r.cpu_seconds for r in runs)
    gpu = sum(r.gpu_seconds for r in runs)
    return Cost(
        cpu_seconds=cpu,
        gpu_seconds=gpu,
        usd=prices.usd(cpu, gpu),
        full_retrain_usd=prices.usd(full_retrain_cpu_seconds, full_retrain_gpu_seconds),
    )


def ratio(whole: float, part: float) -> float | None:
    """A speed-up, rounded for reading; None where there is nothing to divide by."""
    return round(whole / part, 3) if part > 0 else None


def accounting(
    erasure_seconds: float, full_seconds: float, full_basis: str, cost: Cost
) -> dict[str, Any]:
    """An erasure against a full retrain, like against like: measured wall seconds
    (request to shards back in service) against the full retrain's estimated seconds
    (training plus its run's start-up), and USD against USD."""
    return {
        "erasure_seconds": erasure_seconds,
        "full_retrain_seconds": full_seconds,
        "full_retrain_basis": full_basis,
        "speedup": ratio(full_seconds, erasure_seconds),
        "erasure_usd": cost.usd,
        "full_retrain_usd": cost.full_retrain_usd,
        "speedup_usd": ratio(cost.full_retrain_usd, cost.usd),
    }
