"""The data plane in bounded memory: `make bench-ingest`.

Writes synthetic datasets (float32 features, one person per 4 records) as Parquet
prefixes of 8 files to a real SeaweedFS and, for each, in its own process:

- ingests it (``python -m lethe.jobs ingest``: what the operator's ingest job runs):
  rows/s, the peak RSS, and the dataset's size (as Arrow holds it) over that peak;
- erases one person as the operator and the batch's job split it: the keyed part
  (plan, quarantine, erase order; and the check before certifying) in a process that
  imports the operator's package, then the job's data part (patch, purge) in a process
  with no key: seconds and peak RSS of each.

Four datasets: 10 MB and 5 GB at S=8 (the operator's peak must not follow the dataset:
issue 11 says within 50 MB), and 200k and 1.6M rows with the same shard size (patch and
purge must grow with the shard, not the dataset). Peaks are VmHWM, reported, not
enforced (capping the data segment with ``RLIMIT_DATA`` made Arrow's allocator hang,
not fail). The ingest reads with pyarrow's scanner here (no Ray cluster: Ray Data's read
tasks would add processes this does not measure). The test set is 5% of the people,
because evaluation reads it whole.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lethe.core.config import ModelConfig, TrainerConfig
from lethe.core.hashing import is_test_subject
from lethe.jobs import request_ingest
from lethe.layout import ModelLayout
from lethe.store import S3Settings, Store
from lethe_dev import localstack

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


def ingest_once(
    store: Store, name: str, uri: str, env: dict[str, str], shards: int, cap: int
) -> dict[str, float]:
    layout = ModelLayout.of(name)
    cfg = ModelConfig(
        name=name,
        shards=shards,
        slices=4,
        trainer=TrainerConfig(),
        test_fraction=0.05,
        source_uri=uri,
    )
    request_ingest(store, layout, cfg, owner="bench")
    argv = [sys.executable, "-m", "lethe.jobs", "ingest", "--model-prefix", layout.prefix]
    with memory_cap(cap) as cgroup:
        out, wall = _run(argv, env, cgroup)
        usage = _cgroup_value(cgroup, "memory.max_usage_in_bytes")
    return {
        "seconds": wall,
        "records": out["records"],
        "peak_rss": out["peak_rss_bytes"],
        "cap": cap if cgroup else 0,
        "cgroup_peak": usage,
    }


CGROUP_ROOT = Path("/sys/fs/cgroup/memory")  # cgroup v1, as this machine has


@contextlib.contextmanager
def memory_cap(limit: int) -> Iterator[Path | None]:
    """A memory cgroup of ``limit`` bytes for one process, or None where there is no
    cgroup v1 memory controller to write to (the peak is then only reported). Over the
    limit the kernel reclaims the page cache and then kills the process: the cap is
    enforced, not just measured."""
    if not (CGROUP_ROOT / "memory.limit_in_bytes").exists() or os.geteuid() != 0:
        yield None
        return
    cgroup = CGROUP_ROOT / f"lethe-bench-{os.getpid()}"
    cgroup.mkdir(exist_ok=True)
    try:
        (cgroup / "memory.limit_in_bytes").write_text(str(limit))
        yield cgroup
    finally:
        for _ in range(50):  # the process has left it; the kernel may need a moment
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _cgroup_value(cgroup: Path | None, name: str) -> int:
    return int((cgroup / name).read_text()) if cgroup else 0


def _run(argv: list[str], env: dict[str, str], cgroup: Path | None = None) -> tuple[dict, float]:
    """One step in its own process (no Ray: this measures the process itself), in
    ``cgroup`` when given."""

    def enter() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    t0 = time.time()
    proc = subprocess.run(
        argv,
        env={k: v for k, v in env.items() if k != "RAY_ADDRESS"},
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=enter,
    )
    wall = time.time() - t0
    if proc.returncode != 0:
        killed = " (killed: over its memory cap)" if proc.returncode == -9 else ""
        raise RuntimeError(f"{argv[2:4]} failed{killed}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


# -- one erasure's data work, split as the operator and the batch's job split it ----------
def erase_once(name: str, rows: int, env: dict[str, str], keys_dir: str) -> dict[str, float]:
    """Plan, quarantine and order (keyed, the operator's part), then patch and purge (the
    job's part, no key), then the keyed check before certifying; each in a process."""
    subject = next(
        s
        for s in (f"p{i:09d}" for i in range(rows // 8, rows // 4))
        if not is_test_subject(s, 0.05)
    )
    keyed_env = {**env, "LETHE_KEYS_DIR": keys_dir}
    job_env = {k: v for k, v in env.items() if k != "LETHE_KEYS_DIR"}
    me = [sys.executable, str(Path(__file__).resolve())]
    plan, _ = _run([*me, "keyed-plan", name, subject], keyed_env)
    job, _ = _run([*me, "job-data", name, plan["batch"]], job_env)
    check, _ = _run([*me, "keyed-check", name, plan["batch"]], keyed_env)
    return {
        "erased": plan["records"],
        "keyed_seconds": plan["seconds"] + check["seconds"],
        "keyed_peak_rss": max(plan["peak_rss"], check["peak_rss"]),
        "patch_seconds": job["patch_seconds"],
        "purge_seconds": job["purge_seconds"],
        "job_peak_rss": job["peak_rss"],
    }


def step(argv: list[str]) -> dict[str, object]:
    """The child side of ``erase_once``. The keyed steps import the operator's package
    first, so their peak includes what the operator process holds anyway."""
    import lethe_operator.control  # noqa: F401  (the operator's imports, for its baseline)
    from lethe.core.plan import ErasureRequest
    from lethe.erasure import Engine, request_uid
    from lethe.training import peak_rss_bytes

    what, name, arg = argv
    store = Store(S3Settings.from_env())
    engine = Engine(store, ModelLayout.of(name), trainer=None)
    t0 = time.time()
    if what == "keyed-plan":
        request = ErasureRequest(request_uid(name, [arg], []), (arg,))
        plan = engine.prepare([request], patch=False)
        engine.order_erasure(plan)
        out: dict[str, object] = {"batch": plan.batch_id, "records": plan.records_erased}
    elif what == "keyed-check":
        engine.check_erased(engine.load_plan(arg))
        out = {}
    else:  # job-data: no key in this process's environment
        plan = engine.load_plan(arg)
        engine.erase_data_by_order(plan)
        at = {s: store.get_json(engine.layout.step(arg, s))["at"] for s in ("patch", "purge-data")}
        out = {"patch_seconds": at["patch"] - t0, "purge_seconds": at["purge-data"] - at["patch"]}
    return {**out, "seconds": time.time() - t0, "peak_rss": peak_rss_bytes()}


RUNS = (
    # label, rows, shards: the first two compare 10 MB with 5 GB at the same S (the
    # operator's peak); the last two the same shard size at two dataset sizes (patch and
    # purge grow with the shard, not the dataset)
    ("10 MB", 25_000, 8),
    ("5 GB", 12_000_000, 8),
    ("shard 25k, dataset 200k", 200_000, 8),
    ("shard 25k, dataset 1.6M", 1_600_000, 64),
)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] in ("keyed-plan", "keyed-check", "job-data"):
        print(json.dumps(step(sys.argv[1:])))
        return 0
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=float, default=1.0, help="multiply every dataset's rows")
    args = p.parse_args()
    from lethe.certs import Keys

    with tempfile.TemporaryDirectory(prefix="lethe-bench-ingest-") as tmp:
        sw = localstack.launch_seaweedfs(Path(tmp))
        keys_dir = str(Path(tmp) / "keys")
        Keys.generate().save(keys_dir)
        try:
            settings = S3Settings(
                sw.endpoint, "lethe-bench", localstack.ACCESS_KEY, localstack.SECRET_KEY
            )
            store = Store(settings)
            store.ensure_bucket()
            env = {**os.environ, **settings.env()}
            results = []
            for n, (label, base_rows, shards) in enumerate(RUNS):
                rows = int(base_rows * args.scale)
                prefix = f"src-{rows}"
                if not store.exists(f"{prefix}/_bytes.json"):
                    nbytes = write_dataset(store, prefix, rows)
                    store.put_json(f"{prefix}/_bytes.json", {"bytes": nbytes})
                nbytes = int(store.get_json(f"{prefix}/_bytes.json")["bytes"])
                name = f"bench-ingest-{n}"
                # the ingest may hold a quarter of the dataset (and never less than what
                # Python, pyarrow and boto3 take before the first row: about 300 MiB)
                cap = max(nbytes // 4, 512 * 2**20)
                r = ingest_once(store, name, f"s3://lethe-bench/{prefix}/", env, shards, cap)
                r.update(erase_once(name, rows, env, keys_dir))
                results.append((label, rows, shards, nbytes, r))
                print(
                    f"{label:26s} {rows:>10,d} rows {nbytes / 2**20:7.0f} MiB: ingest "
                    f"{r['seconds']:6.1f} s {r['records'] / r['seconds']:8,.0f} rows/s peak "
                    f"{r['peak_rss'] / 2**20:5.0f} MiB ({nbytes / r['peak_rss']:.1f}x); erasure: "
                    f"keyed {r['keyed_seconds']:.2f} s peak {r['keyed_peak_rss'] / 2**20:.0f} MiB, "
                    f"patch {r['patch_seconds']:.2f} s purge {r['purge_seconds']:.2f} s "
                    f"job peak {r['job_peak_rss'] / 2**20:.0f} MiB",
                    flush=True,
                )
        finally:
            localstack.stop_process(sw.pid)
    report(results)
    return 0


def report(runs: list) -> None:
    mib = 2**20
    RESULTS.mkdir(exist_ok=True)
    lines = [
        "# The data plane in bounded memory (`make bench-ingest`)",
        "",
        f"{os.cpu_count()} CPUs; 8 Parquet files, {FEATURES} float32 features, R=4, "
        "test set 5%; each step in its own process: the ingest job "
        "(`python -m lethe.jobs ingest`, pyarrow reader), the operator's keyed part of one "
        "erasure (plan, quarantine, erase order; the check before certifying), the batch "
        "job's data part (patch, purge; no key). One person (4 records) erased per model. "
        "The ingest runs in a memory cgroup capped at a quarter of the dataset (at least "
        "512 MiB): over it the kernel kills the process.",
        "",
        "| run | rows | S | dataset in memory | ingest s | rows/s | ingest memory cap | "
        "ingest peak RSS | dataset / peak | keyed s | keyed peak | patch s | purge s | job peak |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    for label, rows, shards, nbytes, r in runs:
        cap = f"{r['cap'] / mib:,.0f} MiB" if r["cap"] else "none"
        lines.append(
            f"| {label} | {rows:,d} | {shards} | {nbytes / mib:,.0f} MiB | {r['seconds']:.1f} | "
            f"{r['records'] / r['seconds']:,.0f} | {cap} | {r['peak_rss'] / mib:,.0f} MiB | "
            f"{nbytes / r['peak_rss']:.1f}x | {r['keyed_seconds']:.2f} | "
            f"{r['keyed_peak_rss'] / mib:,.0f} MiB | {r['patch_seconds']:.2f} | "
            f"{r['purge_seconds']:.2f} | {r['job_peak_rss'] / mib:,.0f} MiB |"
        )
    by = {label: r for label, _, _, _, r in runs}
    small, big = by[RUNS[0][0]], by[RUNS[1][0]]
    g1, g8 = by[RUNS[2][0]], by[RUNS[3][0]]
    lines += [
        "",
        f"- The operator's keyed part, 5 GB against 10 MB: peak RSS "
        f"{(big['keyed_peak_rss'] - small['keyed_peak_rss']) / mib:+,.0f} MiB "
        "(issue 11: within 50 MB).",
        "- Same shard size, dataset 8x larger: patch "
        f"{g8['patch_seconds'] / g1['patch_seconds']:.2f}x, "
        f"purge {g8['purge_seconds'] / g1['purge_seconds']:.2f}x the time.",
    ]
    (RESULTS / "ingest-latest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
