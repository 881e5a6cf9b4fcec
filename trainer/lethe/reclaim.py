"""What "deleted" did to the bytes: ask the storage backend to reclaim purged data.

Deleting every version of an object through the S3 API takes it out of the namespace,
but most backends keep the bytes on disk for a while: SeaweedFS until the volume that
holds them is vacuumed (compacted), MinIO until its trash area is emptied, Ceph RGW
until garbage collection runs. After a purge Lethe calls :func:`reclaim` and the
certificate records the :class:`Reclaim` it returns:

- ``reclaimed``: Lethe had the backend compact and confirmed it (SeaweedFS with a
  master URL);
- ``pending-backend-compaction``: the bytes may still be on disk; ``detail`` says what
  an operator must run or wait for;
- ``provider-managed``: a cloud provider removes deleted data on its own schedule
  (AWS S3, Google Cloud Storage); Lethe can neither trigger nor observe it.

``detail`` is plain words for the certificate and never holds an id. What each backend
does is in docs/storage-backends.md.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import botocore.exceptions

if TYPE_CHECKING:
    from lethe.store import Store

log = logging.getLogger(__name__)

ReclaimState = Literal["reclaimed", "pending-backend-compaction", "provider-managed"]
BACKENDS = ("seaweedfs", "minio", "ceph", "aws", "gcs", "other")

# The master compacts every volume whose garbage ratio (deleted bytes / content bytes) is
# at least this. Tiny but above zero: one deleted byte in an 8 TB volume still counts,
# while a volume with no deleted data is left alone (0 would rewrite every volume).
VACUUM_THRESHOLD = "1e-20"
# The filer hands deleted chunks to the volume servers in batches about every 1.1 s;
# wait two batches before looking, or a purge that just returned is not yet garbage.
FILER_SETTLE_S = 2.5
# Volume servers report to the master every 5 s by default: reading the master's
# (second-hand) volume status instead of theirs needs that much longer.
MASTER_LAG_S = 6.0

# What an operator runs instead, for the certificate: "an operator must <this>".
SEAWEEDFS_MANUAL = (
    "run `volume.vacuum -garbageThreshold=0.000001` in `weed shell` (or request "
    "/vol/vacuum?garbageThreshold=0.000001 from the master); the master's own automatic "
    "vacuum compacts only volumes above its garbage threshold (default 30%)"
)


@dataclass(frozen=True)
class Reclaim:
    state: ReclaimState
    backend: str
    detail: str  # plain words for the certificate; never an id

    def to_json(self) -> dict[str, str]:
        return {"state": self.state, "backend": self.backend, "detail": self.detail}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Reclaim:
        state = obj["state"]
        if state not in get_args(ReclaimState):
            raise ValueError(f"unknown reclaim state {state!r}")
        return cls(state, str(obj["backend"]), str(obj["detail"]))


def backend_of(endpoint: str | None, backend: str | None = None) -> str:
    """The storage backend: an explicit ``backend`` wins; no endpoint or an
    ``*.amazonaws.com`` one is AWS, ``storage.googleapis.com`` is GCS; else "other"."""
    if backend:
        name = backend.strip().lower()
        if name not in BACKENDS:
            raise ValueError(f"unknown storage backend {backend!r}: one of {', '.join(BACKENDS)}")
        return name
    if not endpoint:
        return "aws"  # boto3's default endpoint
    url = endpoint if "://" in endpoint else f"//{endpoint}"
    host = (urllib.parse.urlsplit(url).hostname or "").lower().rstrip(".")
    if host.endswith((".amazonaws.com", ".amazonaws.com.cn")):
        return "aws"
    if host == "storage.googleapis.com":
        return "gcs"
    return "other"


def backend_from_env(endpoint: str | None) -> tuple[str, str | None]:
    """(backend, admin URL) as configured: ``LETHE_STORAGE_BACKEND`` names the backend,
    ``LETHE_SEAWEEDFS_MASTER`` (set by ``lethe dev up``) is SeaweedFS's master URL and,
    without the former, means SeaweedFS."""
    master = os.environ.get("LETHE_SEAWEEDFS_MASTER") or None
    explicit = os.environ.get("LETHE_STORAGE_BACKEND") or ("seaweedfs" if master else None)
    return backend_of(endpoint, explicit), master


def reclaim(
    backend: str, admin_url: str | None, *, timeout: float = 120, settle: float = FILER_SETTLE_S
) -> Reclaim:
    """Have the backend drop data deleted through the S3 API, where Lethe can, and say
    what happened. Call it after the purge. Never raises for a backend that fails or
    cannot be reached: that is a ``pending-backend-compaction`` with the reason."""
    name = backend_of(None, backend)
    if name == "seaweedfs":
        if not admin_url:
            return _pending(
                name,
                "SeaweedFS keeps deleted data in its volume files until the volume is "
                "vacuumed. No master URL was configured (LETHE_SEAWEEDFS_MASTER), so "
                f"Lethe did not vacuum: an operator must {SEAWEEDFS_MANUAL}.",
            )
        return _seaweedfs(_http_url(admin_url), timeout, settle)
    if name == "minio":
        return _pending(
            name,
            "MinIO removes a deleted version from the object's metadata at once and moves "
            "its data to a trash area on each drive (.minio.sys/tmp/.trash), which a "
            "background task empties, usually within minutes. Lethe can neither trigger "
            "nor confirm that through the S3 API: an operator can check that the trash "
            "area on every drive is empty.",
        )
    if name == "ceph":
        return _pending(
            name,
            "Ceph RGW removes a deleted version from the bucket index at once and queues "
            "its data for garbage collection, which waits rgw_gc_obj_min_wait (default "
            "2 hours) before removing it. Lethe cannot trigger that through the S3 API: an "
            "operator can run `radosgw-admin gc process --include-all` to reclaim it now; "
            "`radosgw-admin gc list --include-all` shows what is still queued.",
        )
    if name == "aws":
        return Reclaim(
            "provider-managed",
            name,
            "Amazon S3 removes deleted data from its storage systems itself, as described "
            "in AWS's data-deletion documentation. Lethe can neither trigger nor observe it.",
        )
    if name == "gcs":
        return Reclaim(
            "provider-managed",
            name,
            "Google Cloud Storage removes deleted data from its storage systems itself, as "
            "described in Google Cloud's data-deletion documentation. Lethe can neither "
            "trigger nor observe it.",
        )
    return _pending(
        name,
        "The storage backend is not one Lethe knows: whether deleted data stays on its "
        "disks, and for how long, depends on it. Its operator must compact or "
        "garbage-collect deleted data.",
    )


def object_lock_supported(store: Store) -> bool:
    """Whether S3 Object Lock is enabled on ``store``'s bucket (GetObjectLockConfiguration
    says ``ObjectLockEnabled: Enabled``). False when the bucket has no Object Lock
    configuration or the backend does not implement the call. Lethe does not use Object
    Lock; on such a bucket a retained version cannot be purged until its retention ends."""
    try:
        r = store.client.get_object_lock_configuration(Bucket=store.bucket)
    except botocore.exceptions.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in (
            "ObjectLockConfigurationNotFoundError",
            "NoSuchObjectLockConfiguration",
            "NotImplemented",
            "MethodNotAllowed",
        ) or status in (405, 501):
            return False
        raise
    return r.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"


# -- SeaweedFS ---------------------------------------------------------------------------


def _pending(backend: str, detail: str) -> Reclaim:
    return Reclaim("pending-backend-compaction", backend, detail)


def _http_url(url: str) -> str:
    return (url if "://" in url else f"http://{url}").rstrip("/")


def _get_json(url: str, timeout: float) -> Any:
    with urllib.request.urlopen(url, timeout=max(timeout, 1.0)) as r:
        return json.loads(r.read() or b"null")


@dataclass(frozen=True)
class _Volume:
    deleted: int  # needles marked deleted and still in the .dat file
    deleted_bytes: int
    revision: int  # CompactRevision: goes up each time the volume is compacted
    read_only: bool

    @property
    def garbage(self) -> bool:
        return self.deleted > 0 or self.deleted_bytes > 0


def _topology(master: str, timeout: float) -> tuple[list[str], int]:
    """The volume servers' HTTP addresses, and how many erasure-coded shards there are."""
    topo = _get_json(f"{master}/dir/status", timeout)["Topology"]
    nodes: list[str] = []
    ec = 0
    for dc in topo.get("DataCenters") or []:
        for rack in dc.get("Racks") or []:
            for node in rack.get("DataNodes") or []:
                nodes.append(str(node["Url"]))
                ec += int(node.get("EcShards") or 0)
    return nodes, ec


