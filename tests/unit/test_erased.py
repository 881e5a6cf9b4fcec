"""The erase order without servers: the keyed side locates rows by position, the keyless
side reads them back and refuses an order that does not match the plan; ids never show
in the order, a repr or a message (``lethe.erased``)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from lethe import dataio
from lethe.core.hashing import sha256_hex
from lethe.core.manifest import FileRef
from lethe.core.plan import CostEstimate, ErasurePlan, RequestPlan, ShardPlan
from lethe.erased import EraseOrder, HashedIds, OrderError, RawIds, locate, recover


def id_hash(value: str) -> str:
    return "h:" + value[::-1]  # a stand-in for the HMAC: any keyed function will do


class DictStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.ranges: list[int] = []  # the length of each ranged read

    def get(self, key: str) -> bytes:
        return self.objects[key]

    def size(self, key: str) -> int:
        return len(self.objects[key])

    def get_range(self, key: str, start: int, length: int) -> bytes:
        self.ranges.append(length)
        return self.objects[key][start : start + length]

    def add(self, key: str, table: pa.Table) -> FileRef:
        body = dataio.encode(table)
        self.objects[key] = body
        return FileRef(key, sha256_hex(body), table.num_rows)


class Gen:
    """The two things ``locate`` reads of a generation."""

    def __init__(self, index: FileRef, test: FileRef) -> None:
        self.number = 3
        self.shards = [type("Shard", (), {"index": index})()]
        self.test = test


ERASED_SUBJECT = "alice@example.org"


@pytest.fixture
def world() -> tuple[DictStore, Gen, ErasurePlan]:
    store = DictStore()
    subjects = ["bob", ERASED_SUBJECT, "carol", ERASED_SUBJECT, "dave", ERASED_SUBJECT]
    index = store.add(
        "idx",
        pa.table(
            {
                "record_id": [f"r{i}" for i in range(6)],
                "subject_id": subjects,
                "slice": pa.array([0, 1, 1, 1, 2, 2], pa.int32()),
            }
        ),
    )
    test = store.add("test", pa.table({"record_id": ["t0", "t1"], "subject_id": ["x", "y"]}))
    erased = ["r1", "r3", "r5"]
    plan = ErasurePlan(
        batch_id="batch-1",
        model="m",
        key_id="k",
        base_generation=3,
        requested_at=0.0,
        requests=[RequestPlan("u", [id_hash(ERASED_SUBJECT)], [id_hash(r) for r in erased], [0])],
        shards=[ShardPlan(0, first_slice=1, records=3)],
        test_records=0,
        estimate=CostEstimate(1, 1, 1, 1),
        record_hashes=sorted(id_hash(r) for r in erased),
    )
    return store, Gen(index, test), plan


def test_order_names_positions_and_reads_back_the_ids(world) -> None:
    store, gen, plan = world
    order = locate(store, gen, plan, id_hash, {"backend": None, "admin": None})  # type: ignore[arg-type]
    text = json.dumps(order.to_json())
    assert ERASED_SUBJECT not in text and '"r1"' not in text
    assert [f.rows for f in order.files] == [(1, 3, 5)]
    assert EraseOrder.from_json(json.loads(text)) == order
    ids = recover(store, order, plan)  # type: ignore[arg-type]
    assert ids.record_ids == {"r1", "r3", "r5"} and ids.subject_ids == {ERASED_SUBJECT}
    assert ERASED_SUBJECT not in repr(ids) and "r1" not in repr(ids)
    # both answers agree on every column they are asked about
    hashed = HashedIds.of(plan, id_hash)
    table = dataio.decode(store.get("idx"))
    assert list(ids.records(table.column("record_id"))) == list(
        hashed.records(table.column("record_id"))
    )
    assert list(ids.subjects(table.column("subject_id"))) == list(
        hashed.subjects(table.column("subject_id"))
    )


def test_raw_ids_match_a_sources_integer_ids_as_the_hashes_saw_them() -> None:
    ids = RawIds(frozenset({"7", "12"}), frozenset())
    assert list(ids.records(pa.array([7, 8, 12], pa.int64()))) == [True, False, True]


def test_a_generation_already_patched_cannot_be_located(world) -> None:
    store, gen, plan = world
    plan.shards = [ShardPlan(0, first_slice=1, records=4)]  # the plan says more rows
    with pytest.raises(OrderError, match="holds 3 of the plan's 4 records"):
        locate(store, gen, plan, id_hash, {})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda f: f.update(rows=[1, 3]), "other rows than the plan's 3"),
        (lambda f: f.update(rows=[1, 3, 3]), "other rows than the plan's 3"),
        (lambda f: f.update(rows=[1, 3, 9]), "other rows than the plan's 3"),
        (lambda f: f.update(rows=[0, 3, 5]), "start in another slice"),
        (lambda f: f["ref"].update(sha256="0" * 64), "is not the file it names"),
        (lambda f: f["ref"].update(key="gone"), "is gone"),
        (lambda f: f.update(shard=None), "not the plan's shards"),
    ],
)
def test_an_order_that_does_not_match_the_plan_is_refused(world, edit, words) -> None:
    store, gen, plan = world
    raw = locate(store, gen, plan, id_hash, {}).to_json()  # type: ignore[arg-type]
    edit(raw["files"][0])
    store.objects.pop("gone", None)
    with pytest.raises(OrderError, match=words) as e:
        recover(_GetOrMissing(store), EraseOrder.from_json(raw), plan)  # type: ignore[arg-type]
    assert ERASED_SUBJECT not in str(e.value) and "r1" not in str(e.value)


class _GetOrMissing:
    def __init__(self, store: DictStore) -> None:
        self.store = store

    def get(self, key: str) -> bytes:
        from lethe.store import NotFound

        try:
            return self.store.get(key)
        except KeyError:
            raise NotFound(key) from None
