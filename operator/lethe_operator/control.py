"""The operator's control logic: plain functions over the engine and the Kubernetes API.

State lives in the objects' status and in S3, never in this process, so killing the
operator at any moment and starting it again resumes every request:
- an ErasureRequest is accepted once: its shards are held in quarantine in S3
  (idempotent), then its status says Quarantined;
- a ShardedModel's status names its active batch *before* anything of the batch
  happens; the batch id is a hash of its request uids and the engine's steps are
  idempotent, so a restarted operator continues the same batch;
- Ray submission ids derive from the batch id and the attempt number, so a job is
  never submitted twice.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from lethe.checkpoints import pending_slices
from lethe.core.config import Columns, ModelConfig, Prices, TrainerConfig
from lethe.core.plan import ErasureRequest, parse_id_lines
from lethe.erasure import Engine, batch_id, hold_shards, release_holds, resolve_shards
from lethe.generations import ModelNotFound, read_live
from lethe.ingest import ingest_table, read_dataset
from lethe.layout import ModelLayout
from lethe.store import S3Settings, Store
from lethe_operator import metrics
from lethe_operator.raylaunch import Launcher, RayJobs

GROUP, VERSION = "lethe.dev", "v1alpha1"
MODELS, REQUESTS = "shardedmodels", "erasurerequests"
FINISHED = ("Succeeded", "Failed")
KILL_ENV = "LETHE_OPERATOR_KILL_AT"  # fault injection for the restart tests
RETRY_BACKOFF_SECONDS = 5.0  # before a failed Ray job's next attempt; doubles each time
log = logging.getLogger("lethe.operator")


def kill_point(name: str) -> None:
    """Die here as ``kill -9`` would make us, when the restart tests ask for it: state
    must live in Kubernetes and S3, never in this process."""
    if os.environ.get(KILL_ENV) == name:
        log.warning("%s=%s: SIGKILL", KILL_ENV, name)
        os.kill(os.getpid(), signal.SIGKILL)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(ts: str) -> float:
    return dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str = "",
    observed: int | None = None,
) -> list[dict[str, Any]]:
    """Kubernetes API conventions: lastTransitionTime moves only when status changes."""
    value = "True" if status else "False"
    out = [c for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    cond = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": old["lastTransitionTime"]
        if old and old.get("status") == value
        else now_iso(),
    }
    if observed is not None:
        cond["observedGeneration"] = observed
    return [*out, cond]


# -- the model's S3 side -----------------------------------------------------------------
@dataclass
class ModelContext:
    namespace: str
    name: str
    spec: dict[str, Any]
    store: Store
    layout: ModelLayout

    @property
    def model_id(self) -> str:
        return f"{self.namespace}.{self.name}"

    def config(self) -> ModelConfig:
        s, t = self.spec, self.spec.get("trainer", {})
        cols = s["dataset"].get("columns", {})
        return ModelConfig(
            name=self.model_id,
            shards=int(s["shards"]),
            slices=int(s["slices"]),
            trainer=TrainerConfig(
                model=t.get("model", "mlp"),
                epochs=float(t.get("epochs", 10)),
                batch_size=int(t.get("batchSize", 128)),
                learning_rate=float(t.get("learningRate", 1e-3)),
                hidden=int(t.get("hidden", 256)),
                seed=int(t.get("seed", 0)),
                workers_per_shard=int(t.get("workersPerShard", 1)),
                cpus_per_worker=float(t.get("cpusPerWorker", 1)),
                gpus_per_worker=float(t.get("gpusPerWorker", 0)),
                input_shape=tuple(t.get("inputShape", ())),
            ),
            prices=Prices(
                float(s.get("prices", {}).get("cpuHourUSD", 0.048)),
                float(s.get("prices", {}).get("gpuHourUSD", 2.5)),
            ),
            columns=Columns(
                cols.get("recordId", "record_id"),
                cols.get("subjectId", "subject_id"),
                cols.get("label", "label"),
                tuple(cols.get("features", ())),
            ),
            test_fraction=float(s["dataset"].get("testFraction", 0.2)),
        )

    def ray(self, owners: list[dict[str, Any]] | None = None) -> Launcher:
        """Where this model's Ray jobs run: an existing cluster's Jobs API, or KubeRay
        RayJobs (``owners``: the objects a RayJob belongs to, for garbage collection)."""
        # the model's extra variables first: they must not override the S3 settings
        env = {**self.spec["ray"].get("env", {}), **self.store.settings.env()}
        python = os.environ.get("LETHE_RAY_PYTHON", "python")
        ray = self.spec["ray"]
        if ray.get("address"):
            return RayJobs(ray["address"], env, python=python)
        from lethe_operator.kuberay import KubeRayJobs

        return KubeRayJobs(
            self.namespace,
            ray["rayJob"],
            env,
            python=python,
            owners=owners or [],
            model=self.name,
            credentials_secret=(self.spec["storage"].get("credentialsSecret") or {}).get("name"),
        )

    def engine(self) -> Engine:
        return Engine(self.store, self.layout, trainer=None)


def _secret_values(namespace: str, name: str, *keys: str) -> list[str]:
    data = k8s.CoreV1Api().read_namespaced_secret(name, namespace).data or {}
    missing = [k for k in keys if k not in data]
    if missing:
        raise KeyError(f"Secret {name} has no key(s) {missing}")
    return [base64.b64decode(data[k]).decode() for k in keys]


def model_context(body: dict[str, Any]) -> ModelContext:
    ns, name, spec = body["metadata"]["namespace"], body["metadata"]["name"], body["spec"]
    storage = spec["storage"]
    access = secret = None
    if storage.get("credentialsSecret"):
        ref = storage["credentialsSecret"]["name"]
        access, secret = _secret_values(ns, ref, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    env = S3Settings.from_env()
    settings = S3Settings(
        endpoint=storage.get("endpoint") or env.endpoint,
        bucket=storage["bucket"],
        access_key=access or env.access_key,
        secret_key=secret or env.secret_key,
        region=env.region,
    )
    return ModelContext(
        ns, name, spec, Store(settings), ModelLayout.of(f"{ns}.{name}", storage.get("prefix", ""))
    )


def load_dataset(ctx: ModelContext) -> Any:
    uri = ctx.spec["dataset"]["uri"]
    if uri.startswith("builtin:"):
        from lethe.datasets import builtin

        return builtin(uri.removeprefix("builtin:"))
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    src = Store(
        S3Settings(
            ctx.store.settings.endpoint,
            bucket,
            ctx.store.settings.access_key,
            ctx.store.settings.secret_key,
            ctx.store.settings.region,
        )
    )
    import tempfile

    suffix = ".csv" if ctx.spec["dataset"].get("format") == "csv" else ".parquet"
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(src.get(key))
        f.flush()
        return read_dataset(f.name)


# -- ShardedModel ------------------------------------------------------------------------
def reconcile_model(body: dict[str, Any], events: Any) -> dict[str, Any]:
    """Ingest, train, run batches; returns the status patch for the ShardedModel."""
    ctx = model_context(body)
    status = dict(body.get("status") or {})
    conds = list(status.get("conditions", []))
    observed = body["metadata"].get("generation")
    try:
        live = read_live(ctx.store, ctx.layout).generation
    except ModelNotFound:
        ingest_table(ctx.store, ctx.layout, load_dataset(ctx), ctx.config())
        events.info("Ingested", "dataset sharded and written to S3 (generation 1)")
        live = read_live(ctx.store, ctx.layout).generation
    # Only the committed generation counts: checkpoints a train job wrote but has not
    # committed yet (with the accuracy) do not make the model Ready.
    # A quarantined shard whose data an erasure has patched is untrained until the
    # erasure's own retrain: only an erasure batch trains it, never a train job.
    untrained = set(pending_slices(live)) - set(live.quarantined_shards)
    if untrained and not status.get("activeBatch"):
        attempt = int(status.get("trainAttempt", 0))
        job = ctx.ray(owners=[body]).ensure(
            f"lethe-train-{body['metadata']['uid']}-{attempt}",
            ["train", "--model-prefix", ctx.layout.prefix],
        )
        if job.status in ("FAILED", "STOPPED"):
            if attempt < int(ctx.spec["ray"].get("maxRetries", 3)):
                status["trainAttempt"] = attempt + 1
            else:
                conds = set_condition(
                    conds, "Ready", False, "TrainingFailed", job.message[:500], observed
                )
        elif job.status == "SUCCEEDED":
            status["trainAttempt"] = attempt + 1  # new data appeared since: train again
        conds = set_condition(
            conds, "Training", True, "Training", f"Ray job {job.submission_id}", observed
        )
        status["conditions"] = conds
        return status
    conds = set_condition(conds, "Training", False, "Trained", "", observed)
    status = run_batches(ctx, body, status, events)
    live = read_live(ctx.store, ctx.layout).generation
    q = live.quarantined_shards
    conds = set_condition(
        conds,
        "Ready",
        True,
        "Serving",
        f"{len(live.live_shards())} of {len(live.shards)} constituents live",
        observed,
    )
    conds = set_condition(
        conds,
        "Degraded",
        bool(q),
        "Quarantined" if q else "AllShardsLive",
        f"shards {q} quarantined" if q else "",
        observed,
    )
    metrics.track(ctx.namespace, ctx.name)  # series from 0, so increase() sees the 1st erasure
    metrics.quarantined.labels(ctx.namespace, ctx.name).set(len(q))
    status.update(
        {
            "liveGeneration": live.number,
            "accuracy": live.accuracy,
            "quarantinedShards": q,
            "observedGeneration": observed,
            "conditions": conds,
        }
    )
    return status


def _requests_of(ctx: ModelContext) -> list[dict[str, Any]]:
    items = k8s.CustomObjectsApi().list_namespaced_custom_object(
        GROUP, VERSION, ctx.namespace, REQUESTS
    )["items"]
    return [r for r in items if r["spec"]["modelRef"]["name"] == ctx.name]


def _subjects_and_records(req: dict[str, Any]) -> tuple[list[str], list[str]]:
    spec = req["spec"]
    if spec.get("secretRef"):
        ref = spec["secretRef"]
        ns = req["metadata"]["namespace"]
        (text,) = _secret_values(ns, ref["name"], ref.get("key", "subjects"))
        return parse_id_lines(text, f"Secret {ref['name']}"), []
    return list(spec.get("subjects", [])), list(spec.get("recordIds", []))


def _as_request(req: dict[str, Any]) -> ErasureRequest:
    subjects, records = _subjects_and_records(req)
    return ErasureRequest(req["metadata"]["uid"], tuple(subjects), tuple(records))


def _patch_request(namespace: str, name: str, status: dict[str, Any]) -> None:
    k8s.CustomObjectsApi().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, REQUESTS, name, {"status": status}
    )


def _holder(uid: str) -> str:
    return f"req-{uid}"


def run_batches(
    ctx: ModelContext, body: dict[str, Any], status: dict[str, Any], events: Any
) -> dict[str, Any]:
    """One step of the model's batch state machine (called by a timer)."""
    policy = ctx.spec.get("erasurePolicy", {})
    requests = _requests_of(ctx)
    active = status.get("activeBatch")
    waiting = [
        r
        for r in requests
        if (r.get("status") or {}).get("phase") == "Quarantined"
        and not (r.get("status") or {}).get("batchId")
    ]
    unfinished = [r for r in requests if (r.get("status") or {}).get("phase") not in FINISHED]
    metrics.pending.labels(ctx.namespace, ctx.name).set(len(unfinished))
    deadline = int(policy.get("deadlineSeconds", 30 * 86400))
    # nothing pending: a request arriving now would have the whole deadline (never stale)
    left = min(
        (
            parse_time(r["metadata"]["creationTimestamp"]) + deadline - time.time()
            for r in unfinished
        ),
        default=float(deadline),
    )
    metrics.deadline_left.labels(ctx.namespace, ctx.name).set(left)
    if not active:
        retry = _due_failed_batch(status, int(policy.get("retryFailedAfterSeconds", 600)))
        if retry is not None:
            status["failedBatches"] = [
                b for b in status.get("failedBatches", []) if b["id"] != retry["id"]
            ]
            attempt = int(retry.get("attempt", 0)) + 1
            status["activeBatch"] = {
                "id": retry["id"],
                "attempt": attempt,
                "firstAttempt": attempt,
                "requests": retry["requests"],
                "started": time.time(),
            }
            events.info("BatchRetry", f"retraining a failed batch again (attempt {attempt + 1})")
            return status
        if not waiting:
            return status
        oldest = min(parse_time(r["metadata"]["creationTimestamp"]) for r in waiting)
        window = int(policy.get("batchWindowSeconds", 30))
        size = int(policy.get("maxBatchSize", 100))
        if len(waiting) < size and time.time() - oldest < window:
            return status
        chosen = sorted(
            waiting, key=lambda r: (r["metadata"]["creationTimestamp"], r["metadata"]["name"])
        )[:size]
        reqs = [_as_request(r) for r in chosen]
        # Name the batch in status first: a restart continues exactly this batch.
        status["activeBatch"] = {
            "id": batch_id(ctx.model_id, reqs),
            "attempt": 0,
            "firstAttempt": 0,
            "requests": [r["metadata"]["name"] for r in chosen],
            "started": time.time(),
        }
        events.info("BatchFormed", f"{len(chosen)} request(s) in one batch")
        return status
    return advance_batch(ctx, status, requests, events)


