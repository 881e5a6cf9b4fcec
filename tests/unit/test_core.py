"""The SISA core: plain Python, no network."""

from __future__ import annotations

import json
import math

import pytest

from lethe.cli import UsageError, read_subjects_file
from lethe.core.config import Columns, ConfigError, ModelConfig, TrainerConfig
from lethe.core.hashing import keyed_hash, shard_of, slice_of, stable_id
from lethe.core.lineage import lineage_hash, shard_lineages
from lethe.core.manifest import FileRef, Generation, Monolithic, ShardState, SliceState
from lethe.core.plan import (
    BASIS_EXTRAPOLATED,
    BASIS_MEASURED,
    CostEstimate,
    ErasurePlan,
    RequestPlan,
    estimate_cost,
    expected_shards_touched,
    ideal_speedup,
    one_request_estimate,
    slice_work,
)


def test_shard_assignment_is_stable_and_spread() -> None:
    assert shard_of("alice", 16) == shard_of("alice", 16)
    counts = [0] * 8
    for i in range(8000):
        counts[shard_of(f"user-{i}", 8)] += 1
    assert min(counts) > 800 and max(counts) < 1200
    # pinned values: a change of hash would silently re-shard every stored model
    assert [shard_of(s, 10) for s in ("alice", "bob", "carol")] == [
        shard_of("alice", 10),
        shard_of("bob", 10),
        shard_of("carol", 10),
    ]
    assert slice_of("alice", 1) == 0


def test_keyed_hash_depends_on_key() -> None:
    assert keyed_hash(b"a", "x") != keyed_hash(b"b", "x")
    assert keyed_hash(b"a", "x") == keyed_hash(b"a", "x")
    assert "x" not in keyed_hash(b"a", "x")
    assert stable_id("b", ["1", "2"]) == stable_id("b", ["1", "2"]) != stable_id("b", ["2", "1"])


def test_lineage_changes_from_the_changed_slice_on() -> None:
    before = shard_lineages("fp", 0, ["a", "b", "c", "d"])
    after = shard_lineages("fp", 0, ["a", "B", "c", "d"])
    assert before[0] == after[0]
    assert all(x != y for x, y in zip(before[1:], after[1:], strict=True))
    assert lineage_hash("fp", 0, ["a"]) != lineage_hash("fp2", 0, ["a"])
    assert lineage_hash("fp", 0, ["a"]) != lineage_hash("fp", 1, ["a"])


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ConfigError, match="shards"):
        ModelConfig("m", 0, 1).validate()
    with pytest.raises(ConfigError, match="trainer.model"):
        ModelConfig("m", 1, 1, TrainerConfig(model="nonsense")).validate()
    with pytest.raises(ConfigError, match="input_shape"):
        ModelConfig("m", 1, 1, TrainerConfig(model="cnn")).validate()
    with pytest.raises(ConfigError, match="name"):
        ModelConfig("bad name/x", 1, 1).validate()
    for decode in ("png", "module", "a.b:c d", ":fn"):
        with pytest.raises(ConfigError, match="columns.decode"):
            ModelConfig("m", 1, 1, columns=Columns(file="img", decode=decode)).validate()
    ModelConfig("m", 1, 1, columns=Columns(file="img", decode="my.pkg:decode")).validate()
    # the built-in decoder leaves the fingerprint as it always was; another one is in it
    plain = ModelConfig("m", 1, 1, columns=Columns(file="img"))
    assert plain.trainer_fingerprint() == ModelConfig("m", 1, 1).trainer_fingerprint()
    custom = ModelConfig("m", 1, 1, columns=Columns(file="img", decode="my.pkg:decode"))
    assert custom.trainer_fingerprint() != plain.trainer_fingerprint()
    cfg = ModelConfig("m", 4, 8, TrainerConfig(epochs=9))
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert cfg.trainer.epochs_per_slice(8) == pytest.approx(2.0)


def _gen(rows: list[list[int]], secs: float = 10.0, overhead: float = 0.0) -> Generation:
    cfg = ModelConfig("m", len(rows), len(rows[0]), TrainerConfig(epochs=9))
    shards = []
    for k, rs in enumerate(rows):
        files = [FileRef(f"d{k}{r}", f"{k}{r}", n) for r, n in enumerate(rs)]
        lins = shard_lineages("fp", k, [f.sha256 for f in files])
        shards.append(
            ShardState(
                FileRef(f"i{k}", f"i{k}", sum(rs)),
                [
                    SliceState(f, lin, f"ck{k}{r}")
                    for r, (f, lin) in enumerate(zip(files, lins, strict=True))
                ],
                secs,
                overhead,
            )
        )
    return Generation(1, None, cfg, shards, FileRef("t", "t", 5))


