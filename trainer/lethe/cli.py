"""The ``lethe`` command line: ingest, train, predict, erase, verify, status, recommend,
calibrate, demo, dev.

Without ``--json`` a command's result goes to stdout, written for people; progress,
warnings and errors go to stderr. With ``--json`` stdout holds only the result, one
JSON object on its last line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lethe.core.config import Columns, ModelConfig, Prices, TrainerConfig
from lethe.core.cost import ratio
from lethe.core.manifest import Generation
from lethe.core.plan import parse_id_lines
from lethe.core.sizing import (
    DEFAULT_MAX_CHECKPOINTS,
    DEFAULT_MIN_ROWS_PER_SHARD,
    DEFAULT_RUN_OVERHEAD,
)
from lethe.errors import ErasureFailed, LetheError, UserError
from lethe.layout import ModelLayout
from lethe.store import S3Settings, Store

err = Console(stderr=True, highlight=False, soft_wrap=True)  # a key or a reason stays on one line
# a command's result, for people; piped, lines stay whole and tables get room
results = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)


def fmt_seconds(s: float | None) -> str:
    """Seconds for people: '0.35 s', '12.3 s', '4.2 min', '3.1 h', '2.5 days'."""
    if s is None:
        return "-"
    if s < 1:
        return f"{s:.2f} s"
    if s < 100:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def fmt_x(x: float | None) -> str:
    if x is None or x != x or x == float("inf"):
        return "-"
    return f"{x:.1f}x" if x < 100 else f"{x:,.0f}x"


def fmt_usd(x: float | None) -> str:
    if x is None:
        return "-"
    return f"${x:,.2f}" if x >= 1 else f"${x:.2g}"


class UsageError(UserError, ValueError):
    """A flag, argument or file given to the command is wrong; the message names it."""


def read_subjects_file(path: str) -> list[str]:
    """One subject id per line; blank lines and lines starting with '#' are skipped."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"subjects file not found: {path}") from None
    except UnicodeDecodeError:
        raise UsageError(f"subjects file {path}: not UTF-8 text") from None
    try:
        return parse_id_lines(text, f"subjects file {path}")
    except ValueError as e:
        raise UsageError(str(e)) from None


def _store(args: argparse.Namespace) -> Store:
    _load_dev_env(args)
    st = Store(S3Settings.from_env(bucket=args.bucket, endpoint=args.endpoint))
    return st


def _load_dev_env(args: argparse.Namespace) -> None:
    """Use the local stack's settings only when asked (``--dev``): on AWS the endpoint
    is unset as a rule, and a dev stack that happens to run must not catch the command."""

    from lethe_dev import localstack

    if not args.dev:
        return
    st = localstack.read_state(Path(args.state_dir))
    if st is None:
        raise UsageError(f"--dev: no running local stack in {args.state_dir} (lethe dev up)")
    st.apply()


def _layout(args: argparse.Namespace) -> ModelLayout:
    return ModelLayout.of(args.model, args.prefix)


def _keys_dir(args: argparse.Namespace) -> str:
    import os

    where = getattr(args, "keys", None) or os.environ.get("LETHE_KEYS_DIR")
    if not where:
        raise UsageError(
            "no keys: pass --keys DIR or set LETHE_KEYS_DIR (create them with `lethe keys init`)"
        )
    return str(where)


def _load_keys(args: argparse.Namespace) -> Any:
    from lethe.certs import Keys, KeysError

    try:
        return Keys.load(_keys_dir(args))
    except (KeysError, FileNotFoundError) as e:
        raise UsageError(f"keys: {e}") from None


def _trainer(args: argparse.Namespace, store: Store) -> Any:
    from lethe.training import RayTrainer

    return RayTrainer(store.settings, args.ray_address)


def _format_of(path: str) -> str:
    if path.endswith((".csv", ".txt")):
        return "csv"
    return "jsonl" if path.endswith((".jsonl", ".json")) else "parquet"


