"""The scanner behind ``verify``, against the real SeaweedFS with bucket versioning on.

Erased ids are known to the scanner only as a keyed hash (HMAC with a test key), as in
``verify``: every test plants an id in some object and format and checks that it is
found, with the right key, version and place, and that nothing else is.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import hmac
import io
import json
import pickle
import tarfile
import tempfile
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lethe.scan import Finding, ScanReport, scan
from lethe.store import Store

from .conftest import unique_model

TEST_KEY = b"lethe-scan-test-key"
SUBJECT = "subj-0042"
RECORD = "000042"  # an id that a typed column holds as the integer 42


def keyed(ids: Iterable[str], key: bytes = TEST_KEY) -> Callable[[str], bool]:
    """The predicate ``verify`` hands over: HMACs of erased ids, never the ids."""
    digests = {hmac.new(key, i.encode(), hashlib.sha256).digest() for i in ids}

    def is_erased(token: str) -> bool:
        return hmac.new(key, token.encode(), hashlib.sha256).digest() in digests

    return is_erased


ERASED = keyed([SUBJECT, RECORD])


def put(store: Store, key: str, body: bytes) -> str:
    """Write one version; its version id."""
    r = store.client.put_object(Bucket=store.bucket, Key=key, Body=body)
    return str(r["VersionId"])


def parquet(table: pa.Table, row_group_size: int | None = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def people_table() -> pa.Table:
    return pa.table(
        {
            "subject_id": ["subj-0001", SUBJECT, "subj-0003", SUBJECT],
            "n": pa.array([1, 42, 7, 9], pa.int64()),
            "tags": pa.array([["a"], ["b", SUBJECT], [], None], pa.list_(pa.string())),
            "note": ["hello", "seen subj-0042 today", None, "bye"],
            "score": pa.array([0.1, 0.2, 0.3, 0.4], pa.float32()),
        }
    )


def clean_table() -> pa.Table:
    """Near misses only: none of these is an erased id."""
    return pa.table(
        {
            "subject_id": ["subj-00420", "subj-004", "xsubj-0042y", "subj-0043"],
            "n": pa.array([420, 4200, 43, 1042], pa.int64()),
            "tags": pa.array([["subj-0041"], [], None, ["0000042"]], pa.list_(pa.string())),
        }
    )


CSV = b"id,name\n1,alice\n2,subj-0042\n3,bob\n"
JSON_DOC = json.dumps({"people": [{"id": "alice"}, {"id": SUBJECT}]}, indent=1).encode()
JSON_LINE = next(i for i, line in enumerate(JSON_DOC.split(b"\n"), 1) if SUBJECT.encode() in line)
BINARY = b"\x00\x01\x02\xff" * 64 + SUBJECT.encode() + b"\x00\xfe\x07" * 64


def torch_like_zip() -> bytes:
    """A checkpoint laid out as torch.save does: stored members, a protocol-2 pickle."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"trained_on": [SUBJECT]}, protocol=2))
        z.writestr("archive/data/0", np.zeros(64, np.float32).tobytes())
    return buf.getvalue()