def advance_batch(
    ctx: ModelContext, status: dict[str, Any], requests: list[dict[str, Any]], events: Any
) -> dict[str, Any]:
    active = dict(status["activeBatch"])
    by_name = {r["metadata"]["name"]: r for r in requests}
    members = [by_name[n] for n in active["requests"] if n in by_name]
    if not members:  # all deleted (their TTL) while the batch waited for a retry
        events.warning("BatchDropped", "no request of the batch is left; shards stay quarantined")
        status.pop("activeBatch", None)
        return status
    kill_point("batched")
    reqs = [_as_request(r) for r in members]
    engine = ctx.engine()
    result = engine.result_of(reqs)
    if result is None:
        requested_at = min(parse_time(r["metadata"]["creationTimestamp"]) for r in members)
        plan = engine.prepare(reqs, requested_at)
        release_holds(ctx.store, ctx.layout, {_holder(r.uid) for r in reqs})
        kill_point("erased")
        for r in members:
            st = r.get("status") or {}
            if st.get("batchId") != plan.batch_id:
                conds = set_condition(
                    st.get("conditions", []),
                    "DataErased",
                    True,
                    "Patched",
                    "records removed from the training data",
                )
                _patch_request(
                    r["metadata"]["namespace"],
                    r["metadata"]["name"],
                    {"phase": "DataErased", "batchId": plan.batch_id, "conditions": conds},
                )
        if not engine.committed(plan):
            if time.time() < float(active.get("retryAt", 0)):  # backing off after a failure
                return status
            attempt = int(active.get("attempt", 0))
            job_id = f"lethe-{plan.batch_id}-{attempt}"
            job = ctx.ray(owners=members).ensure(
                job_id, ["retrain", "--model-prefix", ctx.layout.prefix, "--batch", plan.batch_id]
            )
            if job.status == "FAILED" or job.status == "STOPPED":
                tries = attempt - int(active.get("firstAttempt", 0))
                if tries < int(ctx.spec["ray"].get("maxRetries", 3)):
                    active["attempt"] = attempt + 1
                    active["retryAt"] = time.time() + min(300.0, RETRY_BACKOFF_SECONDS * 2**tries)
                    events.warning("RetrainRetry", f"Ray job {job_id} failed; retrying")
                    status["activeBatch"] = active
                    return status
                _fail(
                    members,
                    "RetrainFailed",
                    f"Ray job {job_id}: {ray_reason(job.message)} (data "
                    "erased; shards stay quarantined until a later retrain succeeds)",
                    ctx,
                )
                events.warning("RetrainFailed", f"batch failed after {tries + 1} attempt(s)")
                status.pop("activeBatch", None)
                status["failedBatches"] = [
                    *status.get("failedBatches", []),
                    {
                        "id": active["id"],
                        "attempt": attempt,
                        "failedAt": time.time(),
                        "requests": active["requests"],
                    },
                ]
                return status
            if job.status != "SUCCEEDED":
                kill_point("submitted")
                for r in members:
                    st = r.get("status") or {}
                    if st.get("phase") == "Retraining" and st.get("rayJobId") == job_id:
                        continue
                    change: dict[str, Any] = {"phase": "Retraining", "rayJobId": job_id}
                    if st.get("phase") == "Failed":  # a failed batch, retried: not failed now
                        change.update(reason=None, message=None, finishedAt=None)
                        change["conditions"] = set_condition(
                            st.get("conditions", []), "Failed", False, "Retrying", job_id
                        )
                    _patch_request(r["metadata"]["namespace"], r["metadata"]["name"], change)
                status["activeBatch"] = active
                return status
        # The Ray job commits the retrained shards itself, so "committed" is usually
        # what a tick sees first, before the job reports SUCCEEDED.
        kill_point("retrained")
        metrics.retrain_duration.labels(ctx.namespace, ctx.name).observe(
            time.time() - float(active.get("started", time.time()))
        )
        result = engine.finish(plan)
        kill_point("certified")
    _succeed(members, result, ctx)
    events.info("BatchSucceeded", f"{len(members)} request(s) erased, retrained, certified")
    status.pop("activeBatch", None)
    return status


