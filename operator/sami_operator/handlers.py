"""Kopf handlers (kopf is imported in this module only). Thin and idempotent: each pass
rebuilds the run's state from its status and its children, asks `reconcile.decide` what to do,
does it, and writes the whole status back.

One timer per SAMIRun drives everything, so passes over one run never overlap; watching the
children is not needed for correctness (a pass every `SAMI_RECONCILE_SECONDS` reads them).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

import kopf
from prometheus_client import Counter, Gauge, Histogram

from sami_operator import kube as kube_module
from sami_operator.builders import build_children, child_name
from sami_operator.models import (
    GROUP,
    PLURAL,
    VERSION,
    Condition,
    Launcher,
    Phase,
    SAMIRun,
    SAMIRunStatus,
    StagePhase,
)
from sami_operator.planner import cleanup_stage, foreign_uris
from sami_operator.reconcile import create_refused, decide, error_text, records_from_status
from sami_operator.settings import from_env
from sami_operator.status import derive_status
from sami_operator.validate import SpecError, parse_samirun

SETTINGS = from_env()
RUNS = Gauge("sami_runs", "SAMIRuns by phase", ["phase"])
STAGE_SECONDS = Histogram(
    "sami_stage_seconds",
    "Stage durations",
    ["stage"],
    buckets=(10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200),
)
RECONCILE_ERRORS = Counter("sami_reconcile_errors_total", "Reconcile passes that raised")
_phases: dict[str, str] = {}
_state: dict[str, Any] = {}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    prefix = SETTINGS.prefix
    settings.persistence.finalizer = SETTINGS.finalizer
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration"
    )
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.posting.level = logging.WARNING
    kube = kube_module.Kube()
    _state["kube"] = kube
    _state["launchers"] = kube.served_launchers()
    logging.getLogger(__name__).info("training launchers served: %s", sorted(_state["launchers"]))
    if SETTINGS.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(SETTINGS.metrics_port)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _invalid(body, patch, message: str, reason: str = "InvalidSpec") -> None:
    now = _stamp(_now())
    generation = body["metadata"].get("generation")
    condition = Condition(
        type="Failed",
        status="True",
        reason=reason,
        message=message,
        last_transition_time=now,
        observed_generation=generation,
    )
    status = SAMIRunStatus(
        phase=Phase.failed,
        message=message,
        observed_generation=generation,
        conditions=[condition],
        completion_time=now,
    )
    patch.status.update(status.model_dump(mode="json", by_alias=True))


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.reconcile_seconds)
def reconcile(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, **_: Any) -> None:
    try:
        _reconcile(body, patch, logger)
    except Exception:
        RECONCILE_ERRORS.inc()
        raise


def _finished(body) -> bool:
    """Nothing left to do: failed, or succeeded with no children to clean up, and the spec
    unchanged since."""
    meta, status = body["metadata"], body.get("status") or {}
    if status.get("observedGeneration") != meta.get("generation"):
        return False
    keep = (body["spec"].get("cleanup") or {}).get("children", "keep") == "keep"
    return status.get("phase") == Phase.failed.value or (
        status.get("phase") == Phase.succeeded.value and keep
    )


def _parse(body, patch) -> SAMIRun:
    """The run, its storage defaulted from the operator's settings when the spec names none.
    The default is recorded in an annotation on first use, so the run keeps its storage
    prefix even if the operator's default changes later."""
    meta = body["metadata"]
    manifest = {k: body[k] for k in ("apiVersion", "kind", "spec")}
    manifest["metadata"] = {
        k: meta[k]
        for k in ("name", "namespace", "labels", "annotations", "generation")
        if k in meta
    }
    if manifest["spec"].get("storage") is None:
        annotation = f"{SETTINGS.prefix}/default-storage"
        recorded = (meta.get("annotations") or {}).get(annotation)
        if recorded is None and SETTINGS.default_storage is not None:
            recorded = json.dumps(SETTINGS.default_storage.to_api())
            patch.metadata.setdefault("annotations", {})[annotation] = recorded
        if recorded is None:
            raise SpecError(
                [
                    "spec.storage: required: this operator has no default storage "
                    "(SAMI_DEFAULT_STORAGE, the chart's operator.defaultStorage)"
                ]
            )
        try:
            storage = json.loads(recorded)
        except json.JSONDecodeError as err:
            raise SpecError(
                [
                    f"metadata.annotations[{annotation}]: not JSON ({err}); remove it to use "
                    "the operator's default storage again"
                ]
            ) from None
        manifest["spec"] = {**manifest["spec"], "storage": storage}
    return parse_samirun(manifest, f"SAMIRun {meta['namespace']}/{meta['name']}")


