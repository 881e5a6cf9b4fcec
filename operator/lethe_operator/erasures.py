"""ErasureRequests: their targets, acceptance, deletion (the finalizer) and TTL.

A request names its models in one of three ways: ``spec.modelRef`` (one model),
``spec.modelSelector`` (a label selector) or ``spec.allModels: true`` (every
ShardedModel of its namespace). The models are resolved once, when the request is
accepted, and frozen into ``status.targets``: one entry per model, each with its own
phase, batch, certificate and outcome. Each model's own tick (``control``) moves its
target on; the request's top-level status is derived from the targets here
(``aggregate``), in one place:

- phase: Succeeded when every target is, Failed when any is, otherwise the least
  advanced target's phase;
- with a single target (every modelRef request) its batchId, affectedShards,
  certificate, rayJobId, outcome and unmatched counts are repeated at the top level.

Targets are written with the request's resourceVersion (optimistic concurrency), so
two models' ticks never lose each other's update.

Deleting a request (a kopf finalizer, ``forget_request``):
- before its batch is named: the request is *cancelled*; its quarantine holds are
  released and nothing of it is erased;
- after its batch is named but before the batch's plan exists: the deletion waits for
  the plan; the request's rows are then erased and its certificate written with the
  rest of the batch, as if it had stayed;
- once its batch has a plan: it goes at once (the plan in S3 carries it to the end).
The TTL deletes only settled requests (certified, or failed for a reason that left
nothing in a batch), through the same finalizer; the models' ticks sweep it
(``sweep_expired``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kubernetes.client.rest import ApiException

from lethe.core.plan import ErasureRequest, parse_id_lines
from lethe.errors import TransientError, UserError
from lethe.generations import ModelNotFound
from lethe.ingest import LayoutOwned
from lethe_operator import metrics
from lethe_operator.batches import RequestPhase
from lethe_operator.context import (
    GROUP,
    MODELS,
    REQUESTS,
    VERSION,
    Events,
    ModelRefused,
    SecretUnreadable,
    get_model,
    kill_point,
    model_context,
    parse_time,
    read_secret,
    secret_entries,
    set_condition,
)
from lethe_operator.kubeapi import custom_objects
from lethe_operator.spec import ErasurePolicy

PHASES = RequestPhase.progress()  # in order
FINISHED = RequestPhase.finished()
DEFAULT_TTL_SECONDS = 86400
# repeated at the top level of a request with a single target
MIRRORED = (
    "batchId",
    "affectedShards",
    "certificate",
    "rayJobId",
    "outcome",
    "subjectsUnmatched",
    "recordsUnmatched",
)


class NotReady(TransientError):
    """A target model cannot take the request yet (kopf retries the handler later)."""


class BatchNotPlanned(TransientError):
    """The deleted request's batch is named but not planned yet: the deletion waits."""


class SubjectsUnreadable(UserError):
    """A request's ids cannot be read (or no longer match what was accepted);
    ``reason`` is the request's failure reason. The message names no id."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def holder(uid: str) -> str:
    """The name a request's quarantine hold goes by, before its batch holds the shards."""
    return f"req-{uid}"


# -- targets -----------------------------------------------------------------------------
def selector_string(selector: dict[str, Any]) -> str:
    """A LabelSelector (matchLabels, matchExpressions) as the API's selector string."""
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], ",".join(e.get("values") or [])
        parts.append(
            {
                "In": f"{key} in ({values})",
                "NotIn": f"{key} notin ({values})",
                "Exists": key,
                "DoesNotExist": f"!{key}",
            }[op]
        )
    return ",".join(parts)


