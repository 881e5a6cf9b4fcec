"""Erasure certificates: keys, signatures, and the per-model chain in S3.

The key and signature tests need no server; the chain tests run against the real
SeaweedFS (bucket versioning on) of the shared stack, one model prefix per test.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lethe import certs
from lethe.certs import (
    ChainError,
    Keys,
    KeysError,
    SignatureError,
    append,
    canonical,
    cert_hash,
    check_in_chain,
    check_signature,
    load_public_key,
    sign,
    verify_chain,
    verify_copies,
)
from lethe.layout import ModelLayout
from lethe.store import Store

from .conftest import unique_model

SUBJECTS = ["cust-42", "cust-77"]


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys.generate()


def sample_body(keys: Keys, n: int = 0) -> dict[str, Any]:
    """A certificate body shaped like the ones the erasure writes (hashes, no ids)."""
    return {
        "kind": "lethe.dev/ErasureCertificate",
        "version": 1,
        "batch_id": f"batch-{n:04d}",
        "status": "erased",
        "subject_hashes": keys.id_hashes(SUBJECTS),
        "record_hashes": keys.id_hashes([f"rec-{n}-{i}" for i in range(3)]),
        "records_erased": 3,
        "shards": [0, 3],
        "lineages": {"0": ["a" * 64, "b" * 64], "3": ["c" * 64]},
        "deleted_keys": ["m/data/shard=0/slice=1/x.parquet"],
        "generation_before": 4,
        "generation_after": 7,
        "accuracy_after": 0.8125,
        "timings": {"requested_at": 1700000000.25, "time_to_forget_seconds": 1.5},
        "cost": {"usd": 0.0123, "full_retrain_usd": 0.1},
        "verified": True,
        "note": None,
    }


def sample_cert(keys: Keys) -> dict[str, Any]:
    return sign(
        {**sample_body(keys), "request_uid": "req-1", "chain": {"sequence": 1, "previous": None}},
        keys,
    )


def edited(value: Any) -> Any:
    """A different value of the same kind, so the edit is a plausible forgery."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1:] != "0" else "1")
    if value is None:
        return 0
    if isinstance(value, list):
        return [*value[:-1], edited(value[-1])] if value else ["x"]
    if isinstance(value, dict):
        k = sorted(value)[0]
        return {**value, k: edited(value[k])}
    raise AssertionError(type(value))


# -- keys ------------------------------------------------------------------------------


def test_fingerprint_and_id_hashes(keys: Keys) -> None:
    assert keys.fingerprint.startswith("sha256:") and len(keys.fingerprint) == 7 + 64
    h = keys.id_hash("cust-42")
    assert len(h) == 64 and h == keys.id_hash("cust-42") and "cust" not in h
    assert keys.id_hashes(["b", "a", "b"]) == sorted({keys.id_hash("a"), keys.id_hash("b")})
    other = Keys.generate()
    assert other.id_hash("cust-42") != h  # keyed: another deployment cannot match it
    assert other.fingerprint != keys.fingerprint


def test_repr_holds_no_secret(keys: Keys) -> None:
    assert keys.hmac_key.hex() not in repr(keys)
    assert "PRIVATE" not in repr(keys)


def test_save_load_round_trip_and_modes(keys: Keys, tmp_path: Path) -> None:
    d = tmp_path / "keys"
    keys.save(d)
    for name in ("signing-key.pem", "hmac-key"):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600, name
    assert (d / "hmac-key").read_text().strip() == keys.hmac_key.hex()
    assert (d / "public-key.pem").read_text() == keys.public_pem()
    back = Keys.load(d)
    assert back.can_sign and back.hmac_key == keys.hmac_key
    assert back.fingerprint == keys.fingerprint
    assert back.id_hash("x") == keys.id_hash("x")
    # what the loaded keys sign, the original public key accepts
    assert check_signature(sign({"a": 1}, back), keys.public_key) == []


