"""``lethe demo`` / ``make demo``: the embedded default, end to end on one machine.

Starts SeaweedFS and a Ray head (unless a stack is already configured), a private
kube-apiserver with etcd, and the operator; ``kubectl apply``s the example
ShardedModel (scikit-learn's bundled digits, 1,797 real 8x8 images spread over
synthetic people; a SISA ensemble of CNNs trained as a Ray job). For comparison it
trains one monolithic model (the same trainer, one shard, one slice) on the data that
will remain after the erasure, and records that run on the ensemble as its measured
full retrain. Then it ``kubectl apply``s the example ErasureRequest for one person,
follows it to Succeeded, verifies the certificate and prints a report.
``--engine`` does the same erasure with the engine in this process, without
Kubernetes. Everything it started is stopped at the end.

The comparison, like against like as far as it goes, and never in the ensemble's
favour:

- *erasure*: from the request (``kubectl apply``) to the person's shards back in
  service, everything included: the operator's steps, plan, quarantine, patch, data
  purge, the retrain on the cluster's warm retrain service (handed over by its retrain
  agent, or a Ray job's driver when there is none), commit. The certificate comes a
  moment later and is reported beside it.
- *full retrain*: the monolithic model's Ray Train run on the same cluster's warm
  retrain service (its start-up on the lane and its training), without any control
  plane around it: no tick, no job driver, no ingest.

Ray's own output (worker start-up warnings and the like) goes to ``demo.log`` in the
demo's state directory, never to the terminal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import yaml
from rich.console import Console
from rich.table import Table

from lethe.calibration import record_from_model
from lethe.core.config import ModelConfig, TrainerConfig
from lethe.core.plan import ErasureRequest
from lethe.datasets import PEOPLE, TEST_FRACTION, digits_table
from lethe.erasure import Engine, request_uid
from lethe.generations import read_live
from lethe.ingest import ingest_table
from lethe.layout import ModelLayout
from lethe.store import S3Settings, Store
from lethe.training import RayTrainer, train_model
from lethe.verify import verify
from lethe_dev import localstack
from lethe_dev.localstack import free_port
from lethe_operator.batches import RequestPhase  # the phases the demo watches

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MODEL_EXAMPLE = EXAMPLES / "shardedmodel-digits.yaml"
REQUEST_EXAMPLE = EXAMPLES / "erasurerequest-subjects.yaml"

ERASURE_MEASURES = {
    "operator": "kubectl apply -> shards back in service: operator steps, plan, quarantine, "
    "patch, data purge, warm retrain (through the cluster's retrain agent), commit",
    "engine": "request -> shards back in service: plan, quarantine, patch, data purge, "
    "warm retrain, commit (the engine in this process)",
}
FULL_RETRAIN_MEASURES = (
    "one monolithic model on the remaining data: the same trainer's Ray Train run on "
    "the same warm retrain service (lane start-up + training; no tick, no job driver)"
)

T = TypeVar("T")


def example_model() -> dict[str, Any]:
    """The example ShardedModel the demo applies (its shape and trainer are the demo's)."""
    return dict(yaml.safe_load(MODEL_EXAMPLE.read_text()))


def example_subject() -> str:
    """The one person the example ErasureRequest erases."""
    (subject,) = yaml.safe_load(REQUEST_EXAMPLE.read_text())["spec"]["subjects"]
    return str(subject)


def demo_config(name: str, shards: int | None = None, slices: int | None = None) -> ModelConfig:
    """The example ShardedModel's model as a ModelConfig (for ``--engine``)."""
    spec = example_model()["spec"]
    t = spec["trainer"]
    return ModelConfig(
        name=name,
        shards=int(spec["shards"] if shards is None else shards),
        slices=int(spec["slices"] if slices is None else slices),
        trainer=TrainerConfig(
            model=t["model"],
            input_shape=tuple(t.get("inputShape", ())),
            epochs=float(t["epochs"]),
            batch_size=int(t["batchSize"]),
            learning_rate=float(t["learningRate"]),
            hidden=int(t["hidden"]),
            seed=int(t.get("seed", 0)),
        ),
        test_fraction=TEST_FRACTION,
    )


# -- output for people -----------------------------------------------------------------
def fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 100:
        return f"{s / 60:.1f} min"
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


def fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}x"


def fmt_acc(a: float | None) -> str:
    return "-" if a is None else f"{a:.3f}"


