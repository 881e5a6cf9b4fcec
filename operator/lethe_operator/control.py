"""The operator's control logic for ShardedModels: plain functions over the model's
service (``lethe.service.ModelService``, its one entry into the engine) and the
Kubernetes API (the request side is ``erasures``).

State lives in the objects' status and in S3, never in this process, so killing the
operator at any moment and starting it again resumes every request:
- a ShardedModel's S3 layout records its owner's UID (``OWNER.json``); a model whose
  layout belongs to another model (one it replaced, say with ``kubectl replace
  --force``) does nothing until it is given the layout with the annotation
  ``lethe.dev/adopt-layout: <old uid>``;
- a ShardedModel's status names its active batch *before* anything of the batch
  happens. The id is a hash of its request uids when it is named, and never computed
  again: every later step, a restart and a retry use ``status.activeBatch.id``, and
  once the batch's plan is in S3 the plan alone says who is in it, whatever happened
  to the requests since;
- the engine's steps are idempotent, and Ray submission ids derive from the batch id
  and the attempt number, so a job is never submitted twice;
- a batch whose retrain failed has its data erased already; it stays in
  ``status.failedBatches`` until a retry certifies it.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from lethe.core.config import ConfigError
from lethe.core.manifest import Generation
from lethe.core.plan import ErasurePlan, ErasureRequest
from lethe.erasure import batch_id
from lethe.generations import ModelNotFound
from lethe.ingest import LayoutOwned
from lethe.service import ModelService
from lethe.sources import Source, SourceError
from lethe.store import PreconditionFailed
from lethe_operator import metrics, wakeup
from lethe_operator.batches import (
    ActiveBatch,
    Facts,
    RequestPhase,
    Step,
    due_for_retry,
    failed_batches,
    next_step,
)
from lethe_operator.context import (
    GROUP,
    MODELS,
    REQUESTS,
    VERSION,
    Events,
    KeysUnavailable,
    ModelContext,
    ModelRefused,
    kill_point,
    log,
    model_context,
    patch_model_status,
    set_condition,
)
from lethe_operator.erasures import (
    Member,
    SubjectsUnreadable,
    as_request,
    holder,
    members_of,
    models_in,
    requests_in,
    settled,
    sweep_expired,
    update_target,
)
from lethe_operator.raylaunch import RayJobs
from lethe_operator.spec import ErasurePolicy

__all__ = [
    "GROUP",
    "MODELS",
    "REQUESTS",
    "VERSION",
    "reconcile_model",
    "ray_reason",
]

ADOPT_ANNOTATION = "lethe.dev/adopt-layout"
LAYOUT_OWNED = "LayoutOwnedByAnotherModel"
_claimed: set[tuple[str, str, str]] = set()  # legacy layouts claimed by this process


# -- ShardedModel ------------------------------------------------------------------------
def reconcile_model(body: dict[str, Any], events: Events) -> dict[str, Any]:
    """Ingest, train, run batches; returns the status patch for the ShardedModel."""
    status = dict(body.get("status") or {})
    conds = list(status.get("conditions", []))
    observed = body["metadata"].get("generation")
    annotations = body["metadata"].get("annotations") or {}

    def not_ready(reason: str, message: str) -> dict[str, Any]:
        status["conditions"] = set_condition(conds, "Ready", False, reason, message, observed)
        return status

    # The backlog (pending requests, nearest deadline) first: it keeps moving whatever
    # the rest of the tick meets (a refused model, a Secret gone, keys unavailable).
    requests = requests_in(body["metadata"]["namespace"])
    report_backlog(body, status, members_of(requests, body["metadata"]["name"]))
    try:  # before anything reaches the model's S3 endpoint or Ray
        ctx = model_context(body)
    except ModelRefused as e:
        return not_ready(e.reason, str(e))
    sweep_expired(requests, models_in(ctx.namespace), ctx.name)
    refused = own_layout(ctx, annotations, events)
    if refused:
        return not_ready(LAYOUT_OWNED, refused)
    try:
        keys = ctx.keys()
    except KeysUnavailable as e:
        status.pop("certificates", None)
        return not_ready(e.reason, str(e))
    status["certificates"] = {"publicKey": keys.public_pem(), "fingerprint": keys.fingerprint}
    service = ctx.service()
    try:
        live = service.live()
    except ModelNotFound:
        waiting = run_ingest(ctx, body, status, events)
        if waiting is not None:
            return not_ready(*waiting)
        live = service.live()
    # Only the committed generation counts: checkpoints a train job wrote but has not
    # committed yet (with the accuracy) do not make the model Ready.
    # A quarantined shard whose data an erasure has patched is untrained until the
    # erasure's own retrain: only an erasure batch trains it, never a train job.
    untrained = service.untrained_shards(live) - set(live.quarantined_shards)
    if untrained and not status.get("activeBatch"):
        attempt = int(status.get("trainAttempt", 0))
        launcher = ctx.ray(owners=[body])
        job = launcher.ensure(
            f"lethe-train-{ctx.uid}-{attempt}",
            ["train", "--model-prefix", ctx.layout.prefix],
        )
        if not job.done and isinstance(launcher, RayJobs):
            wakeup.watch_job(launcher, job, ctx.namespace, ctx.name)
        if job.status in ("FAILED", "STOPPED"):
            if attempt < ctx.spec.ray.max_retries:
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
    status = run_batches(ctx, body, status, requests, events)
    live = service.live()
    if release_orphaned_holds(ctx, live, requests):
        live = service.live()
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


def run_ingest(
    ctx: ModelContext, body: dict[str, Any], status: dict[str, Any], events: Events
) -> tuple[str, str] | None:
    """Have the model's dataset ingested by a Ray job (the operator never reads it);
    None once generation 1 exists, else the Ready condition's (reason, message).

    The job's attempt number is in ``status.ingest``. A dataset the job refused (a user
    error: columns, ids, an unreadable source) is tried again when the spec changes or
    after ``erasurePolicy.retryFailedAfterSeconds``; a job that failed otherwise is
    tried again at once, up to ``ray.maxRetries`` times."""
    state = dict(status.get("ingest") or {})
    attempt = int(state.get("attempt", 0))
    observed = body["metadata"].get("generation")
    failed = state.get("failed")
    if failed:
        retry_after = ctx.spec.policy.retry_failed_after_seconds
        if (
            failed.get("observedGeneration") == observed
            and time.time() < float(failed.get("at", 0)) + retry_after
        ):
            return "IngestFailed", str(failed.get("message", ""))
        attempt += 1
    try:  # what the CRD cannot say (it says nearly everything)
        cfg = ctx.config()
        cfg.validate()
        Source.parse(cfg.source_uri, cfg.source_format)
    except (ConfigError, SourceError) as e:
        return "IngestFailed", f"{type(e).__name__}: {e}"[:500]
    launcher = ctx.ray(owners=[body])
    job_id = f"lethe-ingest-{ctx.uid}-{attempt}"
    job = launcher.status(job_id)
    if job is None:  # not submitted yet: say what it ingests first
        try:  # the job reads with the cluster's keys: only what the model's keys reach
            ctx.service().request_ingest(cfg, ctx.uid)
        except SourceError as e:
            return "IngestFailed", f"{type(e).__name__}: {e}"[:500]
        job = launcher.ensure(job_id, ["ingest", "--model-prefix", ctx.layout.prefix])
    status["ingest"] = _ingest_state(attempt, job_id)
    if job.status == "SUCCEEDED":
        try:
            ctx.service().live()
        except ModelNotFound:  # succeeded without a model: someone deleted it; again
            status["ingest"] = _ingest_state(attempt + 1)
            return "Ingesting", "the ingested model disappeared; ingesting again"
        events.info("Ingested", "dataset sharded and written to S3 (generation 1)")
        return None
    if job.status in ("FAILED", "STOPPED"):
        refused = ctx.service().ingest_error()
        if refused is None and attempt < ctx.spec.ray.max_retries:
            status["ingest"] = _ingest_state(attempt + 1)
            return "Ingesting", f"ingest job {job_id} failed; trying again"
        message = refused or f"ingest job {job_id}: {ray_reason(job.message)}"
        status["ingest"] = _ingest_state(
            attempt,
            job_id,
            {"message": message[:500], "observedGeneration": observed, "at": time.time()},
        )
        events.warning("IngestFailed", message[:500])
        return "IngestFailed", message[:500]
    if isinstance(launcher, RayJobs):
        wakeup.watch_job(launcher, job, ctx.namespace, ctx.name)
    return "Ingesting", f"Ray job {job_id} shards and slices the dataset"


def _ingest_state(
    attempt: int, job: str | None = None, failed: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``status.ingest``, every field given: kopf merges a status patch, so a field
    left out would keep its old value (None deletes it)."""
    return {"attempt": attempt, "job": job, "failed": failed}


