"""Prometheus metrics of the operator, in base units (seconds, USD).

Labels stay low-cardinality: namespace, model, result. Never a subject id.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

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


# -- counted once ------------------------------------------------------------------------
# A model's tick can run the same step again: its status patch failed (a conflict, the
# API unwell) and the next tick sees the state before it. What a step adds to a counter
# or a histogram is keyed by what it is about (a batch id, a request uid) and added
# only the first time this process sees the key. Across a restart "counted" is read
# from status (a request's target is Succeeded once its share was counted, see
# ``control``), so a new process does not count what the old one reported.
_SEEN_MAX = 100_000  # keys remembered (the oldest are forgotten first)
_seen: OrderedDict[tuple[str, ...], None] = OrderedDict()
_seen_lock = threading.Lock()


def first_time(*key: str) -> bool:
    """True the first time this process asks about ``key``, False every time after."""
    with _seen_lock:
        if key in _seen:
            _seen.move_to_end(key)
            return False
        _seen[key] = None
        while len(_seen) > _SEEN_MAX:
            _seen.popitem(last=False)
        return True
