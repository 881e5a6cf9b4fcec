"""Independent proof that an erasure holds: ``lethe verify CERTIFICATE``.

Nothing here trusts what the erasure kept. From S3 alone it re-derives:
1. no data, index or test object of the model, in any version, live or not, holds
   a record or subject named (as salted hashes) in the certificate;
2. every data file's bytes hash to the name it is stored under;
3. every live checkpoint's lineage hash, recomputed from the live data files and
   the trainer configuration, equals the lineage it is stored under, and the data
   it records having been trained on is exactly the live data;
4. every key the certificate says was deleted is gone with all its versions, and no
   checkpoint lineage record or generation manifest still refers to one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lethe import dataio
from lethe.core.hashing import salted_hash, sha256_hex
from lethe.core.lineage import shard_lineages
from lethe.core.manifest import Generation
from lethe.generations import read_live
from lethe.layout import ModelLayout, sha_of_key
from lethe.store import NotFound, Store


@dataclass
class Verdict:
    checks: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def count(self, what: str) -> None:
        self.checks[what] = self.checks.get(what, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {"verified": self.ok, "checks": self.checks, "failures": self.failures}


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


def verify(store: Store, cert: dict[str, Any]) -> Verdict:
    v = Verdict()
    layout = ModelLayout(cert["model_prefix"])
    salt = cert["salt"]
    erased = set(cert.get("record_hashes", [])) | set(cert.get("subject_hashes", []))
    live = read_live(store, layout).generation
    if live.number < cert["generation_after"]:
        v.failures.append(
            f"live generation {live.number} is older than the certified {cert['generation_after']}"
        )

    # 1 and 2: every data-bearing object, every version.
    for prefix in ("data/", "index/", "eval/"):
        for key, version, is_marker in store.list_versions(layout.root + prefix):
            if is_marker:
                continue
            body = store.get_version(key, version)
            v.count("objects scanned")
            if sha256_hex(body) != sha_of_key(key):
                v.failures.append(f"{key} (version {version}): content does not match its hash")
            table = dataio.decode(body, ["record_id", "subject_id"])
            for col in ("record_id", "subject_id"):
                hits = sum(salted_hash(salt, x) in erased for x in table.column(col).to_pylist())
                if hits:
                    v.failures.append(
                        f"{key} (version {version}): holds {hits} erased {col.replace('_', ' ')}(s)"
                    )
    # 3: live checkpoints.
    _verify_lineages(store, layout, live, v)
    # 4: deleted keys.
    deleted = set(cert.get("deleted_keys", []))
    deleted_shas = {sha_of_key(k) for k in deleted if k.endswith(".parquet")}
    for key in sorted(deleted):
        v.count("deleted keys checked")
        left = store.versions_of(key)
        if left:
            v.failures.append(f"{key}: deleted, but {len(left)} version(s) remain")
    for key, version, is_marker in store.list_versions(layout.root + "checkpoints/"):
        if is_marker or not key.endswith(".json"):
            continue
        record = json.loads(store.get_version(key, version))
        if set(record.get("data", [])) & deleted_shas:
            v.failures.append(f"{key}: a checkpoint trained on deleted data remains")
    for key, version, is_marker in store.list_versions(layout.generations_prefix):
        if is_marker:
            continue
        manifest = Generation.from_json(json.loads(store.get_version(key, version)))
        if manifest.referenced_keys() & deleted:
            v.failures.append(f"{key}: a generation manifest still points at deleted data")
    return v


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
                v.failures.append(
                    f"shard {k} slice {r}: checkpoint {sl.checkpoint} does not "
                    f"match the lineage of the live data"
                )
                continue
            try:
                record = store.get_json(ModelLayout.checkpoint_lineage_record(sl.checkpoint))
            except NotFound:
                v.failures.append(f"{sl.checkpoint}: lineage record missing")
                continue
            if record.get("data") != shas[: r + 1] or record.get("trainer") != fingerprint:
                v.failures.append(f"{sl.checkpoint}: trained on other data than the live data")
            if not store.exists(sl.checkpoint):
                v.failures.append(f"{sl.checkpoint}: live checkpoint missing")