def test_cost_estimate_matches_the_sisa_formula() -> None:
    # R equal slices, retrain from slice r: work = sum_{j>=r} (j+1) * n * eps
    assert slice_work([10, 10, 10, 10], 1.0, 0) == 100
    assert slice_work([10, 10, 10, 10], 1.0, 2) == 70
    gen = _gen([[10] * 8] * 4)
    est = estimate_cost(gen, {1: 0})
    # eps = 2*9/(8+1) = 2; one whole shard: sum_j (j+1)*10*2 = 720; full: 320 rows * 9 epochs
    assert (est.retrain_work, est.full_work) == (720, 2880)
    assert est.full_seconds == pytest.approx(40.0)  # 4 shards x 10 s of recorded training
    assert estimate_cost(gen, {1: 4}).retrain_work == 2 * 10 * (5 + 6 + 7 + 8)
    assert est.retrain_seconds == pytest.approx(10.0)
    assert est.speedup == pytest.approx(4.0)  # seconds against seconds, never work
    assert est.full_basis == BASIS_EXTRAPOLATED
    # averaged over the first affected slice, one request costs (2R+1)/(3R)-ish of a shard
    R = 8
    avg = sum(slice_work([1] * R, 1.0, r) for r in range(R)) / R / slice_work([1] * R, 1.0, 0)
    assert avg == pytest.approx((2 * R + 1) / (3 * R), rel=0.1)
    assert ideal_speedup(16, 8) == pytest.approx(16 * 24 / 17)
    assert expected_shards_touched(8, 8) == pytest.approx(8 * (1 - (7 / 8) ** 8))
    assert math.isclose(expected_shards_touched(1, 5), 1.0)


def test_cost_estimate_charges_each_run_its_fixed_start_up() -> None:
    # Every run, the full retrain's included, pays Ray's start-up: with 8 s of it a
    # shard, one shard's retrain is 10 + 8 s and the monolithic retrain 40 + 8 s.
    est = estimate_cost(_gen([[10] * 8] * 4, overhead=8.0), {1: 0, 2: 0})
    assert est.retrain_seconds == pytest.approx(2 * (10.0 + 8.0))
    assert est.full_seconds == pytest.approx(40.0 + 8.0)


def test_a_measured_monolithic_run_replaces_the_extrapolation() -> None:
    # The shards' rate extrapolates to 4 x 10 s = 40 s; a measured run of 12 s on the
    # same 320 rows (plus its own 5 s start-up) is what a full retrain costs.
    gen = _gen([[10] * 8] * 4, overhead=8.0)
    gen.monolithic = Monolithic(12.0, 320, 5.0, 1.0)
    est = estimate_cost(gen, {1: 0})
    assert est.full_seconds == pytest.approx(12.0 + 5.0)
    assert est.full_basis == BASIS_MEASURED
    assert est.retrain_seconds == pytest.approx(10.0 + 8.0)  # retrains unchanged
    assert est.speedup == pytest.approx(17.0 / 18.0)  # honest: slower than retraining all
    # measured on twice the rows: scaled linearly; no start-up measured: the shards'
    gen.monolithic = Monolithic(12.0, 640)
    est = estimate_cost(gen, {1: 0})
    assert est.full_seconds == pytest.approx(6.0 + 8.0)
    assert est.full_basis == "measured on 640 rows, scaled to 320"
    with pytest.raises(ValueError):
        Monolithic(0.0, 10)
    with pytest.raises(ValueError):
        Monolithic(1.0, 10, -1.0)


def test_one_request_estimate_averages_over_where_a_person_sits() -> None:
    # 2 shards x 2 slices of 10 rows, 10 s of training a shard, 3 s start-up.
    # Slice 0 first: the whole shard (10 s); slice 1 first: 2/3 of its work.
    gen = _gen([[10, 10], [10, 10]], overhead=3.0)
    one = one_request_estimate(gen)
    assert one is not None
    assert one.retrain_seconds == pytest.approx((10.0 + 10.0 * 2 / 3) / 2 + 3.0)
    assert one.full_seconds == pytest.approx(20.0 + 3.0)
    untrained = _gen([[10, 10]], secs=0.0)
    assert one_request_estimate(untrained) is None


