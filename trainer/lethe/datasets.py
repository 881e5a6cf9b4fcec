"""Datasets that ship with a package (no download): the demo's digits, by people.

Torch-free, so the operator can ingest ``builtin:digits`` too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from lethe.core.hashing import is_test_subject

PEOPLE = 300
TEST_FRACTION = 0.2
BUILTIN = ("digits",)


def demo_subject() -> str:
    """The synthetic person the demo erases: the first one in the training split."""
    return next(
        f"person-{i:04d}"
        for i in range(PEOPLE)
        if not is_test_subject(f"person-{i:04d}", TEST_FRACTION)
    )


def digits_table(people: int = PEOPLE, seed: int = 7) -> tuple[pa.Table, str]:
    """Digits images, each owned by one of ``people`` synthetic subjects; one of them
    owns 40 images, so erasing that person is visible. Returns the table and that id."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    n = len(d.target)
    subject = demo_subject()
    owner = rng.integers(0, people, n)
    owner[owner == int(subject.split("-")[1])] = (int(subject.split("-")[1]) + 1) % people
    owner[rng.choice(n, 40, replace=False)] = int(subject.split("-")[1])
    cols: dict[str, Any] = {
        "record_id": [f"img-{i:05d}" for i in range(n)],
        "subject_id": [f"person-{o:04d}" for o in owner],
        "label": d.target.astype(np.int64),
    }
    for j in range(d.data.shape[1]):
        cols[f"px{j:02d}"] = (d.data[:, j] / 16.0).astype(np.float32)
    return pa.table(cols), subject


def builtin(name: str) -> pa.Table:
    if name != "digits":
        raise ValueError(f"unknown built-in dataset {name!r} (have: {', '.join(BUILTIN)})")
    return digits_table()[0]
