"""Independent proof that an erasure holds: ``lethe verify CERTIFICATE``.

Nothing in the certificate is taken on trust. With the model's public key and HMAC
key (``--keys``), verify checks:
1. the signature (Ed25519, against the trusted public key) and the model's chain of
   certificates (each entry names the hash of the one before: nothing was removed,
   inserted or edited), and that this certificate is the chain's entry;
2. every claim against what S3 holds: the batch's plan (the hashes, counts, shards
   and the generation before), its step markers (the generation after, the lineages
   and the run that trained each checkpoint, the keys deleted, the tombstones, the
   source and storage state, the timings), and the runs' own resource reports (the
   runs and the cost, recomputed, and the accounting: the measured erasure seconds and
   USD against the plan's full-retrain estimate and its basis);
3. that no object under the model's prefix (``--bucket-wide``: the whole bucket),
   in any version, whatever its name or format, holds a named subject or record id:
   every candidate token is hashed with the HMAC key and looked up;
4. that every data file's bytes hash to the name it is stored under, every live
   checkpoint's lineage matches the live data, every checkpoint anywhere has a
   lineage record naming no purged file, every deleted key is gone with all its
   versions, and no manifest still points at one.
A failure names the certificate field (or the object) that does not hold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lethe import certs
from lethe.checkpoints import tombstoned_shas
from lethe.core.hashing import key_id, sha256_hex
from lethe.core.lineage import shard_lineages
from lethe.core.manifest import Generation
from lethe.core.plan import ErasurePlan
from lethe.erasure import CERTIFICATE_VERSION, BatchEvidence, load_keys
from lethe.generations import read_live
from lethe.layout import ModelLayout, sha_of_key
from lethe.store import NotFound, Store

CONTENT_ADDRESSED = ("data/", "index/", "eval/")


@dataclass
class Verdict:
    checks: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def count(self, what: str, n: int = 1) -> None:
        self.checks[what] = self.checks.get(what, 0) + n

    def fail(self, where: str, why: str) -> None:
        self.failures.append(f"{where}: {why}")

    def to_json(self) -> dict[str, Any]:
        return {
            "verified": self.ok,
            "checks": self.checks,
            "failures": self.failures,
            "notes": self.notes,
        }


def load_certificate(store: Store, ref: str) -> dict[str, Any]:
    """A local path, an s3://bucket/key URI, or a key in the store's bucket."""
    if ref.startswith("s3://"):
        _, _, rest = ref.partition("s3://")
        bucket, _, key = rest.partition("/")
        if bucket != store.bucket:
            raise ValueError(f"certificate is in bucket {bucket}, not {store.bucket}")
        return store.get_json(key)
    try:
        with open(ref) as f:
            return json.load(f)
    except FileNotFoundError:
        return store.get_json(ref)


def verify(
    store: Store,
    cert: dict[str, Any],
    keys: certs.Keys | None = None,
    *,
    public_key: Ed25519PublicKey | None = None,
    bucket_wide: bool = False,
    progress: bool = False,
) -> Verdict:
    """Check ``cert`` against S3; ``keys`` gives the HMAC key and, unless
    ``public_key`` is given, the trusted public key (default: $LETHE_KEYS_DIR)."""
    keys = load_keys(keys)
    v = Verdict()
    if not isinstance(cert, dict) or cert.get("version") != CERTIFICATE_VERSION:
        v.fail("version", f"not a version-{CERTIFICATE_VERSION} Lethe certificate")
        return v
    try:
        layout = ModelLayout(str(cert["model_prefix"]))
    except KeyError:
        v.fail("model_prefix", "missing")
        return v
    trusted = public_key or keys.public_key
    v.failures += certs.check_signature(cert, trusted)
    v.count("signatures checked")
    entries, chain_failures = certs.verify_chain(store, layout, trusted)
    v.count("chain entries checked", entries)
    v.failures += chain_failures
    v.failures += certs.check_in_chain(store, layout, cert)
    copies, copy_failures = certs.verify_copies(store, layout)
    v.count("certificate copies checked", copies)
    v.failures += copy_failures
    if (cert.get("hash") or {}).get("key_id") != key_id(keys.hmac_key):
        v.fail("hash.key_id", "the ids were hashed with another HMAC key than the one given")
    _check_claims(store, layout, cert, v)
    erased = (
        set(cert.get("subject_hashes", []))
        | set(cert.get("record_hashes", []))
        | set(cert.get("requested_record_hashes", []))
    )
    _scan(store, layout, erased, keys, bucket_wide, progress, v)
    try:
        live = read_live(store, layout).generation
    except Exception as e:  # noqa: BLE001 - reported as a failure, never raised
        v.fail("CURRENT", f"cannot read the live generation: {e}")
        return v
    if live.number < int(cert.get("generation_after", 0)):
        v.fail("generation_after", f"the live generation {live.number} is older")
    _verify_lineages(store, layout, live, v)
    _verify_checkpoints(store, layout, cert, v)
    _verify_deleted(store, layout, cert, v)
    _verify_files(store, cert, keys, v)
    if cert.get("outcome") == "NothingHeld":
        v.notes.append(str(cert.get("summary", "nothing held")))
    return v