def resolve_models(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The ShardedModels the request's spec names, as they are now (sorted by name)."""
    ns, spec = body["metadata"]["namespace"], body["spec"]
    if spec.get("modelRef"):
        model = get_model(ns, spec["modelRef"]["name"])
        return [model] if model else []
    selector = "" if spec.get("allModels") else selector_string(spec.get("modelSelector") or {})
    items = custom_objects().list_namespaced_custom_object(
        GROUP, VERSION, ns, MODELS, label_selector=selector
    )["items"]
    return sorted(items, key=lambda m: m["metadata"]["name"])


# what a request accepted by an operator from before targets kept at its top level
LEGACY_TARGET_FIELDS = (
    "phase",
    "reason",
    "message",
    "batchId",
    "affectedShards",
    "rayJobId",
    "certificate",
    "affectedRecords",
    "timeToForgetSeconds",
    "latencySeconds",
    "finishedAt",
    "cost",
)


def targets_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    st = body.get("status") or {}
    ref = (body.get("spec") or {}).get("modelRef")
    if "targets" not in st and st.get("phase") and ref:
        # accepted before targets existed (an upgraded operator): its one target is the
        # top level; the first update writes it out as status.targets
        return [{"model": ref["name"], **{k: st[k] for k in LEGACY_TARGET_FIELDS if k in st}}]
    return list(st.get("targets") or [])


def target_of(body: dict[str, Any], model: str) -> dict[str, Any] | None:
    return next((t for t in targets_of(body) if t.get("model") == model), None)


def in_batch(target: dict[str, Any]) -> bool:
    """Whether the target's batch has a plan (its batchId is written after the plan)."""
    return bool(target.get("batchId"))


def settled(target: dict[str, Any]) -> bool:
    """Certified, or failed for good with nothing of it in a batch. A target that
    failed its retrain is not settled: its batch is retried until it is certified."""
    return target.get("phase") == "Succeeded" or (
        target.get("phase") == "Failed" and not in_batch(target)
    )


def _past_quarantine(target: dict[str, Any]) -> bool:
    return target.get("phase") in ("DataErased", "Retraining", "Succeeded") or in_batch(target)


def aggregate(status: dict[str, Any], targets: list[dict[str, Any]]) -> dict[str, Any]:
    """The request's top-level status derived from its targets: a merge patch (None
    removes a field). ``status`` is the current status (for the conditions' times)."""
    if not targets:
        return {}
    phases = [t["phase"] for t in targets]
    if "Failed" in phases:
        phase = "Failed"
    elif all(p == "Succeeded" for p in phases):
        phase = "Succeeded"
    else:
        phase = min(phases, key=PHASES.index)
    many = len(targets) > 1
    reason = message = None
    failed = [t for t in targets if t["phase"] == "Failed"]
    if failed:
        f = failed[0]
        reason = f.get("reason")
        message = (f"ShardedModel {f['model']}: " if many else "") + str(f.get("message") or "")
    elif phase == "Succeeded":
        nothing = all(t.get("outcome") == "NothingHeld" for t in targets)
        reason = "NothingHeld" if nothing else "Certified"
        if not many:
            message = targets[0].get("message") or None
        elif nothing:
            message = f"none of the {len(targets)} models held anything this request names"
        else:
            message = f"erased and certified in each of {len(targets)} models"
    out: dict[str, Any] = {
        "phase": phase,
        "reason": reason,
        "message": message,
        "models": ",".join(t["model"] for t in targets),
        "affectedRecords": _sum(targets, "affectedRecords"),
        "timeToForgetSeconds": _max(targets, "timeToForgetSeconds"),
        "latencySeconds": _max(targets, "latencySeconds") if phase == "Succeeded" else None,
        "finishedAt": _max(targets, "finishedAt") if phase in FINISHED else None,
        "cost": _cost(targets),
        "conditions": _conditions(status.get("conditions") or [], targets, phase, reason, message),
    }
    for key in MIRRORED:
        out[key] = None if many else targets[0].get(key)
    return out


def _sum(targets: list[dict[str, Any]], key: str) -> int | None:
    values = [int(t[key]) for t in targets if t.get(key) is not None]
    return sum(values) if values else None


def _max(targets: list[dict[str, Any]], key: str) -> float | None:
    values = [float(t[key]) for t in targets if t.get(key) is not None]
    return max(values) if values else None


def _cost(targets: list[dict[str, Any]]) -> dict[str, float] | None:
    costs = [t["cost"] for t in targets if t.get("cost")]
    if not costs:
        return None
    keys = ("cpuSeconds", "gpuSeconds", "usd", "fullRetrainUSD")
    return {k: sum(float(c.get(k, 0.0)) for c in costs) for k in keys}


def _conditions(
    conds: list[dict[str, Any]],
    targets: list[dict[str, Any]],
    phase: str,
    reason: str | None,
    message: str | None,
) -> list[dict[str, Any]]:
    if all(_past_quarantine(t) for t in targets):
        conds = set_condition(
            conds, "DataErased", True, "Patched", "records removed from the training data"
        )
    if phase == "Succeeded":
        nothing = reason == "NothingHeld"
        conds = set_condition(
            conds, "Retrained", True, "NothingToRetrain" if nothing else "Committed", ""
        )
        conds = set_condition(conds, "Succeeded", True, reason or "Certified", message or "")
    if phase == "Failed":
        conds = set_condition(conds, "Failed", True, reason or "Failed", message or "")
    elif any(c["type"] == "Failed" and c["status"] == "True" for c in conds):
        # an earlier attempt had failed; a retry is running or has certified it
        after = "Retrained" if phase == "Succeeded" else "Retrying"
        conds = set_condition(conds, "Failed", False, after, "")
    return conds


# -- the members of a model's batches ----------------------------------------------------
@dataclass
class Member:
    """An ErasureRequest as one model sees it: the request and its target there."""

    body: dict[str, Any]
    target: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def uid(self) -> str:
        return str(self.body["metadata"]["uid"])

    @property
    def created(self) -> float:
        return parse_time(self.body["metadata"]["creationTimestamp"])

    @property
    def deleting(self) -> bool:
        return bool(self.body["metadata"].get("deletionTimestamp"))


def requests_in(namespace: str) -> list[dict[str, Any]]:
    return list(
        custom_objects().list_namespaced_custom_object(GROUP, VERSION, namespace, REQUESTS)["items"]
    )


def models_in(namespace: str) -> list[dict[str, Any]]:
    return list(
        custom_objects().list_namespaced_custom_object(GROUP, VERSION, namespace, MODELS)["items"]
    )


def members_of(requests: list[dict[str, Any]], model: str) -> list[Member]:
    """The accepted requests (of one namespace) that target ``model``."""
    out = []
    for r in requests:
        t = target_of(r, model)
        if t is not None:
            out.append(Member(r, t))
    return out


def update_target(
    member: Member, model: str, change: dict[str, Any], events: Events | None = None
) -> None:
    """Apply ``change`` (None removes a field) to the request's target for ``model`` and
    re-derive the top level; retried on a conflicting write. A request deleted since
    is left alone (its certificate, if any, is in S3). When the request's phase
    changes, ``events`` gets one Event about the request."""
    meta = member.body["metadata"]
    api = custom_objects()
    for _ in range(10):
        try:
            body = api.get_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], REQUESTS, meta["name"]
            )
        except ApiException as e:
            if e.status == 404:
                return
            raise
        if body["metadata"]["uid"] != meta["uid"]:
            return  # another request of the same name
        status = dict(body.get("status") or {})
        targets = [dict(t) for t in targets_of(body)]
        target = next((t for t in targets if t.get("model") == model), None)
        if target is None:
            return
        for key, value in change.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
        patch = {
            "metadata": {"resourceVersion": body["metadata"]["resourceVersion"]},
            "status": {**aggregate(status, targets), "targets": targets},
        }
        try:
            api.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], REQUESTS, meta["name"], patch
            )
        except ApiException as e:
            if e.status in (404, 409):
                continue  # changed meanwhile (or gone): read it again
            raise
        member.body = {**body, "status": {**status, **patch["status"]}}
        member.target = target
        if events is not None:
            report_phase(events.about(member.body), status, patch["status"], model)
        return
    raise TransientError(f"ErasureRequest {meta['name']}: status kept changing under the update")


