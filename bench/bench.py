"""``make bench``: SISA erasure against full retraining, measured side by side in one run.

A synthetic Purchase-like dataset (binary features, 100 classes, a few records per
person) is ingested for every S x R in the grid; each ensemble is trained on Ray
Train, then one batch with one subject and one batch with K subjects are erased.
A monolithic model (S=1, R=1) retrained on the remaining data with the same
trainer, the same Ray cluster and the same per-worker resources gives the
full-retrain time and accuracy. Results go to bench/results/latest.json and a
Markdown table to bench/results/latest.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lethe import localstack
from lethe.core.config import ModelConfig, TrainerConfig
from lethe.core.hashing import is_test_subject
from lethe.core.plan import ErasureRequest, expected_shards_touched, ideal_speedup
from lethe.erasure import Engine, request_uid
from lethe.ingest import ingest_table
from lethe.layout import ModelLayout
from lethe.predict import ensemble_accuracy
from lethe.store import S3Settings, Store
from lethe.training import RayTrainer, train_model

RESULTS = Path(__file__).parent / "results"


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


def trainer_config(args: argparse.Namespace) -> TrainerConfig:
    return TrainerConfig(
        model="mlp",
        epochs=args.epochs,
        batch_size=128,
        learning_rate=1e-3,
        hidden=args.hidden,
        seed=3,
    )


def erase(
    store: Store, layout: ModelLayout, trainer: RayTrainer, subjects: list[str]
) -> dict[str, Any]:
    engine = Engine(store, layout, trainer, evaluate=lambda g: ensemble_accuracy(store, g))
    base_rss = reset_peak_rss()
    t0 = time.perf_counter()
    result = engine.erase(
        [ErasureRequest(request_uid(layout.prefix, [s], []), (s,)) for s in subjects]
    )
    wall = time.perf_counter() - t0
    runs = result["shard_runs"]
    slowest_training = max((r["train_seconds"] for r in runs), default=0.0)
    # Erasure time: request to the retrained shards back in service (as in the demo and
    # the certificate); the purge and the certificate come after, counted in total_seconds.
    to_commit = result["timings"]["erasure_seconds"]
    return {
        "erasure_seconds": to_commit,
        "total_seconds": wall,
        "time_to_forget_seconds": result["timings"]["time_to_forget_seconds"],
        "shards_retrained": result["shards_retrained"],
        "records_erased": result["records_erased"],
        "training_seconds_critical_path": slowest_training,
        "ray_run_seconds_critical_path": max((r["wall_seconds"] for r in runs), default=0.0),
        "overhead_seconds": to_commit - slowest_training,
        "accuracy_after": result["accuracy_after"],
        # what the erasure path added on top of this process (which holds the dataset)
        "driver_peak_rss_mb": (_status("VmHWM") - base_rss) / 2**20,
        "worker_peak_rss_mb": max((r["peak_rss_bytes"] for r in runs), default=0) / 2**20,
        "cpu_seconds": result["cost"]["cpu_seconds"],
        "usd": result["cost"]["usd"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--records", type=int, default=150_000)
    p.add_argument("--features", type=int, default=600)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per-subject", type=int, default=4)
    p.add_argument("--epochs", type=float, default=40)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--shards", default="4,8,16")
    p.add_argument("--slices", default="1,4,8")
    p.add_argument("--k", type=int, default=8, help="subjects in the batched request")
    p.add_argument("--singles", type=int, default=3, help="one-subject requests to average for K=1")
    p.add_argument("--out", default=str(RESULTS / "latest.json"))
    p.add_argument("--quick", action="store_true", help="a tiny grid to check the harness")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the stack is stopped
    if args.quick:
        args.records, args.epochs, args.hidden = 8000, 4, 128
        args.shards, args.slices = "4", "1,4"
    shard_grid = [int(s) for s in args.shards.split(",")]
    slice_grid = [int(s) for s in args.slices.split(",")]

    state = Path(tempfile.mkdtemp(prefix="lethe-bench-"))
    localstack.up(state, bucket="lethe-bench")
    out: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "dataset": {
            "records": args.records,
            "features": args.features,
            "classes": args.classes,
            "records_per_subject": args.per_subject,
        },
        "trainer": {
            "model": "mlp",
            "hidden": args.hidden,
            "epochs": args.epochs,
            "workers_per_shard": 1,
            "cpus_per_worker": 1,
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": [],
    }
    try:
        store = Store(S3Settings.from_env())
        trainer = RayTrainer(store.settings)
        table = purchase_like(args.records, args.features, args.classes, args.per_subject, 11)
        train_subjects = sorted(
            {s for s in table.column("subject_id").to_pylist() if not is_test_subject(s, 0.2)}
        )
        rng = np.random.default_rng(5)
        chosen = [str(s) for s in rng.choice(train_subjects, args.singles + args.k, replace=False)]
        singles, batch = chosen[: args.singles], chosen[args.singles :]

        # The monolithic baseline, retrained on the data left after both erasures.
        remaining = table.filter(
            pa.compute.invert(
                pa.compute.is_in(table.column("subject_id"), value_set=pa.array(chosen))
            )
        )
        full = ModelLayout.of("bench-full")
        ingest_table(store, full, remaining, ModelConfig("bench-full", 1, 1, trainer_config(args)))
        t0 = time.perf_counter()
        full_gen, _ = train_model(store, full, trainer)
        full_seconds = time.perf_counter() - t0
        out["full_retrain"] = {"seconds": full_seconds, "accuracy": full_gen.accuracy}
        print(f"full retrain: {full_seconds:.1f}s accuracy {full_gen.accuracy:.4f}", flush=True)

        for S in shard_grid:
            for R in slice_grid:
                name = f"bench-s{S}-r{R}"
                layout = ModelLayout.of(name)
                ingest_table(store, layout, table, ModelConfig(name, S, R, trainer_config(args)))
                t0 = time.perf_counter()
                gen, _ = train_model(store, layout, trainer)
                sisa_train = time.perf_counter() - t0
                # K=1: several one-person requests, one after another, averaged (where a
                # person sits among the slices decides how much is retrained); K=k: one batch.
                for k, groups in ((1, [[s] for s in singles]), (args.k, [batch])):
                    ms = [erase(store, layout, trainer, g) for g in groups]
                    m = {key: sum(x[key] for x in ms) / len(ms) for key in ms[0]}
                    m["repeats"] = len(ms)
                    ideal = ideal_speedup(S, R)
                    ideal_k = ideal / expected_shards_touched(S, k) if k > 1 else ideal
                    speedup = full_seconds / m["erasure_seconds"]
                    row = {
                        "shards": S,
                        "slices": R,
                        "subjects": k,
                        "sisa_training_seconds": sisa_train,
                        "full_retrain_seconds": full_seconds,
                        "speedup": speedup,
                        "ideal_speedup": ideal_k,
                        "efficiency": speedup / ideal_k,
                        "ensemble_accuracy": gen.accuracy,
                        "monolithic_accuracy": full_gen.accuracy,
                        **m,
                    }
                    out["runs"].append(row)
                    print(
                        json.dumps(
                            {
                                k2: (round(v, 3) if isinstance(v, float) else v)
                                for k2, v in row.items()
                            }
                        ),
                        flush=True,
                    )
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.out).write_text(json.dumps(out, indent=1))
    finally:
        localstack.down(state)
    out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    Path(args.out).write_text(json.dumps(out, indent=1))
    md = markdown(out)
    Path(args.out).with_suffix(".md").write_text(md)
    print(md)
    return 0


def markdown(out: dict[str, Any]) -> str:
    head = (
        "| S | R | K | erasure s | full retrain s | speed-up | ideal | efficiency | "
        "overhead s | shards retrained | ensemble acc | monolithic acc | "
        "worker peak MB | driver peak MB |\n" + "|---" * 14 + "|\n"
    )
    rows = "".join(
        f"| {r['shards']} | {r['slices']} | {r['subjects']} | {r['erasure_seconds']:.1f} | "
        f"{r['full_retrain_seconds']:.1f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.1f}x | "
        f"{r['efficiency']:.0%} | {r['overhead_seconds']:.1f} | {r['shards_retrained']} | "
        f"{r['ensemble_accuracy']:.3f} | {r['monolithic_accuracy']:.3f} | "
        f"{r['worker_peak_rss_mb']:.0f} | {r['driver_peak_rss_mb']:.0f} |\n"
        for r in out["runs"]
    )
    return head + rows


if __name__ == "__main__":
    sys.exit(main())
