"""Two erasures of one model at once: serialised by CAS on CURRENT, no lost update."""

from __future__ import annotations

import threading

from lethe.core.hashing import shard_of
from lethe.core.plan import ErasureRequest
from lethe.erasure import Engine, request_uid
from lethe.generations import read_live
from lethe.predict import ensemble_accuracy
from lethe.store import Store
from lethe.training import RayTrainer
from lethe.verify import verify

from .conftest import trained_small, training_subjects
from .test_erasure import rows_of


def test_two_concurrent_erasures_on_one_shard(store: Store, trainer: RayTrainer) -> None:
    layout, cfg, table = trained_small(store, trainer, shards=2, slices=3)
    same_shard = [s for s in training_subjects(table, cfg) if shard_of(s, 2) == 1]
    first, second = same_shard[0], same_shard[-1]
    results: dict = {}
    errors: list = []

    def erase(subject: str) -> None:
        try:
            # separate engines, as two processes would have
            e = Engine(store, layout, trainer, evaluate=lambda g: ensemble_accuracy(store, g))
            results[subject] = e.erase(
                [ErasureRequest(request_uid(cfg.name, [subject], []), (subject,))]
            )
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=erase, args=(s,)) for s in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    live = read_live(store, layout).generation
    assert rows_of(store, live, first) == rows_of(store, live, second) == 0  # no lost update
    assert live.quarantine == {} and live.shards[1].trained
    for subject in (first, second):
        cert = store.get_json(next(iter(results[subject]["certificates"].values())))
        verdict = verify(store, cert)
        assert verdict.ok, verdict.failures