def _reconcile(body, patch, logger) -> None:
    meta = body["metadata"]
    key = f"{meta['namespace']}/{meta['name']}"
    status_doc = dict(body.get("status") or {})
    if meta.get("deletionTimestamp"):
        return  # being deleted: the delete handler owns it now
    if _finished(body):
        _count(key, status_doc["phase"])
        return
    try:
        run = _parse(body, patch)
    except SpecError as err:
        _invalid(body, patch, "; ".join(err.problems))
        _count(key, Phase.failed.value)
        return
    launcher = run.spec.training.launcher
    if launcher != Launcher.job and launcher.value not in _state["launchers"]:
        _invalid(
            body,
            patch,
            f"spec.training.launcher: {launcher.value} is not served by this "
            f"cluster; served: {sorted(_state['launchers'])}",
            reason="LauncherUnavailable",
        )
        _count(key, Phase.failed.value)
        return

    if SETTINGS.default_storage is not None:
        trespass = foreign_uris(run, SETTINGS.default_storage.uri)
        if trespass:
            _invalid(body, patch, "; ".join(trespass), reason="ForeignStorage")
            _count(key, Phase.failed.value)
            return

    uid = meta["uid"]
    previous = SAMIRunStatus.model_validate(status_doc) if status_doc.get("phase") else None
    records = records_from_status(run, uid, previous)
    before = {stage_id: record.message for stage_id, record in records.items()}
    kube: kube_module.Kube = _state["kube"]
    # Only the children whose outcome is not yet recorded need their pods looked at.
    unsettled = {
        r.child
        for r in records.values()
        if r.child and r.phase not in (StagePhase.succeeded, StagePhase.failed)
    }
    observed = kube.observe_children(meta["namespace"], meta["name"], unsettled)
    now = _now()
    created = datetime.fromisoformat(meta["creationTimestamp"].replace("Z", "+00:00"))
    decision = decide(run, uid, records, observed, SETTINGS, now, created)
    for obj in decision.create:
        try:
            if not kube.create(obj):
                name = obj["metadata"]["name"]
                logger.info("%s %s already exists; adopting it", obj["kind"], name)
        except kube_module.CreateRefusedError as err:
            create_refused(decision, err.refused, before, now)
            break
    for name in decision.delete:
        kube.delete_child(meta["namespace"], name)
    for kind, reason, message in decision.events:
        kopf.event(body, type=kind, reason=reason, message=message)
        if reason == "StageSucceeded":
            _observe_duration(decision.records, message)
    status = derive_status(run, uid, decision.records, _stamp(now), previous)
    patch.status.update(status.model_dump(mode="json", by_alias=True))
    _count(key, status.phase.value)


def _observe_duration(records, message: str) -> None:
    stage_id = message.split(" ", 1)[0]
    record = records.get(stage_id)
    if record and record.start_time and record.completion_time:
        start = datetime.fromisoformat(record.start_time.replace("Z", "+00:00"))
        end = datetime.fromisoformat(record.completion_time.replace("Z", "+00:00"))
        STAGE_SECONDS.labels(stage=stage_id.split("-")[0]).observe((end - start).total_seconds())


def _count(key: str, phase: str) -> None:
    _phases[key] = phase
    for value in Phase:
        RUNS.labels(phase=value.value).set(sum(p == value.value for p in _phases.values()))


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def forget(body: kopf.Body, **_: Any) -> None:
    """Children go with their owner (ownerReferences); only the metrics forget the run."""
    _phases.pop(f"{body['metadata']['namespace']}/{body['metadata']['name']}", None)


def _deletes_storage(spec: kopf.Spec, **_: Any) -> bool:
    return (spec.get("cleanup") or {}).get("storageOnDelete") == "delete"


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_deletes_storage)
def delete_storage(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """cleanup.storageOnDelete: delete. Kopf holds the SAMIRun (a finalizer) until this
    returns: first the run's workloads are deleted (nothing may write under the prefix
    meanwhile), then a Job empties the prefix with the run's own credentials (the operator
    never touches the bucket), then the SAMIRun goes and its children with it."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    try:
        run = _parse(body, patch)
    except SpecError:
        return  # an invalid run never ran: nothing of it is in storage
    kube: kube_module.Kube = _state["kube"]
    stage = cleanup_stage(run, meta["uid"])
    cleanup = child_name(name, stage)
    observed = kube.observe_children(namespace, name)
    workloads = sorted(n for n in observed if n != cleanup)
    for child in workloads:
        kube.delete_child(namespace, child)
    if workloads:
        raise kopf.TemporaryError(f"waiting for {len(workloads)} workloads to stop", delay=2)
    state = observed.get(cleanup)
    if state is None:
        for obj in build_children(run, stage, meta["uid"], SETTINGS):
            kube.create(obj)
        kopf.event(body, type="Normal", reason="DeletingStorage", message=stage.prefix)
        raise kopf.TemporaryError(f"deleting {stage.prefix}", delay=5)
    if state.phase == StagePhase.failed:
        kopf.event(body, type="Warning", reason="DeleteStorageFailed", message=error_text(state))
        kube.delete_child(namespace, cleanup)  # and try again
        raise kopf.TemporaryError(f"deleting {stage.prefix} failed: {error_text(state)}", delay=30)
    if state.phase != StagePhase.succeeded:
        raise kopf.TemporaryError(f"deleting {stage.prefix}", delay=5)
