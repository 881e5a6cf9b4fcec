"""Fault injection for the tests: one object, read from the environment in one place.

Engine, trainer and operator code never reads these variables: it asks a
:class:`Faults` (``FAULTS``, built once per process from the environment, or one
injected into an ``Engine``). Unset, every hook does nothing.

- ``LETHE_CRASH_AFTER=<step>``: the engine exits (status 75) right after that step
  (``erasure.STEPS`` and the purge's own steps; the crash-and-repeat tests);
- ``LETHE_INJECT_TRAIN_FAILURE=1``: every training run fails (the failure paths); it
  travels to Ray's workers in their environment (``env``) and with each task;
- ``LETHE_OPERATOR_KILL_AT=<point>``: the operator SIGKILLs itself there (its restart
  tests).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

CRASH_ENV = "LETHE_CRASH_AFTER"
TRAIN_FAILURE_ENV = "LETHE_INJECT_TRAIN_FAILURE"
KILL_ENV = "LETHE_OPERATOR_KILL_AT"
CRASH_STATUS = 75  # the exit status of an injected crash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Faults:
    crash_after: str | None = None
    fail_training: bool = False
    kill_at: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Faults:
        return cls(
            crash_after=environ.get(CRASH_ENV) or None,
            fail_training=environ.get(TRAIN_FAILURE_ENV) == "1",
            kill_at=environ.get(KILL_ENV) or None,
        )

    def crash_point(self, step: str) -> None:
        """Exit at once, as a crash would, right after ``step``."""
        if self.crash_after == step:
            os._exit(CRASH_STATUS)

    def kill_point(self, name: str) -> None:
        """Die here as ``kill -9`` would make the operator: state must live in
        Kubernetes and S3, never in its process."""
        if self.kill_at == name:
            log.warning("%s=%s: SIGKILL", KILL_ENV, name)
            os.kill(os.getpid(), signal.SIGKILL)

    def check_training(self, requested: bool = False) -> None:
        """Fail a training run when asked to (here, or by the task: ``requested``)."""
        if self.fail_training or requested:
            raise RuntimeError(f"injected training failure ({TRAIN_FAILURE_ENV}=1)")

    def env(self) -> dict[str, str]:
        """What processes started for training must inherit to fail the same way."""
        return {TRAIN_FAILURE_ENV: "1"} if self.fail_training else {}


FAULTS = Faults.from_env()
