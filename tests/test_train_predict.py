"""Training on Ray Train, lineage-addressed checkpoints, prediction."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from lethe import dataio
from lethe.core.lineage import shard_lineages
from lethe.generations import read_live, update
from lethe.layout import ModelLayout
from lethe.predict import Ensemble
from lethe.store import Store
from lethe.training import RayTrainer, train_model

from .conftest import ingest_small, lethe_cli, small_table


def test_train_every_slice_and_record_lineage(store: Store, trainer: RayTrainer) -> None:
    layout, cfg, _ = ingest_small(store, shards=2, slices=3)
    gen, runs = train_model(store, layout, trainer)
    assert sorted(r.shard for r in runs) == [0, 1]
    assert all(r.slices_trained == 3 and r.train_seconds > 0 and r.cpu_seconds > 0 for r in runs)
    assert gen.accuracy is not None and gen.accuracy > 0.8  # 3 separable classes
    fp = gen.config.trainer_fingerprint()
    for k, shard in enumerate(gen.shards):
        shas = [s.data.sha256 for s in shard.slices]
        for r, (sl, lin) in enumerate(zip(shard.slices, shard_lineages(fp, k, shas), strict=True)):
            assert sl.checkpoint == layout.checkpoint(k, r, lin)
            record = store.get_json(ModelLayout.checkpoint_lineage_record(sl.checkpoint))
            assert record["data"] == shas[: r + 1] and record["trainer"] == fp
    # repeating is a no-op: everything is trained already
    again, runs2 = train_model(store, layout, trainer)
    assert runs2 == [] and again.number == gen.number


def test_training_resumes_from_the_last_checkpoint(store: Store, trainer: RayTrainer) -> None:
    """A run that died after slice 1 of shard 0 left slices 0..1: only slice 2 is trained."""
    layout, _, _ = ingest_small(store, shards=2, slices=3)
    gen, _ = train_model(store, layout, trainer)
    lost = gen.shards[0].slices[2].checkpoint
    store.purge(lost)

    def forget(g):
        nxt = g.successor("lost a checkpoint")
        nxt.shards[0].slices[2].checkpoint = None
        return nxt

    update(store, layout, forget)
    gen2, runs = train_model(store, layout, trainer)
    assert [(r.shard, r.first_slice, r.slices_trained) for r in runs] == [(0, 2, 1)]
    assert gen2.shards[0].slices[2].checkpoint == lost and store.exists(lost)


def test_predict_uses_only_live_constituents(store: Store, trainer: RayTrainer, tmp_path) -> None:
    layout, cfg, table = ingest_small(store, shards=2, slices=2)
    train_model(store, layout, trainer)
    ens = Ensemble.live(store, layout)
    assert sorted(ens.models) == [0, 1]
    test = dataio.read_table(store, read_live(store, layout).generation.test)
    x, y = dataio.features_and_labels(test)
    assert (ens.predict(x) == y).mean() > 0.8
    soft = ens.probabilities(x, "softmax")
    assert np.allclose(soft.sum(1), 1.0)

    def quarantine(g):
        nxt = g.successor("quarantine")
        nxt.quarantine[1] = ["test"]
        return nxt

    update(store, layout, quarantine)
    assert sorted(Ensemble.live(store, layout).models) == [0]

    path = tmp_path / "in.parquet"
    pq.write_table(small_table(subjects=3, seed=9).drop_columns(["label"]), path)
    r = lethe_cli("predict", "--model", cfg.name, "--input", str(path), "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 19 and set(lines[:18]) <= set(ens.generation.config.classes)
    assert json.loads(lines[-1])["constituents"] == [0]


def test_a_worker_reads_its_slices_a_row_group_at_a_time(
    store: Store, tmp_path, monkeypatch
) -> None:
    """The worker's spool (``SliceSpool``): slices of several row groups appended one
    group at a time read back, by index, exactly the rows and values of the files
    decoded whole (so the checkpoints stay the same bytes), in slice order."""
    import pyarrow as pa

    from lethe.training import SliceSpool

    layout, _, _ = ingest_small(store, shards=1, slices=2, table=small_table(subjects=90))
    gen = read_live(store, layout).generation
    reads = []
    real = pq.ParquetFile.read_row_group

    def read_row_group(self, i, *args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(i)
        return real(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    # every slice rewritten with row groups of 50 rows (a real file has 65,536)
    keys = []
    for r, sl in enumerate(gen.shards[0].slices):
        table = dataio.decode(store.get(sl.data.key))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=50)
        keys.append(f"{layout.prefix}/spool-test/{r}.parquet")
        store.put(keys[-1], sink.getvalue().to_pybytes())
    spool = SliceSpool(str(tmp_path), gen.config)
    try:
        whole_x, whole_y = [], []
        for key in keys:
            spool.add(store, key)
            x, y = dataio.features_and_labels(dataio.decode(store.get(key)))
            whole_x.append(x)
            whole_y.append(y)
            X, Y = spool.arrays()
            assert np.array_equal(X, np.concatenate(whole_x))
            assert np.array_equal(Y, np.concatenate(whole_y))
        assert (
            len(reads)
            == sum(pq.ParquetFile(pa.BufferReader(store.get(k))).num_row_groups for k in keys)
            > 2
        )
        idx = np.array([len(Y) - 1, 0, 7, 7])
        assert np.array_equal(np.asarray(X[idx]), np.concatenate(whole_x)[idx])
    finally:
        spool.close()
