"""Tamper-evident erasure certificates: keys, signatures and the per-model chain.

A certificate is a JSON object signed with Ed25519 over its canonical form, and
appended to the model's append-only chain in S3 (``certificates/chain/<n>.json``),
where entry n carries ``chain.previous`` = :func:`cert_hash` of entry n-1. Editing a
certificate breaks its signature; removing or editing a chain entry breaks the next
link. A copy of each certificate also lives at ``certificates/<request-uid>.json``.

Ids (subjects, records) are only ever hashed with a keyed HMAC (:meth:`Keys.id_hash`):
the key lives in a Secret, never beside the hashes, so a reader of a certificate
cannot confirm a guessed id. Nothing here logs or raises with an id or key material.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from lethe.core.hashing import keyed_hash
from lethe.errors import IntegrityFailure, UserError
from lethe.layout import ModelLayout
from lethe.store import NotFound, Store

log = logging.getLogger(__name__)

ALG = "ed25519"
SIGNING_KEY_FILE = "signing-key.pem"
PUBLIC_KEY_FILE = "public-key.pem"
HMAC_KEY_FILE = "hmac-key"
_HMAC_KEY_BYTES = 32
_ENTRY_NAME = re.compile(r"^(\d{8})\.json$")
_SCAN_BATCH = 16  # chain entries fetched at once when a rerun looks for its own slot


class KeysError(UserError, ValueError):
    """Keys are missing or malformed (names the file or Secret entry, never the key)."""


class SignatureError(UserError, ValueError):
    """A certificate cannot be signed (no signing key, or not plain JSON)."""


class ChainError(IntegrityFailure, RuntimeError):
    """The chain cannot be appended to (an entry is not a certificate)."""


# -- keys ------------------------------------------------------------------------------


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """Names a key in a signature so a verifier can say *which* key signed."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """A verifier's trusted key from PEM (SubjectPublicKeyInfo), refusing other key types."""
    return _public_key(pem, "public key")


