"""Entry points of the Ray jobs a control plane submits (``python -m lethe.jobs``).

The operator never imports torch: it prepares an erasure (plan, quarantine, patch),
submits ``retrain`` as a Ray job, purges the erased rows while it runs, and finishes
(purge, certify) when the job is done. ``train`` trains a newly ingested model. Both
run on the Ray cluster, read S3 settings from the environment and are safe to run
again. Their drivers do not import torch either: the training and the accuracy run on
the cluster's warm retrain service (``lethe.warm``), which has it loaded.
"""

from __future__ import annotations

import argparse
import json
import sys

from lethe.layout import ModelLayout
from lethe.store import S3Settings, Store


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lethe.jobs")
    p.add_argument("job", choices=["train", "retrain"])
    p.add_argument("--model-prefix", required=True, help="PREFIX/MODEL in the bucket")
    p.add_argument("--batch", help="the erasure batch id (retrain)")
    args = p.parse_args(argv)

    from lethe.erasure import Engine
    from lethe.training import RayTrainer, train_model

    store = Store(S3Settings.from_env())
    layout = ModelLayout(args.model_prefix)
    trainer = RayTrainer(store.settings)
    if args.job == "train":
        gen, runs = train_model(store, layout, trainer)
        out = {"generation": gen.number, "accuracy": gen.accuracy, "shards_trained": len(runs)}
    else:
        if not args.batch:
            p.error("retrain needs --batch")
        engine = Engine(store, layout, trainer, evaluate=lambda g: trainer.evaluate(store, g))
        plan = engine.load_plan(args.batch)
        engine.retrain(plan)
        out = {"batch": plan.batch_id, "shards": plan.affected_shards}
    out["torch_imported"] = "torch" in sys.modules  # the driver should not need it
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