def test_save_refuses_to_overwrite(keys: Keys, tmp_path: Path) -> None:
    (tmp_path / "hmac-key").write_text("old")
    with pytest.raises(FileExistsError) as e:
        Keys.generate().save(tmp_path)
    assert "hmac-key" in str(e.value)
    assert (tmp_path / "hmac-key").read_text() == "old"
    assert not (tmp_path / "signing-key.pem").exists()  # nothing half-written


def test_load_names_the_missing_file(keys: Keys, tmp_path: Path) -> None:
    keys.save(tmp_path)
    (tmp_path / "hmac-key").unlink()
    with pytest.raises(KeysError, match="hmac-key"):
        Keys.load(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "hmac-key").write_text(keys.hmac_key.hex())
    with pytest.raises(KeysError, match="public-key.pem"):
        Keys.load(empty)
    with pytest.raises(KeysError, match="no such keys directory"):
        Keys.load(tmp_path / "nowhere")


def test_load_rejects_malformed_files_without_echoing_them(keys: Keys, tmp_path: Path) -> None:
    keys.save(tmp_path)
    (tmp_path / "hmac-key").write_text("zz" * 32)
    with pytest.raises(KeysError, match="hmac-key: expected 64 hex") as e:
        Keys.load(tmp_path)
    assert "zzzz" not in str(e.value)
    other = Keys.generate()
    (tmp_path / "hmac-key").write_text(keys.hmac_key.hex())
    (tmp_path / "public-key.pem").write_text(other.public_pem())
    with pytest.raises(KeysError, match="does not belong"):
        Keys.load(tmp_path)


def test_verifier_keys_load_and_cannot_sign(keys: Keys, tmp_path: Path) -> None:
    keys.verifier().save(tmp_path)
    assert not (tmp_path / "signing-key.pem").exists()
    v = Keys.load(tmp_path)
    assert not v.can_sign and v.fingerprint == keys.fingerprint
    assert v.id_hash("cust-42") == keys.id_hash("cust-42")
    with pytest.raises(SignatureError):
        sign({"a": 1}, v)
    assert check_signature(sample_cert(keys), v.public_key) == []


def test_from_secret(keys: Keys) -> None:
    data = keys.secret_data()
    assert set(data) == {"signing-key.pem", "hmac-key", "public-key.pem"}
    back = Keys.from_secret({k: v.encode() for k, v in data.items()})  # bytes work too
    assert back.can_sign and back.hmac_key == keys.hmac_key
    assert back.fingerprint == keys.fingerprint
    minimal = Keys.from_secret(
        {"signing-key.pem": data["signing-key.pem"], "hmac-key": data["hmac-key"]}
    )
    assert minimal.fingerprint == keys.fingerprint
    verifier = Keys.from_secret(
        {"public-key.pem": data["public-key.pem"], "hmac-key": data["hmac-key"]}
    )
    assert not verifier.can_sign


@pytest.mark.parametrize("missing", ["signing-key.pem", "hmac-key"])
def test_from_secret_names_the_missing_entry(keys: Keys, missing: str) -> None:
    data = {k: v for k, v in keys.secret_data().items() if k not in (missing, "public-key.pem")}
    with pytest.raises(KeysError, match=f"'{missing}': missing"):
        Keys.from_secret(data)


def test_from_secret_names_the_malformed_entry(keys: Keys) -> None:
    data = keys.secret_data()
    with pytest.raises(KeysError, match="'signing-key.pem'"):
        Keys.from_secret({**data, "signing-key.pem": data["public-key.pem"]})
    with pytest.raises(KeysError, match="'hmac-key'"):
        Keys.from_secret({**data, "hmac-key": "abc"})


def test_load_public_key(keys: Keys) -> None:
    assert certs.fingerprint(load_public_key(keys.public_pem())) == keys.fingerprint
    with pytest.raises(KeysError):
        load_public_key("not a key")


# -- canonical form and signatures -----------------------------------------------------


def test_canonical_form(keys: Keys) -> None:
    doc = {"b": [1, 2.5, "é"], "a": {"y": None, "x": True}, "signature": {"value": "x"}}
    assert canonical(doc) == b'{"a":{"x":true,"y":null},"b":[1,2.5,"\\u00e9"]}'
    cert = sample_cert(keys)
    assert canonical(cert) == canonical({k: v for k, v in cert.items() if k != "signature"})
    # a stored certificate reads back with the same canonical bytes
    assert canonical(json.loads(json.dumps(cert, indent=1))) == canonical(cert)


