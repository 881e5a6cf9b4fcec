"""Storage-level reclaim without a server: which backend an endpoint is, and what each
state says. tests/test_reclaim.py runs ``reclaim`` against the real SeaweedFS."""

from __future__ import annotations

import pytest

from lethe.reclaim import BACKENDS, Reclaim, backend_from_env, backend_of, reclaim
from lethe_dev import localstack


@pytest.mark.parametrize(
    ("endpoint", "backend", "expected"),
    [
        (None, None, "aws"),
        ("", None, "aws"),
        ("https://s3.amazonaws.com", None, "aws"),
        ("https://s3.eu-west-1.amazonaws.com", None, "aws"),
        ("https://bucket.s3.dualstack.us-east-2.amazonaws.com/", None, "aws"),
        ("https://s3.cn-north-1.amazonaws.com.cn", None, "aws"),
        ("s3.us-west-2.amazonaws.com", None, "aws"),
        ("https://storage.googleapis.com", None, "gcs"),
        ("http://127.0.0.1:8333", None, "other"),
        ("https://minio.example.com", None, "other"),
        ("https://amazonaws.com.evil.example", None, "other"),
        ("http://127.0.0.1:8333", "seaweedfs", "seaweedfs"),
        ("http://127.0.0.1:9000", "MinIO", "minio"),
        ("https://rgw.example", "ceph", "ceph"),
        ("https://s3.amazonaws.com", "other", "other"),
        (None, "gcs", "gcs"),
    ],
)
def test_backend_of(endpoint: str | None, backend: str | None, expected: str) -> None:
    assert backend_of(endpoint, backend) == expected


def test_backend_of_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown storage backend"):
        backend_of(None, "azure")
    with pytest.raises(ValueError):
        reclaim("nfs", None)


def test_backend_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LETHE_STORAGE_BACKEND", raising=False)
    monkeypatch.delenv("LETHE_SEAWEEDFS_MASTER", raising=False)
    assert backend_from_env("http://127.0.0.1:1") == ("other", None)
    monkeypatch.setenv("LETHE_SEAWEEDFS_MASTER", "http://127.0.0.1:9333")
    assert backend_from_env("http://127.0.0.1:1") == ("seaweedfs", "http://127.0.0.1:9333")
    monkeypatch.setenv("LETHE_STORAGE_BACKEND", "minio")
    assert backend_from_env("http://127.0.0.1:1") == ("minio", "http://127.0.0.1:9333")


@pytest.mark.parametrize(
    ("backend", "state", "words"),
    [
        ("seaweedfs", "pending-backend-compaction", "volume.vacuum"),
        ("minio", "pending-backend-compaction", ".minio.sys/tmp/.trash"),
        ("ceph", "pending-backend-compaction", "radosgw-admin gc process"),
        ("other", "pending-backend-compaction", "garbage-collect"),
        ("aws", "provider-managed", "AWS's data-deletion documentation"),
        ("gcs", "provider-managed", "Google Cloud's data-deletion documentation"),
    ],
)
def test_states_without_an_admin_url(backend: str, state: str, words: str) -> None:
    r = reclaim(backend, None)
    assert (r.state, r.backend) == (state, backend)
    assert words in r.detail
    assert Reclaim.from_json(r.to_json()) == r
    assert set(r.to_json()) == {"state", "backend", "detail"}


def test_reclaim_json_rejects_unknown_state() -> None:
    with pytest.raises(ValueError):
        Reclaim.from_json({"state": "erased", "backend": "aws", "detail": ""})


def test_unreachable_master_is_pending_with_the_reason() -> None:
    dead = f"http://127.0.0.1:{localstack.free_port()}"
    r = reclaim("seaweedfs", dead, timeout=10)
    assert r.state == "pending-backend-compaction"
    assert "connection refused" in r.detail and "volume.vacuum" in r.detail
    assert dead not in r.detail  # no addresses, no ids in certificate text


def test_backends_list_is_what_backend_of_accepts() -> None:
    for name in BACKENDS:
        assert backend_of("http://127.0.0.1:1", name) == name
