"""Constituent models: a built-in MLP for tabular data, a small CNN for images, or a
user model named by an import path ``package.module:build``.

A user ``build(num_features, num_classes, config)`` returns a ``torch.nn.Module``
mapping a float tensor of shape (batch, num_features) to class logits.
"""

from __future__ import annotations

import importlib
import io
from typing import Any

import torch
from torch import nn

from lethe.core.config import ConfigError, TrainerConfig


class MLP(nn.Module):
    def __init__(self, num_features: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self, shape: tuple[int, ...], num_classes: int, channels: int) -> None:
        super().__init__()
        c, h, w = shape
        self.shape = (c, h, w)
        self.features = nn.Sequential(
            nn.Conv2d(c, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(channels * (h // 2) * (w // 2), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, *self.shape)
        return self.head(self.features(x).flatten(1))


def build_model(cfg: TrainerConfig, num_features: int, num_classes: int) -> nn.Module:
    if cfg.model == "mlp":
        return MLP(num_features, num_classes, cfg.hidden)
    if cfg.model == "cnn":
        return SmallCNN(tuple(cfg.input_shape), num_classes, max(8, cfg.hidden // 8))
    module_name, _, attr = cfg.model.partition(":")
    try:
        build = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"trainer.model: cannot import {cfg.model!r}: {e}") from None
    model = build(num_features=num_features, num_classes=num_classes, config=cfg)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"trainer.model: {cfg.model!r} did not return a torch.nn.Module")
    return model


def save_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, meta: dict[str, Any]
) -> bytes:
    buf = io.BytesIO()
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "meta": meta,
    }
    torch.save(state, buf)
    return buf.getvalue()


def load_checkpoint(body: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
