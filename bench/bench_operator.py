"""``make bench-operator``: what the control plane adds on top of the engine, in one run.

Everything is real: SeaweedFS, a Ray head, kube-apiserver + etcd, and the operator
(``python -m lethe_operator``) as its own process. Requests are created through the
Kubernetes API and timed from this process: the create call to the moment a watch
sees the request's phase.

Printed, measured side by side:
- apply-to-Quarantined p50/p95 over every request of the run (one at a time and
  bursts of several);
- the operator's overhead: apply-to-Succeeded of one request with batching off,
  minus the engine's own erasure time (``Engine.erase`` in this process on an
  identical copy of the model, same Ray head, same subjects), medians over reps;
- throughput (requests per minute) of a burst applied at once, batching on and off.
Results go to bench/results/operator-latest.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' harness runs the operator process

from kubernetes import client as k8s  # noqa: E402
from kubernetes import config as k8s_config  # noqa: E402
from kubernetes import watch  # noqa: E402
from tests.harness import (  # noqa: E402
    Operator,
    digits_model,
    s3_secret,
    train_subjects,
)

from lethe.core.config import ModelConfig, TrainerConfig  # noqa: E402
from lethe.core.plan import ErasureRequest  # noqa: E402
from lethe.datasets import digits_table  # noqa: E402
from lethe.erasure import Engine, request_uid  # noqa: E402
from lethe.ingest import ingest_table  # noqa: E402
from lethe.layout import ModelLayout  # noqa: E402
from lethe.predict import ensemble_accuracy  # noqa: E402
from lethe.store import NotFound, S3Settings, Store  # noqa: E402
from lethe.training import RayTrainer, train_model  # noqa: E402
from lethe_dev import kubestack, localstack  # noqa: E402
from lethe_operator.batches import RequestPhase  # noqa: E402
from lethe_operator.control import GROUP, MODELS, REQUESTS, VERSION  # noqa: E402
from lethe_operator.raylaunch import find_agent  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NS = "default"
MODEL = "bench"
QUARANTINED = RequestPhase.forgotten()


class Clock:
    """When each request was created (by us) and first seen in each phase (by a watch)."""

    def __init__(self, api: k8s.CustomObjectsApi) -> None:
        self.api = api
        self.created: dict[str, float] = {}
        self.quarantined: dict[str, float] = {}
        self.succeeded: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            w = watch.Watch()
            for ev in w.stream(
                self.api.list_namespaced_custom_object,
                GROUP,
                VERSION,
                NS,
                REQUESTS,
                timeout_seconds=20,
            ):
                t = time.time()
                obj = ev["object"]
                name, st = obj["metadata"]["name"], obj.get("status") or {}
                if st.get("phase") in QUARANTINED:
                    self.quarantined.setdefault(name, t)
                if st.get("phase") == RequestPhase.SUCCEEDED and name not in self.succeeded:
                    self.succeeded[name] = {"at": t, "status": st}
                if self._stop.is_set():
                    break

    def create(self, name: str, subject: str) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ErasureRequest",
            "metadata": {"name": name},
            "spec": {"modelRef": {"name": MODEL}, "subjects": [subject], "reason": "bench"},
        }
        self.created[name] = time.time()
        self.api.create_namespaced_custom_object(GROUP, VERSION, NS, REQUESTS, body)

    def wait_succeeded(self, names: list[str], timeout: float = 900) -> float:
        deadline = time.time() + timeout
        while not all(n in self.succeeded for n in names):
            if time.time() > deadline:
                raise TimeoutError(f"requests not done: {set(names) - set(self.succeeded)}")
            time.sleep(0.05)
        return max(self.succeeded[n]["at"] for n in names)

    def stop(self) -> None:
        self._stop.set()


def patch_policy(api: k8s.CustomObjectsApi, **policy: int) -> None:
    api.patch_namespaced_custom_object(
        GROUP, VERSION, NS, MODELS, MODEL, {"spec": {"erasurePolicy": policy}}
    )
    time.sleep(3)  # the operator sees the new spec on its next tick


def wait_ready(api: k8s.CustomObjectsApi, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = api.get_namespaced_custom_object(GROUP, VERSION, NS, MODELS, MODEL).get("status") or {}
        if any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", [])):
            return
        time.sleep(1)
    raise TimeoutError("the model did not become Ready")


def retrain_run(dashboard: str, submission_id: str) -> tuple[float, float, str]:
    """When a batch's job started and ended, and where it ran: the cluster's retrain
    agent (``lethe.agent``) or a Ray job (driver start-up included)."""
    agent = find_agent(dashboard, int(os.environ["LETHE_AGENT_PORT"]))
    where, url = "ray job", f"{dashboard}/api/jobs/{submission_id}"
    if agent is not None and agent.status(submission_id) is not None:
        where, url = "agent", f"{agent.url}/jobs/{submission_id}"
    with urllib.request.urlopen(url, timeout=10) as r:
        info = json.loads(r.read())
    return info["start_time"] / 1000, info["end_time"] / 1000, where


def step_times(store: Store, layout: ModelLayout, batch: str) -> dict[str, float]:
    """When each of a batch's steps was done (its marker's time)."""
    out = {}
    for step in ("quarantine", "patch", "purge-data", "commit", "purge"):
        try:
            out[step] = float(store.get_json(layout.step(batch, step))["at"])
        except NotFound:
            pass
    return out


def operator_timeline(
    store: Store,
    layout: ModelLayout,
    status: dict[str, Any],
    created: float,
    done: float,
    run: tuple[float, float, str],
) -> dict[str, float]:
    """Where one request's seconds went through the operator."""
    at = step_times(store, layout, status["batchId"])
    start, end, _ = run
    return {
        "apply_to_quarantined": at["quarantine"] - created,  # batch formed, planned
        "quarantined_to_job_start": start - at["quarantine"],  # erase order, submission
        "job_start_to_patched": at["patch"] - start,
        "patched_to_committed": at["commit"] - at["patch"],  # retrain (purge beside)
        "committed_to_job_end": end - at["commit"],
        "job_end_to_checkpoints_purged": at["purge"] - end,  # noticed, checkpoints purged
        "checkpoints_purged_to_succeeded": done - at["purge"],  # check, certify, status
    }


