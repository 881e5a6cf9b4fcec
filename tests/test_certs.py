"""Erasure certificates: the per-model chain in S3, against the real SeaweedFS (bucket
versioning on) of the shared stack, one model prefix per test. Keys and signatures,
which need no server, are tested in tests/unit/test_certs.py."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest

from lethe.certs import (
    ChainError,
    Keys,
    SignatureError,
    append,
    cert_hash,
    check_in_chain,
    check_signature,
    sign,
    verify_chain,
    verify_copies,
)
from lethe.layout import ModelLayout
from lethe.store import Store

from .conftest import unique_model
from .unit.test_certs import SUBJECTS, sample_body


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys.generate()


# -- the chain in S3 -------------------------------------------------------------------


def builder(keys: Keys, n: int = 0) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def build(chain: dict[str, Any]) -> dict[str, Any]:
        assert set(chain) == {"sequence", "previous"}
        return sample_body(keys, n)

    return build


def never(chain: dict[str, Any]) -> dict[str, Any]:
    raise AssertionError("build must not be called: the certificate exists already")


def chain_len(store: Store, layout: ModelLayout) -> int:
    return len(list(store.list_keys(layout.certificate_chain_prefix)))


def filled(store: Store, keys: Keys, count: int = 5) -> tuple[ModelLayout, list[dict[str, Any]]]:
    layout = ModelLayout.of(unique_model("certs"))
    docs = [append(store, layout, f"req-{i}", builder(keys, i), keys) for i in range(count)]
    return layout, docs


def test_append_five(store: Store, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="lethe.certs")
    layout, docs = filled(store, keys)
    assert [d["chain"]["sequence"] for d in docs] == [1, 2, 3, 4, 5]
    assert docs[0]["chain"]["previous"] is None
    for prev, doc in zip(docs, docs[1:], strict=False):
        assert doc["chain"]["previous"] == cert_hash(prev)
    for i, doc in enumerate(docs):
        assert doc["request_uid"] == f"req-{i}"
        assert store.get_json(layout.certificate(f"req-{i}")) == doc
        assert store.get_json(layout.certificate_chain(i + 1)) == doc
        assert check_signature(doc, keys.public_key) == []
        assert check_in_chain(store, layout, doc) == []
    assert verify_chain(store, layout, keys.public_key) == (5, [])
    assert verify_copies(store, layout) == (5, [])
    for subject in SUBJECTS:
        assert subject not in caplog.text


def test_empty_chain_verifies(store: Store, keys: Keys) -> None:
    layout = ModelLayout.of(unique_model("certs"))
    assert verify_chain(store, layout, keys.public_key) == (0, [])


def test_append_is_idempotent(store: Store, keys: Keys) -> None:
    layout, docs = filled(store, keys, 3)
    again = append(store, layout, "req-1", never, keys)
    assert again == docs[1]
    assert chain_len(store, layout) == 3


def test_rerun_after_crash_between_slot_and_copy(store: Store, keys: Keys) -> None:
    layout, docs = filled(store, keys, 4)
    # req-2 claimed slot 3, then the process died before copying it
    assert store.purge(layout.certificate("req-2")) >= 1
    again = append(store, layout, "req-2", never, keys)
    assert again == docs[2]
    assert store.get_json(layout.certificate("req-2")) == docs[2]
    assert chain_len(store, layout) == 4
    assert verify_chain(store, layout, keys.public_key) == (4, [])
    # the newest slot, too
    store.purge(layout.certificate("req-3"))
    assert append(store, layout, "req-3", never, keys) == docs[3]
    assert chain_len(store, layout) == 4


def test_build_is_given_the_chain_and_cannot_change_the_request(store: Store, keys: Keys) -> None:
    layout, _ = filled(store, keys, 1)
    seen: list[dict[str, Any]] = []

    def build(chain: dict[str, Any]) -> dict[str, Any]:
        seen.append(chain)
        return {**sample_body(keys), "chain": {"sequence": 99}, "signature": "junk"}

    doc = append(store, layout, "req-x", build, keys)
    assert seen == [doc["chain"]] and doc["chain"]["sequence"] == 2
    with pytest.raises(ValueError, match="another request"):
        append(store, layout, "req-y", lambda c: {"request_uid": "req-z"}, keys)
    with pytest.raises(SignatureError):
        append(store, layout, "req-y", builder(keys), keys.verifier())
    assert verify_chain(store, layout, keys.public_key) == (2, [])


def test_concurrent_appends(store: Store, keys: Keys) -> None:
    """Eight writers at once: one contiguous chain, every entry there once."""
    layout, _ = filled(store, keys, 2)
    start = threading.Barrier(8)
    results: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            start.wait()
            results[i] = append(store, layout, f"conc-{i}", builder(keys, i), keys)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(d["chain"]["sequence"] for d in results.values()) == list(range(3, 11))
    assert chain_len(store, layout) == 10
    assert verify_chain(store, layout, keys.public_key) == (10, [])
    assert verify_copies(store, layout) == (10, [])


def test_concurrent_appends_of_one_request(store: Store, keys: Keys) -> None:
    """The same request certified by several processes at once lands once."""
    layout, _ = filled(store, keys, 1)
    start = threading.Barrier(4)
    results: list[dict[str, Any]] = []

    def worker() -> None:
        start.wait()
        results.append(append(store, layout, "same", builder(keys, 9), keys))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r == results[0] for r in results)
    assert chain_len(store, layout) == 2
    assert verify_chain(store, layout, keys.public_key) == (2, [])


def test_removed_link_is_caught(store: Store, keys: Keys) -> None:
    layout, _ = filled(store, keys)
    store.purge(layout.certificate_chain(2))
    checked, failures = verify_chain(store, layout, keys.public_key)
    assert checked == 4
    assert failures == ["chain: entry 2 is missing"]


def test_removed_newest_entry_is_caught_by_its_copy(store: Store, keys: Keys) -> None:
    layout, _ = filled(store, keys)
    store.purge(layout.certificate_chain(5))
    assert verify_chain(store, layout, keys.public_key) == (4, [])  # nothing links to it
    _, failures = verify_copies(store, layout)
    assert failures == [
        f"{layout.certificate('req-4')}: {layout.certificate_chain(5)}: missing "
        "(the certificate is not in the chain)"
    ]


def test_edited_entry_is_caught(store: Store, keys: Keys) -> None:
    layout, docs = filled(store, keys)
    forged = {**docs[2], "records_erased": 0}
    store.put_json(layout.certificate_chain(3), forged)  # a new version over the entry
    _, failures = verify_chain(store, layout, keys.public_key)
    key3, key4 = layout.certificate_chain(3), layout.certificate_chain(4)
    assert failures == [
        f"{key3}: signature.value: does not match the certificate's content "
        "(edited after signing?)",
        f"{key4}: chain.previous does not match entry 3 (a link removed or edited?)",
    ]
    # the untouched copy no longer matches the chain, and says which field differs
    assert check_in_chain(store, layout, docs[2]) == [
        f"records_erased: differs from the chain entry {key3}"
    ]


def test_entry_re_signed_by_a_forger_is_caught(store: Store, keys: Keys) -> None:
    layout, docs = filled(store, keys)
    forger = Keys.generate()
    store.put_json(layout.certificate_chain(2), sign({**docs[1], "status": "x"}, forger))
    _, failures = verify_chain(store, layout, keys.public_key)
    key2 = layout.certificate_chain(2)
    assert failures[0].startswith(f"{key2}: signature.key: signed by {forger.fingerprint}")
    assert failures[-1].endswith(
        "chain.previous does not match entry 2 (a link removed or edited?)"
    )


def test_chain_signed_with_another_key_fails(store: Store, keys: Keys) -> None:
    other = Keys.generate()
    layout, _ = filled(store, other, 3)
    checked, failures = verify_chain(store, layout, keys.public_key)
    assert checked == 3 and len(failures) == 3
    assert all("signature.key: signed by " + other.fingerprint in f for f in failures)
    assert verify_chain(store, layout, other.public_key) == (3, [])


def test_duplicate_request_and_stray_objects_are_caught(store: Store, keys: Keys) -> None:
    layout, docs = filled(store, keys, 2)
    dup = sign({**docs[1], "chain": {"sequence": 3, "previous": cert_hash(docs[1])}}, keys)
    store.put_json_if_absent(layout.certificate_chain(3), dup)
    store.put_json(layout.certificate_chain_prefix + "extra.json", {})
    _, failures = verify_chain(store, layout, keys.public_key)
    assert failures == [
        f"{layout.certificate_chain_prefix}extra.json: not a chain entry "
        "(unexpected object under the chain)",
        f"{layout.certificate_chain(3)}: request_uid: same request as entry 2",
    ]


def test_check_in_chain(store: Store, keys: Keys) -> None:
    layout, docs = filled(store, keys, 2)
    local = json.loads(json.dumps(docs[1]))
    assert check_in_chain(store, layout, local) == []
    local["status"] = "nothing-to-erase"
    local["signature"] = sign(local, keys)["signature"]  # validly signed, but not the entry
    assert check_signature(local, keys.public_key) == []
    assert check_in_chain(store, layout, local) == [
        f"signature: differs from the chain entry {layout.certificate_chain(2)}",
        f"status: differs from the chain entry {layout.certificate_chain(2)}",
    ]
    beyond = {**docs[1], "chain": {"sequence": 9, "previous": None}}
    assert check_in_chain(store, layout, beyond) == [
        f"{layout.certificate_chain(9)}: missing (the certificate is not in the chain)"
    ]
    assert check_in_chain(store, layout, {"a": 1})[0].startswith("chain.sequence:")


def test_append_refuses_to_link_to_garbage(store: Store, keys: Keys) -> None:
    layout, _ = filled(store, keys, 1)
    store.put(layout.certificate_chain(2), b"not json")
    with pytest.raises(ChainError, match="00000002.json: not a certificate"):
        append(store, layout, "req-after", builder(keys), keys)
