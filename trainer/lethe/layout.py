"""Object keys of one model under s3://BUCKET/PREFIX/MODEL/ (see shared DESIGN.md).

Data, index, test and checkpoint objects are content-addressed or lineage-addressed,
so redoing a step after a crash writes the same keys. Only CURRENT is overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelLayout:
    prefix: str  # "PREFIX/MODEL" without a trailing slash (PREFIX may be empty)

    @classmethod
    def of(cls, model: str, prefix: str = "") -> ModelLayout:
        return cls(f"{prefix.strip('/')}/{model}".lstrip("/"))

    def _k(self, rest: str) -> str:
        return f"{self.prefix}/{rest}"

    @property
    def root(self) -> str:
        return self.prefix + "/"

    @property
    def current(self) -> str:
        return self._k("CURRENT")

    def generation(self, n: int) -> str:
        return self._k(f"generations/{n}.json")

    @property
    def generations_prefix(self) -> str:
        return self._k("generations/")

    def data(self, shard: int, slice_: int, sha: str) -> str:
        return self._k(f"data/shard={shard}/slice={slice_}/{sha}.parquet")

    def data_prefix(self, shard: int) -> str:
        return self._k(f"data/shard={shard}/")

    def index(self, shard: int, sha: str) -> str:
        return self._k(f"index/shard={shard}/{sha}.parquet")

    def index_prefix(self, shard: int) -> str:
        return self._k(f"index/shard={shard}/")

    def test(self, sha: str) -> str:
        # Content-addressed like the data files, so erasing a held-out subject makes
        # a new object instead of overwriting one.
        return self._k(f"eval/test-{sha}.parquet")

    @property
    def eval_prefix(self) -> str:
        return self._k("eval/")

    def checkpoint(self, shard: int, slice_: int, lineage: str) -> str:
        return self._k(f"checkpoints/shard={shard}/slice={slice_}/{lineage}.pt")

    @staticmethod
    def checkpoint_lineage_record(checkpoint_key: str) -> str:
        """Beside each checkpoint: the data hashes it was trained on (for the purge)."""
        return checkpoint_key[: -len(".pt")] + ".json"

    def checkpoints_prefix(self, shard: int) -> str:
        return self._k(f"checkpoints/shard={shard}/")

    def plan(self, batch: str) -> str:
        return self._k(f"erasures/{batch}/plan.json")

    def step(self, batch: str, step: str) -> str:
        return self._k(f"erasures/{batch}/{step}.json")

    def erase_order(self, batch: str) -> str:
        """Where the erased rows of a batch are, by position (``lethe.erased``): written
        by the keyed side for the batch's data job, purged once the data is erased."""
        return self._k(f"erasures/{batch}/order.json")

    def shard_runs_prefix(self, batch: str, shard: int | None = None) -> str:
        """Each Ray Train run of a batch reports its resources here, one object per
        attempt (``<prefix><attempt>.json``), written by the run itself."""
        tail = "" if shard is None else f"shard={shard}/"
        return self._k(f"erasures/{batch}/runs/{tail}")

    def result(self, batch: str) -> str:
        return self._k(f"erasures/{batch}/result.json")

    def certificate(self, request_uid: str) -> str:
        return self._k(f"certificates/{request_uid}.json")

    def certificate_chain(self, sequence: int) -> str:
        """The model's append-only certificate log: entry n is the n-th certificate."""
        return self._k(f"certificates/chain/{sequence:08d}.json")

    @property
    def certificate_chain_prefix(self) -> str:
        return self._k("certificates/chain/")

    def tombstone(self, sha: str) -> str:
        """Written before a file holding erased rows is purged: nothing may recreate
        it, and no checkpoint trained on it may be kept or committed."""
        return self._k(f"tombstones/{sha}.json")

    @property
    def tombstones_prefix(self) -> str:
        return self._k("tombstones/")

    def claim(self, shard: int, lineage: str) -> str:
        """A lease on training one shard up to this (final-slice) lineage."""
        return self._k(f"claims/shard={shard}/{lineage}.json")

    @property
    def ingest_request(self) -> str:
        """What an ingest job ingests (the model's configuration and owner), written by
        whoever submits the job: a job's arguments stay short and hold no settings."""
        return self._k("ingest/request.json")

    @property
    def ingest_error(self) -> str:
        """Why the last ingest job refused the dataset (a user error, counts only)."""
        return self._k("ingest/error.json")

    @property
    def owner(self) -> str:
        """Who owns this layout (a ShardedModel's UID), written once at ingest."""
        return self._k("OWNER.json")


def sha_of_key(key: str) -> str:
    """The content hash a content-addressed key carries in its file name."""
    name = key.rsplit("/", 1)[-1]
    stem = name.split(".", 1)[0]
    return stem.removeprefix("test-")