def engine_timeline(
    store: Store, layout: ModelLayout, batch: str, t0: float, t1: float
) -> dict[str, float]:
    """The same segments for the engine alone (no job: its start is the quarantine)."""
    at = step_times(store, layout, batch)
    return {
        "apply_to_quarantined": at["quarantine"] - t0,
        "quarantined_to_job_start": 0.0,
        "job_start_to_patched": at["patch"] - at["quarantine"],
        "patched_to_committed": at["commit"] - at["patch"],
        "committed_to_job_end": max(at["commit"], at["purge-data"]) - at["commit"],
        "job_end_to_checkpoints_purged": at["purge"] - max(at["commit"], at["purge-data"]),
        "checkpoints_purged_to_succeeded": t1 - at["purge"],
    }


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def twin_engine_seconds(
    store: Store, spec: dict[str, Any], subjects: list[str]
) -> tuple[list[float], list[dict[str, float]]]:
    """Engine.erase of each subject, one at a time, on an identical copy of the model:
    its seconds, and where they went."""
    t = spec["trainer"]
    cfg = ModelConfig(
        name="bench-twin",
        shards=spec["shards"],
        slices=spec["slices"],
        trainer=TrainerConfig(
            model=t["model"],
            epochs=t["epochs"],
            batch_size=t["batchSize"],
            learning_rate=t["learningRate"],
            hidden=t["hidden"],
        ),
    )
    layout = ModelLayout.of("bench-twin", "twin")
    ingest_table(store, layout, digits_table()[0], cfg)
    trainer = RayTrainer(store.settings)
    train_model(store, layout, trainer)
    engine = Engine(store, layout, trainer, evaluate=lambda g: ensemble_accuracy(store, g))
    out, where = [], []
    for s in subjects:
        t0 = time.time()
        result = engine.erase([ErasureRequest(request_uid("bench-twin", [s], []), (s,), ())])
        t1 = time.time()
        out.append(t1 - t0)
        where.append(engine_timeline(store, layout, result["batch_id"], t0, t1))
    return out, where


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="one-at-a-time requests (batching off)")
    p.add_argument("--burst", type=int, default=8, help="requests applied at once")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--verbose", action="store_true", help="the operator's debug log (kept)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Unverified HTTPS request")

    state = Path(tempfile.mkdtemp(prefix="lethe-bench-operator-"))
    try:
        return measure(args, state)
    finally:  # whatever failed, nothing it started is left running
        kubestack.stop(state / "kube")
        localstack.down(state / "stack")
        if args.verbose:
            print(f"the operator's log: {state / 'operator.log'}")


