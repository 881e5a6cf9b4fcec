"""Erasure certificates without a server: keys, the canonical form and signatures.

The chain of certificates in S3 is tested in tests/test_certs.py, against the real
SeaweedFS of the shared stack; it uses ``sample_body`` from here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from lethe import certs
from lethe.certs import (
    Keys,
    KeysError,
    SignatureError,
    canonical,
    cert_hash,
    check_signature,
    load_public_key,
    sign,
)

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