def release_orphaned_holds(
    ctx: ModelContext, live: Generation, requests: list[dict[str, Any]]
) -> bool:
    """Release quarantine holds of requests that no longer exist (deleted while this
    model was out of reach, so their finalizer could not). A request is listed again
    after ``live`` was read before its hold counts as orphaned: a request accepted
    after the tick's first listing already exists in the second."""
    held = {h for hs in live.quarantine.values() for h in hs if h.startswith(holder(""))}
    orphans = held - {holder(r["metadata"]["uid"]) for r in requests}
    if orphans:
        orphans -= {holder(r["metadata"]["uid"]) for r in requests_in(ctx.namespace)}
    if not orphans:
        return False
    ctx.service().release(orphans)
    log.info("%s: released %d orphaned quarantine hold(s)", ctx.model_id, len(orphans))
    return True


def own_layout(ctx: ModelContext, annotations: dict[str, str], events: Events) -> str | None:
    """None when the model's S3 layout is its own; otherwise why it is not.

    A layout without an owner record (made before owners were recorded) is claimed.
    One owned by another model (a model this one replaced, or another cluster's model
    on the same bucket and prefix) is taken over only when the annotation
    ``lethe.dev/adopt-layout`` names that owner's UID: the owner record is then
    rewritten with a conditional put, so two adopters cannot both win."""
    try:
        ctx.service().check_owner(ctx.uid)
    except LayoutOwned:
        pass
    else:
        claim = (ctx.store.bucket, ctx.layout.prefix, ctx.uid)
        if claim not in _claimed:
            ctx.store.put_json_if_absent(ctx.layout.owner, {"uid": ctx.uid})
            _claimed.add(claim)
        return None
    raw, etag = ctx.store.get_with_etag(ctx.layout.owner)
    owner = str(json.loads(raw).get("uid", ""))
    where = f"s3://{ctx.store.bucket}/{ctx.layout.prefix}/"
    if owner and annotations.get(ADOPT_ANNOTATION) == owner:
        record = {"uid": ctx.uid, "adopted_from": owner, "at": time.time()}
        try:
            ctx.store.put_if_match(ctx.layout.owner, json.dumps(record).encode(), etag)
        except PreconditionFailed:
            return f"{where}: its owner record changed while this model adopted it; retrying"
        events.info("LayoutAdopted", f"this model took over {where} from ShardedModel {owner}")
        return None
    return (
        f"{where} belongs to another ShardedModel (uid {owner}), for example one this model "
        "replaced. To take over its data, erasures and certificates, annotate this model: "
        f"kubectl annotate shardedmodel {ctx.name} {ADOPT_ANNOTATION}={owner} "
        "(otherwise create it with another storage.prefix)"
    )


