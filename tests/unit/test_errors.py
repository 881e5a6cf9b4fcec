"""One error hierarchy (``lethe.errors``) and the exit status the command line gives
each kind, without a server: the store is a dict, the commands are the real ones."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from lethe import cli, errors
from lethe.calibration import CalibrationError
from lethe.certs import ChainError, Keys, KeysError, SignatureError
from lethe.cli import UsageError
from lethe.core.config import ConfigError
from lethe.core.hashing import sha256_hex
from lethe.dataio import Tombstoned
from lethe.erasure import IntegrityError
from lethe.errors import ErasureFailed, IntegrityFailure, LetheError, TransientError, UserError
from lethe.generations import (
    CommitConflict,
    GenerationMoved,
    ModelNotFound,
    create_first,
    read_live,
)
from lethe.ingest import IngestError, LayoutOwned
from lethe.layout import ModelLayout
from lethe.predict import NoLiveConstituents
from lethe.store import NotFound, PreconditionFailed
from lethe_operator.erasures import BatchNotPlanned, NotReady, SubjectsUnreadable

from .test_calibration import DictStore
from .test_core import _gen

SECRET_ID = "subject-7f3a9c-private"  # must never reach the command's output


# -- the hierarchy ----------------------------------------------------------------------
def test_each_kind_has_its_own_exit_code_and_the_module_documents_it() -> None:
    codes = {kind: kind.exit_code for kind in errors.KINDS}
    assert len(set(codes.values())) == len(codes)
    assert 0 not in codes.values()
    assert all(issubclass(kind, LetheError) for kind in errors.KINDS)
    doc = errors.__doc__ or ""
    for kind, code in codes.items():  # the docstring's table: "<code>  <class>"
        assert re.search(rf"^{code}\s+{kind.__name__}\s", doc, re.M), kind.__name__


@pytest.mark.parametrize(
    ("cls", "kind", "builtin"),
    [
        (ConfigError, UserError, ValueError),
        (UsageError, UserError, ValueError),
        (CalibrationError, UserError, ValueError),
        (IngestError, UserError, ValueError),
        (LayoutOwned, UserError, ValueError),
        (KeysError, UserError, ValueError),
        (SignatureError, UserError, ValueError),
        (ModelNotFound, UserError, LookupError),
        (SubjectsUnreadable, UserError, Exception),
        (Tombstoned, IntegrityFailure, ValueError),
        (ChainError, IntegrityFailure, RuntimeError),
        (IntegrityError, IntegrityFailure, RuntimeError),
        (IntegrityError, ErasureFailed, RuntimeError),
        (ErasureFailed, LetheError, RuntimeError),
        (CommitConflict, TransientError, RuntimeError),
        (GenerationMoved, TransientError, Exception),
        (PreconditionFailed, TransientError, Exception),
        (NotReady, TransientError, Exception),
        (BatchNotPlanned, TransientError, Exception),
        (NotFound, LetheError, KeyError),
        (NoLiveConstituents, LetheError, RuntimeError),
    ],
)
def test_existing_errors_keep_their_builtin_base(
    cls: type[Exception], kind: type[LetheError], builtin: type[Exception]
) -> None:
    """Re-based onto a kind, and still caught by the ``except`` clauses written for the
    builtin base they had."""
    assert issubclass(cls, kind) and issubclass(cls, builtin)


def test_names_stay_importable_where_they_were() -> None:
    from lethe import erasure

    assert erasure.ErasureFailed is ErasureFailed
    failure = ErasureFailed("RetrainFailed", "Ray said no")
    assert (failure.reason, str(failure), failure.exit_code) == ("RetrainFailed", "Ray said no", 3)
    broken = IntegrityError("live object k still holds erased records")
    assert broken.reason == "IntegrityError"
    assert broken.exit_code == IntegrityFailure.exit_code  # integrity outranks the failure
    with pytest.raises(ValueError):  # callers that catch the builtin still catch it
        raise ConfigError("shards: must be at least 1")
    with pytest.raises(KeyError):
        raise NotFound("some/key")


def test_a_manifest_that_does_not_match_current_is_an_integrity_failure() -> None:
    store, layout = DictStore(), ModelLayout.of("m")
    create_first(store, layout, _gen([[10] * 2] * 2))  # type: ignore[arg-type]
    pointer = json.loads(store.get(layout.current))
    store.objects[pointer["key"]] += b" "  # the manifest changed under its hash
    assert sha256_hex(store.objects[pointer["key"]]) != pointer["sha256"]
    with pytest.raises(IntegrityFailure, match="does not match the hash in CURRENT"):
        read_live(store, layout)  # type: ignore[arg-type]


# -- the command line: one mapping, one line on stderr, JSON with --json ----------------
def run(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: BaseException,
    *flags: str,
) -> tuple[int, str, str]:
    """``lethe status`` whose command raises ``error``: (exit status, stdout, stderr)."""

    def raising(args: Any) -> dict[str, Any]:
        raise error

    monkeypatch.setattr(cli, "cmd_status", raising)
    code = cli.main(["status", "--model", "m", *flags])
    shown = capsys.readouterr()
    return code, shown.out, shown.err


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (ConfigError("shards: must be at least 1"), 2, "error: shards: must be at least 1"),
        (UsageError("give --rows"), 2, "error: give --rows"),
        (ModelNotFound("model not found: m"), 2, "error: model not found: m"),
        (FileExistsError("keys/signing-key.pem exists"), 2, "error: keys/signing-key.pem"),
        (
            ErasureFailed("RetrainFailed", "injected (after 3 attempts)"),
            3,
            "erasure failed (RetrainFailed): injected (after 3 attempts)",
        ),
        (
            IntegrityError("refusing to purge live object k"),
            4,
            "erasure failed (IntegrityError): refusing to purge live object k",
        ),
        (ChainError("00000002.json: not a certificate"), 4, "error: 00000002.json: not a"),
        (Tombstoned("k: these exact bytes were purged"), 4, "error: k: these exact bytes"),
        (CommitConflict("gave up after 100 lost compare-and-swaps"), 5, "error: gave up after"),
        (PreconditionFailed("m/CURRENT"), 5, "error: m/CURRENT"),
        (NotFound("m/CURRENT"), 1, "error: m/CURRENT"),  # no KeyError quotes
        (LetheError("anything else"), 1, "error: anything else"),
    ],
)
def test_each_kind_exits_with_its_code(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: BaseException,
    code: int,
    line: str,
) -> None:
    got, out, err = run(monkeypatch, capsys, error)
    assert got == code == cli.exit_code(error)
    assert line in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert out == ""
    got, out, _ = run(monkeypatch, capsys, error, "--json")
    assert got == code
    last = json.loads(out.strip().splitlines()[-1])
    message = error.args[0]
    assert last["error"] == message and last["exit_code"] == code
    assert last["type"] == type(error).__name__
    if isinstance(error, ErasureFailed):
        assert last["reason"] == error.reason


def test_other_errors_are_not_swallowed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug is a traceback (exit 1), not a one-line message that hides where it was."""
    with pytest.raises(ZeroDivisionError):
        run(monkeypatch, capsys, ZeroDivisionError("a bug"))
    assert cli.exit_code(ZeroDivisionError()) == 1


