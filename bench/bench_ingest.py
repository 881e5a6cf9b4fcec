"""Ingest in bounded memory: `make bench-ingest`.

Writes a synthetic dataset (float32 features, one person per 4 records) as a Parquet
prefix of 8 files to a real SeaweedFS, at two sizes, and ingests each in its own
process (``python -m lethe.jobs ingest``: what the operator's ingest job runs), then
reports rows/s, the peak RSS of that process and the ratio of the dataset's size (as
Arrow holds it in memory) to that peak. The claim under test: the peak grows with a
batch, a slice and the test set, not with the dataset, so a dataset several times
larger than the memory a worker is given still ingests. (Capping the process's data
segment with ``RLIMIT_DATA`` instead made Arrow's allocator hang, not fail: the peak is
reported, not enforced.)

The ingest process reads with pyarrow's scanner here (no Ray cluster is started: Ray
Data's read tasks would add their own processes, which this does not measure). The
test set is 5% of the people, because evaluation reads it whole.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lethe import localstack
from lethe.core.config import ModelConfig, TrainerConfig
from lethe.jobs import request_ingest
from lethe.layout import ModelLayout
from lethe.store import S3Settings, Store

FEATURES = 100
FILES = 8
RESULTS = Path(__file__).parent / "results"


def write_dataset(src: Store, prefix: str, rows: int, seed: int = 0) -> int:
    """``rows`` records in FILES Parquet files under ``prefix``; returns their size in
    memory (Arrow bytes)."""
    rng = np.random.default_rng(seed)
    per = -(-rows // FILES)
    nbytes = 0
    for f in range(FILES):
        lo, hi = f * per, min(rows, (f + 1) * per)
        ids = np.arange(lo, hi)
        x = rng.normal(size=(hi - lo, FEATURES)).astype(np.float32)
        cols: dict[str, pa.Array] = {
            "record_id": pa.array([f"r{i:09d}" for i in ids]),
            "subject_id": pa.array([f"p{i // 4:09d}" for i in ids]),
            "label": pa.array((x[:, 0] > 0).astype(np.int64)),
        }
        for j in range(FEATURES):
            cols[f"x{j:03d}"] = pa.array(x[:, j])
        table = pa.table(cols)
        nbytes += table.nbytes
        buf = io.BytesIO()
        # row groups of 65,536 rows (26 MiB here; Spark writes 128 MiB): a reader
        # holds one at a time, so they are part of the bound
        pq.write_table(table, buf, compression="zstd", row_group_size=65_536)
        src.put(f"{prefix}/part-{f:03d}.parquet", buf.getvalue())
    return nbytes


def ingest_once(store: Store, name: str, uri: str, env: dict[str, str]) -> dict[str, float]:
    layout = ModelLayout.of(name)
    cfg = ModelConfig(
        name=name,
        shards=8,
        slices=4,
        trainer=TrainerConfig(),
        test_fraction=0.05,
        source_uri=uri,
    )
    request_ingest(store, layout, cfg, owner="bench")
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "lethe.jobs", "ingest", "--model-prefix", layout.prefix],
        env={k: v for k, v in env.items() if k != "RAY_ADDRESS"},
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"ingest failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"seconds": wall, "records": out["records"], "peak_rss": out["peak_rss_bytes"]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--small-rows", type=int, default=50_000)
    p.add_argument("--large-rows", type=int, default=6_000_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="lethe-bench-ingest-") as tmp:
        sw = localstack.launch_seaweedfs(Path(tmp))
        try:
            settings = S3Settings(
                sw.endpoint, "lethe-bench", localstack.ACCESS_KEY, localstack.SECRET_KEY
            )
            store = Store(settings)
            store.ensure_bucket()
            env = {**os.environ, **settings.env()}
            rows_out = []
            for label, rows in (("small", args.small_rows), ("large", args.large_rows)):
                prefix = f"src-{rows}"
                if not store.exists(f"{prefix}/part-000.parquet"):
                    nbytes = write_dataset(store, prefix, rows)
                    store.put_json(f"{prefix}/_bytes.json", {"bytes": nbytes})
                nbytes = int(store.get_json(f"{prefix}/_bytes.json")["bytes"])
                r = ingest_once(
                    store, f"bench-ingest-{len(rows_out)}", f"s3://lethe-bench/{prefix}/", env
                )
                rows_out.append((label, rows, nbytes, r))
                print(
                    f"{label:32s} {rows:>9,d} rows {nbytes / 2**20:8.0f} MiB in memory: "
                    f"{r['seconds']:6.1f} s, {r['records'] / r['seconds']:9,.0f} rows/s, "
                    f"peak RSS {r['peak_rss'] / 2**20:6.0f} MiB "
                    f"(dataset / peak = {nbytes / r['peak_rss']:.1f}x)",
                    flush=True,
                )
        finally:
            os.kill(sw.pid, signal.SIGTERM)
    report(rows_out)
    return 0


def report(runs: list) -> None:
    RESULTS.mkdir(exist_ok=True)
    lines = [
        "# Ingest in bounded memory (`make bench-ingest`)",
        "",
        f"{os.cpu_count()} CPUs; 8 Parquet files, {FEATURES} float32 features, S=8, R=4, "
        "test set 5%; `python -m lethe.jobs ingest` in its own process (pyarrow reader).",
        "",
        "| run | rows | dataset in memory | seconds | rows/s | peak RSS | dataset / peak |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, rows, nbytes, r in runs:
        lines.append(
            f"| {label} | {rows:,d} | {nbytes / 2**20:,.0f} MiB | {r['seconds']:.1f} | "
            f"{r['records'] / r['seconds']:,.0f} | {r['peak_rss'] / 2**20:,.0f} MiB | "
            f"{nbytes / r['peak_rss']:.1f}x |"
        )
    (RESULTS / "ingest-latest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
