"""Entry points of the Ray jobs a control plane submits (``python -m lethe.jobs``).

The operator never imports torch: it prepares an erasure (plan, quarantine, patch),
has the batch retrained on the Ray cluster, purges the erased rows meanwhile and
finishes (purge, certify) when the retrain is done. ``train`` trains a newly ingested
model. Both run on the Ray cluster, read S3 settings from the environment and are safe
to run again. Their drivers do not import torch either: the training and the accuracy
run on the cluster's warm retrain service (``lethe.warm``), which has it loaded. That
service also runs ``retrain`` itself when the operator asks it over HTTP
(``lethe.agent``): then a batch needs no job driver at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lethe.layout import ModelLayout
from lethe.store import S3Settings, Store


def retrain(store: Store, model_prefix: str, batch: str) -> dict[str, Any]:
    """Retrain and commit the shards of a prepared batch (its plan is in S3)."""
    from lethe.erasure import Engine
    from lethe.training import RayTrainer

    trainer = RayTrainer(store.settings)
    engine = Engine(
        store, ModelLayout(model_prefix), trainer, evaluate=lambda g: trainer.evaluate(store, g)
    )
    plan = engine.load_plan(batch)
    engine.retrain(plan)
    return {"batch": plan.batch_id, "shards": plan.affected_shards}


def train(store: Store, model_prefix: str) -> dict[str, Any]:
    """Train every untrained slice of a model and commit the generation."""
    from lethe.training import RayTrainer, train_model

    gen, runs = train_model(store, ModelLayout(model_prefix), RayTrainer(store.settings))
    return {"generation": gen.number, "accuracy": gen.accuracy, "shards_trained": len(runs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lethe.jobs")
    p.add_argument("job", choices=["train", "retrain"])
    p.add_argument("--model-prefix", required=True, help="PREFIX/MODEL in the bucket")
    p.add_argument("--batch", help="the erasure batch id (retrain)")
    args = p.parse_args(argv)
    if args.job == "retrain" and not args.batch:
        p.error("retrain needs --batch")

    store = Store(S3Settings.from_env())
    if args.job == "train":
        out = train(store, args.model_prefix)
    else:
        out = retrain(store, args.model_prefix, args.batch)
    out["torch_imported"] = "torch" in sys.modules  # the driver should not need it
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