def cmd_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from lethe.ingest import ingest_source

    shape = tuple(int(x) for x in args.input_shape.split(",")) if args.input_shape else ()
    cfg = ModelConfig(
        name=args.model,
        shards=args.shards,
        slices=args.slices,
        trainer=TrainerConfig(
            model=args.trainer_model,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            hidden=args.hidden,
            seed=args.seed,
            workers_per_shard=args.workers_per_shard,
            cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker,
            input_shape=shape,
        ),
        prices=Prices(args.price_cpu_hour, args.price_gpu_hour),
        columns=Columns(
            args.record_id_column,
            args.subject_column,
            args.label_column,
            tuple(args.feature_columns.split(",")) if args.feature_columns else (),
            file=args.file_column,
            decode=args.decode,
        ),
        test_fraction=args.test_fraction,
        source_uri=args.data if args.data.startswith("s3://") else str(Path(args.data).resolve()),
        source_format=args.format or _format_of(args.data),
    )
    store = _store(args)
    store.ensure_bucket()
    gen = ingest_source(store, _layout(args), cfg)
    return {
        "model": args.model,
        "generation": gen.number,
        "shards": cfg.shards,
        "slices": cfg.slices,
        "records": sum(s.rows for s in gen.shards),
        "test_records": gen.test.rows,
    }


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from lethe.training import train_model

    store = _store(args)
    t0 = time.time()
    gen, runs = train_model(store, _layout(args), _trainer(args, store))
    return {
        "model": args.model,
        "generation": gen.number,
        "accuracy": gen.accuracy,
        "shards_trained": len(runs),
        "seconds": round(time.time() - t0, 2),
        "erasure_estimate": erasure_outlook(gen, args.model),
    }


def erasure_outlook(gen: Generation, model: str) -> dict[str, Any] | None:
    """What erasing one person is expected to cost against a full retrain, seconds
    against seconds; None until training times are known. Warns (stderr) when the
    erasure would cost as much as retraining everything."""
    from lethe.core.plan import one_request_estimate

    est = one_request_estimate(gen)
    if est is None:
        return None
    if est.retrain_seconds >= est.full_seconds:
        err.print(
            f"[bold yellow]WARNING:[/bold yellow] erasing one person from {model} is estimated "
            f"at {fmt_seconds(est.retrain_seconds)}, as much as or more than a full retrain "
            f"({fmt_seconds(est.full_seconds)}, {est.full_basis}): at {len(gen.shards)} "
            f"shard(s) x {gen.config.slices} slice(s) SISA saves nothing here. See "
            f"`lethe recommend --model {model} --requests-per-day N`."
        )
    return {
        "one_erasure_seconds": est.retrain_seconds,
        "full_retrain_seconds": est.full_seconds,
        "full_basis": est.full_basis,
        "speedup": ratio(est.full_seconds, est.retrain_seconds),
        "run_overhead_seconds": est.run_overhead_seconds,
    }


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    from lethe.ingest import read_dataset
    from lethe.predict import Ensemble

    store = _store(args)
    ens = Ensemble.live(store, _layout(args))
    table = read_dataset(args.input)
    cfg = ens.generation.config
    if cfg.columns.file:  # file-backed records: the input names their files
        from lethe.files import FileDecoder

        if cfg.columns.file not in table.column_names:
            raise UsageError(f"input lacks the file column {cfg.columns.file!r}")
        uris = [str(u) for u in table.column(cfg.columns.file).to_pylist()]
        x = FileDecoder(store, cfg).decode_all(uris)[0]
    else:
        x = _feature_matrix(table, cfg)
    labels = ens.labels(x, args.aggregate)
    for label in labels:
        print(label)
    return {
        "predictions": len(labels),
        "generation": ens.generation.number,
        "constituents": sorted(ens.models),
    }


def _feature_matrix(table: Any, cfg: ModelConfig) -> Any:
    """An input table's feature columns (the model's, or every other column) as float32."""
    import numpy as np

    cols = list(cfg.columns.features)
    ignore = {cfg.columns.record_id, cfg.columns.subject_id, cfg.columns.label}
    cols = cols or [c for c in table.column_names if c not in ignore]
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise UsageError(f"input lacks feature column(s) {missing}")
    return np.column_stack([table.column(c).to_numpy().astype(np.float32) for c in cols])


