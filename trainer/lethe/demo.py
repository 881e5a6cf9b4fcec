"""``lethe demo`` / ``make demo``: the embedded default, end to end on one machine.

Starts SeaweedFS and a Ray head (unless a stack is already configured), ingests
scikit-learn's bundled digits (1,797 real 8x8 images) spread over synthetic people,
trains a SISA ensemble of small CNNs on Ray Train, erases one person, retrains a
monolithic model on the remaining data for comparison, verifies the certificate
and prints a report. Everything it started is stopped at the end.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from rich.console import Console
from rich.table import Table

from lethe import localstack
from lethe.core.config import ModelConfig, TrainerConfig
from lethe.core.plan import ErasureRequest
from lethe.datasets import PEOPLE, TEST_FRACTION, digits_table
from lethe.erasure import Engine, request_uid
from lethe.ingest import ingest_table
from lethe.layout import ModelLayout
from lethe.predict import ensemble_accuracy
from lethe.store import S3Settings, Store
from lethe.training import RayTrainer, train_model
from lethe.verify import verify

SHARDS, SLICES = 5, 4


def demo_config(name: str, shards: int, slices: int) -> ModelConfig:
    return ModelConfig(
        name=name,
        shards=shards,
        slices=slices,
        trainer=TrainerConfig(
            model="cnn",
            input_shape=(1, 8, 8),
            epochs=30,
            batch_size=32,
            learning_rate=2e-3,
            hidden=128,
            seed=1,
        ),
        test_fraction=TEST_FRACTION,
    )


def run_demo(json_mode: bool = False, keep: bool = False) -> dict[str, Any]:
    console = Console(stderr=True, highlight=False)
    state_dir = Path(tempfile.mkdtemp(prefix="lethe-demo-"))
    started = not os.environ.get("LETHE_S3_ENDPOINT")
    try:
        with console.status("starting SeaweedFS and a Ray head"):
            if started:
                localstack.up(state_dir, bucket="lethe-demo")
        store = Store(S3Settings.from_env())
        store.ensure_bucket()
        trainer = RayTrainer(store.settings)
        tag = time.strftime("%Y%m%d-%H%M%S")
        table, subject = digits_table()
        layout = ModelLayout.of(f"digits-{tag}")

        def step(msg: str) -> None:
            console.print(f"[bold cyan]{'demo':>10}[/bold cyan]  {msg}")

        step(
            f"ingesting {table.num_rows} digit images of {PEOPLE} people "
            f"into {SHARDS} shards x {SLICES} slices"
        )
        gen = ingest_table(
            store, layout, table, demo_config(layout.prefix.split("/")[-1], SHARDS, SLICES)
        )
        step("training the SISA ensemble on Ray Train (shards run concurrently)")
        t0 = time.time()
        gen, _ = train_model(store, layout, trainer)
        train_seconds = time.time() - t0
        accuracy_before = gen.accuracy
        step(f"trained in {train_seconds:.1f}s, test accuracy {accuracy_before:.3f}")

        step("erasing one person (40 images)")
        engine = Engine(
            store,
            layout,
            trainer,
            evaluate=lambda g: ensemble_accuracy(store, g),
            progress=lambda s, m: console.print(f"[bold magenta]{s:>10}[/bold magenta]  {m}"),
        )
        result = engine.erase(
            [ErasureRequest(request_uid(layout.prefix, [subject], []), (subject,))]
        )
        cert_key = next(iter(result["certificates"].values()))

        step("for comparison: retraining one monolithic model on the remaining data")
        remaining = table.filter(pa.compute.not_equal(table.column("subject_id"), subject))
        full_layout = ModelLayout.of(f"digits-full-{tag}")
        ingest_table(
            store, full_layout, remaining, demo_config(full_layout.prefix.split("/")[-1], 1, 1)
        )
        t0 = time.time()
        full_gen, _ = train_model(store, full_layout, trainer)
        full_seconds = time.time() - t0

        step("verifying the certificate independently against S3")
        verdict = verify(store, store.get_json(cert_key))
        t = result["timings"]
        report = {
            "records": table.num_rows,
            "shards": SHARDS,
            "slices": SLICES,
            "records_erased": result["records_erased"],
            "shards_retrained": result["shards_retrained"],
            "time_to_forget_seconds": round(t["time_to_forget_seconds"], 3),
            "erasure_seconds": round(t["erasure_seconds"], 3),
            "full_retrain_seconds": round(full_seconds, 3),
            "speedup": round(full_seconds / t["erasure_seconds"], 3),
            "accuracy_before": accuracy_before,
            "accuracy_after": result["accuracy_after"],
            "accuracy_full_retrain": full_gen.accuracy,
            "certificate": f"s3://{store.bucket}/{cert_key}",
            "verified": verdict.ok,
            "verify_checks": verdict.checks,
            "cost_usd": result["cost"]["usd"],
            "full_retrain_usd_estimate": result["cost"]["full_retrain_usd"],
            "initial_training_seconds": round(train_seconds, 3),
        }
        for f in verdict.failures:
            console.print(f"[red]FAIL[/red] {f}")
        _print_report(console, report)
        return report
    finally:
        if started and not keep:
            localstack.down(state_dir)


def _print_report(console: Console, r: dict[str, Any]) -> None:
    t = Table(title="Lethe demo: one erasure, end to end", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("records / shards x slices", f"{r['records']} / {r['shards']} x {r['slices']}"),
        ("records erased", str(r["records_erased"])),
        ("shards retrained", f"{r['shards_retrained']} of {r['shards']}"),
        ("time to forget (quarantined)", f"{r['time_to_forget_seconds']:.2f} s"),
        ("erasure (retrained, committed)", f"{r['erasure_seconds']:.2f} s"),
        ("full retrain, same run", f"{r['full_retrain_seconds']:.2f} s"),
        ("speed-up", f"{r['speedup']:.2f}x"),
        (
            "accuracy before / after / full",
            f"{r['accuracy_before']:.3f} / "
            f"{r['accuracy_after']:.3f} / {r['accuracy_full_retrain']:.3f}",
        ),
        ("certificate", r["certificate"]),
        ("verified", "[green]yes[/green]" if r["verified"] else "[red]NO[/red]"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