@contextlib.contextmanager
def _terminal_for_us_only(log: Path) -> Iterator[Console]:
    """While the demo runs, whatever this process (Ray's driver, its C++ core, Python
    warnings) writes to stdout or stderr goes to ``log``; only the returned console
    reaches the terminal (on stderr)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_err), "w", buffering=1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield Console(file=terminal, highlight=False)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        terminal.close()


def _in_background(console: Console, label: Callable[[], str], fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread while a spinner shows ``label()`` and the seconds so far."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = e

    thread = threading.Thread(target=target, name="lethe-demo-step", daemon=True)
    t0 = time.time()
    with console.status(label()) as status:
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            status.update(f"{label()}  [dim]{time.time() - t0:.0f} s[/dim]")
    if "error" in out:
        raise out["error"]
    return out["value"]  # type: ignore[no-any-return]


# -- the demo ----------------------------------------------------------------------------
def run_demo(json_mode: bool = False, keep: bool = False, engine: bool = False) -> dict[str, Any]:
    """The demo: through the operator (default) or the engine alone (``engine``)."""
    state_dir = Path(tempfile.mkdtemp(prefix="lethe-demo-"))
    with _terminal_for_us_only(state_dir / "demo.log") as console:
        try:
            return _run(console, state_dir, keep, engine)
        except BaseException:
            console.print(f"[red]the demo stopped[/red]; its logs are in {state_dir}")
            raise
        finally:
            # Ray's driver prints the cluster's warnings whenever they arrive: end it
            # while its output still goes to the log
            localstack.disconnect_ray()


def _run(console: Console, state_dir: Path, keep: bool, engine: bool) -> dict[str, Any]:
    started = not os.environ.get("LETHE_S3_ENDPOINT")
    t_demo = time.time()

    def step(msg: str) -> None:
        console.print(f"[bold cyan]{'demo':>10}[/bold cyan]  {msg}")

    try:
        if started:
            with console.status("starting SeaweedFS and a Ray head"):
                localstack.up(state_dir, bucket="lethe-demo")
            step(f"SeaweedFS and a Ray head are up (logs in {state_dir})")
        if not os.environ.get("LETHE_KEYS_DIR"):  # the certificates' signing and HMAC keys
            os.environ["LETHE_KEYS_DIR"] = str(localstack.ensure_keys(state_dir))
        store = Store(S3Settings.from_env())
        store.ensure_bucket()
        table, _ = digits_table()
        subject = example_subject()
        owned = int(pc.sum(pc.equal(table.column("subject_id"), subject)).as_py())
        spec = example_model()["spec"]
        t = spec["trainer"]
        step(
            f"{table.num_rows:,} digit images of {PEOPLE} people; a SISA ensemble of "
            f"{spec['shards']} shards x {spec['slices']} slices of CNNs ({t['epochs']} "
            f"epochs); the person to erase owns {owned} of the images"
        )
        remaining = table.filter(pc.not_equal(table.column("subject_id"), subject))
        tag = time.strftime("%Y%m%d-%H%M%S")
        if engine:
            erased = _erase_with_engine(console, step, store, table, remaining, subject, tag)
        else:
            erased = _erase_through_operator(console, step, store, state_dir, remaining, tag)

        cert = store.get_json(erased.pop("certificate_key"))
        verdict = _in_background(
            console,
            lambda: "verifying the certificate independently against S3",
            lambda: verify(store, cert),
        )
        for f in verdict.failures:
            console.print(f"[red]FAIL[/red] {f}")
        step(
            f"certificate verified: {len(verdict.checks)} checks hold"
            if verdict.ok
            else "[red]the certificate did NOT verify[/red]"
        )
        report = _report(erased, cert, verdict, engine)
        report["records"] = table.num_rows
        report["demo_seconds"] = round(time.time() - t_demo, 1)
        report["logs"] = str(state_dir)
        _print_report(console, report)
        return report
    finally:
        if started and not keep:
            with console.status("stopping the processes the demo started"):
                localstack.down(state_dir)


def _report(
    erased: dict[str, Any], cert: dict[str, Any], verdict: Any, engine: bool
) -> dict[str, Any]:
    erasure = erased["erasure_seconds"]
    full = erased["full_retrain_seconds"]
    acc = cert.get("accounting") or {}
    return {
        "path": "engine" if engine else "operator",
        **{k: v for k, v in erased.items() if not k.startswith("_")},
        "erasure_measures": ERASURE_MEASURES["engine" if engine else "operator"],
        "full_retrain_measures": FULL_RETRAIN_MEASURES,
        "speedup": round(full / erasure, 2) if erasure > 0 else None,
        "accuracy_gap_points": round(
            (erased["accuracy_full_retrain"] - erased["accuracy_after"]) * 100, 2
        ),
        "retrained_from_slice": min(
            (int(r["first_slice"]) for r in (cert.get("retrained") or {}).values()),
            default=None,
        ),
        "certificate": f"s3://{cert['bucket']}/{erased['certificate_path']}",
        "certificate_accounting": acc,
        "verified": verdict.ok,
        "verify_checks": verdict.checks,
    }


def _monolithic(
    console: Console,
    step: Callable[[str], None],
    store: Store,
    model: ModelLayout,
    remaining: pa.Table,
    trainer: RayTrainer,
) -> dict[str, Any]:
    """Train one model (the ensemble's trainer, one shard, one slice) on the data that
    remains after the erasure, on the same cluster's warm retrain service, and record
    its run on the ensemble: the erasure's certificate then compares with a measured
    full retrain, not an extrapolated one."""
    cfg = read_live(store, model).generation.config
    name = f"{cfg.name}-monolithic"
    mono = ModelLayout.of(name, model.prefix.rsplit("/", 1)[0] if "/" in model.prefix else "")
    mono_cfg = dataclasses.replace(cfg, name=name, shards=1, slices=1, source_uri="")
    ingest_table(store, mono, remaining, mono_cfg)
    rows = read_live(store, mono).generation.training_rows
    gen, _ = _in_background(
        console,
        lambda: f"the full retrain: one model on the remaining {rows:,} training images",
        lambda: train_model(store, mono, trainer),
    )
    shard = gen.shards[0]
    seconds = shard.train_seconds + shard.overhead_seconds
    step(
        f"full retrain: {fmt_s(seconds)} on the warm retrain service "
        f"({fmt_s(shard.overhead_seconds)} start-up + {fmt_s(shard.train_seconds)} "
        f"training), test accuracy {fmt_acc(gen.accuracy)}"
    )
    record_from_model(store, model, mono)
    step("recorded on the ensemble as its measured full retrain (lethe calibrate)")
    return {
        "full_retrain_seconds": round(seconds, 3),
        "full_retrain_train_seconds": round(shard.train_seconds, 3),
        "full_retrain_startup_seconds": round(shard.overhead_seconds, 3),
        "accuracy_full_retrain": gen.accuracy,
        "monolithic_model": mono.prefix,
    }


def _erase_with_engine(
    console: Console,
    step: Callable[[str], None],
    store: Store,
    table: pa.Table,
    remaining: pa.Table,
    subject: str,
    tag: str,
) -> dict[str, Any]:
    """Ingest, train and erase in this process (no Kubernetes)."""
    trainer = RayTrainer(store.settings)
    layout = ModelLayout.of(f"digits-{tag}")
    ingest_table(store, layout, table, demo_config(layout.prefix.split("/")[-1]))
    t0 = time.time()
    gen, _ = _in_background(
        console,
        lambda: "training the SISA ensemble on Ray Train (shards run concurrently)",
        lambda: train_model(store, layout, trainer),
    )
    train_seconds = time.time() - t0
    step(f"ensemble trained in {fmt_s(train_seconds)}, test accuracy {fmt_acc(gen.accuracy)}")
    mono = _monolithic(console, step, store, layout, remaining, trainer)
    step(f"erasing {subject}")
    engine = Engine(
        store,
        layout,
        trainer,
        evaluate=lambda g: trainer.evaluate(store, g),
        progress=lambda s, m: console.print(f"[bold magenta]{s:>10}[/bold magenta]  {_tidy(m)}"),
    )
    req = ErasureRequest(request_uid(layout.prefix, [subject], []), (subject,))
    result = _in_background(console, lambda: f"erasing {subject}", lambda: engine.erase([req]))
    t = result["timings"]
    key = next(iter(result["certificates"].values()))
    return {
        "shards": gen.config.shards,
        "slices": gen.config.slices,
        "records_erased": result["records_erased"],
        "shards_retrained": result["shards_retrained"],
        "time_to_forget_seconds": round(t["time_to_forget_seconds"], 3),
        "erasure_seconds": round(t["erasure_seconds"], 3),
        "certified_seconds": None,
        "accuracy_before": gen.accuracy,
        "accuracy_after": result["accuracy_after"],
        **mono,
        "cost_usd": result["cost"]["usd"],
        "initial_training_seconds": round(train_seconds, 3),
        "certificate_key": key,
        "certificate_path": key,
    }


def _tidy(message: str) -> str:
    """The engine's progress lines, with long floats (an accuracy) cut to 3 decimals."""
    return re.sub(r"\d+\.\d{4,}", lambda m: f"{float(m.group()):.3f}", message)


def _kubectl(kubeconfig: str, *args: str, stdin: str | None = None) -> str:
    from lethe_dev.kubestack import kubectl

    r = kubectl(kubeconfig, *args, stdin=stdin)
    if r.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def _erase_through_operator(
    console: Console,
    step: Callable[[str], None],
    store: Store,
    state_dir: Path,
    remaining: pa.Table,
    tag: str,
) -> dict[str, Any]:
    """A private kube-apiserver + etcd and the operator; ``kubectl apply`` the examples."""
    from lethe_dev import kubestack

    try:
        with console.status("starting etcd, kube-apiserver and the operator"):
            kube = kubestack.start(state_dir / "kube")
            cfg = kube.kubeconfig
            op = kubestack.spawn_operator(cfg, free_port(), state_dir / "operator.log")
    except BaseException:
        kubestack.stop(state_dir / "kube")  # whatever of it had started
        raise
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
        model = example_model()
        spec = model["spec"]
        spec["storage"].update(
            bucket=store.bucket, endpoint=store.settings.endpoint, prefix=f"demo-{tag}"
        )
        spec["ray"]["address"] = os.environ["RAY_DASHBOARD_ADDRESS"]
        spec["erasurePolicy"]["batchWindowSeconds"] = 0
        _kubectl(cfg, "apply", "-f", "-", stdin=json.dumps(model))
        name = model["metadata"]["name"]
        step(f"kubectl apply -f examples/{MODEL_EXAMPLE.name}  (ShardedModel {name})")
        layout = ModelLayout.of(f"default.{name}", spec["storage"]["prefix"])
        slices_total = int(spec["shards"]) * int(spec["slices"])
        t0 = time.time()
        with console.status("the operator ingests the model") as status:

            def ready(st: dict[str, Any]) -> bool:
                done = _checkpoints(store, layout, int(spec["shards"]))
                what = (
                    "the operator trains the ensemble as a Ray job"
                    if _condition(st, "Training")
                    else "the operator ingests the model and starts its Ray job"
                )
                status.update(
                    f"{what}: {done} of {slices_total} slice checkpoints  "
                    f"[dim]{time.time() - t0:.0f} s[/dim]"
                )
                return _condition(st, "Ready")

            _wait_for(cfg, "shardedmodel", name, ready, 900)
        train_seconds = time.time() - t0
        gen = read_live(store, layout).generation
        step(
            f"ensemble trained and Ready in {fmt_s(train_seconds)} "
            f"(ingest, Ray job, {slices_total} slices), test accuracy {fmt_acc(gen.accuracy)}"
        )

        mono = _monolithic(console, step, store, layout, remaining, RayTrainer(store.settings))

        req_name = yaml.safe_load(REQUEST_EXAMPLE.read_text())["metadata"]["name"]
        step(f"kubectl apply -f examples/{REQUEST_EXAMPLE.name}  (ErasureRequest {req_name})")
        applied = time.time()
        _kubectl(cfg, "apply", "-f", str(REQUEST_EXAMPLE))
        seen: dict[str, float] = {}
        with console.status("the operator takes the request") as status:

            def progress(st: dict[str, Any]) -> bool:
                ph = st.get("phase", "")
                if ph and ph not in seen:
                    seen[ph] = time.time() - applied
                    console.print(f"[bold magenta]{ph:>12}[/bold magenta]  after {fmt_s(seen[ph])}")
                if ph == RequestPhase.FAILED:
                    raise RuntimeError(
                        f"the erasure failed: {st.get('reason')}: {st.get('message')}"
                    )
                status.update(
                    f"erasure: {PHASE_WORDS.get(ph, ph or 'queued')}  "
                    f"[dim]{time.time() - applied:.0f} s[/dim]"
                )
                return ph == RequestPhase.SUCCEEDED

            _wait_for(cfg, "erasurerequest", req_name, progress, 900, every=0.1)
        st = json.loads(_kubectl(cfg, "get", "erasurerequest", req_name, "-o", "json"))["status"]
        key = st["certificate"].split("/", 3)[3]
        timings = store.get_json(key)["timings"]
        # shards back in service: the commit's own timestamp (this machine's clock)
        erasure = (timings.get("committed_at") or applied + seen["Succeeded"]) - applied
        accuracy_after = _in_background(
            console,
            lambda: "the ensemble's test accuracy after the erasure",
            lambda: _accuracy_after(store, layout),
        )
        return {
            "shards": int(spec["shards"]),
            "slices": int(spec["slices"]),
            "records_erased": st["affectedRecords"],
            "shards_retrained": len(st["affectedShards"]),
            "time_to_forget_seconds": round(min(seen.get(p, 1e9) for p in FORGOTTEN), 3),
            "erasure_seconds": round(erasure, 3),
            "certified_seconds": round(seen["Succeeded"], 3),
            "accuracy_before": gen.accuracy,
            "accuracy_after": accuracy_after,
            **mono,
            "cost_usd": st["cost"]["usd"],
            "initial_training_seconds": round(train_seconds, 3),
            "certificate_key": key,
            "certificate_path": key,
        }
    finally:
        op.terminate()
        try:
            op.wait(20)
        except subprocess.TimeoutExpired:
            op.kill()
        kubestack.stop(state_dir / "kube")


# phases in which the person's shards are already out of service
FORGOTTEN = RequestPhase.forgotten()
PHASE_WORDS = {
    RequestPhase.PENDING: "waiting for its batch",
    RequestPhase.QUARANTINED: "shards out of service; patching the data",
    RequestPhase.DATA_ERASED: "rows purged from S3; retraining",
    RequestPhase.RETRAINING: "retraining the person's shard on the warm retrain service",
}


def _checkpoints(store: Store, layout: ModelLayout, shards: int) -> int:
    try:
        return sum(
            1
            for k in range(shards)
            for key in store.list_keys(layout.checkpoints_prefix(k))
            if key.endswith(".pt")
        )
    except Exception:  # noqa: BLE001 - progress only
        return 0


def _accuracy_after(store: Store, layout: ModelLayout, timeout: float = 300) -> float | None:
    """The retrained ensemble's accuracy: the retrain job measures it right after the
    commit, off the erasure's path; wait for it."""
    deadline = time.time() + timeout
    while True:
        gen = read_live(store, layout).generation
        if gen.accuracy is not None and not gen.quarantined_shards:
            return gen.accuracy
        if time.time() > deadline:
            return RayTrainer(store.settings).evaluate(store, gen)
        time.sleep(0.5)


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
    t = Table(title="Lethe demo: one person erased, end to end", show_header=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    acc = r.get("certificate_accounting") or {}
    first = r.get("retrained_from_slice")
    gap = r["accuracy_gap_points"]
    gap_words = "level" if gap == 0 else f"{abs(gap):.1f} points {'below' if gap > 0 else 'above'}"
    rows = [
        ("path", r["path"]),
        ("ensemble", f"{r['shards']} shards x {r['slices']} slices, {r['records']:,} images"),
        ("records erased", f"{r['records_erased']}"),
        (
            "shards retrained",
            f"{r['shards_retrained']} of {r['shards']}"
            + (f", from slice {first + 1} of {r['slices']}" if first is not None else ""),
        ),
        ("time to forget", f"{fmt_s(r['time_to_forget_seconds'])} (shards out of service)"),
        ("erasure", f"{fmt_s(r['erasure_seconds'])} (request -> shards back in service)"),
    ]
    if r.get("certified_seconds") is not None:
        rows.append(("certified", f"{fmt_s(r['certified_seconds'])} (phase Succeeded)"))
    rows += [
        (
            "full retrain",
            f"{fmt_s(r['full_retrain_seconds'])} (monolithic model, warm Ray Train run)",
        ),
        ("speed-up", f"[bold]{fmt_x(r['speedup'])}[/bold] (full retrain / erasure)"),
        (
            "certificate's speed-up",
            f"{fmt_x(acc.get('speedup'))} "
            f"({fmt_s(acc.get('full_retrain_seconds'))} / {fmt_s(acc.get('erasure_seconds'))}; "
            f"full retrain {acc.get('full_retrain_basis', '-')})",
        ),
        (
            "accuracy, ensemble",
            f"{fmt_acc(r['accuracy_before'])} before, {fmt_acc(r['accuracy_after'])} after",
        ),
        (
            "accuracy, monolithic",
            f"{fmt_acc(r['accuracy_full_retrain'])} (the ensemble after: {gap_words})",
        ),
        ("certificate", r["certificate"]),
        ("verified", "[green]yes[/green]" if r["verified"] else "[red]NO[/red]"),
        ("demo wall time", fmt_s(r["demo_seconds"])),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    console.print(
        "[dim]erasure: "
        + r["erasure_measures"]
        + ".\nfull retrain: "
        + r["full_retrain_measures"]
        + ".[/dim]"
    )