def _as_bytes(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


def _public_key(pem: str | bytes, where: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(_as_bytes(pem))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeysError(f"{where}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeysError(f"{where}: not an Ed25519 public key")
    return key


def _signing_key(pem: str | bytes, where: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_as_bytes(pem), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeysError(f"{where}: not an unencrypted PEM (PKCS8) private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeysError(f"{where}: not an Ed25519 private key")
    return key


def _hmac_key(text: str | bytes, where: str) -> bytes:
    try:
        s = _as_bytes(text).decode("ascii").strip()
        key = bytes.fromhex(s)
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != _HMAC_KEY_BYTES:
        raise KeysError(f"{where}: expected {2 * _HMAC_KEY_BYTES} hex characters")
    return key


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Keys:
    """The HMAC key for id hashes and the Ed25519 key pair that signs certificates.

    A verifier holds the same HMAC key (to recompute hashes of ids it is asked about)
    and only the public key (``signing_key`` None), so it cannot forge a certificate.
    """

    hmac_key: bytes = field(repr=False)
    public_key: Ed25519PublicKey
    signing_key: Ed25519PrivateKey | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.hmac_key, bytes) or len(self.hmac_key) != _HMAC_KEY_BYTES:
            raise KeysError(f"hmac key: expected {_HMAC_KEY_BYTES} bytes")
        if not isinstance(self.public_key, Ed25519PublicKey):
            raise KeysError("public key: not an Ed25519 public key")
        if self.signing_key is not None:
            if not isinstance(self.signing_key, Ed25519PrivateKey):
                raise KeysError("signing key: not an Ed25519 private key")
            if _raw(self.signing_key.public_key()) != _raw(self.public_key):
                raise KeysError("public key: does not belong to the signing key")

    @property
    def fingerprint(self) -> str:
        """``sha256:`` + hex SHA-256 of the raw 32-byte public key."""
        return fingerprint(self.public_key)

    @property
    def can_sign(self) -> bool:
        return self.signing_key is not None

    def id_hash(self, value: str) -> str:
        """Hex HMAC-SHA256 of an id: only a holder of the key can test a guessed id."""
        return keyed_hash(self.hmac_key, value)

    def id_hashes(self, values: Iterable[str]) -> list[str]:
        """Sorted and unique, so the order of a request leaks nothing and is stable."""
        return sorted({self.id_hash(v) for v in values})

    def public_pem(self) -> str:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def _signing_pem(self) -> str:
        assert self.signing_key is not None
        return self.signing_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()

    def verifier(self) -> Keys:
        """The same keys without the signing key: what a verifier is given."""
        return Keys(hmac_key=self.hmac_key, public_key=self.public_key)

    @classmethod
    def generate(cls) -> Keys:
        sk = Ed25519PrivateKey.generate()
        return cls(
            hmac_key=secrets.token_bytes(_HMAC_KEY_BYTES),
            public_key=sk.public_key(),
            signing_key=sk,
        )

    def _files(self) -> list[tuple[str, str, int]]:
        files = [(HMAC_KEY_FILE, self.hmac_key.hex() + "\n", 0o600)]
        if self.signing_key is not None:
            files.append((SIGNING_KEY_FILE, self._signing_pem(), 0o600))
        files.append((PUBLIC_KEY_FILE, self.public_pem(), 0o644))
        return files

    def save(self, directory: str | Path) -> None:
        """Write the key files; never overwrites one (losing a key orphans every
        certificate and hash made with it). Secrets are created with mode 0600."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        files = self._files()
        for name, _, _ in files:
            if (d / name).exists():
                raise FileExistsError(
                    errno.EEXIST, "refusing to overwrite an existing key file", str(d / name)
                )
        for name, text, mode in files:
            path = d / name
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError:
                raise FileExistsError(
                    errno.EEXIST, "refusing to overwrite an existing key file", str(path)
                ) from None
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), mode)  # the umask must not widen or narrow it
                f.write(text)

    @classmethod
    def load(cls, directory: str | Path) -> Keys:
        """Signing keys (signing-key.pem + hmac-key) or verifier keys (public-key.pem +
        hmac-key). When both PEM files are there they must agree."""
        d = Path(directory)
        if not d.is_dir():
            raise KeysError(f"{d}: no such keys directory")
        hmac_path = d / HMAC_KEY_FILE
        if not hmac_path.is_file():
            raise KeysError(f"{hmac_path}: missing (the HMAC key of id hashes)")
        hmac_key = _hmac_key(hmac_path.read_bytes(), str(hmac_path))
        sk_path, pk_path = d / SIGNING_KEY_FILE, d / PUBLIC_KEY_FILE
        sk = _signing_key(sk_path.read_bytes(), str(sk_path)) if sk_path.is_file() else None
        if pk_path.is_file():
            pk = _public_key(pk_path.read_bytes(), str(pk_path))
            if sk is not None and _raw(sk.public_key()) != _raw(pk):
                raise KeysError(f"{pk_path}: does not belong to {sk_path}")
        elif sk is not None:
            pk = sk.public_key()
        else:
            raise KeysError(f"{pk_path}: missing (and no {SIGNING_KEY_FILE} either)")
        return cls(hmac_key=hmac_key, public_key=pk, signing_key=sk)

    @classmethod
    def from_secret(cls, data: Mapping[str, str | bytes]) -> Keys:
        """From a Kubernetes Secret's decoded data: 'signing-key.pem' and 'hmac-key'
        (same formats as the files); 'public-key.pem' alone makes verifier keys."""
        if HMAC_KEY_FILE not in data:
            raise KeysError(f"Secret entry '{HMAC_KEY_FILE}': missing")
        hmac_key = _hmac_key(data[HMAC_KEY_FILE], f"Secret entry '{HMAC_KEY_FILE}'")
        sk = None
        if SIGNING_KEY_FILE in data:
            sk = _signing_key(data[SIGNING_KEY_FILE], f"Secret entry '{SIGNING_KEY_FILE}'")
        if PUBLIC_KEY_FILE in data:
            pk = _public_key(data[PUBLIC_KEY_FILE], f"Secret entry '{PUBLIC_KEY_FILE}'")
            if sk is not None and _raw(sk.public_key()) != _raw(pk):
                raise KeysError(
                    f"Secret entry '{PUBLIC_KEY_FILE}': does not belong to '{SIGNING_KEY_FILE}'"
                )
        elif sk is not None:
            pk = sk.public_key()
        else:
            raise KeysError(f"Secret entry '{SIGNING_KEY_FILE}': missing")
        return cls(hmac_key=hmac_key, public_key=pk, signing_key=sk)

    def secret_data(self) -> dict[str, str]:
        """The inverse of :meth:`from_secret` (file name -> content, as --from-file makes)."""
        return {name: text for name, text, _ in self._files()}


# -- canonical form and signatures -----------------------------------------------------


def _plain(doc: Any) -> Any:
    """The document as it reads back from JSON (tuples become lists, keys strings), so
    what is signed is exactly what a reader of the stored object sees."""
    try:
        return json.loads(json.dumps(doc, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise SignatureError(f"certificate is not plain JSON ({type(e).__name__})") from None


def _canonical_bytes(doc: Any) -> bytes:
    return json.dumps(
        _plain(doc), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def canonical(doc: dict[str, Any]) -> bytes:
    """The signed bytes: the document without its "signature" field, as JSON with
    sorted keys, no spaces, ASCII only (floats as Python's repr; NaN and infinities
    are refused, since they are not JSON)."""
    if not isinstance(doc, dict):
        raise TypeError("a certificate is a JSON object")
    return _canonical_bytes({k: v for k, v in doc.items() if k != "signature"})


def sign(doc: dict[str, Any], keys: Keys) -> dict[str, Any]:
    """A signed copy of ``doc`` (any earlier signature replaced)."""
    if keys.signing_key is None:
        raise SignatureError("these keys cannot sign (verifier keys: no signing key)")
    body = json.loads(canonical(doc))
    value = keys.signing_key.sign(canonical(body))
    body["signature"] = {
        "alg": ALG,
        "key": keys.fingerprint,
        "value": base64.b64encode(value).decode("ascii"),
    }
    return body


def check_signature(doc: Any, public_key: Ed25519PublicKey) -> list[str]:
    """Why ``doc`` is not a certificate signed by ``public_key``; empty when it is."""
    if not isinstance(doc, dict):
        return ["certificate: not a JSON object"]
    sig = doc.get("signature")
    if sig is None:
        return ["signature: missing"]
    if not isinstance(sig, dict):
        return ["signature: not an object"]
    failures = []
    if sig.get("alg") != ALG:
        failures.append(f"signature.alg: {sig.get('alg')!r} is not {ALG!r}")
    trusted = fingerprint(public_key)
    key_ok = sig.get("key") == trusted
    if not key_ok:
        failures.append(
            f"signature.key: signed by {sig.get('key')} not by the trusted key {trusted}"
        )
    value = sig.get("value")
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else None
    except (binascii.Error, ValueError):
        raw = None
    if raw is None:
        failures.append("signature.value: missing or not base64")
        return failures
    try:
        public_key.verify(raw, canonical(doc))
    except InvalidSignature:
        if key_ok:  # a wrong key is already the reason; do not report it twice
            failures.append(
                "signature.value: does not match the certificate's content (edited after signing?)"
            )
    except SignatureError as e:
        failures.append(f"certificate: {e}")
    return failures


def cert_hash(doc: dict[str, Any]) -> str:
    """The chain link to ``doc``: hex SHA-256 of ``canonical(doc) + b"\\n" + value``,
    where value is the ASCII base64 ``signature.value`` (empty if absent or not a
    string). Covering the signature too means a re-signed entry breaks the link even
    if its content is unchanged. The newline separator occurs in neither canonical
    JSON nor base64."""
    sig = doc.get("signature")
    value = sig.get("value") if isinstance(sig, dict) else None
    if not isinstance(value, str):
        value = ""
    return hashlib.sha256(canonical(doc) + b"\n" + value.encode("utf-8")).hexdigest()


# -- the chain -------------------------------------------------------------------------


def _sequences(store: Store, layout: ModelLayout) -> tuple[list[int], list[str]]:
    """(chain sequence numbers present, ascending; other keys under the chain prefix)."""
    prefix = layout.certificate_chain_prefix
    seqs, others = [], []
    for key in store.list_keys(prefix):
        m = _ENTRY_NAME.match(key[len(prefix) :])
        if m and int(m.group(1)) >= 1 and key == layout.certificate_chain(int(m.group(1))):
            seqs.append(int(m.group(1)))
        else:
            others.append(key)
    return sorted(seqs), others


def _read(store: Store, key: str) -> Any:
    """An entry as stored, or None when it is gone; unparsable bytes read as a string."""
    try:
        raw = store.get(key)
    except NotFound:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return "<not JSON>"


def _find_own(
    store: Store, layout: ModelLayout, uid: str, seqs: list[int]
) -> dict[str, Any] | None:
    """A slot this request claimed before a crash, searched newest first (a rerun is
    usually soon after), a batch of entries at a time."""
    newest_first = seqs[::-1]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for i in range(0, len(newest_first), _SCAN_BATCH):
            batch = newest_first[i : i + _SCAN_BATCH]
            docs = pool.map(lambda n: _read(store, layout.certificate_chain(n)), batch)
            for doc in docs:
                if isinstance(doc, dict) and doc.get("request_uid") == uid:
                    return doc
    return None


def _link_to(layout: ModelLayout, doc: Any, seq: int) -> str:
    """The link to entry ``seq``; refuses to extend a chain whose last entry is gone
    or unreadable (verify would fail on it, and a new entry cannot mend that)."""
    key = layout.certificate_chain(seq)
    if doc is None:
        raise ChainError(f"{key}: missing; cannot append after it (run verify on the chain)")
    link = _safe_hash(doc)
    if link is None:
        raise ChainError(f"{key}: not a certificate; cannot link to it (run verify on the chain)")
    return link


def _safe_hash(doc: Any) -> str | None:
    """cert_hash, or None for an entry that is not a plain JSON object."""
    if not isinstance(doc, dict):
        return None
    try:
        return cert_hash(doc)
    except SignatureError:
        return None


DEFAULT_RETENTION_DAYS = 7 * 365  # how long a locked certificate cannot be deleted


def retention_days(store: Store) -> int | None:
    """Where the bucket has S3 Object Lock on, certificates are written in compliance
    mode for ``$LETHE_CERT_RETENTION_DAYS`` (default 7 years); elsewhere None."""
    if not store.object_lock_enabled():
        return None
    return int(os.environ.get("LETHE_CERT_RETENTION_DAYS") or DEFAULT_RETENTION_DAYS)


def append(
    store: Store,
    layout: ModelLayout,
    uid: str,
    build: Callable[[dict[str, Any]], dict[str, Any]],
    keys: Keys,
) -> dict[str, Any]:
    """Append the certificate of request ``uid`` to the model's chain, once.

    ``build(chain)`` returns the unsigned body; it may be called more than once (each
    lost race), so it must not have side effects. The signed certificate claims the
    next free slot by a conditional create (a writer that loses moves to the next
    slot, reading each winner, so no fork and no lost entry), then is copied to
    ``certificates/<uid>.json``. Rerunning after a crash at any point returns the same
    certificate and never adds a second entry for ``uid``.
    """
    if not uid or "/" in uid:
        raise ValueError("request uid must be a non-empty path segment")
    if keys.signing_key is None:
        raise SignatureError("these keys cannot sign (verifier keys: no signing key)")
    copy_key = layout.certificate(uid)
    try:
        return store.get_json(copy_key)
    except NotFound:
        pass
    retain = retention_days(store)
    seqs, _ = _sequences(store, layout)
    doc = _find_own(store, layout, uid, seqs)
    if doc is None:
        doc = _claim(store, layout, uid, build, keys, seqs[-1] if seqs else 0, retain)
    else:
        log.info("certificate chain: request found in the chain, copying it")
    if store.put_json_if_absent(copy_key, doc, retain):
        return doc
    return store.get_json(copy_key)  # a concurrent run of the same request copied first


def _claim(
    store: Store,
    layout: ModelLayout,
    uid: str,
    build: Callable[[dict[str, Any]], dict[str, Any]],
    keys: Keys,
    last: int,
    retain: int | None = None,
) -> dict[str, Any]:
    """Sign and write the certificate into the first free slot after ``last``."""
    prev_doc = _read(store, layout.certificate_chain(last)) if last else None
    n = last + 1
    vanished = 0
    while True:
        if n > 1 and prev_doc is None:
            # The previous slot vanished (or was never listed): link to what is there.
            prev_doc = _read(store, layout.certificate_chain(n - 1))
        previous = _link_to(layout, prev_doc, n - 1) if n > 1 else None
        chain = {"sequence": n, "previous": previous}
        body = dict(build(dict(chain)))
        if body.get("request_uid", uid) != uid:
            raise ValueError("build returned a certificate of another request")
        body["request_uid"] = uid
        body["chain"] = chain
        body.pop("signature", None)
        doc = sign(body, keys)
        key = layout.certificate_chain(n)
        if store.put_json_if_absent(key, doc, retain):
            log.info("certificate chain: appended entry %d", n)
            return doc
        winner = _read(store, key)
        if winner is None:
            # Refused, yet not there: deleted between our put and read (or hidden by a
            # delete marker the store still counts). Retry a few times, never forever.
            vanished += 1
            if vanished > 5:
                raise ChainError(f"{key}: refused a create but cannot be read (run verify)")
            continue
        if isinstance(winner, dict) and winner.get("request_uid") == uid:
            return winner  # a concurrent run of this same request got there first
        log.debug("certificate chain: slot %d taken, trying the next", n)
        prev_doc, n, vanished = winner, n + 1, 0


def verify_chain(
    store: Store, layout: ModelLayout, public_key: Ed25519PublicKey
) -> tuple[int, list[str]]:
    """Check every entry 1..N: signature, ``chain.sequence`` = its slot, ``chain.previous``
    = cert_hash of entry n-1, no gaps, no request twice. Returns (entries checked,
    failures naming the slot key and field). Cannot see the newest entries removed
    (nothing after them links to them); :func:`verify_copies` covers that."""
    seqs, others = _sequences(store, layout)
    failures = [f"{k}: not a chain entry (unexpected object under the chain)" for k in others]
    present = set(seqs)
    last = seqs[-1] if seqs else 0
    checked = 0
    prev: Any = None
    seen: dict[str, int] = {}
    for n in range(1, last + 1):
        key = layout.certificate_chain(n)
        doc = _read(store, key) if n in present else None
        if doc is None:
            failures.append(f"chain: entry {n} is missing")
            prev = None
            continue
        checked += 1
        if not isinstance(doc, dict):
            failures.append(f"{key}: not a JSON object")
            prev = doc  # the next link cannot match it, and says so
            continue
        failures += [f"{key}: {f}" for f in check_signature(doc, public_key)]
        chain = doc.get("chain")
        if not isinstance(chain, dict):
            failures.append(f"{key}: chain: missing")
        else:
            if chain.get("sequence") != n:
                failures.append(f"{key}: chain.sequence is {chain.get('sequence')!r}, not {n}")
            if n == 1:
                if chain.get("previous") is not None:
                    failures.append(f"{key}: chain.previous must be null for the first entry")
            elif prev is not None:
                if chain.get("previous") != _safe_hash(prev):
                    failures.append(
                        f"{key}: chain.previous does not match entry {n - 1} "
                        "(a link removed or edited?)"
                    )
            # else: entry n-1 is missing or unreadable, already reported
        uid = doc.get("request_uid")
        if not isinstance(uid, str) or not uid:
            failures.append(f"{key}: request_uid: missing")
        elif uid in seen:
            failures.append(f"{key}: request_uid: same request as entry {seen[uid]}")
        else:
            seen[uid] = n
        prev = doc
    return checked, failures


def _diff_fields(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(
        k
        for k in set(a) | set(b)
        if k not in a or k not in b or _canonical_bytes(a[k]) != _canonical_bytes(b[k])
    )


def check_in_chain(store: Store, layout: ModelLayout, cert: Any) -> list[str]:
    """Why ``cert`` (e.g. a local copy) is not exactly the chain entry at its sequence;
    empty when it is. The signature is compared too."""
    if not isinstance(cert, dict):
        return ["certificate: not a JSON object"]
    chain = cert.get("chain")
    seq = chain.get("sequence") if isinstance(chain, dict) else None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return ["chain.sequence: missing or not a positive integer (not a chained certificate)"]
    key = layout.certificate_chain(seq)
    entry = _read(store, key)
    if entry is None:
        return [f"{key}: missing (the certificate is not in the chain)"]
    if not isinstance(entry, dict):
        return [f"{key}: not a JSON object"]
    try:
        if _canonical_bytes(cert) == _canonical_bytes(entry):
            return []
        fields = _diff_fields(cert, entry)
    except SignatureError as e:
        return [f"certificate: {e}"]
    return [f"{f}: differs from the chain entry {key}" for f in fields]


def verify_copies(store: Store, layout: ModelLayout) -> tuple[int, list[str]]:
    """Every ``certificates/<uid>.json`` must be its chain entry, byte for byte
    (canonically): catches an edited copy, and a chain whose newest entries were
    removed while their copies remain. Returns (copies checked, failures)."""
    prefix = layout.certificate("x")[: -len("x.json")]  # certificates/, from the layout
    checked, failures = 0, []
    for key in _copy_keys(store, prefix, layout.certificate_chain_prefix):
        doc = _read(store, key)
        if doc is None:
            continue  # deleted while we listed
        checked += 1
        failures += [f"{key}: {f}" for f in check_in_chain(store, layout, doc)]
    return checked, failures


def _copy_keys(store: Store, prefix: str, chain_prefix: str) -> Iterator[str]:
    for key in store.list_keys(prefix):
        rest = key[len(prefix) :]
        if not key.startswith(chain_prefix) and "/" not in rest and rest.endswith(".json"):
            yield key