def test_real_commands_map_their_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    """The commands themselves, on a store without the model: no id named on the
    command line is ever in what it prints."""
    store = DictStore()
    monkeypatch.setattr(cli, "_store", lambda args: store)
    Keys.generate().save(tmp_path / "keys")
    monkeypatch.setenv("LETHE_KEYS_DIR", str(tmp_path / "keys"))

    assert cli.main(["erase", "--model", "nope", "--subject", SECRET_ID, "--json"]) == 2
    shown = capsys.readouterr()
    assert "model not found" in shown.err
    assert json.loads(shown.out.strip().splitlines()[-1])["type"] == "ModelNotFound"
    assert SECRET_ID not in shown.out + shown.err

    assert cli.main(["erase", "--model", "nope", "--record", SECRET_ID]) == 2
    assert SECRET_ID not in "".join(capsys.readouterr())

    assert cli.main(["verify", "m/certificates/none.json"]) == 2
    assert "certificate not found: m/certificates/none.json" in capsys.readouterr().err

    # a live generation whose manifest no longer matches CURRENT's hash
    layout = ModelLayout.of("m")
    create_first(store, layout, _gen([[10] * 2] * 2))  # type: ignore[arg-type]
    assert cli.main(["status", "--model", "m"]) == 0
    capsys.readouterr()
    pointer = json.loads(store.get(layout.current))
    store.objects[pointer["key"]] += b"\n"
    assert cli.main(["status", "--model", "m"]) == IntegrityFailure.exit_code == 4
    assert "does not match the hash in CURRENT" in capsys.readouterr().err