def ray_reason(message: str, limit: int = 600) -> str:
    """Ray's message for a status: its first line (what failed) and the end of the
    rest (the job's last log lines: the error that ended it), whitespace collapsed."""
    first, _, rest = message.strip().partition("\n")
    first, rest = " ".join(first.split())[:150], " ".join(rest.split())
    tail = limit - len(first) - 5
    return first if not rest else f"{first} ... {rest[-tail:]}"


def _due_failed_batch(status: dict[str, Any], after_seconds: int) -> dict[str, Any] | None:
    """The oldest failed batch whose wait for another retry is over (None: none due)."""
    if after_seconds <= 0:
        return None
    due = [
        b
        for b in status.get("failedBatches", [])
        if time.time() - float(b.get("failedAt", 0)) >= after_seconds
    ]
    return min(due, key=lambda b: float(b.get("failedAt", 0)), default=None)


def _fail(members: list[dict[str, Any]], reason: str, message: str, ctx: ModelContext) -> None:
    for r in members:
        st = r.get("status") or {}
        conds = set_condition(st.get("conditions", []), "Failed", True, reason, message)
        _patch_request(
            r["metadata"]["namespace"],
            r["metadata"]["name"],
            {
                "phase": "Failed",
                "reason": reason,
                "message": message,
                "conditions": conds,
                "finishedAt": time.time(),
            },
        )
        metrics.requests_total.labels(ctx.namespace, ctx.name, "failed").inc()