# -- batches -----------------------------------------------------------------------------
def run_batches(
    ctx: ModelContext,
    body: dict[str, Any],
    status: dict[str, Any],
    requests: list[dict[str, Any]],
    events: Events,
) -> dict[str, Any]:
    """One step of the model's batch state machine (called by a timer); ``requests``:
    the namespace's ErasureRequests."""
    policy = ctx.spec.policy
    members = members_of(requests, ctx.name)
    if status.get("activeBatch"):
        return advance_batch(ctx, body, status, members, events)
    failed = failed_batches(status)
    retry = due_for_retry(failed, policy.retry_failed_after_seconds, time.time())
    if retry is not None:
        status["failedBatches"] = [b.to_status() for b in failed if b.id != retry.id]
        active = retry.retry(time.time())
        status["activeBatch"] = active.to_status()
        events.info("BatchRetry", f"retraining a failed batch again (attempt {active.attempt + 1})")
        return status
    waiting = [
        m
        for m in members
        if m.target.get("phase") == "Quarantined"
        and not m.target.get("batchId")
        and not m.deleting  # deleted before its batch: cancelled
    ]
    if not waiting:
        return status
    oldest = min(m.created for m in waiting)
    window, size = policy.batch_window_seconds, policy.max_batch_size
    if len(waiting) < size and time.time() - oldest < window:
        return status
    chosen = sorted(waiting, key=lambda m: (m.created, m.name))[:size]
    readable = readable_requests(ctx, chosen, events)
    if not readable:
        return status
    # Name the batch in status first, written before anything of it happens: a restart
    # continues exactly this batch, and nothing ever computes its id again. Then take
    # it as far as it goes in this same tick (a tick of its own cost a reconcile's
    # reads again, about 0.3 s, before the plan).
    status["activeBatch"] = ActiveBatch(
        id=batch_id(ctx.model_id, [r for _, r in readable]),
        requests=tuple(m.name for m, _ in readable),
        requested_at=min(m.created for m, _ in readable),
        started=time.time(),
    ).to_status()
    patch_model_status(ctx.namespace, ctx.name, {"activeBatch": status["activeBatch"]})
    events.info("BatchFormed", f"{len(readable)} request(s) in one batch")
    return advance_batch(ctx, body, status, members, events)


