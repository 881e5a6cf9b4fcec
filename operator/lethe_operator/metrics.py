"""Prometheus metrics of the operator, in base units (seconds, USD).

Labels stay low-cardinality: namespace, model, result. Never a subject id.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LABELS = ("namespace", "model")
LATENCY_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)
FORGET_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)

requests_total = Counter(
    "lethe_erasure_requests_total", "Finished erasure requests", (*LABELS, "result")
)
time_to_forget = Histogram(
    "lethe_time_to_forget_seconds",
    "Request created to its shards quarantined",
    LABELS,
    buckets=FORGET_BUCKETS,
)
latency = Histogram(
    "lethe_erasure_latency_seconds",
    "Request created to Succeeded (retrained, purged, certified)",
    LABELS,
    buckets=LATENCY_BUCKETS,
)
retrain_duration = Histogram(
    "lethe_retrain_duration_seconds",
    "A batch formed to its shards retrained and committed (Ray job start-up included)",
    LABELS,
    buckets=LATENCY_BUCKETS,
)
cpu_seconds = Counter(
    "lethe_retrain_cpu_seconds_total", "CPU-seconds allocated to retrains", LABELS
)
gpu_seconds = Counter(
    "lethe_retrain_gpu_seconds_total", "GPU-seconds allocated to retrains", LABELS
)
cost_usd = Counter("lethe_retrain_cost_usd_total", "USD spent on retrains", LABELS)
full_retrain_usd = Counter(
    "lethe_full_retrain_cost_usd_total", "USD full retrains would have cost instead", LABELS
)
shards_retrained = Counter("lethe_shards_retrained_total", "Shards retrained", LABELS)
slices_retrained = Counter("lethe_slices_retrained_total", "Slices retrained", LABELS)
records_erased = Counter("lethe_records_erased_total", "Records erased", LABELS)
pending = Gauge(
    "lethe_pending_requests",
    "Requests whose erasure is not certified yet (failed retrains awaiting a retry included)",
    LABELS,
)
quarantined = Gauge("lethe_quarantined_shards", "Shards out of service", LABELS)
deadline_left = Gauge(
    "lethe_nearest_deadline_seconds",
    "Seconds left to the nearest deadline of a request not certified yet "
    "(the policy's whole deadline when none is pending)",
    LABELS,
)

_PER_MODEL = (
    time_to_forget,
    latency,
    retrain_duration,
    cpu_seconds,
    gpu_seconds,
    cost_usd,
    full_retrain_usd,
    shards_retrained,
    slices_retrained,
    records_erased,
)


def track(namespace: str, model: str) -> None:
    """Create a model's series at zero before its first erasure.

    Prometheus' increase()/rate() cannot see the jump of a series that appears with its
    first value already counted, so a model's first erasure would read as 0 USD and its
    latency quantiles as NaN. Touching every child once makes them start from 0.
    """
    for m in _PER_MODEL:
        m.labels(namespace, model)
    for result in ("succeeded", "failed"):
        requests_total.labels(namespace, model, result)
