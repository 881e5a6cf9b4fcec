"""Lethe's errors: one base, :class:`LetheError`, and four kinds under it.

Every error Lethe raises on purpose is a ``LetheError``; what to do about it follows
from its kind, and so does the ``lethe`` command's exit status (``cli.main`` maps
them in one place, from each class's ``exit_code``):

====  =================  ==============================================================
exit  class              what it means, what to do
====  =================  ==============================================================
0     -                  success (``lethe verify``: the proof holds)
1     LetheError         a Lethe error of no narrower kind (``lethe verify`` also exits
                         1 when the proof does not hold, as does an unexpected crash)
2     UserError          bad input or configuration; the message names the field,
                         flag or file: fix it and run again
3     ErasureFailed      an erasure batch could not finish; its data stays erased and
                         its shards quarantined; ``reason`` is a word for why
                         (``RetrainFailed``, ``NoKeys``, ``RetrainRace``)
4     IntegrityFailure   data, certificate or lineage integrity is broken (a live object
                         holds erased rows, a chain entry is not a certificate, a
                         manifest does not match its hash): investigate, do not retry
5     TransientError     the store, Ray or a concurrent writer got in the way (a lost
                         compare-and-swap, a service not reachable): retry later
====  =================  ==============================================================

Not errors: 75 is the crash ``LETHE_CRASH_AFTER`` injects (tests), 143 a SIGTERM.

A class elsewhere keeps its builtin base beside its kind (``class ConfigError(UserError,
ValueError)``), so that ``except ValueError`` around it still works. An error that
is both an erasure failure and an integrity failure (``erasure.IntegrityError``) exits
with the integrity code. Messages name keys, fields and counts, never a subject or
record id: the command line prints them as they are.

Plain Python, no dependencies: the operator image and ``lethe.core`` import it.
"""

from __future__ import annotations


class LetheError(Exception):
    """Base of every error Lethe raises on purpose."""

    exit_code = 1


class UserError(LetheError):
    """Bad input or configuration; the message names the field, flag or file."""

    exit_code = 2


class ErasureFailed(LetheError, RuntimeError):
    """The batch could not finish; the data stays erased and the shards quarantined.
    ``reason`` is a short CamelCase word (``RetrainFailed``, ``NoKeys``...)."""

    exit_code = 3

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class IntegrityFailure(LetheError):
    """Data, certificate or lineage integrity is broken: S3 contradicts what Lethe
    wrote or relies on. Not retried: someone has to look."""

    exit_code = 4


class TransientError(LetheError):
    """The store, Ray or a concurrent writer got in the way; the same call may
    succeed later (a lost compare-and-swap, a service not reachable)."""

    exit_code = 5


KINDS: tuple[type[LetheError], ...] = (
    LetheError,
    UserError,
    ErasureFailed,
    IntegrityFailure,
    TransientError,
)