def _volume(v: dict[str, Any]) -> _Volume:
    return _Volume(
        int(v.get("DeleteCount") or 0),
        int(v.get("DeletedByteCount") or 0),
        int(v.get("CompactRevision") or 0),
        bool(v.get("ReadOnly")),
    )


def _volumes(
    master: str, nodes: list[str], live: bool, timeout: float
) -> dict[tuple[str, int], _Volume]:
    """Every volume replica, keyed by (volume server, volume id). ``live`` reads each
    volume server's own status; otherwise the master's copy, which lags a heartbeat."""
    out: dict[tuple[str, int], _Volume] = {}
    if live:
        for node in nodes:
            for v in _get_json(f"{_http_url(node)}/status", timeout).get("Volumes") or []:
                out[(node, int(v["Id"]))] = _volume(v)
        return out
    tree = _get_json(f"{master}/vol/status", timeout)["Volumes"]["DataCenters"]
    for racks in (tree or {}).values():
        for servers in (racks or {}).values():
            for node, vols in (servers or {}).items():
                for v in vols or []:
                    out[(str(node), int(v["Id"]))] = _volume(v)
    return out


def _seaweedfs(master: str, timeout: float, settle: float) -> Reclaim:
    name = "seaweedfs"
    deadline = time.monotonic() + timeout

    def left() -> float:
        return deadline - time.monotonic()

    try:
        nodes, _ = _topology(master, left())
    except (OSError, ValueError, KeyError, TypeError) as e:
        return _pending(
            name,
            f"Lethe could not read the SeaweedFS master's volume status ({_why(e)}), so it "
            "did not vacuum, and deleted data stays in the volume files: an operator must "
            f"{SEAWEEDFS_MANUAL}.",
        )
    # A volume server's own status is current; the master's lags its heartbeats.
    live = True
    try:
        _volumes(master, nodes, True, left())
    except (OSError, ValueError, KeyError, TypeError):
        live = False
        settle += MASTER_LAG_S
    time.sleep(max(0.0, min(settle, left() - 1)))

    try:
        nodes, ec_shards = _topology(master, left())
        before = _volumes(master, nodes, live, left())
    except (OSError, ValueError, KeyError, TypeError) as e:
        return _pending(
            name,
            f"Lethe could not read SeaweedFS's volume status ({_why(e)}), so it did not "
            f"vacuum: an operator must {SEAWEEDFS_MANUAL}.",
        )
    if not nodes:  # nothing to look at is not evidence that nothing is left
        return _pending(
            name,
            "The SeaweedFS master listed no volume servers, so Lethe could not vacuum or "
            f"check them: an operator must {SEAWEEDFS_MANUAL}.",
        )
    source = "the volume servers' own status" if live else "the master's volume status"
    dirty = {k: v for k, v in before.items() if v.garbage}
    ec_note = (
        " The cluster also holds erasure-coded volumes: a vacuum does not remove deleted "
        "data from those, and Lethe cannot see whether the purged data was in them."
        if ec_shards
        else ""
    )
    # Where the bytes still are when the answer is "pending", in the certificate's words.
    where = "SeaweedFS volume(s) still hold deleted data in their files"
    if not dirty:
        if ec_shards:
            return _pending(name, "No SeaweedFS volume held deleted data." + ec_note)
        return Reclaim(
            "reclaimed",
            name,
            f"After the purge no SeaweedFS volume held deleted data (per {source}), so "
            "there was nothing left to compact.",
        )
    read_only = sum(1 for v in dirty.values() if v.read_only)
    log.info("vacuuming SeaweedFS: %d volume replica(s) hold deleted data", len(dirty))

    waiting = dict(dirty)
    problem = ""
    while True:
        try:
            urllib.request.urlopen(
                f"{master}/vol/vacuum?garbageThreshold={VACUUM_THRESHOLD}",
                timeout=max(left(), 1.0),
            ).close()
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                return _pending(
                    name,
                    f"The SeaweedFS master refused the vacuum request (HTTP {e.code}): "
                    f"{len(waiting)} {where}; an operator must {SEAWEEDFS_MANUAL}.{ec_note}",
                )
            problem = f"the master answered the vacuum request with HTTP {e.code}"
        except OSError as e:
            # A timeout may only mean a big volume is still compacting: keep checking.
            problem = f"the vacuum request failed ({_why(e)})"
        try:
            now = _volumes(master, nodes, live, left())
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"Lethe could not read the volume status ({_why(e)})"
            now = None
        if now is not None:
            # Compacted (revision moved) or gone (its files deleted with it): done.
            waiting = {
                k: v for k, v in waiting.items() if k in now and now[k].revision == v.revision
            }
        if not waiting:
            break
        if left() < 1.5:
            ro = (
                f" {read_only} of them are read-only, and a vacuum sweep skips read-only volumes."
                if read_only
                else ""
            )
            why = f" Last problem: {problem}." if problem else ""
            return _pending(
                name,
                f"Lethe asked the SeaweedFS master to vacuum, but within {timeout:.0f} s "
                f"{len(waiting)} {where} were not compacted.{ro}{why} An operator must "
                f"{SEAWEEDFS_MANUAL}.{ec_note}",
            )
        # Another vacuum (the master's automatic one) may hold the lock: try again.
        time.sleep(1.0)

    if ec_shards:
        return _pending(
            name,
            f"Lethe had the SeaweedFS master vacuum the {len(dirty)} volume replica(s) that "
            f"held deleted data and confirmed each was compacted.{ec_note}",
        )
    return Reclaim(
        "reclaimed",
        name,
        f"Lethe had the SeaweedFS master vacuum the {len(dirty)} volume replica(s) that "
        f"held deleted data and confirmed from {source} that each was compacted: their "
        "volume files were rewritten without the deleted data. (The filesystem under them "
        "frees the old files' blocks; it does not overwrite them.)",
    )


def _why(e: BaseException) -> str:
    """A reason without URLs or ids: the error's kind and, for HTTP, its status."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    return type(e).__name__