# -- the certificate's claims against S3 ----------------------------------------------
def _check_claims(store: Store, layout: ModelLayout, cert: dict[str, Any], v: Verdict) -> None:
    """Derive the certificate again from what S3 holds about its batch (the plan, the
    step markers, the runs' reports) and compare every field."""
    batch = str(cert.get("batch_id", ""))
    try:
        plan = ErasurePlan.from_json(store.get_json(layout.plan(batch)))
    except NotFound:
        v.fail("batch_id", "no plan for this batch in S3")
        return
    req = next((r for r in plan.requests if r.uid == cert.get("request_uid")), None)
    if req is None:
        v.fail("request_uid", "not a request of the batch's plan")
        return
    try:
        expected = BatchEvidence.read(store, layout, plan).certificate_body(req)
    except Exception as e:  # noqa: BLE001 - reported as a failure, never raised
        v.fail("CURRENT", f"cannot read the model's live generation: {type(e).__name__}")
        return
    for name, want in expected.items():
        v.count("claims cross-checked")
        if _norm(cert.get(name)) != _norm(want):
            v.fail(name, "does not match what S3 holds for this batch")
    for name in set(cert) - set(expected) - {"chain", "signature"}:
        v.fail(name, "not a field of a Lethe certificate")
    for sha in cert.get("tombstones", []):
        v.count("tombstones checked")
        if not store.exists(layout.tombstone(sha)):
            v.fail("tombstones", "a purged file has no tombstone (it could be written back)")
    for shard, info in (cert.get("retrained") or {}).items():
        for ckpt, run in zip(info.get("checkpoints", []), info.get("runs", []), strict=False):
            if not ckpt:
                continue
            try:
                record = store.get_json(ModelLayout.checkpoint_lineage_record(ckpt))
            except NotFound:
                continue  # replaced by a later erasure since: nothing left to compare
            v.count("retrained checkpoints checked")
            if record.get("run_id") != run:
                v.fail(f"retrained.{shard}.runs", "another run trained that checkpoint")


def _norm(x: Any) -> str:
    return json.dumps(x, sort_keys=True)


# -- every object, every version --------------------------------------------------------
def _scan(
    store: Store,
    layout: ModelLayout,
    erased: set[str],
    keys: certs.Keys,
    bucket_wide: bool,
    progress: bool,
    v: Verdict,
) -> None:
    from lethe.scan import scan

    prefix = "" if bucket_wide else layout.root
    report = scan(store, prefix, lambda tok: keys.id_hash(tok) in erased, progress=progress)
    v.count("objects scanned", report.objects)
    v.count("versions scanned", report.versions)
    v.count("bytes scanned", report.bytes)
    for f in report.findings:
        v.fail(f"{f.key} (version {f.version})", f"holds {f.hits} erased id(s) ({f.where})")
    for e in report.errors:
        v.fail("scan", f"could not read {e}")
    for folder in CONTENT_ADDRESSED:
        for key, version, is_marker in store.list_versions(layout.root + folder):
            if is_marker:
                continue
            try:
                body = store.get_version(key, version)
            except NotFound:
                continue  # purged by a concurrent erasure since the listing: not held
            v.count("content addresses checked")
            if sha256_hex(body) != sha_of_key(key):
                v.fail(f"{key} (version {version})", "content does not match its hash")


