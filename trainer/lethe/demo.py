"""``lethe demo`` / ``make demo``: the embedded default, end to end on one machine.

Starts SeaweedFS and a Ray head (unless a stack is already configured), a private
kube-apiserver with etcd, and the operator; ``kubectl apply``s the example
ShardedModel (scikit-learn's bundled digits, 1,797 real 8x8 images spread over
synthetic people; a SISA ensemble of small CNNs trained as a Ray job) and then the
example ErasureRequest for one person, and follows it to Succeeded. Then it retrains
a monolithic model on the remaining data for comparison, verifies the certificate
and prints a report. ``--engine`` does the same erasure with the engine in this
process, without Kubernetes. Everything it started is stopped at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml
from rich.console import Console
from rich.table import Table

from lethe import localstack
from lethe.core.config import ModelConfig, TrainerConfig
from lethe.core.plan import ErasureRequest
from lethe.datasets import PEOPLE, TEST_FRACTION, digits_table
from lethe.erasure import Engine, request_uid
from lethe.generations import read_live
from lethe.ingest import ingest_table
from lethe.layout import ModelLayout
from lethe.localstack import free_port
from lethe.predict import ensemble_accuracy
from lethe.store import S3Settings, Store
from lethe.training import RayTrainer, train_model
from lethe.verify import verify

SHARDS, SLICES = 5, 4  # as in examples/shardedmodel-digits.yaml
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


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


def run_demo(json_mode: bool = False, keep: bool = False, engine: bool = False) -> dict[str, Any]:
    """The demo: through the operator (default) or the engine alone (``engine``)."""
    console = Console(stderr=True, highlight=False)
    state_dir = Path(tempfile.mkdtemp(prefix="lethe-demo-"))
    started = not os.environ.get("LETHE_S3_ENDPOINT")

    def step(msg: str) -> None:
        console.print(f"[bold cyan]{'demo':>10}[/bold cyan]  {msg}")

    try:
        with console.status("starting SeaweedFS and a Ray head"):
            if started:
                localstack.up(state_dir, bucket="lethe-demo")
        if not os.environ.get("LETHE_KEYS_DIR"):  # the certificates' signing and HMAC keys
            os.environ["LETHE_KEYS_DIR"] = str(localstack.ensure_keys(state_dir))
        store = Store(S3Settings.from_env())
        store.ensure_bucket()
        table, subject = digits_table()
        tag = time.strftime("%Y%m%d-%H%M%S")
        step(
            f"{table.num_rows} digit images of {PEOPLE} people, "
            f"{SHARDS} shards x {SLICES} slices; the person to erase owns 40 of them"
        )
        if engine:
            erased = _erase_with_engine(console, step, store, table, subject, tag)
        else:
            erased = _erase_through_operator(step, store, state_dir, tag)

        step("for comparison: retraining one monolithic model on the remaining data")
        trainer = RayTrainer(store.settings)
        remaining = table.filter(pa.compute.not_equal(table.column("subject_id"), subject))
        full_layout = ModelLayout.of(f"digits-full-{tag}")
        ingest_table(
            store, full_layout, remaining, demo_config(full_layout.prefix.split("/")[-1], 1, 1)
        )
        t0 = time.time()
        full_gen, _ = train_model(store, full_layout, trainer)
        full_seconds = time.time() - t0

        step("verifying the certificate independently against S3")
        verdict = verify(store, store.get_json(erased["certificate_key"]))
        report = {
            "path": "engine" if engine else "operator",
            "records": table.num_rows,
            "shards": SHARDS,
            "slices": SLICES,
            **{k: v for k, v in erased.items() if k != "certificate_key"},
            "full_retrain_seconds": round(full_seconds, 3),
            "speedup": round(full_seconds / erased["erasure_seconds"], 3),
            "accuracy_full_retrain": full_gen.accuracy,
            "certificate": f"s3://{store.bucket}/{erased['certificate_key']}",
            "verified": verdict.ok,
            "verify_checks": verdict.checks,
        }
        for f in verdict.failures:
            console.print(f"[red]FAIL[/red] {f}")
        _print_report(console, report)
        return report
    finally:
        if started and not keep:
            localstack.down(state_dir)


def _erase_with_engine(
    console: Console, step: Any, store: Store, table: pa.Table, subject: str, tag: str
) -> dict[str, Any]:
    """Ingest, train and erase in this process (no Kubernetes)."""
    trainer = RayTrainer(store.settings)
    layout = ModelLayout.of(f"digits-{tag}")
    ingest_table(store, layout, table, demo_config(layout.prefix.split("/")[-1], SHARDS, SLICES))
    step("training the SISA ensemble on Ray Train (shards run concurrently)")
    t0 = time.time()
    gen, _ = train_model(store, layout, trainer)
    train_seconds = time.time() - t0
    step(f"trained in {train_seconds:.1f}s, test accuracy {gen.accuracy:.3f}")
    step("erasing one person (40 images)")
    engine = Engine(
        store,
        layout,
        trainer,
        evaluate=lambda g: ensemble_accuracy(store, g),
        progress=lambda s, m: console.print(f"[bold magenta]{s:>10}[/bold magenta]  {m}"),
    )
    result = engine.erase([ErasureRequest(request_uid(layout.prefix, [subject], []), (subject,))])
    t = result["timings"]
    return {
        "records_erased": result["records_erased"],
        "shards_retrained": result["shards_retrained"],
        "time_to_forget_seconds": round(t["time_to_forget_seconds"], 3),
        "erasure_seconds": round(t["erasure_seconds"], 3),
        "accuracy_before": gen.accuracy,
        "accuracy_after": result["accuracy_after"],
        "cost_usd": result["cost"]["usd"],
        "full_retrain_usd_estimate": result["cost"]["full_retrain_usd"],
        "initial_training_seconds": round(train_seconds, 3),
        "certificate_key": next(iter(result["certificates"].values())),
    }


def _kubectl(kubeconfig: str, *args: str, stdin: str | None = None) -> str:
    from lethe.kubestack import kubectl

    r = kubectl(kubeconfig, *args, stdin=stdin)
    if r.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def _erase_through_operator(step: Any, store: Store, state_dir: Path, tag: str) -> dict[str, Any]:
    """A private kube-apiserver + etcd and the operator; ``kubectl apply`` the examples."""
    from lethe import kubestack

    kube = kubestack.start(state_dir / "kube")
    cfg = kube.kubeconfig
    op = kubestack.spawn_operator(cfg, free_port(), state_dir / "operator.log")
    try:
        step(f"kube-apiserver and the operator are up (operator log {state_dir}/operator.log)")
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            # opted in for ShardedModels by the namespace's admin (here: the demo)
            "metadata": {"name": "lethe-s3", "labels": {"lethe.dev/s3-credentials": "true"}},
            "stringData": {
                k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
            },
        }
        _kubectl(cfg, "apply", "-f", "-", stdin=json.dumps(secret))
        # The example as it is, pointed at this machine's S3 and Ray; the demo does not
        # wait for other requests to share its batch.
        model = yaml.safe_load((EXAMPLES / "shardedmodel-digits.yaml").read_text())
        spec = model["spec"]
        spec["storage"].update(
            bucket=store.bucket, endpoint=store.settings.endpoint, prefix=f"demo-{tag}"
        )
        spec["ray"]["address"] = os.environ["RAY_DASHBOARD_ADDRESS"]
        spec["erasurePolicy"]["batchWindowSeconds"] = 0
        _kubectl(cfg, "apply", "-f", "-", stdin=json.dumps(model))
        name = model["metadata"]["name"]
        step(
            f"kubectl apply: ShardedModel {name} (the operator ingests it, trains it as a Ray job)"
        )
        t0 = time.time()
        _wait_for(cfg, "shardedmodel", name, lambda st: _condition(st, "Ready"), 900)
        train_seconds = time.time() - t0
        layout = ModelLayout.of(f"default.{name}", spec["storage"]["prefix"])
        accuracy_before = read_live(store, layout).generation.accuracy
        step(f"trained in {train_seconds:.1f}s, test accuracy {accuracy_before}")

        request = EXAMPLES / "erasurerequest-subjects.yaml"
        req_name = yaml.safe_load(request.read_text())["metadata"]["name"]
        step(f"kubectl apply -f examples/{request.name}")
        applied = time.time()
        _kubectl(cfg, "apply", "-f", str(request))
        seen: dict[str, float] = {}

        def progress(st: dict[str, Any]) -> bool:
            ph = st.get("phase", "")
            if ph and ph not in seen:
                seen[ph] = time.time() - applied
                step(f"  {ph:<12} after {seen[ph]:6.2f}s")
            if ph == "Failed":
                raise RuntimeError(f"the erasure failed: {st.get('reason')}: {st.get('message')}")
            return ph == "Succeeded"

        _wait_for(cfg, "erasurerequest", req_name, progress, 900, every=0.1)
        st = json.loads(_kubectl(cfg, "get", "erasurerequest", req_name, "-o", "json"))["status"]
        print(_kubectl(cfg, "get", "erasurerequests", "-o", "wide"), end="", file=sys.stderr)
        return {
            "records_erased": st["affectedRecords"],
            "shards_retrained": len(st["affectedShards"]),
            "time_to_forget_seconds": round(min(seen.get(p, 1e9) for p in FORGOTTEN), 3),
            "erasure_seconds": round(seen["Succeeded"], 3),
            "accuracy_before": accuracy_before,
            "accuracy_after": read_live(store, layout).generation.accuracy,
            "cost_usd": st["cost"]["usd"],
            "full_retrain_usd_estimate": st["cost"]["fullRetrainUSD"],
            "initial_training_seconds": round(train_seconds, 3),
            "certificate_key": st["certificate"].split("/", 3)[3],
        }
    finally:
        op.terminate()
        try:
            op.wait(20)
        except subprocess.TimeoutExpired:
            op.kill()
        kubestack.stop(state_dir / "kube")


# phases in which the person's shards are already out of service
FORGOTTEN = ("Quarantined", "DataErased", "Retraining", "Succeeded")


def _condition(status: dict[str, Any], type_: str) -> bool:
    return any(c["type"] == type_ and c["status"] == "True" for c in status.get("conditions", []))


def _wait_for(
    kubeconfig: str,
    kind: str,
    name: str,
    done: Any,
    timeout: float,
    every: float = 1.0,
) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        obj = json.loads(_kubectl(kubeconfig, "get", kind, name, "-o", "json"))
        if done(obj.get("status") or {}):
            return
        time.sleep(every)
    raise TimeoutError(f"{kind} {name}: not done after {timeout:.0f}s")


def _print_report(console: Console, r: dict[str, Any]) -> None:
    t = Table(title="Lethe demo: one erasure, end to end", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("records / shards x slices", f"{r['records']} / {r['shards']} x {r['slices']}"),
        ("records erased", str(r["records_erased"])),
        ("shards retrained", f"{r['shards_retrained']} of {r['shards']}"),
        ("path", r["path"]),
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