def cmd_erase(args: argparse.Namespace) -> dict[str, Any]:
    from lethe.core.plan import ErasureRequest
    from lethe.erasure import Engine, request_uid
    from lethe.predict import ensemble_accuracy

    subjects = list(args.subject or [])
    if args.subjects_file:
        subjects += read_subjects_file(args.subjects_file)
    records = list(args.record or [])
    if not subjects and not records:
        raise UsageError("name at least one --subject, --record or --subjects-file")
    store = _store(args)
    layout = _layout(args)
    from lethe.generations import read_live

    read_live(store, layout)  # fail fast on an unknown model
    requests = [
        ErasureRequest(request_uid(args.model, subjects, records), tuple(subjects), tuple(records))
    ]
    engine = Engine(
        store,
        layout,
        _trainer(args, store),
        evaluate=lambda g: ensemble_accuracy(store, g),
        progress=_progress,
        keys=_load_keys(args),
    )
    result = engine.erase(requests)
    result["accounting"] = _accounting(result)
    for outcome in result.get("outcomes", {}).values():
        if outcome["outcome"] == "NothingHeld":
            err.print(
                "[yellow]nothing held:[/yellow] none of the ids named was found in "
                f"{args.model}; nothing was erased (the certificate says so)"
            )
    return result


def _accounting(result: dict[str, Any]) -> dict[str, Any] | None:
    """The batch's measured seconds and USD against a full retrain's (as in its
    certificates); None for a batch planned before that accounting existed."""
    from lethe.core.cost import Cost, accounting

    est, cost = result.get("estimate") or {}, result.get("cost")
    if "full_basis" not in est or not cost:
        return None
    erasure = float((result.get("timings") or {}).get("erasure_seconds") or 0.0)
    return accounting(erasure, est["full_seconds"], est["full_basis"], Cost(**cost))


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    from lethe.certs import load_public_key
    from lethe.store import NotFound
    from lethe.verify import load_certificate, verify

    store = _store(args)
    keys = _load_keys(args)
    try:
        cert = load_certificate(store, args.certificate)
    except NotFound:
        raise UsageError(f"certificate not found: {args.certificate}") from None
    except ValueError as e:  # another bucket, or not JSON
        raise UsageError(f"certificate {args.certificate}: {e}") from None
    public = None
    if args.public_key:
        try:
            public = load_public_key(Path(args.public_key).read_bytes())
        except (OSError, ValueError) as e:
            raise UsageError(f"--public-key: {e}") from None
    verdict = verify(
        store,
        cert,
        keys,
        public_key=public,
        bucket_wide=args.bucket_wide,
        progress=not args.json,
    )
    for f in verdict.failures:
        err.print(f"[red]FAIL[/red] {f}")
    for n in verdict.notes:
        err.print(f"[yellow]note[/yellow] {n}")
    out = verdict.to_json()
    out["_exit"] = 0 if verdict.ok else 1
    return out


def cmd_keys(args: argparse.Namespace) -> dict[str, Any]:
    """``lethe keys init DIR``: a new Ed25519 signing key and HMAC key for a model."""
    from lethe.certs import Keys

    keys = Keys.generate()
    try:
        keys.save(args.dir)
    except FileExistsError as e:
        raise UsageError(f"{e} (keys are never overwritten)") from None
    return {"keys": str(Path(args.dir).resolve()), "fingerprint": keys.fingerprint}


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    from lethe.generations import read_live

    gen = read_live(_store(args), _layout(args)).generation
    return {
        "model": args.model,
        "generation": gen.number,
        "reason": gen.reason,
        "accuracy": gen.accuracy,
        "shards": len(gen.shards),
        "slices": gen.config.slices,
        "quarantined": gen.quarantined_shards,
        "live_shards": gen.live_shards(),
        "records": gen.training_rows,
        "monolithic": gen.monolithic.to_json() if gen.monolithic else None,
        "erasure_estimate": erasure_outlook(gen, args.model),
    }