def readable_requests(
    ctx: ModelContext, members: list[Member], events: Events
) -> list[tuple[Member, ErasureRequest]]:
    """The members whose ids can be read, exactly as they were accepted. The others
    fail, each with its reason, and release their quarantine; the model and the other
    members carry on: a ``secretRef`` Secret deleted since (SecretNotFound), no longer
    readable (SecretForbidden) or holding other ids than it did then (SecretChanged).
    Members that failed already are left out."""
    out = []
    for m in members:
        if m.target.get("phase") == "Failed":
            continue
        try:
            out.append((m, as_request(m.body)))
            continue
        except SubjectsUnreadable as e:
            reason, msg = e.reason, str(e)
        except (KeyError, ValueError) as e:
            reason, msg = "InvalidSubjects", f"cannot read the subjects: {e}"
        # (any other ApiException: the API is unwell; the tick is tried again)
        ctx.service().release({holder(m.uid)})
        update_target(
            m,
            ctx.name,
            {"phase": "Failed", "reason": reason, "message": msg, "finishedAt": time.time()},
            events,
        )
        metrics.requests_total.labels(ctx.namespace, ctx.name, "failed").inc()
    return out


def report_backlog(body: dict[str, Any], status: dict[str, Any], members: list[Member]) -> None:
    """Pending requests and the nearest deadline of the ShardedModel ``body``: every
    request whose erasure is not certified yet, failed retrains included, and members
    of the model's batches that were deleted before their batch was certified. Reads
    only the API's objects (never S3 or a Secret), so it cannot fail with them."""
    ns, model = body["metadata"]["namespace"], body["metadata"]["name"]
    deadline = ErasurePolicy.parse(body["spec"]["erasurePolicy"]).deadline_seconds
    since = {m.name: m.created for m in members if not settled(m.target)}
    known = {m.name for m in members}
    for b in [status.get("activeBatch") or {}, *status.get("failedBatches", [])]:
        at = float(b.get("requestedAt") or b.get("started") or time.time())
        for request in b.get("requests", []):
            if request not in known:
                since.setdefault(request, at)
    metrics.pending.labels(ns, model).set(len(since))
    # nothing pending: a request arriving now would have the whole deadline (never stale)
    left = min((t + deadline - time.time() for t in since.values()), default=float(deadline))
    metrics.deadline_left.labels(ns, model).set(left)


