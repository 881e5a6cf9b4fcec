"""File-backed records are read through their decode function when they are used, on
the real SeaweedFS and Ray head: the slice files hold each record's URI and the sha256
of its file, never its pixels; training and evaluation fetch and decode the files; the
model is the one trained on the same pixels given as features (checkpoint weights
equal); a file edited or deleted behind Lethe's back stops training and evaluation
with an integrity error that names no file."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lethe import dataio
from lethe.core.config import ConfigError
from lethe.files import FileChanged
from lethe.generations import read_live
from lethe.ingest import ingest_source, ingest_table
from lethe.layout import ModelLayout
from lethe.models import load_checkpoint
from lethe.predict import ensemble_accuracy
from lethe.store import Store
from lethe.training import RayTrainer, train_model

from .conftest import small_config, unique_model

BUCKET = "lethe-file-training"
PEOPLE, PER_PERSON, SIDE = 40, 4, 6


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.reshape(SIDE, SIDE), "L").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset(store: Store) -> tuple[Store, str, pa.Table, list[str]]:
    """Images of three classes (a bright row per class, noise elsewhere) as PNG objects,
    a Parquet table of references to them, and the same pixels as a feature table."""
    src = store.for_bucket(BUCKET)
    src.ensure_bucket()
    root = unique_model("imgs")
    rng = np.random.default_rng(3)
    rows, uris, features = [], [], []
    for p in range(PEOPLE):
        for i in range(PER_PERSON):
            rid, label = f"r{p:03d}-{i}", (p + i) % 3
            px = rng.integers(0, 60, (SIDE, SIDE), dtype=np.uint8)
            px[label * 2] = 255
            key = f"{root}/img/{rid}.png"
            src.put(key, _png(px), "image/png")
            uris.append(f"s3://{BUCKET}/{key}")
            rows.append((rid, f"person-{p:03d}", str(label)))
            features.append(px.reshape(-1).astype(np.float32) / 255.0)
    ids = {
        "record_id": [r for r, _, _ in rows],
        "subject_id": [s for _, s, _ in rows],
        "label": [lab for _, _, lab in rows],
    }
    buf = io.BytesIO()
    pq.write_table(pa.table({**ids, "image": uris}), buf)
    src.put(f"{root}/refs.parquet", buf.getvalue())
    x = np.stack(features)
    as_features = pa.table({**ids, **{f"px{j:02d}": x[:, j] for j in range(x.shape[1])}})
    return src, f"s3://{BUCKET}/{root}/refs.parquet", as_features, uris


def test_records_are_decoded_when_trained_into_the_same_model(
    store: Store, trainer: RayTrainer, dataset
) -> None:
    src, refs_uri, as_features, uris = dataset
    name = unique_model("filetrain")
    base = replace(small_config(name, shards=2, slices=2), source_uri=refs_uri)
    cfg = replace(base, columns=replace(base.columns, file="image"))
    layout = ModelLayout.of(name)
    gen = ingest_source(store, layout, cfg)
    twin = ModelLayout.of(f"{name}-features")
    ingest_table(store, twin, as_features, small_config(f"{name}-features", shards=2, slices=2))

    # the slice files hold the URI and the file's hash, never the pixels
    for shard in gen.shards:
        for sl in shard.slices:
            table = dataio.read_table(store, sl.data)
            assert "features" not in table.column_names
            assert {"uri", "file_sha256"} <= set(table.column_names)
            assert all(len(h) == 64 for h in table.column("file_sha256").to_pylist())
    assert gen.config.num_features == SIDE * SIDE

    files_gen, _ = train_model(store, layout, trainer)
    feats_gen, _ = train_model(store, twin, trainer)
    for a, b in zip(files_gen.shards, feats_gen.shards, strict=True):
        wa = load_checkpoint(store.get(a.final_checkpoint))["model"]
        wb = load_checkpoint(store.get(b.final_checkpoint))["model"]
        assert wa.keys() == wb.keys()
        assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)
    assert files_gen.accuracy == feats_gen.accuracy and files_gen.accuracy > 0.9

    # a file edited behind Lethe's back: evaluation (and training) refuse it
    test_uri = dataio.read_table(store, files_gen.test, ["uri"]).column("uri")[0].as_py()
    key = test_uri.split("/", 3)[3]
    original = src.get(key)
    src.put(key, _png(np.zeros((SIDE, SIDE), np.uint8)), "image/png")
    try:
        with pytest.raises(FileChanged, match="changed since ingest") as e:
            ensemble_accuracy(store, read_live(store, layout).generation)
        assert "s3://" not in str(e.value) and "img/" not in str(e.value)
        src.purge(key)  # and deleted
        with pytest.raises(FileChanged, match="does not exist") as e:
            ensemble_accuracy(store, read_live(store, layout).generation)
        assert "s3://" not in str(e.value)
    finally:
        src.put(key, original, "image/png")
    assert ensemble_accuracy(store, read_live(store, layout).generation) == files_gen.accuracy


def test_a_decode_function_by_import_path(store: Store, trainer: RayTrainer, dataset) -> None:
    """``columns.decode`` names the function that turns a file into features, imported
    where the jobs run: here the built-in one by its import path, which trains the same
    weights under another lineage (the decoder is part of what a checkpoint holds);
    a path that does not import refuses the ingest naming the field."""
    from lethe.ingest import IngestError

    _, refs_uri, _, _ = dataset
    models = {}
    for decode in ("image", "lethe.files:decode_image"):
        name = unique_model("decode")
        base = replace(small_config(name, shards=1, slices=1), source_uri=refs_uri)
        cfg = replace(base, columns=replace(base.columns, file="image", decode=decode))
        layout = ModelLayout.of(name)
        ingest_source(store, layout, cfg)
        models[decode], _ = train_model(store, layout, trainer)
    a, b = (m.shards[0] for m in models.values())
    assert a.slices[0].lineage != b.slices[0].lineage
    wa = load_checkpoint(store.get(a.final_checkpoint))["model"]
    wb = load_checkpoint(store.get(b.final_checkpoint))["model"]
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)

    name = unique_model("decode-missing")
    base = replace(small_config(name, shards=1, slices=1), source_uri=refs_uri)
    cfg = replace(base, columns=replace(base.columns, file="image", decode="nowhere.at_all:fn"))
    with pytest.raises(Exception, match=r"columns\.decode: cannot import") as e:
        ingest_source(store, ModelLayout.of(name), cfg)
    assert isinstance(e.value, IngestError | ConfigError)

    # a decode function that imports but raises on every file (schema-valid, absurd:
    # split_uri takes one argument): refused naming the decoder and the error's type,
    # never the file; nothing written
    name = unique_model("decode-raises")
    cfg = replace(cfg, name=name, columns=replace(cfg.columns, decode="lethe.files:split_uri"))
    with pytest.raises(IngestError, match=r"could not be decoded by 'lethe.files:split_uri'") as e:
        ingest_source(store, ModelLayout.of(name), cfg)
    assert "s3://" not in str(e.value) and "img/" not in str(e.value)
    assert not store.exists(ModelLayout.of(name).current)