def tar_gz(name: str, body: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo(name)
        info.size = len(body)
        tf.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def deflated_zip(name: str, body: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, body)
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# name -> (body, where the id must be found, hits); where None: the object is clean
PLANTED: dict[str, tuple[bytes, str | None, int]] = {
    "data/people.parquet": (parquet(people_table(), row_group_size=2), None, 0),
    "exports/people.csv": (CSV, "csv column 2", 1),
    "exports/people.tsv": (b"name\tid\nbob\t000042\n", "tsv column 2", 1),
    "exports/people.json": (JSON_DOC, f"json line {JSON_LINE}", 1),
    "exports/people.jsonl": (
        b'{"id": "alice"}\n{"id": "subj-0042", "n": 1}\n{"id": "bob"}\n',
        "jsonl line 2",
        1,
    ),
    "notes/notes.txt": (b"first line\nsecond line\nthe id was subj-0042.\n", "text line 3", 1),
    "exports/people.csv.gz": (gzip.compress(CSV), "gzip > csv column 2", 1),
    "exports/people.json.zst": (
        pa.compress(json.dumps({"id": SUBJECT}).encode(), "zstd", asbytes=True),
        "zstd > json line 1",
        1,
    ),
    "logs/app.log.bz2": (
        bz2.compress(b"start\nuser=subj-0042 logged in\n"),
        "bz2 > text line 2",
        1,
    ),
    "blobs/blob.bin": (BINARY, "raw bytes offset 256", 1),
    "backup/x.parquet": (parquet(pa.table({"who": [SUBJECT]})), "parquet column who", 1),
    "checkpoints/x.parquet": (parquet(pa.table({"who": [SUBJECT]})), "parquet column who", 1),
    "checkpoints/model.pt": (torch_like_zip(), "zip member archive/data.pkl > pickle", 1),
    "backup/people.zip": (
        deflated_zip("people.csv", CSV),
        "zip member people.csv > csv column 2",
        1,
    ),
    "backup/people.tar.gz": (tar_gz("a.csv", CSV), "gzip > tar member a.csv > csv column 2", 1),
    "arrays/ids.npy": (npy(np.array(["subj-0001", SUBJECT])), "npy array", 1),
    "notes/utf16.txt": ("hi\nsubj-0042\n".encode("utf-16"), "utf-16 > text line 2", 1),
    "clean/people.parquet": (parquet(clean_table()), None, 0),
    "clean/notes.txt": (b"subj-00420 and subj-004 and 0000042 and 42\n", None, 0),
    "clean/blob.bin": (b"\x00\x01subj-00420\x00\xff" * 50, None, 0),
    "clean/people.csv.gz": (gzip.compress(b"id\nsubj-0043\n"), None, 0),
}
PARQUET_WHERE = {
    "parquet column subject_id": 2,
    "parquet column n": 1,  # 42, which is "000042" zero-padded
    "parquet column tags": 1,
    "parquet column note": 1,
}


@dataclass
class Planted:
    prefix: str
    versions: dict[str, str]  # key -> version id of the object's (last) version
    old_version: str  # the overwritten version of prefix/rewritten.csv that held the id
    new_version: str
    sizes: int
    report: ScanReport

    def at(self, name: str) -> list[Finding]:
        key = f"{self.prefix}/{name}"
        return [f for f in self.report.findings if f.key == key]


@pytest.fixture(scope="module")
def planted(store: Store) -> Planted:
    prefix = unique_model("scan")
    versions = {}
    sizes = 0
    for name, (body, _, _) in PLANTED.items():
        versions[f"{prefix}/{name}"] = put(store, f"{prefix}/{name}", body)
        sizes += len(body)
    old_body, new_body = b"id\nsubj-0042\n", b"id\nsubj-0001\n"
    old = put(store, f"{prefix}/rewritten.csv", old_body)
    new = put(store, f"{prefix}/rewritten.csv", new_body)
    sizes += len(old_body) + len(new_body)
    report = scan(store, prefix + "/", ERASED)
    return Planted(prefix, versions, old, new, sizes, report)


def test_every_object_and_version_is_read(planted: Planted) -> None:
    r = planted.report
    assert r.errors == []
    assert r.objects == len(PLANTED) + 1
    assert r.versions == len(PLANTED) + 2
    assert r.bytes == planted.sizes  # every byte of every version was read


@pytest.mark.parametrize("name", [n for n, (_, where, _) in PLANTED.items() if where])
def test_found_with_key_version_and_place(planted: Planted, name: str) -> None:
    _, where, hits = PLANTED[name]
    key = f"{planted.prefix}/{name}"
    assert planted.at(name) == [Finding(key, planted.versions[key], str(where), hits)]


def test_parquet_string_int_and_list_columns(planted: Planted) -> None:
    found = planted.at("data/people.parquet")
    assert {f.version for f in found} == {planted.versions[f"{planted.prefix}/data/people.parquet"]}
    assert {f.where: f.hits for f in found} == PARQUET_WHERE


def test_clean_objects_give_no_findings(planted: Planted) -> None:
    for name, (_, where, _) in PLANTED.items():
        if name.startswith("clean/"):
            assert where is None
            assert planted.at(name) == [], name


def test_old_version_is_found_and_new_is_clean(planted: Planted) -> None:
    found = planted.at("rewritten.csv")
    key = f"{planted.prefix}/rewritten.csv"
    assert found == [Finding(key, planted.old_version, "csv column 1", 1)]
    assert planted.new_version != planted.old_version


def test_report_names_no_id(planted: Planted) -> None:
    assert SUBJECT not in repr(planted.report)
    for f in planted.report.findings:
        assert RECORD not in f.where


def test_predicate_is_a_keyed_hash(store: Store, planted: Planted) -> None:
    """Only the predicate knows the ids: with another HMAC key nothing is found."""
    asked: list[str] = []
    right = keyed([SUBJECT, RECORD])

    def recording(token: str) -> bool:
        asked.append(token)
        return right(token)

    assert scan(store, planted.prefix + "/", recording).findings == planted.report.findings
    assert SUBJECT in asked and all(isinstance(t, str) for t in asked)
    # The same erased set asked with another key: the hashes never meet.
    digests = {hmac.new(TEST_KEY, i.encode(), hashlib.sha256).digest() for i in (SUBJECT, RECORD)}

    def wrong_key(token: str) -> bool:
        return hmac.new(b"another key", token.encode(), hashlib.sha256).digest() in digests

    other = scan(store, planted.prefix + "/", wrong_key)
    assert other.findings == [] and other.errors == []


def test_token_across_chunk_boundary(store: Store) -> None:
    prefix = unique_model("scan-chunk")
    binary = b"\x00" * 60 + SUBJECT.encode() + b"\x00" * 60  # the id spans bytes 60..68
    text = b"a" * 10 + b"\n" + b"x" * 45 + b" " + SUBJECT.encode() + b" tail\n"
    vb = put(store, f"{prefix}/b.bin", binary)
    vt = put(store, f"{prefix}/t.txt", text)
    report = scan(store, prefix + "/", ERASED, chunk_size=64)
    assert report.errors == []
    assert sorted(report.findings, key=lambda f: f.key) == [
        Finding(f"{prefix}/b.bin", vb, "raw bytes offset 60", 1),
        Finding(f"{prefix}/t.txt", vt, "text line 2", 1),
    ]


def test_corrupt_parquet_is_an_error_not_an_exception(store: Store) -> None:
    prefix = unique_model("scan-corrupt")
    key = f"{prefix}/data/shard=0/bad.parquet"
    version = put(store, key, b"PAR1" + bytes(range(256)) * 8 + b" subj-0042 " + b"PAR1")
    report = scan(store, prefix + "/", ERASED)
    assert len(report.errors) == 1
    assert report.errors[0].startswith(f"{key} (version {version}): parquet:")
    assert SUBJECT not in report.errors[0]
    # What the raw bytes still show is reported too.
    assert [f.key for f in report.findings] == [key]
    assert report.findings[0].where.startswith("unreadable parquet > raw bytes offset")


def test_truncated_gzip_is_an_error(store: Store) -> None:
    prefix = unique_model("scan-gzip")
    key = f"{prefix}/x.csv.gz"
    version = put(store, key, gzip.compress(CSV * 100)[:-20])
    report = scan(store, prefix + "/", ERASED)
    assert len(report.errors) == 1 and report.errors[0].startswith(f"{key} (version {version})")
    assert "gzip" in report.errors[0]


def test_key_that_is_an_id(store: Store) -> None:
    prefix = unique_model("scan-name")
    key = f"{prefix}/backup/{SUBJECT}.txt"
    version = put(store, key, b"nothing here\n")
    report = scan(store, prefix + "/", ERASED)
    assert report.findings == [Finding(key, version, "object key", 1)]


def test_whole_bucket(store: Store, planted: Planted) -> None:
    outside = f"{unique_model('scan-root')}.txt"  # not under the planted prefix
    version = put(store, outside, b"root subj-0042\n")
    seen: list[str] = []

    def skip(key: str) -> bool:
        seen.append(key)
        # other tests share the bucket: their objects are listed, not read (time)
        return not (key == outside or key.startswith(planted.prefix + "/"))

    report = scan(store, "", ERASED, skip=skip, max_object_bytes=32 << 20)
    assert Finding(outside, version, "text line 1", 1) in report.findings
    mine = [f for f in report.findings if f.key.startswith(planted.prefix + "/")]
    assert sorted(mine, key=repr) == sorted(planted.report.findings, key=repr)
    assert outside in seen and any(k.startswith(planted.prefix + "/") for k in seen)
    assert not [e for e in report.errors if e.startswith(planted.prefix + "/")]


def test_skip_and_size_limit(store: Store, planted: Planted) -> None:
    report = scan(store, planted.prefix + "/", ERASED, skip=lambda k: k.endswith(".csv"))
    assert not [f for f in report.findings if f.key.endswith(".csv")]
    assert report.objects == len(PLANTED) + 1 - 2  # people.csv and rewritten.csv
    small = scan(store, planted.prefix + "/", ERASED, max_object_bytes=200)
    blob = f"{planted.prefix}/blobs/blob.bin"
    assert any(e.startswith(f"{blob} (version ") and "over the limit" in e for e in small.errors)
    assert not [f for f in small.findings if f.key == blob]


def test_progress(store: Store, planted: Planted, capsys: pytest.CaptureFixture[str]) -> None:
    scan(store, planted.prefix + "/", ERASED, progress=True)  # stderr is not a terminal here
    assert capsys.readouterr() == ("", "")
    scan(store, planted.prefix + "/", ERASED, progress="always")
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("\r") and err.endswith("\n") and err.count("\n") == 1
    last = err.rstrip().rsplit("\r", 1)[-1]
    assert f"{len(PLANTED) + 1} objects, {len(PLANTED) + 2} versions" in last
    assert SUBJECT not in err


def test_predicate_errors_propagate(store: Store, planted: Planted) -> None:
    def broken(token: str) -> bool:
        raise RuntimeError("hmac key missing")

    with pytest.raises(RuntimeError, match="hmac key missing"):
        scan(store, planted.prefix + "/", broken)


def test_memory_is_bounded_for_a_large_object(store: Store) -> None:
    """200 MB object, the id in the middle: found, with Python memory under 64 MiB."""
    size, at = 200 << 20, 100 << 20
    key = f"{unique_model('scan-big')}/blob.bin"
    with tempfile.TemporaryFile() as f:
        f.truncate(size)  # sparse zeros
        f.seek(at)
        f.write(SUBJECT.encode())
        f.seek(0)
        version = str(store.client.put_object(Bucket=store.bucket, Key=key, Body=f)["VersionId"])
    try:
        tracemalloc.start()
        started = time.monotonic()
        report = scan(store, key, ERASED)
        took = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert report.errors == []
        assert report.findings == [Finding(key, version, f"raw bytes offset {at}", 1)]
        assert report.bytes == size
        assert peak < 64 << 20, f"peak {peak >> 20} MiB"
        assert took < 60
    finally:
        tracemalloc.stop()
        store.purge(key)