def report_phase(events: Events, old: dict[str, Any], new: dict[str, Any], model: str) -> None:
    """One Event when a request's phase changed (``old``/``new``: its status before and
    the patch written); Failed is a Warning with the failure's reason."""
    before, after = old.get("phase") or "Pending", new.get("phase")
    if not after or after == before:
        return
    text = f"phase {before} -> {after} (ShardedModel {model})"
    if after == "Failed":
        why = str(new.get("message") or "")
        events.warning(str(new.get("reason") or "Failed"), f"{text}: {why}"[:1000] if why else text)
    else:
        events.info(after, text)


def ids_digest(ids: Iterable[str], domain: str) -> str:
    """A sha256 digest of a set of ids (order and repeats ignored) under ``domain``."""
    h = hashlib.sha256(domain.encode() + b"\n")
    for i in sorted(set(ids)):
        h.update(i.encode() + b"\n")
    return f"sha256:{h.hexdigest()}"


def secret_digest(body: dict[str, Any], subjects: Iterable[str]) -> str:
    """What a ``secretRef`` request's ids are frozen as when it is accepted: a digest
    salted with the request's uid (the same list in two requests digests differently)."""
    return ids_digest(subjects, f"lethe.dev/secret-ids/v1/{body['metadata']['uid']}")