def measure(args: argparse.Namespace, state: Path) -> int:
    t_setup = time.time()
    stack = localstack.up(state / "stack", bucket="lethe-bench", num_cpus=2)
    stack.apply()
    kube = kubestack.start(state / "kube")
    print(f"stack up in {time.time() - t_setup:.1f}s (state {state})", flush=True)
    store = Store(S3Settings.from_env())
    store.ensure_bucket(versioning=True)
    k8s_config.load_kube_config(kube.kubeconfig)
    api = k8s.CustomObjectsApi()
    k8s.CoreV1Api().create_namespaced_secret(NS, s3_secret(stack))
    model = digits_model(
        MODEL,
        stack,
        store,
        policy={"batchWindowSeconds": 0, "maxBatchSize": 1, "ttlSecondsAfterFinished": 86400},
    )
    model["spec"]["shards"] = args.shards
    api.create_namespaced_custom_object(GROUP, VERSION, NS, MODELS, model)
    log = state / "operator.log"
    op = Operator(
        kube.kubeconfig, localstack.free_port(), log, args=("--verbose",) if args.verbose else ()
    )
    op.start()
    clock = Clock(api)
    try:
        wait_ready(api)
        print(f"model trained and Ready after {time.time() - t_setup:.1f}s", flush=True)
        subjects = iter(train_subjects(args.reps + 2 * args.burst, offset=5))

        # 1. one request at a time, batching off: apply -> Succeeded, per request
        single: list[tuple[str, str]] = []
        for i in range(args.reps):
            name, subject = f"one-{i}", next(subjects)
            clock.create(name, subject)
            clock.wait_succeeded([name])
            single.append((name, subject))
            print(f"  {name}: {clock.succeeded[name]['at'] - clock.created[name]:.1f}s", flush=True)

        # 2. a burst applied at once, batching off then on
        throughput: dict[str, dict[str, float]] = {}
        for mode, policy in (
            ("off", {"maxBatchSize": 1, "batchWindowSeconds": 0}),
            ("on", {"maxBatchSize": 100, "batchWindowSeconds": 2}),
        ):
            patch_policy(api, **policy)
            names = [f"burst-{mode}-{i}" for i in range(args.burst)]
            for n in names:
                clock.create(n, next(subjects))
            end = clock.wait_succeeded(names)
            wall = end - min(clock.created[n] for n in names)
            batches = {clock.succeeded[n]["status"]["batchId"] for n in names}
            throughput[mode] = {
                "requests": len(names),
                "batches": len(batches),
                "seconds": round(wall, 2),
                "requests_per_minute": round(len(names) / wall * 60, 2),
            }
            print(f"  batching {mode}: {throughput[mode]}", flush=True)
        op_total = [clock.succeeded[n]["at"] - clock.created[n] for n, _ in single]
        runs = [
            retrain_run(stack.ray_dashboard, clock.succeeded[n]["status"]["rayJobId"])
            for n, _ in single
        ]
    finally:
        clock.stop()
        op.stop()
    layout = ModelLayout.of(f"{NS}.{MODEL}", model["spec"]["storage"]["prefix"])
    op_where = [
        operator_timeline(
            store,
            layout,
            clock.succeeded[n]["status"],
            clock.created[n],
            clock.succeeded[n]["at"],
            run,
        )
        for (n, _), run in zip(single, runs, strict=True)
    ]
    # 3. the engine alone, after the operator has stopped (nothing else on the CPUs)
    engine, engine_where = twin_engine_seconds(store, model["spec"], [s for _, s in single])
    quarantine = [clock.quarantined[n] - clock.created[n] for n in clock.created]
    overhead = statistics.median(op_total) - statistics.median(engine)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "model": {"dataset": "builtin:digits", "shards": args.shards, "slices": 2},
        "apply_to_quarantined_seconds": {
            "n": len(quarantine),
            "p50": round(pct(quarantine, 0.5), 3),
            "p95": round(pct(quarantine, 0.95), 3),
            "max": round(max(quarantine), 3),
        },
        "one_request_batching_off": {
            "reps": args.reps,
            "apply_to_succeeded_median_s": round(statistics.median(op_total), 2),
            "engine_erase_median_s": round(statistics.median(engine), 2),
            "operator_overhead_s": round(overhead, 2),
            "retrain_run_median_s": round(statistics.median(e - s for s, e, _ in runs), 2),
            "retrain_ran_on": sorted({where for _, _, where in runs}),
            # medians of each segment, through the operator and in the engine alone
            "where_the_seconds_go": {
                "operator": medians(op_where),
                "engine": medians(engine_where),
            },
            "apply_to_succeeded_s": [round(x, 2) for x in op_total],
            "engine_erase_s": [round(x, 2) for x in engine],
        },
        "throughput": throughput,
        "speedup_batching": round(
            throughput["on"]["requests_per_minute"] / throughput["off"]["requests_per_minute"], 2
        ),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "operator-latest.json").write_text(json.dumps(result, indent=1) + "\n")
    md = render(result)
    (RESULTS / "operator-latest.md").write_text(md)
    print(md)
    return 0


