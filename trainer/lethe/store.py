"""S3 access: plain gets and puts, conditional puts, and deletes of every version.

Conditional puts (If-None-Match: * to create, If-Match: ETag to replace) are how
concurrent writers are serialised; no local lock is ever taken.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from lethe.errors import IntegrityFailure, LetheError, TransientError


class PreconditionFailed(TransientError):
    """A conditional put lost: someone else wrote first."""


class NotFound(LetheError, KeyError):
    """No such object (or version) in the bucket; the message is its key."""


@dataclass(frozen=True)
class S3Settings:
    endpoint: str | None
    bucket: str
    access_key: str | None = None
    secret_key: str | None = None
    region: str = "us-east-1"

    @classmethod
    def from_env(cls, bucket: str | None = None, endpoint: str | None = None) -> S3Settings:
        return cls(
            endpoint=endpoint or os.environ.get("LETHE_S3_ENDPOINT") or None,
            bucket=bucket or os.environ.get("LETHE_BUCKET", "lethe"),
            access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        )

    def public_env(self) -> dict[str, str]:
        """Where the data is, without the keys: safe to put in a Ray job's runtime_env
        (job and actor metadata, readable by anyone who can reach the cluster)."""
        out = {"LETHE_BUCKET": self.bucket, "AWS_DEFAULT_REGION": self.region}
        if self.endpoint:
            out["LETHE_S3_ENDPOINT"] = self.endpoint
        return out

    def env(self) -> dict[str, str]:
        """The environment that makes ``from_env`` give these settings back, keys included
        (for a process this one starts; never for a Ray job's metadata)."""
        out = self.public_env()
        if self.access_key:
            out["AWS_ACCESS_KEY_ID"] = self.access_key
        if self.secret_key:
            out["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        return out


CONNECT_TIMEOUT_SECONDS = 10

# What S3 answers for an object, or a version of one, that is not there (any more).
MISSING = ("NoSuchKey", "NoSuchVersion", "404", "NotFound")
# What S3 answers to credentials that may not do what was asked (HEAD has no body: "403").
DENIED = ("AccessDenied", "403", "Forbidden", "AllAccessDisabled")
WRITE_PROBE = '"lethe-write-probe"'  # an ETag no object has (not hex)


def error_code(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


@contextmanager
def missing_as_not_found(what: str) -> Iterator[None]:
    """S3's answers for an object (or version) that is not there, as ``NotFound(what)``."""
    try:
        yield
    except botocore.exceptions.ClientError as e:
        if error_code(e) in MISSING:
            raise NotFound(what) from None
        raise


class Store:
    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.client = boto3.client(
            "s3",
            endpoint_url=settings.endpoint,
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key,
            region_name=settings.region,
            config=Config(
                retries={"max_attempts": 5, "mode": "standard"},
                s3={"addressing_style": "path"},
                # an endpoint that does not answer fails in seconds, not minutes: the
                # operator's threads are shared by every model it watches
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
            ),
        )

    # -- bucket ------------------------------------------------------------------
    def ensure_bucket(self, versioning: bool = True) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError:
            self.client.create_bucket(Bucket=self.bucket)
        if versioning:
            self.client.put_bucket_versioning(
                Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"}
            )

    # -- reads -------------------------------------------------------------------
    def get(self, key: str) -> bytes:
        return self.get_with_etag(key)[0]

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        with missing_as_not_found(key):
            r = self.client.get_object(Bucket=self.bucket, Key=key)
        return r["Body"].read(), r["ETag"]

    def download(self, key: str, sink: Any) -> None:
        """The object's bytes written to the binary file ``sink``, streamed."""
        with missing_as_not_found(key):
            self.client.download_fileobj(self.bucket, key, sink)

    def get_json(self, key: str) -> Any:
        return json.loads(self.get(key))

    def size(self, key: str) -> int:
        return self.head(key)[1]

    def head(self, key: str) -> tuple[str, int]:
        """(ETag, size) of the current version."""
        with missing_as_not_found(key):
            r = self.client.head_object(Bucket=self.bucket, Key=key)
        return str(r["ETag"]), int(r["ContentLength"])

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of an object from ``start`` (fewer at its end)."""
        if length <= 0:
            return b""
        with missing_as_not_found(key):
            r = self.client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + length - 1}"
            )
        return r["Body"].read()

    def get_version(self, key: str, version_id: str) -> bytes:
        """One version's bytes; NotFound if it is gone (a concurrent purge deleted it
        between a listing and this read)."""
        with missing_as_not_found(f"{key} (version {version_id})"):
            r = self.client.get_object(Bucket=self.bucket, Key=key, VersionId=version_id)
        return r["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except botocore.exceptions.ClientError as e:
            if error_code(e) in MISSING:
                return False
            raise

    def list_keys(self, prefix: str) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"]

    def list_versions(self, prefix: str) -> Iterator[tuple[str, str, bool]]:
        """(key, version id, is a delete marker) for every version under prefix."""
        pages = self.client.get_paginator("list_object_versions").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            for v in page.get("Versions", []):
                yield v["Key"], v["VersionId"], False
            for m in page.get("DeleteMarkers", []):
                yield m["Key"], m["VersionId"], True

    # -- writes ------------------------------------------------------------------
    def put(self, key: str, body: bytes, content_type: str = "application/octet-stream") -> str:
        """Write key; returns the new version's id ("null" where versioning is off)."""
        r = self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)
        return str(r.get("VersionId") or "null")

    def put_file(self, key: str, path: str | Path) -> str:
        """Write key from a local file, streamed (not read into memory first)."""
        with open(path, "rb") as f:
            r = self.client.put_object(
                Bucket=self.bucket, Key=key, Body=f, ContentType="application/octet-stream"
            )
        return str(r.get("VersionId") or "null")

    def put_json(self, key: str, obj: Any) -> None:
        self.put(key, _dumps(obj), "application/json")

    def put_if_absent(self, key: str, body: bytes, retain_days: int | None = None) -> bool:
        """Create key unless it exists. True if this call created it. ``retain_days``:
        write it under S3 Object Lock in compliance mode (nobody can delete or
        overwrite that version until then; the bucket must have Object Lock on)."""
        lock: dict[str, Any] = {}
        if retain_days:
            lock = {
                "ObjectLockMode": "COMPLIANCE",
                "ObjectLockRetainUntilDate": dt.datetime.now(dt.UTC)
                + dt.timedelta(days=retain_days),
            }
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*", **lock)
            return True
        except botocore.exceptions.ClientError as e:
            if error_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise

    def put_json_if_absent(self, key: str, obj: Any, retain_days: int | None = None) -> bool:
        return self.put_if_absent(key, _dumps(obj), retain_days)

    def object_lock_enabled(self) -> bool:
        """Whether the bucket has S3 Object Lock on (certificates are then locked)."""
        try:
            conf = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except botocore.exceptions.ClientError:
            return False
        return conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"

    def put_if_match(self, key: str, body: bytes, etag: str) -> str:
        """Replace key only if it still has ``etag``; returns the new ETag."""
        try:
            r = self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfMatch=etag)
        except botocore.exceptions.ClientError as e:
            if error_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise PreconditionFailed(key) from None
            raise
        return str(r["ETag"])

    def may_write(self, key: str) -> bool:
        """Whether these credentials may overwrite ``key``, found without writing: a PUT
        whose If-Match no object can have (S3 answers 403 to a caller without the right
        and 412, or 404 for a missing object, to one with it: the right is checked
        first)."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=b"", IfMatch=WRITE_PROBE)
        except botocore.exceptions.ClientError as e:
            code = error_code(e)
            if code in DENIED:
                return False
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", *MISSING):
                return True
            raise
        raise IntegrityFailure(f"s3://{self.bucket}/{key}: the store ignored If-Match on a PUT")

    def purge(self, key: str) -> int:
        """Delete every version and delete marker of exactly ``key``; returns how many."""
        n = 0
        for k, version, _ in list(self.list_versions(key)):
            if k != key:
                continue
            self.client.delete_object(Bucket=self.bucket, Key=k, VersionId=version)
            n += 1
        return n

    def purge_older_versions(self, key: str, keep: str) -> int:
        """Delete every version and delete marker of ``key`` except version ``keep``."""
        n = 0
        for k, version, _ in list(self.list_versions(key)):
            if k == key and version != keep:
                self.client.delete_object(Bucket=self.bucket, Key=k, VersionId=version)
                n += 1
        return n

    def for_bucket(self, bucket: str) -> Store:
        """The same endpoint and credentials, another bucket (a model's source data)."""
        return Store(replace(self.settings, bucket=bucket))

    def versions_of(self, key: str) -> list[tuple[str, bool]]:
        return [(v, m) for k, v, m in self.list_versions(key) if k == key]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, indent=1).encode()