def cmd_recommend(args: argparse.Namespace) -> dict[str, Any]:
    """Rank shapes (S, R) by expected erasure seconds a day; from the flags, or from a
    trained model's rows, training seconds and run start-up (flags override)."""
    from lethe.core import sizing

    rows, train, overhead, basis = args.rows, args.train_seconds, args.overhead, "given"
    overhead_basis = "given"
    current, shards_train = None, None
    if args.model:
        from lethe.core.plan import full_retrain, run_overhead
        from lethe.generations import read_live

        gen = read_live(_store(args), _layout(args)).generation
        current = (len(gen.shards), gen.config.slices)
        if all(s.train_seconds > 0 for s in gen.shards):
            shards_train = sum(s.train_seconds for s in gen.shards)
        m_train, m_overhead, m_basis = full_retrain(gen)
        rows = rows or gen.training_rows
        if train is None and m_train > 0:
            train, basis = m_train, m_basis
        if overhead is None and run_overhead(gen) > 0:  # what a retrain run pays
            overhead, overhead_basis = run_overhead(gen), "the model's shard runs"
        elif overhead is None and m_overhead > 0:
            overhead, overhead_basis = m_overhead, "the measured full run"
    if not rows or train is None:
        raise UsageError(
            "give --rows and --train-seconds (a full training run's seconds), or --model "
            "with a trained model"
        )
    if overhead is None:
        overhead, overhead_basis = (
            sizing.DEFAULT_RUN_OVERHEAD,
            "assumed: Ray Train's in the benchmark",
        )
    try:
        rec = sizing.recommend(
            rows,
            train,
            args.requests_per_day,
            batch_window_seconds=args.batch_window,
            overhead_seconds=overhead,
            erasure_overhead_seconds=args.erasure_overhead,
            min_rows_per_shard=args.min_rows_per_shard,
            max_checkpoints=args.max_checkpoints,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    result = {
        "model": args.model,
        **rec.to_json(),
        "train_seconds_basis": basis,
        "run_overhead_basis": overhead_basis,
    }
    if current:
        now = sizing.evaluate(
            *current,
            rows,
            train,
            args.requests_per_day,
            args.batch_window,
            overhead,
            args.erasure_overhead,
            shards_train,
        )
        now.reason = "now, at its shards' recorded times"
        result["current"] = now.to_json()
        if shards_train and shards_train > 1.2 * train:
            result["notes"].append(
                f"This model's {current[0]} shards train {shards_train / train:.1f}x slower per "
                "row than the full run: the other shapes assume no such loss, so smaller "
                "shards may save less than shown."
            )
    return result


def cmd_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    """Record a measured monolithic run on the model: from a trained S=1, R=1 model
    (``--from-model``) or from numbers measured elsewhere (``--seconds``/``--rows``)."""
    from lethe.calibration import CalibrationError, record_from_model, record_monolithic
    from lethe.core.plan import estimate_cost

    store = _store(args)
    layout = _layout(args)
    try:
        if args.from_model:
            if args.seconds is not None or args.rows is not None:
                raise UsageError("give either --from-model or --seconds and --rows, not both")
            gen = record_from_model(store, layout, ModelLayout.of(args.from_model, args.prefix))
        elif args.seconds is not None and args.rows is not None:
            gen = record_monolithic(store, layout, args.seconds, args.rows, args.overhead)
        else:
            raise UsageError("give --from-model, or --seconds and --rows")
    except CalibrationError as e:
        raise UsageError(str(e)) from None
    full = estimate_cost(gen, {})
    return {
        "model": args.model,
        "generation": gen.number,
        "monolithic": gen.monolithic.to_json() if gen.monolithic else None,
        "full_retrain_seconds": full.full_seconds,
        "full_basis": full.full_basis,
        "erasure_estimate": erasure_outlook(gen, args.model),
    }


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from lethe_dev.demo import run_demo

    return run_demo(json_mode=args.json, keep=args.keep, engine=args.engine)


def cmd_dev(args: argparse.Namespace) -> dict[str, Any]:
    """The local stack: SeaweedFS, a Ray head and (unless --no-kube) etcd + kube-apiserver
    with the CRDs installed. Writes <state>/env and <state>/kubeconfig; idempotent."""
    from lethe_dev import kubestack, localstack

    state = Path(args.state_dir)
    if args.action == "down":
        return {"stopped": kubestack.stop(state) | localstack.down(state)}
    st = localstack.up(state)
    env = st.env()
    if not args.no_kube:
        kube = kubestack.read_state(state) or kubestack.start(state)
        env["KUBECONFIG"] = str(Path(kube.kubeconfig).resolve())
    env["LETHE_METRICS_URL"] = f"http://127.0.0.1:{args.metrics_port}/metrics"
    (state / "env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    return {"state_dir": str(state), "env": str(state / "env"), **env}


def cmd_operator(args: argparse.Namespace) -> dict[str, Any]:
    from lethe_operator.__main__ import main as operator_main

    operator_main(["--metrics-port", str(args.metrics_port)])
    return {}


# -- results for people (stdout, without --json) --------------------------------------
def show_fields(r: dict[str, Any]) -> None:
    """Any result: one 'name: value' line per field."""
    for k, v in r.items():
        if v not in (None, "", [], {}):
            results.print(f"{k.replace('_', ' ')}: {v}")


def show_outlook(o: dict[str, Any] | None) -> None:
    if not o:
        return
    results.print(
        f"One erasure (one person), estimated: {fmt_seconds(o['one_erasure_seconds'])} of "
        f"retraining (with its run's {fmt_seconds(o['run_overhead_seconds'])} start-up) "
        f"against {fmt_seconds(o['full_retrain_seconds'])} for a full retrain "
        f"({o['full_basis']}): {fmt_x(o['speedup'])}."
    )


def show_ingest(r: dict[str, Any]) -> None:
    per_shard = r["records"] // max(r["shards"], 1)
    results.print(
        f"Ingested {r['model']}: {r['records']:,} training records in {r['shards']} shard(s) "
        f"x {r['slices']} slice(s) (about {per_shard:,} a shard), {r['test_records']:,} held "
        f"out for testing; generation {r['generation']}."
    )
    results.print(f"Next: lethe train --model {r['model']}")


def show_train(r: dict[str, Any]) -> None:
    acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
    results.print(
        f"Trained {r['model']}: {r['shards_trained']} shard run(s) in "
        f"{fmt_seconds(r['seconds'])}; generation {r['generation']}, test accuracy {acc}."
    )
    show_outlook(r.get("erasure_estimate"))


def show_erase(r: dict[str, Any]) -> None:
    acc = r.get("accuracy_after")
    results.print(
        f"Erased {r['records_erased']:,} record(s) for {r['requests']} request(s) from "
        f"{r['model']}: {r['shards_retrained']} shard(s) retrained, generation "
        f"{r.get('generation_before')} -> {r.get('generation_after')}"
        + (f", test accuracy {acc:.3f}." if acc is not None else ".")
    )
    t = r.get("timings") or {}
    a = r.get("accounting")
    if t:
        line = (
            f"Time to forget {fmt_seconds(t.get('time_to_forget_seconds'))}; "
            f"erasure {fmt_seconds(t.get('erasure_seconds'))} (request to shards back in service)"
        )
        if a:
            line += (
                f"; a full retrain {fmt_seconds(a['full_retrain_seconds'])} "
                f"({a['full_retrain_basis']}): {fmt_x(a['speedup'])}"
            )
        results.print(line + ".")
    if a and a.get("speedup_usd") is not None:
        results.print(
            f"Cost {fmt_usd(a['erasure_usd'])} against {fmt_usd(a['full_retrain_usd'])} "
            f"for a full retrain: {fmt_x(a['speedup_usd'])}."
        )
    for key in (r.get("certificates") or {}).values():
        results.print(f"Certificate: {key}  (check it: lethe verify {key})")


def show_verify(r: dict[str, Any]) -> None:
    checks = ", ".join(f"{n:,} {what}" for what, n in r["checks"].items())
    if r["verified"]:
        results.print(f"[green]verified[/green]: {checks}")
    else:
        results.print(
            f"[red]NOT verified[/red]: {len(r['failures'])} failure(s) (on stderr); {checks}"
        )


def show_status(r: dict[str, Any]) -> None:
    acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
    results.print(
        f"{r['model']}: generation {r['generation']} ({r['reason'] or '-'}), "
        f"{r['shards']} shard(s) x {r['slices']} slice(s), {r['records']:,} training records, "
        f"test accuracy {acc}."
    )
    q = r["quarantined"]
    results.print(
        f"Serving {len(r['live_shards'])} of {r['shards']} shard(s)"
        + (f"; quarantined: {', '.join(map(str, q))}." if q else ".")
    )
    m = r.get("monolithic")
    if m:
        over = m["overhead_seconds"]
        results.print(
            f"Measured full retrain: {fmt_seconds(m['train_seconds'])} of training"
            + (f" + {fmt_seconds(over)} start-up" if over is not None else "")
            + f" on {m['rows']:,} rows."
        )
    show_outlook(r.get("erasure_estimate"))
    if r.get("erasure_estimate") is None:
        results.print("One erasure's cost: not known until the model is trained.")


def show_recommend(r: dict[str, Any], top: int = 8) -> None:
    window = r["batch_window_seconds"]
    load = f"{r['requests_per_day']:g} request(s) a day" + (
        f", batched every {fmt_seconds(window)} (about {r['requests_per_batch']:.1f} a batch)"
        if window
        else ", each erased on its own"
    )
    results.print(
        f"{r['rows']:,} training rows; a full retrain: {fmt_seconds(r['full_train_seconds'])} "
        f"of training ({r['train_seconds_basis']}) + {fmt_seconds(r['run_overhead_seconds'])} "
        f"run start-up ({r['run_overhead_basis']}) = {fmt_seconds(r['full_retrain_seconds'])}; "
        f"{load}."
    )
    table = Table(show_edge=False, pad_edge=False)
    for col in ("S x R", "rows/shard", "ckpts", "one erasure", "speed-up", "per day", "why"):
        table.add_column(col, justify="left" if col in ("S x R", "why") else "right")
    now = r.get("current")  # the model's own shape, at its shards' recorded times
    for c in [*r["candidates"][: max(top, 1)], *([now] if now else [])]:
        name = f"{c['shards']} x {c['slices']}" + (" (now)" if c is now else "")
        table.add_row(
            f"[bold green]{name}[/bold green]" if c["recommended"] else name,
            f"{c['rows_per_shard']:,}",
            f"{c['checkpoints']:,}",
            fmt_seconds(c["erasure_seconds"]),
            fmt_x(c["speedup"]),
            fmt_seconds(c["seconds_per_day"]),
            c["reason"],
        )
    results.print(table)
    best = r["recommended"]
    results.print(
        f"Recommended: {best['shards']} shard(s) x {best['slices']} slice(s) "
        f"(lethe ingest --shards {best['shards']} --slices {best['slices']})."
    )
    for note in r["notes"]:
        results.print(f"- {note}")


def show_calibrate(r: dict[str, Any]) -> None:
    m = r["monolithic"]
    over = m["overhead_seconds"]
    results.print(
        f"Recorded on {r['model']} (generation {r['generation']}): a monolithic run of "
        f"{fmt_seconds(m['train_seconds'])} of training"
        + (f" + {fmt_seconds(over)} start-up" if over is not None else "")
        + f" on {m['rows']:,} rows. A full retrain is now estimated at "
        f"{fmt_seconds(r['full_retrain_seconds'])} ({r['full_basis']})."
    )
    show_outlook(r.get("erasure_estimate"))


def show_keys(r: dict[str, Any]) -> None:
    results.print(f"Keys written to {r['keys']} (public key fingerprint {r['fingerprint']}).")
    results.print(
        "Verifiers need public-key.pem and hmac-key from it; keep signing-key.pem to Lethe."
    )


def show_dev(r: dict[str, Any]) -> None:
    if "stopped" in r:
        results.print("Local stack stopped." if r["stopped"] else "No local stack was running.")
        return
    results.print(f"Local stack running; use it with: . {r['env']}")
    for k in ("LETHE_S3_ENDPOINT", "RAY_ADDRESS", "KUBECONFIG", "LETHE_METRICS_URL"):
        if r.get(k):
            results.print(f"  {k}={r[k]}")


HUMAN = {
    "ingest": show_ingest,
    "train": show_train,
    "erase": show_erase,
    "verify": show_verify,
    "status": show_status,
    "calibrate": show_calibrate,
    "keys": show_keys,
    "dev": show_dev,
}
SILENT = ("predict", "demo", "operator")  # they print their own output


def _progress(step: str, message: str) -> None:
    err.print(f"[bold cyan]{step:>10}[/bold cyan]  {message}")


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bucket", help="S3 bucket (env LETHE_BUCKET, default 'lethe')")
    common.add_argument("--endpoint", help="S3 endpoint URL (env LETHE_S3_ENDPOINT)")
    common.add_argument("--prefix", default="", help="key prefix above the model")
    common.add_argument("--ray-address", help="Ray cluster address (env RAY_ADDRESS)")
    common.add_argument("--state-dir", default=".lethe/dev", help="local stack state directory")
    common.add_argument(
        "--dev", action="store_true", help="use the running `lethe dev` stack's settings"
    )
    common.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line of stdout"
    )
    p = argparse.ArgumentParser(prog="lethe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        parents=[common], name="ingest", help="shard and slice a dataset into S3 (generation 1)"
    )
    s.add_argument("--model", required=True)
    s.add_argument(
        "--data",
        required=True,
        help="a file or directory of them (.parquet, .csv, .jsonl), or s3://bucket/key "
        "(a key ending in '/' is a prefix: every file under it)",
    )
    s.add_argument("--format", choices=["parquet", "csv", "jsonl"], help="default: by suffix")
    s.add_argument(
        "--file-column", default="", help="a column of s3:// image URIs (file-backed records)"
    )
    s.add_argument(
        "--decode",
        default="image",
        help="how a file becomes features: image (built in) or package.module:fn",
    )
    s.add_argument("--shards", type=int, default=8)
    s.add_argument("--slices", type=int, default=4)
    s.add_argument("--record-id-column", default="record_id")
    s.add_argument("--subject-column", default="subject_id")
    s.add_argument("--label-column", default="label")
    s.add_argument("--feature-columns", default="", help="comma-separated (default: all others)")
    s.add_argument("--test-fraction", type=float, default=0.2)
    s.add_argument("--trainer-model", default="mlp", help="mlp, cnn, or package.module:build")
    s.add_argument("--epochs", type=float, default=10.0)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--learning-rate", type=float, default=1e-3)
    s.add_argument("--hidden", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers-per-shard", type=int, default=1)
    s.add_argument("--cpus-per-worker", type=float, default=1.0)
    s.add_argument("--gpus-per-worker", type=float, default=0.0)
    s.add_argument("--input-shape", default="", help="C,H,W for the cnn model")
    s.add_argument("--price-cpu-hour", type=float, default=Prices().cpu_hour_usd)
    s.add_argument("--price-gpu-hour", type=float, default=Prices().gpu_hour_usd)
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser(parents=[common], name="train", help="train every constituent on Ray Train")
    s.add_argument("--model", required=True)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser(parents=[common], name="predict", help="predict with the live ensemble")
    s.add_argument("--model", required=True)
    s.add_argument("--input", required=True)
    s.add_argument("--aggregate", choices=["vote", "softmax"], default="vote")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser(
        parents=[common], name="erase", help="erase subjects or records and retrain what saw them"
    )
    s.add_argument("--model", required=True)
    s.add_argument("--subject", action="append", help="a subject id (repeatable)")
    s.add_argument("--record", action="append", help="a record id (repeatable)")
    s.add_argument("--subjects-file", help="a file of subject ids, one per line")
    s.add_argument("--keys", help="the model's key directory (env LETHE_KEYS_DIR)")
    s.set_defaults(func=cmd_erase)

    s = sub.add_parser(
        parents=[common], name="verify", help="re-check an erasure certificate against S3"
    )
    s.add_argument("certificate", help="a local file, s3://bucket/key, or a key")
    s.add_argument("--keys", help="the model's key directory (env LETHE_KEYS_DIR)")
    s.add_argument("--public-key", help="the trusted public key (PEM); default: the one in --keys")
    s.add_argument(
        "--bucket-wide", action="store_true", help="scan the whole bucket, not only the model"
    )
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser(parents=[common], name="keys", help="create a model's signing and HMAC keys")
    s.add_argument("action", choices=["init"])
    s.add_argument("dir", help="where to write signing-key.pem, hmac-key and public-key.pem")
    s.set_defaults(func=cmd_keys)

    s = sub.add_parser(parents=[common], name="status", help="show the live generation of a model")
    s.add_argument("--model", required=True)
    s.set_defaults(func=cmd_status)

    s = sub.add_parser(
        parents=[common],
        name="recommend",
        help="rank shards x slices by what erasures will cost (from numbers or a trained model)",
    )
    s.add_argument("--model", help="take rows, training seconds and start-up from this model")
    s.add_argument("--rows", type=int, help="training rows")
    s.add_argument(
        "--train-seconds", type=float, help="seconds to train one model on all rows (no start-up)"
    )
    s.add_argument("--requests-per-day", type=float, required=True, help="erasure requests a day")
    s.add_argument(
        "--batch-window", type=float, default=0.0, help="seconds requests are gathered (0: none)"
    )
    s.add_argument(
        "--overhead",
        type=float,
        help=f"fixed start-up of one training run, seconds (default: the model's, else "
        f"{DEFAULT_RUN_OVERHEAD:g})",
    )
    s.add_argument(
        "--erasure-overhead", type=float, default=0.0, help="fixed seconds of each erasure batch"
    )
    s.add_argument(
        "--min-rows-per-shard",
        type=int,
        default=DEFAULT_MIN_ROWS_PER_SHARD,
        help="smaller shards are never proposed (they cost accuracy)",
    )
    s.add_argument(
        "--max-checkpoints",
        type=int,
        default=DEFAULT_MAX_CHECKPOINTS,
        help="at most S x R stored model copies",
    )
    s.add_argument("--top", type=int, default=8, help="rows of the table (JSON: all)")
    s.set_defaults(func=cmd_recommend)

    s = sub.add_parser(
        parents=[common],
        name="calibrate",
        help="record a measured full (monolithic) retrain on a model, for honest estimates",
    )
    s.add_argument("--model", required=True)
    s.add_argument(
        "--from-model", help="a trained S=1, R=1 model with the same trainer (its run is read)"
    )
    s.add_argument("--seconds", type=float, help="measured in-worker training seconds")
    s.add_argument("--rows", type=int, help="training rows that run trained on")
    s.add_argument("--overhead", type=float, help="that run's fixed start-up seconds, if known")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser(
        parents=[common], name="demo", help="the embedded default: digits, one erasure, verified"
    )
    s.add_argument("--keep", action="store_true", help="leave the local stack running")
    s.add_argument(
        "--engine", action="store_true", help="erase with the engine in-process (no Kubernetes)"
    )
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        parents=[common], name="dev", help="start or stop the local stack (SeaweedFS + Ray)"
    )
    s.add_argument("action", choices=["up", "down"])
    s.add_argument("--no-kube", action="store_true", help="only SeaweedFS and Ray")
    s.add_argument("--metrics-port", type=int, default=9090, help="the operator's /metrics port")
    s.set_defaults(func=cmd_dev)

    s = sub.add_parser(parents=[common], name="operator", help="run the kopf operator")
    s.add_argument("--metrics-port", type=int, default=9090)
    s.set_defaults(func=cmd_operator)
    return p


def exit_code(e: BaseException) -> int:
    """The exit status for an error (``lethe.errors`` has the table): its class's
    ``exit_code``; an existing file a command refuses to overwrite is the user's."""
    if isinstance(e, LetheError):
        return e.exit_code
    return UserError.exit_code if isinstance(e, FileExistsError) else 1


def failed(e: BaseException, as_json: bool) -> int:
    """Report a command's error on stderr (and, with --json, as the last line of stdout)
    and return its exit status. The message is the error's own: Lethe's errors name
    keys, fields and counts, never a subject or record id."""
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # KeyError quotes
    out: dict[str, Any] = {"error": message, "type": type(e).__name__, "exit_code": exit_code(e)}
    if isinstance(e, ErasureFailed):
        err.print(f"[red]erasure failed ({e.reason}):[/red] {message}")
        out["reason"] = e.reason
    else:
        err.print(f"[red]error:[/red] {message}")
    if as_json:
        print(json.dumps(out), flush=True)
    return out["exit_code"]


def _disconnect_ray() -> None:
    """Ray's driver prints raylet warnings to stdout whenever they arrive; disconnect
    first so that the JSON object really is the last line."""
    from lethe.training import disconnect_ray

    disconnect_ray()
    sys.stdout.flush()


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks (stopping the demo's stack) run."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _exit_on_sigterm()
    try:
        out = args.func(args)
    except (LetheError, FileExistsError) as e:
        return failed(e, args.json)
    code = int(out.pop("_exit", 0)) if isinstance(out, dict) else 0
    _disconnect_ray()
    if args.json:
        print(json.dumps(out, default=str), flush=True)
    elif args.command == "recommend":
        show_recommend(out, args.top)
    elif args.command not in SILENT:
        HUMAN.get(args.command, show_fields)(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