def test_sign_normalises_and_refuses_non_json(keys: Keys) -> None:
    signed = sign({"shards": (1, 2), "lineages": {3: "x"}}, keys)
    assert signed["shards"] == [1, 2] and signed["lineages"] == {"3": "x"}
    assert check_signature(json.loads(json.dumps(signed)), keys.public_key) == []
    with pytest.raises(SignatureError, match="not plain JSON"):
        sign({"cost": float("nan")}, keys)


def test_signed_certificate_checks(keys: Keys) -> None:
    cert = sample_cert(keys)
    assert cert["signature"]["alg"] == "ed25519"
    assert cert["signature"]["key"] == keys.fingerprint
    assert check_signature(cert, keys.public_key) == []
    for subject in SUBJECTS:
        assert subject not in json.dumps(cert)


def test_every_top_level_edit_is_caught(keys: Keys) -> None:
    cert = sample_cert(keys)
    for field in cert:
        if field == "signature":
            continue
        forged = copy.deepcopy(cert)
        forged[field] = edited(forged[field])
        assert forged[field] != cert[field]
        failures = check_signature(forged, keys.public_key)
        assert failures and failures[0].startswith("signature.value: does not match"), field
    for sub in ("alg", "key", "value"):
        forged = copy.deepcopy(cert)
        forged["signature"][sub] = edited(forged["signature"][sub])
        failures = check_signature(forged, keys.public_key)
        assert any(f.startswith(f"signature.{sub}:") for f in failures), sub
    added = {**cert, "extra": 1}
    assert check_signature(added, keys.public_key)
    removed = {k: v for k, v in cert.items() if k != "status"}
    assert check_signature(removed, keys.public_key)


def test_nested_edits_are_caught(keys: Keys) -> None:
    cert = sample_cert(keys)
    forged = copy.deepcopy(cert)
    forged["subject_hashes"][1] = keys.id_hash("someone-else")
    assert check_signature(forged, keys.public_key)
    forged = copy.deepcopy(cert)
    forged["lineages"]["0"][0] = "d" * 64
    assert check_signature(forged, keys.public_key)
    forged = copy.deepcopy(cert)
    forged["subject_hashes"].reverse()
    assert check_signature(forged, keys.public_key)


def test_missing_or_malformed_signature(keys: Keys) -> None:
    cert = sample_cert(keys)
    unsigned = {k: v for k, v in cert.items() if k != "signature"}
    assert check_signature(unsigned, keys.public_key) == ["signature: missing"]
    assert check_signature({**cert, "signature": "x"}, keys.public_key) == [
        "signature: not an object"
    ]
    bad = {**cert, "signature": {**cert["signature"], "value": "***"}}
    assert check_signature(bad, keys.public_key) == ["signature.value: missing or not base64"]
    assert check_signature([1], keys.public_key) == ["certificate: not a JSON object"]


def test_wrong_key(keys: Keys) -> None:
    cert = sample_cert(keys)
    other = Keys.generate()
    failures = check_signature(cert, other.public_key)
    assert failures == [
        f"signature.key: signed by {keys.fingerprint} not by the trusted key {other.fingerprint}"
    ]
    # a forger who also rewrites the key field still fails on the value
    relabelled = {**cert, "signature": {**cert["signature"], "key": other.fingerprint}}
    failures = check_signature(relabelled, other.public_key)
    assert failures and failures[0].startswith("signature.value: does not match")


def test_cert_hash_covers_content_and_signature(keys: Keys) -> None:
    cert = sample_cert(keys)
    value = cert["signature"]["value"]
    assert cert_hash(cert) == hashlib.sha256(canonical(cert) + b"\n" + value.encode()).hexdigest()
    resigned = sign(cert, Keys.generate())
    assert canonical(resigned) == canonical(cert)
    assert cert_hash(resigned) != cert_hash(cert)
    assert cert_hash({**cert, "status": "x"}) != cert_hash(cert)


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
