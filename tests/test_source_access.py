"""A model's dataset is read, deleted and patched only where the model's own S3 keys
reach, although the jobs that do it run with the Ray cluster's keys (the confused
deputy: a tenant names another tenant's data as its ``dataset.uri``).

On the real SeaweedFS, with the dev stack's second identity (the tenant's keys: read
and write in ``lethe-tenant``, read only in ``lethe-shared``, nothing in the stack's
own bucket) against the stack's admin keys (the cluster's):
- the keyed side pins the source with the tenant's keys: listed, each object HEADed
  (read) and, when ``sourcePolicy`` changes the source, write-checked by a PUT that
  cannot succeed; what they do not reach is refused naming the field, and the write
  check writes nothing;
- the ingest job reads the pinned objects only, as they were: a file added after the
  pinning is not read, a pinned file replaced stops the ingest;
- ``delete-after-ingest`` deletes the pinned objects only;
- an erasure's source patch follows the erase order: objects the tenant's keys may not
  write are left alone and the result says why.
"""

from __future__ import annotations

import io
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lethe import dataio, jobs
from lethe.core.plan import ErasureRequest
from lethe.erasure import Engine, request_uid, writable_source
from lethe.generations import read_live
from lethe.ingest import IngestError, ingest_table
from lethe.layout import ModelLayout
from lethe.sources import Source, SourceError, pin_objects, pin_source
from lethe.store import S3Settings, Store
from lethe_dev.localstack import (
    SHARED_BUCKET,
    TENANT_ACCESS_KEY,
    TENANT_BUCKET,
    TENANT_SECRET_KEY,
)

from .conftest import small_config, small_table, training_subjects, unique_model


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def buckets(store: Store) -> dict[str, Store]:
    """The cluster's (admin) view of the tenant's, the shared and the stack's bucket."""
    out = {}
    for name in (TENANT_BUCKET, SHARED_BUCKET):
        out[name] = store.for_bucket(name)
        out[name].ensure_bucket(versioning=True)
    out[store.bucket] = store
    return out