def test_estimate_json_is_seconds_and_older_plans_still_load() -> None:
    est = estimate_cost(_gen([[10] * 8] * 4, overhead=8.0), {1: 0})
    d = est.to_json()
    assert d["speedup"] == pytest.approx((40.0 + 8.0) / (10.0 + 8.0))
    assert d["full_basis"] == BASIS_EXTRAPOLATED and d["run_overhead_seconds"] == 8.0
    again = CostEstimate.from_json(json.loads(json.dumps(d)))
    assert again == est and not again.legacy
    # byte for byte: verify re-derives a certificate's estimate from the stored plan
    assert json.dumps(again.to_json()) == json.dumps(d)
    assert json.dumps(d) == json.dumps(json.loads(json.dumps(d)))
    # a plan written before: its "speedup" was full_work / retrain_work
    old = {
        "retrain_work": 720.0,
        "full_work": 2880.0,
        "retrain_seconds": 18.0,
        "full_seconds": 48.0,
        "speedup": 4.0,
    }
    legacy = CostEstimate.from_json(old)
    assert legacy.legacy and legacy.full_basis == BASIS_EXTRAPOLATED
    assert legacy.to_json() == old  # re-emitted as written: its certificates still verify
    assert legacy.speedup == pytest.approx(48.0 / 18.0)
    plan = {
        "batch_id": "b",
        "model": "m",
        "key_id": "k",
        "base_generation": 3,
        "requested_at": 1.0,
        "requests": [],
        "shards": [{"shard": 1, "first_slice": 0, "records": 2}],
        "test_records": 0,
        "estimate": old,
    }
    assert ErasurePlan.from_json(plan).to_json()["estimate"] == old


def test_certificate_accounting_is_seconds_and_usd_like_for_like() -> None:
    """The certificate compares the measured erasure with the full retrain's estimate;
    a certificate of an older plan re-derives as it was issued (no accounting)."""
    from types import SimpleNamespace

    from lethe.core.cost import ShardRun
    from lethe.erasure import STEPS, BatchEvidence
    from lethe.layout import ModelLayout

    gen = _gen([[10] * 8] * 4, overhead=8.0)
    est = estimate_cost(gen, {1: 0})
    plan = ErasurePlan("b", "m", "k", 1, 100.0, [], [], 0, est)
    markers: dict = {step: {} for step in STEPS}
    markers["quarantine"] = {"at": 100.5}
    markers["commit"] = {"at": 112.0, "generation": 2}
    run = ShardRun(1, "r", 0, wall_seconds=18.0, cpu_seconds=18.0, gpu_seconds=0.0)
    store = SimpleNamespace(bucket="lethe")
    layout = ModelLayout.of("m")
    ev = BatchEvidence(store, layout, plan, markers, [run], gen.config)  # type: ignore[arg-type]
    req = RequestPlan("u", ["h"], ["r1"], [1])
    body = ev.certificate_body(req)
    acc = body["accounting"]
    assert acc["erasure_seconds"] == pytest.approx(12.0)  # request to back in service
    assert acc["full_retrain_seconds"] == pytest.approx(48.0)
    assert acc["full_retrain_basis"] == BASIS_EXTRAPOLATED
    assert acc["speedup"] == pytest.approx(4.0)
    assert acc["erasure_usd"] == body["cost"]["usd"]
    assert acc["speedup_usd"] == pytest.approx(48.0 / 18.0, abs=1e-3)
    assert "speedup" not in body["cost"]
    plan.estimate = CostEstimate.from_json(
        {"retrain_work": 1, "full_work": 4, "retrain_seconds": 18, "full_seconds": 48, "speedup": 4}
    )
    old = ev.certificate_body(req)
    assert "accounting" not in old and old["estimate"]["speedup"] == 4


def test_manifest_round_trip_and_successor() -> None:
    gen = _gen([[3, 4], [5, 6]])
    gen.quarantine = {1: ["b1"]}
    again = Generation.from_json(gen.to_json())
    assert again.to_json() == gen.to_json()
    assert again.quarantined_shards == [1]
    assert again.live_shards() == [0]
    nxt = gen.successor("x")
    assert (nxt.number, nxt.parent) == (2, 1)
    nxt.quarantine[1].append("b2")
    assert gen.quarantine[1] == ["b1"]  # deep copy
    assert "monolithic" not in gen.to_json()  # older manifests round-trip unchanged
    gen.monolithic = Monolithic(30.0, 18, None, 5.0)
    again = Generation.from_json(gen.to_json())
    assert again.monolithic == gen.monolithic
    assert gen.successor("erase").successor("train").monolithic == gen.monolithic