def advance_batch(
    ctx: ModelContext,
    body: dict[str, Any],
    status: dict[str, Any],
    members: list[Member],
    events: Events,
) -> dict[str, Any]:
    """Take the active batch as far as it goes now: ``batches.next_step`` decides each
    step from the facts (S3, Ray), this function performs it and gathers the facts
    again, until the batch waits (its retrain runs, a retry backs off) or closes."""
    batch = ActiveBatch.from_status(status["activeBatch"])
    service = ctx.service()
    kill_point("batched")
    result = service.result(batch.id)
    facts = Facts(certified=result is not None)
    plan = None
    batch_members: list[Member] = []
    if result is None:
        plan = _plan(ctx, service, batch, members, events)
        if plan is None:  # every request gone before it was planned
            status.pop("activeBatch", None)
            return status
        in_plan = {r.uid for r in plan.requests}
        batch_members = [m for m in members if m.uid in in_plan]
        service.release({holder(uid) for uid in in_plan})
        facts = _progress(service, plan, facts)
    max_retries = ctx.spec.ray.max_retries
    job_message = ""
    while (step := next_step(batch, facts, time.time(), max_retries)) is not Step.REPORT:
        assert plan is not None  # not certified: planned above
        if step is Step.CERTIFY:
            _data_erased(ctx, batch, batch_members, events)
            # The job commits the shards itself, so "committed" is usually what a
            # step sees first, before Ray reports the job's end.
            kill_point("retrained")
            if metrics.first_time("retrain-duration", ctx.namespace, ctx.name, batch.id):
                metrics.retrain_duration.labels(ctx.namespace, ctx.name).observe(
                    time.time() - batch.started
                )
            t0 = time.time()
            result = service.finish(plan)
            log.debug("batch %s certified in %.3f s", batch.id, time.time() - t0)
            kill_point("certified")
            facts = replace(facts, certified=True)
        elif step is Step.BACK_OFF:
            if facts.data_erased:
                _data_erased(ctx, batch, batch_members, events)
            return status
        elif step is Step.SUBMIT:
            launcher = ctx.ray(owners=[m.body for m in batch_members] or [body])
            job = launcher.ensure(
                batch.job_id,
                ["retrain", "--model-prefix", ctx.layout.prefix, "--batch", batch.id],
            )
            log.debug("batch %s: job %s %s (%s)", batch.id, job.submission_id, job.status, job.via)
            kill_point("submitted")
            for m in batch_members:  # the batch and its job, before any phase of theirs
                _set_target(ctx, m, {"batchId": batch.id, "rayJobId": job.submission_id}, events)
            if not job.done and isinstance(launcher, RayJobs):
                wakeup.watch_job(launcher, job, ctx.namespace, ctx.name)
            facts = replace(_progress(service, plan, facts), job=job.status)
            job_message = job.message
        elif step is Step.RETRY:
            events.warning("RetrainRetry", f"retrain {batch.job_id} failed; retrying")
            status["activeBatch"] = batch.retried(time.time()).to_status()
            return status
        elif step is Step.FAIL:
            erased = (
                "data erased; shards stay quarantined until a later retrain succeeds"
                if facts.data_erased
                else "the data is not erased yet either: the batch is retried later"
            )
            _fail(
                ctx,
                batch_members,
                events,
                "RetrainFailed",
                f"retrain {batch.job_id}: {ray_reason(job_message)} ({erased})",
            )
            events.warning("RetrainFailed", f"batch failed after {batch.tries + 1} attempt(s)")
            status.pop("activeBatch", None)
            status["failedBatches"] = [
                *status.get("failedBatches", []),
                batch.failed(time.time()).to_status(),
            ]
            return status
        else:  # Step.WAIT: the job runs; its progress is in S3
            if facts.data_erased:
                _data_erased(ctx, batch, batch_members, events)
                _mark_retraining(ctx, batch, batch_members, events)
            status["activeBatch"] = batch.to_status()
            return status
    assert result is not None
    outcomes = result.get("outcomes") or {}
    _succeed(ctx, batch.id, [m for m in members if m.uid in outcomes], result, events)
    events.info("BatchSucceeded", f"{len(outcomes)} request(s) erased, retrained, certified")
    status.pop("activeBatch", None)
    return status