def _succeed(members: list[dict[str, Any]], result: dict[str, Any], ctx: ModelContext) -> None:
    cost = result["cost"]
    labels = (ctx.namespace, ctx.name)
    metrics.cpu_seconds.labels(*labels).inc(cost["cpu_seconds"])
    metrics.gpu_seconds.labels(*labels).inc(cost["gpu_seconds"])
    metrics.cost_usd.labels(*labels).inc(cost["usd"])
    metrics.full_retrain_usd.labels(*labels).inc(cost["full_retrain_usd"])
    metrics.shards_retrained.labels(*labels).inc(result["shards_retrained"])
    metrics.slices_retrained.labels(*labels).inc(
        sum(r["slices_trained"] for r in result["shard_runs"])
    )
    metrics.records_erased.labels(*labels).inc(result["records_erased"])
    share = 1.0 / max(1, len(members))
    for r in members:
        st = r.get("status") or {}
        if st.get("phase") == "Succeeded":
            continue
        uid = r["metadata"]["uid"]
        key = result["certificates"].get(uid, "")
        cert = store_uri(ctx, key)
        records = int(ctx.store.get_json(key).get("records_erased", 0)) if key else 0
        created = parse_time(r["metadata"]["creationTimestamp"])
        conds = st.get("conditions", [])
        for t, reason in (("Retrained", "Committed"), ("Succeeded", "Certified")):
            conds = set_condition(conds, t, True, reason, "")
        if any(c["type"] == "Failed" for c in conds):  # an earlier attempt had failed
            conds = set_condition(conds, "Failed", False, "Retrained", "")
        lat = time.time() - created
        _patch_request(
            r["metadata"]["namespace"],
            r["metadata"]["name"],
            {
                "phase": "Succeeded",
                "reason": "Certified",
                "message": None,
                "certificate": cert,
                "affectedRecords": records,
                "latencySeconds": round(lat, 3),
                "conditions": conds,
                "finishedAt": time.time(),
                "cost": {
                    "cpuSeconds": cost["cpu_seconds"] * share,
                    "gpuSeconds": cost["gpu_seconds"] * share,
                    "usd": cost["usd"] * share,
                    "fullRetrainUSD": cost["full_retrain_usd"],
                },
            },
        )
        metrics.latency.labels(*labels).observe(lat)
        metrics.requests_total.labels(*labels, "succeeded").inc()
        kill_point("reported")


