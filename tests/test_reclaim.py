"""Storage-level reclaim: what "deleted" did to the bytes, against the session's SeaweedFS.

The decisive test first shows that a purge through the S3 API leaves the bytes in the
volume files (so it can fail), then that ``reclaim`` removes them from every file under
the server's data directory. The vacuum compacts every volume of the shared server,
which only drops data already deleted, so the other test modules are unaffected.
What needs no server (backends, states) is in tests/unit/test_reclaim.py.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import secrets
from dataclasses import asdict
from pathlib import Path

import botocore.exceptions
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lethe.reclaim import (
    object_lock_supported,
    reclaim,
)
from lethe.store import S3Settings, Store
from lethe_dev import localstack

from .conftest import unique_model


def _marker() -> bytes:
    m = f"LETHE-RECLAIM-MARKER-{secrets.token_hex(32)}"[:64].encode()
    assert len(m) == 64
    return m


def _parquet_with(marker: bytes, version: int) -> bytes:
    """A real Parquet file whose bytes hold ``marker`` verbatim (no compression, no
    dictionary), as an erased person's row would be."""
    n = 50
    table = pa.table(
        {
            "record_id": [f"rec-{version}-{i:03d}" for i in range(n)],
            "note": [marker.decode() if i == 7 else f"row {i}" for i in range(n)],
            "x0": pa.array([float(i) for i in range(n)], pa.float32()),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="none", use_dictionary=False)
    body = buf.getvalue()
    assert marker in body
    return body


def _files_with(root: Path, needle: bytes, chunk: int = 1 << 20) -> list[Path]:
    """Every file under root whose raw bytes contain needle (read in chunks that
    overlap by len(needle) - 1, so a match across a chunk edge is found)."""
    hits = []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        try:
            with p.open("rb") as f:
                tail = b""
                while block := f.read(chunk):
                    if needle in tail + block:
                        hits.append(p)
                        break
                    tail = block[-(len(needle) - 1) :]
        except FileNotFoundError:  # a volume file swapped out by a compaction meanwhile
            continue
    return hits


# -- the real SeaweedFS ---------------------------------------------------------------------


def test_stack_records_the_master_and_data_dir(stack: localstack.StackState) -> None:
    assert stack.seaweedfs_master.startswith("http://127.0.0.1:")
    assert stack.env()["LETHE_SEAWEEDFS_MASTER"] == stack.seaweedfs_master
    assert os.environ["LETHE_SEAWEEDFS_MASTER"] == stack.seaweedfs_master
    data = Path(stack.seaweedfs_dir)
    assert data == (Path(stack.state_dir) / "seaweedfs").resolve()
    assert data.is_dir()  # the server's -dir: volume files appear here with the first write
    # A stack.json from before these fields still loads.
    old = {k: v for k, v in asdict(stack).items() if k not in ("seaweedfs_master", "seaweedfs_dir")}
    st = localstack.StackState(**old)
    assert st.seaweedfs_master == "" and "LETHE_SEAWEEDFS_MASTER" not in st.env()


def test_purged_bytes_stay_on_disk_until_reclaim_vacuums_them(
    stack: localstack.StackState, store: Store
) -> None:
    data_dir = Path(stack.seaweedfs_dir)
    marker = _marker()
    key = f"{unique_model('reclaim')}/data/shard=0/slice=0/part.parquet"
    for version in range(3):
        store.put(key, _parquet_with(marker, version))
    store.put(f"{key}.keep", b"an object that stays")  # live data must survive the vacuum
    assert len(store.versions_of(key)) == 3

    assert store.purge(key) == 3
    assert store.versions_of(key) == []
    assert not store.exists(key)

    # The S3 API says gone; the volume files still hold the bytes. This is what the test
    # guards against, and it shows that the test can fail.
    still = _files_with(data_dir, marker)
    assert any(p.suffix == ".dat" for p in still), still

    r = reclaim("seaweedfs", stack.seaweedfs_master, timeout=60)
    assert r.state == "reclaimed", r.detail
    assert r.backend == "seaweedfs"
    assert "compacted" in r.detail
    assert key not in r.detail and marker.decode() not in r.detail

    assert _files_with(data_dir, marker) == []  # in no file at all: .dat, .idx, filer store
    assert store.get(f"{key}.keep") == b"an object that stays"

    # Nothing left to compact: reclaimed again, and it says so.
    again = reclaim("seaweedfs", stack.seaweedfs_master, timeout=30)
    assert again.state == "reclaimed", again.detail


def test_reclaim_falls_back_to_the_masters_status(
    stack: localstack.StackState, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Volume servers out of reach (only the master is): Lethe waits out the master's
    heartbeat lag, vacuums, and confirms from the master's copy of the status."""
    import lethe.reclaim as rc

    real = rc._get_json

    def masters_only(url: str, timeout: float) -> object:
        if url.endswith("/status") and not url.endswith(("/dir/status", "/vol/status")):
            raise ConnectionRefusedError
        return real(url, timeout)

    marker = _marker()
    key = f"{unique_model('reclaim')}/index/shard=0/part.parquet"
    store.put(key, _parquet_with(marker, 0))
    assert store.purge(key) == 1
    assert _files_with(Path(stack.seaweedfs_dir), marker)

    monkeypatch.setattr(rc, "_get_json", masters_only)
    r = reclaim("seaweedfs", stack.seaweedfs_master, timeout=60)
    assert r.state == "reclaimed", r.detail
    assert "the master's volume status" in r.detail and "compacted" in r.detail
    assert _files_with(Path(stack.seaweedfs_dir), marker) == []


def test_object_lock_on_seaweedfs(stack: localstack.StackState, store: Store) -> None:
    """SeaweedFS honours S3 Object Lock: a COMPLIANCE-retained version cannot be deleted,
    not even by an admin; GOVERNANCE can be bypassed. The stack's own bucket has none."""
    assert object_lock_supported(store) is False

    bucket = f"lethe-lock-{os.getpid()}-{secrets.token_hex(3)}"
    locked = Store(S3Settings.from_env(bucket=bucket))
    locked.client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    assert object_lock_supported(locked) is True
    versioning = locked.client.get_bucket_versioning(Bucket=bucket)
    assert versioning.get("Status") == "Enabled"  # Object Lock turns versioning on

    until = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    put = locked.client.put_object(
        Bucket=bucket,
        Key="compliance",
        Body=b"retained",
        ObjectLockMode="COMPLIANCE",
        ObjectLockRetainUntilDate=until,
    )
    retention = locked.client.get_object_retention(
        Bucket=bucket, Key="compliance", VersionId=put["VersionId"]
    )
    assert retention["Retention"]["Mode"] == "COMPLIANCE"
    for bypass in (False, True):
        with pytest.raises(botocore.exceptions.ClientError) as e:
            locked.client.delete_object(
                Bucket=bucket,
                Key="compliance",
                VersionId=put["VersionId"],
                BypassGovernanceRetention=bypass,
            )
        assert e.value.response["Error"]["Code"] == "AccessDenied"
    assert [v for v, _ in locked.versions_of("compliance")] == [put["VersionId"]]
    with pytest.raises(botocore.exceptions.ClientError):
        locked.purge("compliance")  # so a purge on such a bucket fails loudly

    gov = locked.client.put_object(
        Bucket=bucket,
        Key="governance",
        Body=b"retained",
        ObjectLockMode="GOVERNANCE",
        ObjectLockRetainUntilDate=until,
    )
    with pytest.raises(botocore.exceptions.ClientError):
        locked.client.delete_object(Bucket=bucket, Key="governance", VersionId=gov["VersionId"])
    locked.client.delete_object(
        Bucket=bucket, Key="governance", VersionId=gov["VersionId"], BypassGovernanceRetention=True
    )
    assert locked.versions_of("governance") == []