def _plan(
    ctx: ModelContext,
    service: ModelService,
    batch: ActiveBatch,
    members: list[Member],
    events: Events,
) -> ErasurePlan | None:
    """The batch's plan: made now from its requests, its shards quarantined and its
    erase order written for the job (which patches and purges), or read back. None
    when every request of the batch was deleted or unreadable before it was planned."""
    if service.plan_exists(batch.id):
        reqs: list[ErasureRequest] = []  # the plan says who is in the batch
    else:
        named = [m for m in members if m.name in batch.requests]
        reqs = [r for _, r in readable_requests(ctx, named, events)]
        if not reqs:
            events.warning(
                "BatchDropped",
                "every request of the batch was deleted or unreadable before it was "
                "planned: nothing to erase",
            )
            return None
    t0 = time.time()
    plan = service.start_batch(batch.id, reqs, batch.requested_at)
    log.debug("batch %s planned in %.3f s", batch.id, time.time() - t0)
    return plan


def _progress(service: ModelService, plan: ErasurePlan, facts: Facts) -> Facts:
    """What S3 says of the batch's job: its data erased, its shards committed."""
    committed, data_erased = service.progress(plan)
    return replace(facts, committed=committed, data_erased=data_erased)


def _set_target(ctx: ModelContext, m: Member, change: dict[str, Any], events: Events) -> None:
    """Write the fields of ``change`` that differ from the request's target."""
    change = {k: v for k, v in change.items() if m.target.get(k) != v}
    if change:
        update_target(m, ctx.name, change, events)


def _data_erased(
    ctx: ModelContext, batch: ActiveBatch, members: list[Member], events: Events
) -> None:
    """The batch's job erased its rows from every object version: say so on its
    requests (one status write per request that does not say it yet)."""
    kill_point("erased")
    for m in members:
        if m.target.get("phase") in (RequestPhase.QUARANTINED, RequestPhase.PENDING, None):
            change = {"phase": RequestPhase.DATA_ERASED, "batchId": batch.id}
            _set_target(ctx, m, change, events)


def _mark_retraining(
    ctx: ModelContext, batch: ActiveBatch, members: list[Member], events: Events
) -> None:
    """The batch's requests are Retraining under this attempt's run (a request of a
    failed batch that is retried is not failed any more)."""
    for m in members:
        t = m.target
        if t.get("phase") == RequestPhase.RETRAINING and t.get("rayJobId") == batch.job_id:
            continue
        update_target(
            m,
            ctx.name,
            {
                "phase": RequestPhase.RETRAINING,
                "rayJobId": batch.job_id,
                "reason": None,
                "message": None,
                "finishedAt": None,
            },
            events,
        )


def ray_reason(message: str, limit: int = 600) -> str:
    """Ray's message for a status: its first line (what failed) and the end of the
    rest (the job's last log lines: the error that ended it), whitespace collapsed."""
    first, _, rest = message.strip().partition("\n")
    first, rest = " ".join(first.split())[:150], " ".join(rest.split())
    tail = limit - len(first) - 5
    return first if not rest else f"{first} ... {rest[-tail:]}"


def _fail(
    ctx: ModelContext, members: list[Member], events: Events, reason: str, message: str
) -> None:
    for m in members:
        if m.target.get("phase") == "Failed":
            continue  # failed (and counted) by a tick whose model status patch was lost
        update_target(
            m,
            ctx.name,
            {"phase": "Failed", "reason": reason, "message": message, "finishedAt": time.time()},
            events,
        )
        metrics.requests_total.labels(ctx.namespace, ctx.name, "failed").inc()


