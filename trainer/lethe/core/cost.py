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