def frozen_digest(body: dict[str, Any]) -> str | None:
    """The digest a ``secretRef`` request's ids were frozen as at acceptance
    (``status.idsDigest``; None: not accepted yet)."""
    digest = (body.get("status") or {}).get("idsDigest")
    return str(digest) if digest else None


def read_secret_ids(body: dict[str, Any], frozen: bool) -> list[str]:
    """The subject ids in a request's ``secretRef`` Secret. Raises SubjectsUnreadable
    (SecretNotFound, SecretForbidden, SecretChanged when ``frozen``, else
    InvalidSubjects); an API error that may pass (5xx) is raised as it is."""
    ref = body["spec"]["secretRef"]
    ns, name, key = body["metadata"]["namespace"], ref["name"], ref.get("key", "subjects")
    try:
        entries = secret_entries(read_secret(ns, name, "spec.secretRef"))
    except SecretUnreadable as e:
        raise SubjectsUnreadable(f"Secret{e.kind}", str(e)) from None
    reason = "SecretChanged" if frozen else "InvalidSubjects"
    if key not in entries:
        raise SubjectsUnreadable(reason, f"cannot read the subjects: Secret {name} has no {key}")
    try:
        return parse_id_lines(entries[key].decode(), f"Secret {name}")
    except UnicodeDecodeError:
        raise SubjectsUnreadable(
            reason, f"cannot read the subjects: Secret {name}: key {key} is not UTF-8 text"
        ) from None
    except ValueError as e:
        raise SubjectsUnreadable(reason, f"cannot read the subjects: {e}") from None


def subjects_and_records(body: dict[str, Any]) -> tuple[list[str], list[str]]:
    """A request's ids. A ``secretRef`` request accepted with its ids frozen must still
    find exactly those ids in its Secret (raises SubjectsUnreadable: SecretChanged)."""
    spec = body["spec"]
    if spec.get("secretRef"):
        want = frozen_digest(body)
        subjects = read_secret_ids(body, frozen=want is not None)
        if want is not None and secret_digest(body, subjects) != want:
            raise SubjectsUnreadable(
                "SecretChanged",
                f"Secret {spec['secretRef']['name']} changed after the request was accepted "
                "(its ids are frozen then): nothing of this request is erased here; "
                "create a new ErasureRequest for the new list",
            )
        return subjects, []
    return list(spec.get("subjects", [])), list(spec.get("recordIds", []))


def as_request(body: dict[str, Any]) -> ErasureRequest:
    subjects, records = subjects_and_records(body)
    return ErasureRequest(body["metadata"]["uid"], tuple(subjects), tuple(records))