def store_uri(ctx: ModelContext, key: str) -> str:
    return f"s3://{ctx.store.bucket}/{key}" if key else ""


# -- ErasureRequest ----------------------------------------------------------------------
def accept_request(body: dict[str, Any], events: Any) -> dict[str, Any]:
    """Validate the model reference, quarantine at once; returns the status patch."""
    meta, spec = body["metadata"], body["spec"]
    st = dict(body.get("status") or {})
    if st.get("phase"):
        return st  # accepted already (a restart): nothing to redo
    conds = st.get("conditions", [])
    try:
        model = k8s.CustomObjectsApi().get_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], MODELS, spec["modelRef"]["name"]
        )
    except ApiException as e:
        if e.status != 404:
            raise
        msg = f"ShardedModel {spec['modelRef']['name']} not found in {meta['namespace']}"
        events.warning("ModelNotFound", msg)
        metrics.requests_total.labels(meta["namespace"], spec["modelRef"]["name"], "failed").inc()
        return {
            "phase": "Failed",
            "reason": "ModelNotFound",
            "message": msg,
            "finishedAt": time.time(),
            "observedGeneration": meta.get("generation"),
            "conditions": set_condition(conds, "Failed", True, "ModelNotFound", msg),
        }
    ctx = model_context(model)
    try:
        subjects, records = _subjects_and_records(body)
    except (KeyError, ValueError, ApiException) as e:
        msg = f"cannot read the subjects: {getattr(e, 'reason', None) or e}"
        return {
            "phase": "Failed",
            "reason": "InvalidSubjects",
            "message": msg,
            "finishedAt": time.time(),
            "conditions": set_condition(conds, "Failed", True, "InvalidSubjects", msg),
        }
    live = read_live(ctx.store, ctx.layout).generation
    shards = resolve_shards(ctx.store, live, subjects, records)
    hold_shards(ctx.store, ctx.layout, _holder(meta["uid"]), shards)
    kill_point("accepted")
    forget = time.time() - parse_time(meta["creationTimestamp"])
    metrics.time_to_forget.labels(ctx.namespace, ctx.name).observe(max(forget, 0.0))
    events.info("Quarantined", f"{len(shards)} shard(s) out of service")
    conds = set_condition(conds, "Accepted", True, "ModelFound", "")
    conds = set_condition(
        conds,
        "Quarantined",
        True,
        "ShardsQuarantined",
        f"shards {shards} excluded from predictions",
    )
    return {
        "phase": "Quarantined",
        "affectedShards": shards,
        "timeToForgetSeconds": round(max(forget, 0.0), 3),
        "observedGeneration": meta.get("generation"),
        "conditions": conds,
    }


def expired(body: dict[str, Any], ttl_seconds: int) -> bool:
    st = body.get("status") or {}
    return (
        st.get("phase") in FINISHED
        and time.time() - float(st.get("finishedAt", time.time())) >= ttl_seconds
    )