# -- checkpoints and lineage ------------------------------------------------------------
def _verify_lineages(store: Store, layout: ModelLayout, live: Generation, v: Verdict) -> None:
    fingerprint = live.config.trainer_fingerprint()
    for k, shard in enumerate(live.shards):
        shas = [s.data.sha256 for s in shard.slices]
        expected = shard_lineages(fingerprint, k, shas)
        for r, sl in enumerate(shard.slices):
            if sl.checkpoint is None:
                continue
            v.count("live checkpoints checked")
            if sl.checkpoint != layout.checkpoint(k, r, expected[r]):
                v.fail(
                    f"shard {k} slice {r}",
                    f"checkpoint {sl.checkpoint} does not match the lineage of the live data",
                )
                continue
            try:
                record = store.get_json(ModelLayout.checkpoint_lineage_record(sl.checkpoint))
            except NotFound:
                v.fail(sl.checkpoint, "lineage record missing")
                continue
            if record.get("data") != shas[: r + 1] or record.get("trainer") != fingerprint:
                v.fail(sl.checkpoint, "trained on other data than the live data")
            if not store.exists(sl.checkpoint):
                v.fail(sl.checkpoint, "live checkpoint missing")


def _verify_checkpoints(
    store: Store, layout: ModelLayout, cert: dict[str, Any], v: Verdict
) -> None:
    """Every checkpoint object under the prefix, live or not, whatever its name: it must
    have a lineage record, and that record must name no purged file."""
    purged = tombstoned_shas(store, layout) | {
        sha_of_key(k) for k in cert.get("deleted_keys", []) if k.endswith(".parquet")
    }
    seen = set()
    for key, _version, is_marker in store.list_versions(layout.root + "checkpoints/"):
        if is_marker or key in seen:
            continue
        seen.add(key)
        if key.endswith(".json"):
            try:
                record = store.get_json(key)
            except (NotFound, ValueError):
                continue  # an old version only, or not a record: the scan read it
            if set(record.get("data", [])) & purged:
                v.fail(key, "a checkpoint trained on purged data remains")
            continue
        v.count("checkpoints checked")
        try:
            store.get_json(ModelLayout.checkpoint_lineage_record(key))
        except NotFound:
            v.fail(key, "a checkpoint without a lineage record (what was it trained on?)")
        except ValueError:
            v.fail(key, "its lineage record is unreadable")


def _verify_files(store: Store, cert: dict[str, Any], keys: certs.Keys, v: Verdict) -> None:
    """File-backed records: no version of any object in the buckets the certificate
    names has a URI whose keyed hash is one of the erased files' (the certificate holds
    hashes only: a URI may name a person)."""
    files = cert.get("files") or {}
    erased = set(files.get("hashes", []))
    if not erased:
        return
    for bucket in files.get("buckets", []):
        found = 0
        for key, _version, is_marker in store.for_bucket(bucket).list_versions(""):
            v.count("file object versions checked")
            if not is_marker and keys.id_hash(f"s3://{bucket}/{key}") in erased:
                found += 1
        if found:
            v.fail(f"files/{bucket}", f"{found} version(s) of erased records' files remain")


def _verify_deleted(store: Store, layout: ModelLayout, cert: dict[str, Any], v: Verdict) -> None:
    deleted = set(cert.get("deleted_keys", []))
    for key in sorted(deleted):
        v.count("deleted keys checked")
        left = store.versions_of(key)
        if left:
            v.fail(key, f"deleted, but {len(left)} version(s) remain")
    for key, version, is_marker in store.list_versions(layout.generations_prefix):
        if is_marker:
            continue
        try:
            raw = store.get_version(key, version)
        except NotFound:
            continue  # purged since the listing
        try:
            manifest = Generation.from_json(json.loads(raw))
        except (ValueError, KeyError):
            v.fail(key, "an unreadable generation manifest")
            continue
        if manifest.referenced_keys() & deleted:
            v.fail(key, "a generation manifest still points at deleted data")