@pytest.fixture(autouse=True)
def no_ray_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """``jobs.ingest`` reads with Ray Data when it can reach a cluster, by connecting
    this process to it: in a job's driver that is what it should do, here it would make
    the test process a Ray driver without the stack's S3 settings for later tests. The
    pinning is the same either way (``test_file_records.py`` ingests through Ray Data)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture(scope="module")
def tenant(store: Store, buckets: dict[str, Store]) -> Store:
    """The tenant's keys (what a model's credentialsSecret holds), on its own bucket."""
    return Store(
        S3Settings(
            store.settings.endpoint,
            TENANT_BUCKET,
            access_key=TENANT_ACCESS_KEY,
            secret_key=TENANT_SECRET_KEY,
            region=store.settings.region,
        )
    )


def _versions(bucket: Store, key: str) -> list[tuple[str, bool]]:
    return sorted(bucket.versions_of(key))


def test_pinning_with_the_tenants_keys_refuses_what_they_do_not_reach(
    buckets: dict[str, Store], tenant: Store, store: Store
) -> None:
    root = unique_model("pin")
    body = _parquet(small_table(subjects=4, per_subject=2))
    for bucket in buckets.values():
        bucket.put(f"{root}/a.parquet", body)
        bucket.put(f"{root}/b.parquet", body)
    before = {name: _versions(b, f"{root}/a.parquet") for name, b in buckets.items()}

    own = pin_objects(tenant, Source.parse(f"s3://{TENANT_BUCKET}/{root}/"), writable=True)
    assert [o.key for o in own] == [f"{root}/a.parquet", f"{root}/b.parquet"]
    assert all(o.size == len(body) and o.etag for o in own)
    shared = pin_objects(tenant, Source.parse(f"s3://{SHARED_BUCKET}/{root}/"))
    assert len(shared) == 2  # read only: enough to ingest
    with pytest.raises(SourceError, match=r"^dataset.sourcePolicy: .* may not write"):
        pin_objects(tenant, Source.parse(f"s3://{SHARED_BUCKET}/{root}/"), writable=True)
    for uri in (f"s3://{store.bucket}/{root}/", f"s3://{store.bucket}/{root}/a.parquet"):
        with pytest.raises(SourceError, match=r"^dataset.uri: the model's S3 credentials may not"):
            pin_objects(tenant, Source.parse(uri))
    # a bucket that does not exist is just as refused (the tenant learns nothing of it);
    # keys that reach every bucket are told it does not exist
    with pytest.raises(SourceError, match=r"^dataset.uri: the model's S3 credentials may not"):
        pin_objects(tenant, Source.parse(f"s3://lethe-no-such-{root}/x.parquet"))
    with pytest.raises(SourceError, match=r"^dataset.uri: no bucket"):
        pin_objects(store, Source.parse(f"s3://lethe-no-such-{root}/x/"))
    with pytest.raises(SourceError, match=r"^dataset.uri: no object"):
        pin_objects(store, Source.parse(f"s3://{store.bucket}/{root}/none.parquet"))
    with pytest.raises(SourceError, match=r"^dataset.uri: no parquet files"):
        pin_objects(tenant, Source.parse(f"s3://{TENANT_BUCKET}/{root}-empty/"))
    # the write checks (allowed and refused) wrote nothing: same versions, same bytes
    after = {name: _versions(b, f"{root}/a.parquet") for name, b in buckets.items()}
    assert after == before
    assert all(b.get(f"{root}/a.parquet") == body for b in buckets.values())


def test_the_ingest_job_reads_the_pinned_objects_only_as_they_were(
    store: Store, buckets: dict[str, Store], tenant: Store
) -> None:
    """The job runs with the cluster's keys (here the stack's), as Ray would."""
    root = unique_model("pinned")
    table = small_table(subjects=30, per_subject=4)
    half = table.num_rows // 2
    shared = buckets[SHARED_BUCKET]
    shared.put(f"{root}/part-0.parquet", _parquet(table.slice(0, half)))
    shared.put(f"{root}/part-1.parquet", _parquet(table.slice(half)))
    name = f"{root}-m"
    cfg = replace(small_config(name), source_uri=f"s3://{SHARED_BUCKET}/{root}/")
    pinned = pin_source(tenant, cfg)
    assert pinned is not None and len(pinned) == 2
    # a file the tenant's keys were never shown, added after the pinning
    extra = small_table(subjects=5, per_subject=4, seed=7)
    extra = extra.set_column(0, "record_id", pa.array([f"x{i}" for i in range(extra.num_rows)]))
    shared.put(f"{root}/part-2.parquet", _parquet(extra))
    layout = ModelLayout.of(name)
    jobs.request_ingest(store, layout, cfg, "uid-1", pinned)
    out = jobs.ingest(store, layout.prefix)
    # part-2 not read: the same training records as the two pinned files alone give
    reference = ingest_table(store, ModelLayout.of(f"{name}-ref"), table, cfg)
    assert out["records"] == sum(s.rows for s in reference.shards)
    ids = set()
    for shard in read_live(store, layout).generation.shards:
        ids |= set(dataio.read_table(store, shard.index).column("record_id").to_pylist())
    assert ids and not any(i.startswith("x") for i in ids)

    # a pinned object replaced between the pinning and the job: refused, nothing written
    name2 = f"{root}-m2"
    cfg2 = replace(cfg, name=name2)
    pinned2 = pin_source(tenant, cfg2)
    shared.put(f"{root}/part-1.parquet", _parquet(table.slice(half, 10)))
    layout2 = ModelLayout.of(name2)
    jobs.request_ingest(store, layout2, cfg2, "uid-2", pinned2)
    with pytest.raises(IngestError, match="changed or went after the model's credentials"):
        jobs.ingest(store, layout2.prefix)
    assert jobs.ingest_error(store, layout2) is not None
    assert not store.exists(layout2.current)


def test_delete_after_ingest_deletes_the_pinned_objects_only(
    store: Store, buckets: dict[str, Store], tenant: Store
) -> None:
    root = unique_model("delpin")
    table = small_table(subjects=30, per_subject=4)
    own = buckets[TENANT_BUCKET]
    own.put(f"{root}/part-0.parquet", _parquet(table))
    name = f"{root}-m"
    cfg = replace(
        small_config(name),
        source_uri=f"s3://{TENANT_BUCKET}/{root}/",
        source_policy="delete-after-ingest",
    )
    pinned = pin_source(tenant, cfg)  # write-checked: the policy deletes
    own.put(f"{root}/part-1.parquet", _parquet(table.slice(0, 0)))  # after the pinning
    layout = ModelLayout.of(name)
    jobs.request_ingest(store, layout, cfg, "uid-1", pinned)
    jobs.ingest(store, layout.prefix)
    assert own.versions_of(f"{root}/part-0.parquet") == []  # every version gone
    assert len(own.versions_of(f"{root}/part-1.parquet")) == 1  # never pinned: kept
    # a source the tenant may only read cannot have a deleting policy at all
    shared_cfg = replace(cfg, source_uri=f"s3://{SHARED_BUCKET}/{root}/")
    buckets[SHARED_BUCKET].put(f"{root}/part-0.parquet", _parquet(table))
    with pytest.raises(SourceError, match="^dataset.sourcePolicy"):
        pin_source(tenant, shared_cfg)


def test_the_erasure_patches_only_sources_the_tenants_keys_may_write(
    store: Store, buckets: dict[str, Store], tenant: Store
) -> None:
    """A model whose keys lost the right to write its source (or never had it, ingested
    with other keys): the keyed side's order says so, and the keyless job leaves the
    source alone (every version) while it erases the model's own data."""
    root = unique_model("patchpin")
    table = small_table(subjects=30, per_subject=4)
    shared = buckets[SHARED_BUCKET]
    key = f"{root}/data.parquet"
    shared.put(key, _parquet(table))
    name = f"{root}-m"
    cfg = replace(
        small_config(name), source_uri=f"s3://{SHARED_BUCKET}/{key}", source_policy="patch"
    )
    assert "refused" in (writable_source(tenant, cfg) or {})
    own_cfg = replace(cfg, source_uri=f"s3://{TENANT_BUCKET}/{key}")
    buckets[TENANT_BUCKET].put(key, _parquet(table))
    assert writable_source(tenant, own_cfg) == {"keys": [key]}

    # the model lives in the tenant's bucket; ingested with the cluster's keys
    layout = ModelLayout.of(name)
    ingest_table(buckets[TENANT_BUCKET], layout, table, cfg)
    subject = training_subjects(table, cfg)[0]
    keyed = Engine(tenant, layout, trainer=None)
    request = ErasureRequest(request_uid(name, [subject], []), (subject,))
    plan = keyed.prepare([request], patch=False)
    keyed.order_erasure(plan)
    before = _versions(shared, key)
    job = Engine(buckets[TENANT_BUCKET], layout, trainer=None)  # the cluster's keys
    job.erase_data_by_order(job.load_plan(plan.batch_id))
    assert _versions(shared, key) == before  # not patched, no version deleted
    source = store.for_bucket(TENANT_BUCKET).get_json(layout.step(plan.batch_id, "purge-data"))
    state = source["source"]["state"]
    assert state.startswith("not erased: dataset.sourcePolicy"), state
    assert read_live(tenant, layout).generation.number >= 1
