"""Entry points of the Ray jobs a control plane submits (``python -m lethe.jobs``).

The operator never imports torch and never reads a dataset: it plans an erasure,
quarantines its shards and writes where the erased rows are (``lethe.erased``); the
batch's ``retrain`` job patches and purges the data and retrains beside the purge; the
operator finishes (purge of checkpoints, certify) when both are done. ``ingest``
shards and slices a new model's dataset, streamed with Ray Data; ``train`` trains a
newly ingested model. All run on the Ray cluster, read S3 settings from the
environment and are safe to run again. Their drivers do not import torch either: the
training and the accuracy run on the cluster's warm retrain service (``lethe.warm``),
which has it loaded. That service also runs ``retrain`` itself when the operator asks
it over HTTP (``lethe.agent``): then a batch needs no job driver at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from lethe.core.config import ModelConfig
from lethe.layout import ModelLayout
from lethe.sources import SourceObject
from lethe.store import NotFound, S3Settings, Store


def request_ingest(
    store: Store,
    layout: ModelLayout,
    cfg: ModelConfig,
    owner: str,
    objects: list[SourceObject] | None = None,
) -> None:
    """Say what an ingest job of ``layout`` ingests (before submitting it): a new
    request replaces the last one and its error. ``objects``: an S3 source's objects as
    the model's own keys saw them (``sources.pin_objects``): the job, which reads with
    the cluster's keys, reads (and deletes, for ``delete-after-ingest``) those only."""
    body: dict[str, Any] = {"config": cfg.to_json(), "owner": owner}
    if objects is not None:
        body["objects"] = [o.to_json() for o in objects]
    store.put_json(layout.ingest_request, body)
    store.purge(layout.ingest_error)


def ingest_error(store: Store, layout: ModelLayout) -> str | None:
    """Why the last ingest job refused its dataset, or None."""
    try:
        return str(store.get_json(layout.ingest_error)["message"])
    except NotFound:
        return None


def ingest(store: Store, model_prefix: str) -> dict[str, Any]:
    """Ingest a model's dataset as its request object says (``request_ingest``), read
    with Ray Data on the cluster. A user error (bad columns, ids, an unreadable source)
    is written where the submitter reads it, and the job fails."""
    from lethe.core.config import ConfigError
    from lethe.generations import read_live
    from lethe.ingest import IngestError, ingest_source
    from lethe.training import peak_rss_bytes

    layout = ModelLayout(model_prefix)
    request = store.get_json(layout.ingest_request)
    cfg = ModelConfig.from_json(request["config"])
    pinned = request.get("objects")
    ray_data = _ray_ready()
    try:
        gen = ingest_source(
            store,
            layout,
            cfg,
            request.get("owner"),
            ray_data=ray_data,
            pinned=None if pinned is None else [SourceObject.from_json(o) for o in pinned],
        )
    except FileExistsError:  # ingested by an earlier run of this job: done
        gen = read_live(store, layout).generation
    except (IngestError, ConfigError) as e:
        store.put_json(layout.ingest_error, {"error": type(e).__name__, "message": str(e)})
        raise
    return {
        "generation": gen.number,
        "records": sum(s.rows for s in gen.shards),
        "reader": "ray-data" if ray_data and cfg.source_uri.startswith("s3://") else "arrow",
        # this process's peak memory (the reads of a Ray Data job run in their own)
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _ray_ready() -> bool:
    """Ray Data reads when this process can reach a Ray cluster (a Ray job's driver)."""
    try:
        import ray
    except ImportError:
        return False
    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            return False
        ray.init(log_to_driver=False)
    return True


def retrain(store: Store, model_prefix: str, batch: str) -> dict[str, Any]:
    """A planned and quarantined batch (its plan and erase order are in S3): patch and
    purge its rows, retrain and commit its shards beside the purge (``Engine.run_batch``).
    Holds no key: the erase order says where the rows are."""
    from lethe.erasure import Engine
    from lethe.training import RayTrainer, peak_rss_bytes

    trainer = RayTrainer(store.settings)
    engine = Engine(
        store, ModelLayout(model_prefix), trainer, evaluate=lambda g: trainer.evaluate(store, g)
    )
    plan = engine.load_plan(batch)
    engine.run_batch(plan)
    return {
        "batch": plan.batch_id,
        "shards": plan.affected_shards,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def train(store: Store, model_prefix: str) -> dict[str, Any]:
    """Train every untrained slice of a model and commit the generation."""
    from lethe.training import RayTrainer, train_model

    gen, runs = train_model(store, ModelLayout(model_prefix), RayTrainer(store.settings))
    return {"generation": gen.number, "accuracy": gen.accuracy, "shards_trained": len(runs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lethe.jobs")
    p.add_argument("job", choices=["ingest", "train", "retrain"])
    p.add_argument("--model-prefix", required=True, help="PREFIX/MODEL in the bucket")
    p.add_argument("--batch", help="the erasure batch id (retrain)")
    args = p.parse_args(argv)
    if args.job == "retrain" and not args.batch:
        p.error("retrain needs --batch")

    store = Store(S3Settings.from_env())
    if args.job == "ingest":
        out = ingest(store, args.model_prefix)
    elif args.job == "train":
        out = train(store, args.model_prefix)
    else:
        out = retrain(store, args.model_prefix, args.batch)
    out["torch_imported"] = "torch" in sys.modules  # the driver should not need it
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