def test_set_shard_data_keeps_clean_checkpoints_only() -> None:
    gen = _gen([[3, 4, 5]])
    gen.config = ModelConfig("m", 1, 3)
    fp = gen.config.trainer_fingerprint()
    files = [FileRef(f"d{r}", f"s{r}", 3) for r in range(3)]
    lins = shard_lineages(fp, 0, [f.sha256 for f in files])
    gen.shards[0].slices = [
        SliceState(f, lin, f"ck{r}") for r, (f, lin) in enumerate(zip(files, lins, strict=True))
    ]
    gen.set_shard_data(0, FileRef("i", "i", 8), [files[0], FileRef("new", "n1", 2), files[2]])
    assert [s.checkpoint for s in gen.shards[0].slices] == ["ck0", None, None]
    assert gen.shards[0].first_untrained_slice() == 1


def test_subjects_file(tmp_path) -> None:
    f = tmp_path / "s.txt"
    f.write_text("# people\nalice\n\n bob \n")
    assert read_subjects_file(str(f)) == ["alice", "bob"]
    f.write_text("alice smith\n")
    with pytest.raises(UsageError, match="line 1"):
        read_subjects_file(str(f))
    f.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UsageError, match="UTF-8"):
        read_subjects_file(str(f))
    f.write_text("# nobody\n")
    with pytest.raises(UsageError, match="names no subject"):
        read_subjects_file(str(f))
    with pytest.raises(UsageError, match="not found"):
        read_subjects_file(str(tmp_path / "missing.txt"))


def test_ray_reason_keeps_what_failed_and_the_last_error() -> None:
    from lethe_operator.control import ray_reason

    log = "Job entrypoint command failed with exit code 1, last logs:\n" + "noise\n" * 500
    got = ray_reason(log + "RuntimeError: injected training failure\n")
    assert got.startswith("Job entrypoint command failed with exit code 1")
    assert got.endswith("RuntimeError: injected training failure") and len(got) <= 600
    assert ray_reason("STOPPED by user") == "STOPPED by user"


def test_source_policy_is_checked_naming_the_field() -> None:
    from dataclasses import replace

    import pytest

    from lethe.core.config import ConfigError, ModelConfig

    base = ModelConfig(name="m", shards=1, slices=1)
    with pytest.raises(ConfigError, match="source_policy"):
        replace(base, source_policy="shred").validate()
    with pytest.raises(ConfigError, match="source_policy.*s3://"):  # a local file: unreachable
        replace(base, source_policy="patch", source_uri="/data/x.parquet").validate()
    replace(base, source_policy="patch", source_uri="s3://b/k.parquet").validate()


def test_a_user_models_code_gets_warm_lanes_of_its_own() -> None:
    """A lane's workers keep a user model's module imported between tasks: its lanes
    must not run another model's tasks (built-in models share lanes by shape)."""
    from lethe.warm import lane_key

    def cfg(name: str, model: str) -> ModelConfig:
        return ModelConfig(name, 2, 2, trainer=TrainerConfig(model=model))

    builtin_a, builtin_b = lane_key(cfg("ns.a", "mlp")), lane_key(cfg("ns.b", "mlp"))
    user_a, user_b = lane_key(cfg("ns.a", "pkg.mod:build")), lane_key(cfg("ns.b", "pkg.mod:build"))
    assert builtin_a == builtin_b and builtin_a[3] == ""
    assert user_a != user_b and user_a != builtin_a
    assert user_a[:3] == builtin_a[:3]  # the same Ray Train shape all the same


def test_warm_ttl_from_the_environment_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TTL that is not a number is refused naming the variable; zero or a negative
    number cannot make lanes end before their first task (at least one second)."""
    from lethe import warm

    monkeypatch.setenv(warm.TTL_ENV, "ten minutes")
    with pytest.raises(ValueError, match=warm.TTL_ENV):
        warm.ttl_seconds()
    for raw, expected in (("0", 1.0), ("-5", 1.0), ("90", 90.0), ("", warm.DEFAULT_TTL_SECONDS)):
        monkeypatch.setenv(warm.TTL_ENV, raw)
        assert warm.ttl_seconds() == expected
