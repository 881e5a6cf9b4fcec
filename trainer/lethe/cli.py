"""The ``lethe`` command line: ingest, train, predict, erase, verify, status, demo, dev."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from lethe.core.config import Columns, ConfigError, ModelConfig, Prices, TrainerConfig
from lethe.core.plan import parse_id_lines
from lethe.layout import ModelLayout
from lethe.store import S3Settings, Store

err = Console(stderr=True, highlight=False)


class UsageError(ValueError):
    pass


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

    from lethe import localstack

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


def cmd_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from lethe.ingest import ingest_file

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
        ),
        test_fraction=args.test_fraction,
        source_uri=str(Path(args.data).resolve()),
        source_format="csv" if args.data.endswith((".csv", ".txt")) else "parquet",
    )
    store = _store(args)
    store.ensure_bucket()
    gen = ingest_file(store, _layout(args), args.data, cfg)
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
    }


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from lethe.ingest import read_dataset
    from lethe.predict import Ensemble

    store = _store(args)
    ens = Ensemble.live(store, _layout(args))
    table = read_dataset(args.input)
    cols = list(ens.generation.config.columns.features)
    ignore = {
        ens.generation.config.columns.record_id,
        ens.generation.config.columns.subject_id,
        ens.generation.config.columns.label,
    }
    cols = cols or [c for c in table.column_names if c not in ignore]
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise UsageError(f"input lacks feature column(s) {missing}")
    x = np.column_stack([table.column(c).to_numpy().astype(np.float32) for c in cols])
    labels = ens.labels(x, args.aggregate)
    for label in labels:
        print(label)
    return {
        "predictions": len(labels),
        "generation": ens.generation.number,
        "constituents": sorted(ens.models),
    }


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
    for outcome in result.get("outcomes", {}).values():
        if outcome["outcome"] == "NothingHeld":
            err.print(
                "[yellow]nothing held:[/yellow] none of the ids named was found in "
                f"{args.model}; nothing was erased (the certificate says so)"
            )
    return result


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    from lethe.certs import load_public_key
    from lethe.verify import load_certificate, verify

    store = _store(args)
    keys = _load_keys(args)
    public = None
    if args.public_key:
        try:
            public = load_public_key(Path(args.public_key).read_bytes())
        except (OSError, ValueError) as e:
            raise UsageError(f"--public-key: {e}") from None
    verdict = verify(
        store,
        load_certificate(store, args.certificate),
        keys,
        public_key=public,
        bucket_wide=args.bucket_wide,
        progress=not args.json,
    )
    for f in verdict.failures:
        err.print(f"[red]FAIL[/red] {f}")
    for n in verdict.notes:
        err.print(f"[yellow]note[/yellow] {n}")
    if verdict.ok:
        err.print(f"[green]verified[/green]: {verdict.checks}")
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
        "quarantined": gen.quarantined_shards,
        "live_shards": gen.live_shards(),
        "records": sum(s.rows for s in gen.shards),
    }


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from lethe.demo import run_demo

    return run_demo(json_mode=args.json, keep=args.keep, engine=args.engine)


def cmd_dev(args: argparse.Namespace) -> dict[str, Any]:
    """The local stack: SeaweedFS, a Ray head and (unless --no-kube) etcd + kube-apiserver
    with the CRDs installed. Writes <state>/env and <state>/kubeconfig; idempotent."""
    from lethe import kubestack, localstack

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
    s.add_argument("--data", required=True, help="a .parquet or .csv file")
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


def _disconnect_ray() -> None:
    """Ray's driver prints raylet warnings to stdout whenever they arrive; disconnect
    first so that the JSON object really is the last line."""
    from lethe.localstack import disconnect_ray

    disconnect_ray()
    sys.stdout.flush()


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks (stopping the demo's stack) run."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _exit_on_sigterm()
    from lethe.erasure import ErasureFailed
    from lethe.generations import ModelNotFound
    from lethe.ingest import IngestError

    try:
        out = args.func(args)
    except (UsageError, ConfigError, IngestError, ModelNotFound, FileExistsError) as e:
        err.print(f"[red]error:[/red] {e}")
        if args.json:
            print(json.dumps({"error": str(e), "type": type(e).__name__}))
        return 2
    except ErasureFailed as e:
        err.print(f"[red]erasure failed ({e.reason}):[/red] {e}")
        if args.json:
            print(json.dumps({"error": str(e), "reason": e.reason}))
        return 3
    code = int(out.pop("_exit", 0)) if isinstance(out, dict) else 0
    if args.json:
        _disconnect_ray()
        print(json.dumps(out, default=str), flush=True)
    elif args.command not in ("predict", "demo"):
        err.print_json(json.dumps(out, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
