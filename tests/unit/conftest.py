"""tests/unit needs no server: ``make test-unit`` runs it in seconds on a bare machine.

A test here that asks for the session's SeaweedFS and Ray (``stack``, and through it
``store``, ``trainer`` and ``keys``) or for the kube-apiserver (``kube``) fails at once
instead of starting them: it belongs in tests/, beside the others that use real parts.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def stack() -> None:
    pytest.fail("tests/unit starts no server: move a test that needs the stack to tests/")


@pytest.fixture(scope="session")
def kube() -> None:
    pytest.fail("tests/unit starts no server: move a test that needs kube to tests/")
