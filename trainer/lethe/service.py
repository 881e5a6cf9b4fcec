"""The one entry point a control plane has into a model: what is live, the ingest
request, quarantine holds, and a batch from its plan to its certificate.

No torch, no Kubernetes, no data work that grows with the dataset: the Ray jobs do
that (``lethe.jobs``). The operator calls this object and nothing else of the engine
(``lethe_operator.context.ModelContext.service``); the CLI, which runs every step in
one process, uses :class:`lethe.erasure.Engine` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lethe.certs import Keys
from lethe.checkpoints import pending_slices
from lethe.core.config import ModelConfig
from lethe.core.manifest import Generation
from lethe.core.plan import ErasurePlan, ErasureRequest
from lethe.erasure import Engine, hold_shards, release_holds, resolve_shards
from lethe.generations import read_live
from lethe.ingest import check_owner
from lethe.jobs import ingest_error, request_ingest
from lethe.layout import ModelLayout
from lethe.sources import pin_source
from lethe.store import Store


@dataclass
class ModelService:
    """A model's S3 side through the credentials it was given; ``keys`` loads its
    signing and HMAC keys when a step needs them (planning, certifying), never before."""

    store: Store
    layout: ModelLayout
    keys: Callable[[], Keys] | None = None
    storage_backend: str | None = None
    storage_admin: str | None = None
    _engine: Engine | None = field(default=None, repr=False)

    # -- the model -------------------------------------------------------------------
    def live(self) -> Generation:
        """The live generation; raises ModelNotFound before the first ingest."""
        return read_live(self.store, self.layout).generation

    @staticmethod
    def untrained_shards(gen: Generation) -> set[int]:
        """Shards with a slice not trained yet."""
        return set(pending_slices(gen))

    def check_owner(self, uid: str) -> None:
        """Raise LayoutOwned if the layout belongs to another model."""
        check_owner(self.store, self.layout, uid)

    # -- ingest ----------------------------------------------------------------------
    def request_ingest(self, cfg: ModelConfig, owner: str) -> None:
        """Pin the source with these credentials (``sources.pin_source``: raises
        SourceError naming the field) and say what the ingest job ingests."""
        request_ingest(self.store, self.layout, cfg, owner, pin_source(self.store, cfg))

    def ingest_error(self) -> str | None:
        return ingest_error(self.store, self.layout)

    # -- quarantine holds ------------------------------------------------------------
    def shards_of(
        self, gen: Generation, subjects: Iterable[str], records: Iterable[str]
    ) -> list[int]:
        """The training shards that hold any of these subjects or records."""
        return resolve_shards(self.store, gen, subjects, records)

    def hold(self, holder: str, shards: list[int]) -> Generation:
        return hold_shards(self.store, self.layout, holder, shards)

    def release(self, holders: set[str]) -> Generation:
        return release_holds(self.store, self.layout, holders)

    # -- a batch ---------------------------------------------------------------------
    def plan_exists(self, batch: str) -> bool:
        return self._keyless().plan_exists(batch)

    def result(self, batch: str) -> dict[str, Any] | None:
        """The certified batch's result, or None."""
        return self._keyless().result_of_batch(batch)

    def start_batch(
        self, batch: str, requests: list[ErasureRequest], requested_at: float
    ) -> ErasurePlan:
        """Plan the batch (or read its plan back), quarantine its shards and write its
        erase order for the job that patches, purges and retrains."""
        engine = self.engine()
        plan = engine.prepare(requests, requested_at, batch=batch, patch=False)
        engine.order_erasure(plan)
        return plan

    def progress(self, plan: ErasurePlan) -> tuple[bool, bool]:
        """(committed, data erased): what the batch's job has done, from S3."""
        engine = self._keyless()
        return engine.committed(plan), engine.data_erased(plan)

    def finish(self, plan: ErasurePlan) -> dict[str, Any]:
        """Purge the checkpoints trained on the erased rows, check, certify."""
        return self.engine().finish(plan)

    def engine(self) -> Engine:
        """The keyed engine (loads the keys on first use)."""
        if self._engine is None:
            self._engine = Engine(
                self.store,
                self.layout,
                trainer=None,
                keys=self.keys() if self.keys is not None else None,
                storage_backend=self.storage_backend,
                storage_admin=self.storage_admin,
            )
        return self._engine

    def _keyless(self) -> Engine:
        """An engine for reading a batch's state, which needs no key."""
        return self._engine or Engine(self.store, self.layout, trainer=None)
