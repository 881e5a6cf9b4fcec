"""Prediction: aggregate the live constituents of a generation.

Quarantined shards never vote: the moment an erasure is accepted, nothing derived
from the erased records serves predictions.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from lethe import dataio
from lethe.core.manifest import Generation
from lethe.errors import LetheError
from lethe.files import feature_columns, features_and_labels
from lethe.generations import read_live
from lethe.layout import ModelLayout
from lethe.models import build_model, load_checkpoint
from lethe.store import Store

Aggregate = Literal["vote", "softmax"]


class NoLiveConstituents(LetheError, RuntimeError):
    """Every shard is quarantined (an erasure's retrain has not landed) or untrained."""


class Ensemble:
    def __init__(self, gen: Generation, models: dict[int, torch.nn.Module]) -> None:
        self.generation = gen
        self.models = models

    @classmethod
    def load(
        cls,
        store: Store,
        gen: Generation,
        shards: list[int] | None = None,
        cache: dict[str, torch.nn.Module] | None = None,
    ) -> Ensemble:
        shards = gen.live_shards() if shards is None else shards
        cfg = gen.config
        models: dict[int, torch.nn.Module] = {}
        for k in shards:
            key = gen.shards[k].final_checkpoint
            if key is None:
                continue
            if cache is not None and key in cache:
                models[k] = cache[key]
                continue
            model = build_model(cfg.trainer, cfg.num_features, len(cfg.classes))
            model.load_state_dict(load_checkpoint(store.get(key))["model"])
            model.eval()
            models[k] = model
            if cache is not None:
                cache[key] = model
        return cls(gen, models)

    @classmethod
    def live(cls, store: Store, layout: ModelLayout) -> Ensemble:
        return cls.load(store, read_live(store, layout).generation)

    def probabilities(self, x: np.ndarray, aggregate: Aggregate = "vote") -> np.ndarray:
        if not self.models:
            raise NoLiveConstituents("no live constituent: every shard is quarantined or untrained")
        n_classes = len(self.generation.config.classes)
        xt = torch.from_numpy(np.asarray(x, np.float32))
        votes = np.zeros((len(x), n_classes))
        probs = np.zeros((len(x), n_classes))
        with torch.no_grad():
            for model in self.models.values():
                p = torch.softmax(model(xt), dim=1).numpy()
                probs += p
                votes[np.arange(len(x)), p.argmax(1)] += 1
        probs /= len(self.models)
        if aggregate == "softmax":
            return probs
        # Majority vote; the mean softmax breaks ties.
        return (votes + probs * 1e-3) / len(self.models)

    def predict(self, x: np.ndarray, aggregate: Aggregate = "vote") -> np.ndarray:
        return self.probabilities(x, aggregate).argmax(1)

    def labels(self, x: np.ndarray, aggregate: Aggregate = "vote") -> list[str]:
        classes = self.generation.config.classes
        return [classes[i] for i in self.predict(x, aggregate)]


def ensemble_accuracy(
    store: Store,
    gen: Generation,
    shards: list[int] | None = None,
    cache: dict[str, torch.nn.Module] | None = None,
) -> float | None:
    """Accuracy of the ensemble of ``shards`` (default: the live ones) on the test set."""
    ens = Ensemble.load(store, gen, shards, cache)
    cfg = gen.config
    test = dataio.read_table(store, gen.test, feature_columns(cfg))
    x, y = features_and_labels(store, cfg, test)
    if not ens.models or len(y) == 0:
        return None
    return float((ens.predict(x) == y).mean())