def render(r: dict[str, Any]) -> str:
    q, one, tp = r["apply_to_quarantined_seconds"], r["one_request_batching_off"], r["throughput"]
    lines = [
        f"# Operator benchmark ({r['date']}, {r['machine']})",
        "",
        f"Model: {r['model']}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| apply to Quarantined, p50 / p95 (n={q['n']}) | {q['p50']} s / {q['p95']} s |",
        f"| apply to Succeeded, one request, median of {one['reps']} "
        f"| {one['apply_to_succeeded_median_s']} s |",
        f"| engine's own erasure (Engine.erase, same model and subjects), median "
        f"| {one['engine_erase_median_s']} s |",
        f"| **operator overhead** (difference of the medians) | {one['operator_overhead_s']} s |",
        f"| the retrain's run on the cluster ({', '.join(one['retrain_ran_on'])}), wall time "
        f"(retrain, commit), median | {one['retrain_run_median_s']} s |",
    ]
    for mode in ("off", "on"):
        t = tp[mode]
        lines.append(
            f"| throughput, batching {mode}: {t['requests']} requests at once, "
            f"{t['batches']} batch(es), {t['seconds']} s | {t['requests_per_minute']} req/min |"
        )
    lines.append(f"| batching on / off | {r['speedup_batching']}x |")
    where = one["where_the_seconds_go"]
    lines += [
        "",
        "Where one request's seconds go (medians; the engine has no job to start):",
        "",
        "| segment | operator | engine alone | difference |",
        "|---|---|---|---|",
    ]
    for seg, op_s in where["operator"].items():
        en_s = where["engine"][seg]
        lines.append(f"| {seg.replace('_', ' ')} | {op_s} s | {en_s} s | {op_s - en_s:+.3f} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