# -- acceptance --------------------------------------------------------------------------
def _failed(status: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    """Failed before any model held anything of it (so no target, and no batch)."""
    return {
        "targets": [],
        "phase": "Failed",
        "reason": reason,
        "message": message,
        "finishedAt": time.time(),
        "conditions": set_condition(
            status.get("conditions") or [], "Failed", True, reason, message
        ),
    }


def accept_request(body: dict[str, Any], events: Events) -> dict[str, Any]:
    """Resolve the target models, quarantine the request's shards in each at once;
    returns the status patch (empty when the request was accepted before)."""
    meta, spec = body["metadata"], body["spec"]
    status = dict(body.get("status") or {})
    if status.get("phase"):
        return {}  # accepted already (a restart): nothing to redo, nothing to overwrite
    ns = meta["namespace"]
    models = resolve_models(body)
    if not models:
        if spec.get("modelRef"):
            name = spec["modelRef"]["name"]
            msg = f"ShardedModel {name} not found in {ns}"
            events.warning("ModelNotFound", msg)
            if metrics.first_time("accept-failed", meta["uid"]):
                metrics.requests_total.labels(ns, name, "failed").inc()
            return {
                **_failed(status, "ModelNotFound", msg),
                "observedGeneration": meta.get("generation"),
            }
        which = "in the namespace" if spec.get("allModels") else "matches spec.modelSelector"
        msg = f"no ShardedModel {which} ({ns})"
        events.warning("NoModelMatched", msg)
        return {
            **_failed(status, "NoModelMatched", msg),
            "observedGeneration": meta.get("generation"),
        }
    digest = None
    try:
        if spec.get("secretRef"):
            subjects, records = read_secret_ids(body, frozen=False), []
            digest = secret_digest(body, subjects)  # the list is frozen from here on
        else:
            subjects, records = subjects_and_records(body)
    except SubjectsUnreadable as e:
        events.warning(e.reason, str(e))
        return {**_failed(status, e.reason, str(e)), "observedGeneration": meta.get("generation")}
    except ApiException as e:
        raise NotReady(f"cannot read Secret {spec['secretRef']['name']}: {e.reason}") from None
    created = parse_time(meta["creationTimestamp"])
    targets = []
    for model in models:
        try:
            ctx = model_context(model)
        except (ModelRefused, ApiException) as e:
            why = e if isinstance(e, ModelRefused) else e.reason
            raise NotReady(
                f"ShardedModel {model['metadata']['name']} cannot take requests ({why})"
            ) from None
        service = ctx.service()
        try:
            service.check_owner(ctx.uid)
            live = service.live()
        except LayoutOwned:
            raise NotReady(
                f"ShardedModel {ctx.name}: its S3 layout belongs to another model "
                "(see the model's Ready condition)"
            ) from None
        except ModelNotFound:
            raise NotReady(f"ShardedModel {ctx.name} has no data in S3 yet") from None
        shards = service.shards_of(live, subjects, records)
        service.hold(holder(meta["uid"]), shards)
        forget = max(time.time() - created, 0.0)
        if metrics.first_time("forget", meta["uid"], ctx.name):  # a retry observes nothing
            metrics.time_to_forget.labels(ns, ctx.name).observe(forget)
        targets.append(
            {
                "model": ctx.name,
                "phase": "Quarantined",
                "affectedShards": shards,
                "timeToForgetSeconds": round(forget, 3),
            }
        )
    kill_point("accepted")
    n_shards = sum(len(t["affectedShards"]) for t in targets)
    where = f" in {len(targets)} models" if len(targets) > 1 else ""
    events.info("Quarantined", f"{n_shards} shard(s) out of service{where}")
    conds = set_condition(
        status.get("conditions") or [],
        "Accepted",
        True,
        "ModelFound" if len(targets) == 1 else "ModelsFound",
        f"{len(targets)} model(s)" + ("; ids frozen (status.idsDigest)" if digest else ""),
    )
    conds = set_condition(
        conds,
        "Quarantined",
        True,
        "ShardsQuarantined",
        f"shards {targets[0]['affectedShards']} excluded from predictions"
        if len(targets) == 1
        else f"{n_shards} shard(s) excluded from predictions{where}",
    )
    out = aggregate({"conditions": conds}, targets)
    return {
        **{k: v for k, v in out.items() if v is not None},
        **({"idsDigest": digest} if digest else {}),
        "targets": targets,
        "observedGeneration": meta.get("generation"),
    }


# -- deletion ----------------------------------------------------------------------------
def forget_request(body: dict[str, Any], events: Events) -> None:
    """The finalizer: release what the request holds, or wait for its batch's plan
    (raises BatchNotPlanned). See the module's docstring for what deleting means."""
    meta = body["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
    recorded = {t["model"]: t for t in targets_of(body)}
    # Not accepted yet (or killed between holding and writing the status): whatever
    # its spec names now may hold its shards.
    names = sorted(recorded) or [m["metadata"]["name"] for m in resolve_models(body)]
    cancelled = 0
    for model_name in names:
        model = get_model(ns, model_name)
        if model is None:
            continue
        target = recorded.get(model_name) or {}
        active = (model.get("status") or {}).get("activeBatch") or {}
        try:
            ctx = model_context(model)
        except ModelRefused:
            # Out of reach (its credentials or Ray address are refused now): the model's
            # own tick releases the hold once it is allowed again (orphaned holds).
            continue
        if not in_batch(target):
            if name in active.get("requests", []):
                if not ctx.service().plan_exists(active["id"]):
                    raise BatchNotPlanned(
                        f"ShardedModel {model_name}: the request's batch is named and "
                        "not planned yet; its deletion waits for the plan"
                    )
            elif not settled(target):
                cancelled += 1
        ctx.service().release({holder(uid)})
    if cancelled:
        events.info(
            "Cancelled",
            f"deleted before its batch was named: nothing erased in {cancelled} model(s), "
            "quarantine released",
        )


# -- TTL ---------------------------------------------------------------------------------
# The TTL is swept by the models' ticks, not by a timer on each request: a kopf timer
# that deletes its own object can leave kopf's finalizer on it for good (kopf #1305).
def finished_for_good(body: dict[str, Any]) -> bool:
    """Finished, and every target settled: nothing of it is waiting for a retry."""
    st = body.get("status") or {}
    return st.get("phase") in FINISHED and all(settled(t) for t in targets_of(body))


def expired(body: dict[str, Any], ttl: int) -> bool:
    st = body.get("status") or {}
    return finished_for_good(body) and time.time() - float(st.get("finishedAt", time.time())) >= ttl


def sweep_expired(
    requests: list[dict[str, Any]], models: list[dict[str, Any]], sweeper: str
) -> int:
    """Delete the expired requests of a namespace that the model ``sweeper`` looks after:
    those whose first target model (by name) it is, and, when none of a request's
    models exists (ModelNotFound, NoModelMatched, models deleted since), the namespace's
    first model. The TTL is the shortest ``ttlSecondsAfterFinished`` of the request's
    models (it holds the ids it names: the strictest policy wins), a day without one.
    Deletion goes through the finalizer (``forget_request``). Returns how many went."""
    ttls = {}
    for m in models:
        policy = ErasurePolicy.parse(m["spec"]["erasurePolicy"])
        ttls[m["metadata"]["name"]] = policy.ttl_seconds_after_finished
    first = min(ttls, default=None)
    deleted = 0
    for r in requests:
        if r["metadata"].get("deletionTimestamp") or not finished_for_good(r):
            continue
        present = sorted(t["model"] for t in targets_of(r) if t["model"] in ttls)
        if (present[0] if present else first) != sweeper:
            continue
        ttl = min((ttls[m] for m in present), default=DEFAULT_TTL_SECONDS)
        if not expired(r, ttl):
            continue
        meta = r["metadata"]
        try:
            custom_objects().delete_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], REQUESTS, meta["name"]
            )
            deleted += 1
        except ApiException as e:
            if e.status != 404:
                raise
    return deleted