def outcome_message(outcome: dict[str, Any]) -> str:
    """A target's outcome in plain words: counts only, never an id."""
    subjects, records = (
        int(outcome.get("subjects_unmatched", 0)),
        int(outcome.get("records_unmatched", 0)),
    )
    unmatched = " and ".join(
        part
        for n, part in ((subjects, f"{subjects} subject(s)"), (records, f"{records} record id(s)"))
        if n
    )
    if outcome.get("outcome") == "NothingHeld":
        if not unmatched:
            return "nothing this request names was held by this model: nothing was erased"
        return (
            f"none of the {unmatched} named by this request was held by this model: "
            "nothing was erased or retrained"
        )
    erased = f"{int(outcome.get('records_erased', 0))} record(s) erased and certified"
    return (
        f"{erased}; {unmatched} named by this request matched nothing here" if unmatched else erased
    )


def count_batch(
    namespace: str, model: str, batch: str, result: dict[str, Any], reported: bool
) -> bool:
    """Add a certified batch's cost and work to the counters, once: not when
    ``reported`` (status says a process reported the batch already: every member of
    it still here is Succeeded), and only the first time this process counts ``batch``
    (a tick repeated because its status patch was lost). True when it counted."""
    if reported or not metrics.first_time("batch", namespace, model, batch):
        return False
    cost = result["cost"]
    labels = (namespace, model)
    metrics.cpu_seconds.labels(*labels).inc(cost["cpu_seconds"])
    metrics.gpu_seconds.labels(*labels).inc(cost["gpu_seconds"])
    metrics.cost_usd.labels(*labels).inc(cost["usd"])
    metrics.full_retrain_usd.labels(*labels).inc(cost["full_retrain_usd"])
    metrics.shards_retrained.labels(*labels).inc(result["shards_retrained"])
    metrics.slices_retrained.labels(*labels).inc(
        sum(r["slices_trained"] for r in result["shard_runs"])
    )
    metrics.records_erased.labels(*labels).inc(result["records_erased"])
    return True


def _succeed(
    ctx: ModelContext, batch: str, members: list[Member], result: dict[str, Any], events: Events
) -> None:
    """Report a certified batch: its cost counted once (``count_batch``), then each
    member Succeeded, its own latency and count added as its target turns Succeeded
    (a member already Succeeded was counted by whoever wrote that)."""
    cost = result["cost"]
    labels = (ctx.namespace, ctx.name)
    reported = bool(members) and all(m.target.get("phase") == "Succeeded" for m in members)
    count_batch(ctx.namespace, ctx.name, batch, result, reported)
    share = 1.0 / max(1, int(result.get("requests", len(members))))
    for m in members:
        if m.target.get("phase") == "Succeeded":
            continue
        outcome = result["outcomes"][m.uid]
        nothing = outcome["outcome"] == "NothingHeld"
        message = outcome_message(outcome)
        lat = time.time() - m.created
        update_target(
            m,
            ctx.name,
            {
                "phase": "Succeeded",
                "reason": "NothingHeld" if nothing else "Certified",
                "message": message,
                "outcome": outcome["outcome"],
                "certificate": store_uri(ctx, outcome.get("certificate", "")),
                "affectedRecords": int(outcome.get("records_erased", 0)),
                "subjectsUnmatched": int(outcome.get("subjects_unmatched", 0)),
                "recordsUnmatched": int(outcome.get("records_unmatched", 0)),
                "latencySeconds": round(lat, 3),
                "finishedAt": time.time(),
                "cost": {
                    "cpuSeconds": cost["cpu_seconds"] * share,
                    "gpuSeconds": cost["gpu_seconds"] * share,
                    "usd": cost["usd"] * share,
                    "fullRetrainUSD": cost["full_retrain_usd"],
                },
            },
            events,
        )
        if nothing:
            events.about(m.body).info("NothingHeld", message)
        metrics.latency.labels(*labels).observe(lat)
        metrics.requests_total.labels(*labels, "succeeded").inc()
        kill_point("reported")


def store_uri(ctx: ModelContext, key: str) -> str:
    return f"s3://{ctx.store.bucket}/{key}" if key else ""
