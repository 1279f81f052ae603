"""Kopf handlers (kopf is imported in this module only). Thin and idempotent: each pass
rebuilds the run's state from its status and its children, asks `reconcile.decide` what to do,
does it, and patches the status when it changed.

One daemon per SAMIRun drives it, so passes over one run never overlap. The daemon sleeps until
a child of its run, a child's pod or a failed-create event about one changes (the watches of
kube.Kube call back), or at the latest `SAMI_RECONCILE_SECONDS` later (a spec edit, a
deadline). The children come from those watches, so a pass
costs no API call to read them; a pass that finds the run and its children as the last full
pass left them, with no deadline due, returns at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import kopf
from prometheus_client import Counter, Gauge, Histogram

from sami_operator import kube as kube_module
from sami_operator.builders import build_children, child_name
from sami_operator.models import (
    GROUP,
    MAX_RESTARTS,
    PLURAL,
    VERSION,
    Condition,
    Launcher,
    Phase,
    SAMIRun,
    SAMIRunStatus,
    StagePhase,
)
from sami_operator.planner import cleanup_stage, foreign_uris, plan
from sami_operator.reconcile import (
    CreateRefused,
    create_refused,
    decide,
    error_text,
    records_from_status,
)
from sami_operator.settings import from_env
from sami_operator.status import STALLED, derive_status
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
_phases_lock = threading.Lock()
for _phase in Phase:
    RUNS.labels(phase=_phase.value).set(0)
_state: dict[str, Any] = {}
# Per run ("namespace/name"): what its last full pass saw (its resourceVersion and its
# children's version in the watches) and when a deadline is next due, if it settled there.
_quiet: dict[str, tuple[tuple[str, int], datetime | None]] = {}


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    prefix = SETTINGS.prefix
    settings.persistence.finalizer = SETTINGS.finalizer
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration"
    )
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.posting.level = logging.WARNING
    loop = asyncio.get_running_loop()

    def changed(namespace: str, name: str) -> None:  # on a watch's thread
        loop.call_soon_threadsafe(_wake, f"{namespace}/{name}")

    await asyncio.to_thread(_connect, changed)
    if SETTINGS.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(SETTINGS.metrics_port, addr=SETTINGS.metrics_address)


def _connect(changed) -> None:
    """The API client, the training launchers served, and the watches of the children."""
    global SETTINGS
    kube = kube_module.Kube(creates_per_second=SETTINGS.creates_per_second)
    _state["kube"] = kube
    # generation.shards: one Indexed Job where the Job controller retries each index on its
    # own (Kubernetes 1.29+), else a Job per shard.
    SETTINGS = dataclasses.replace(SETTINGS, indexed_jobs=kube.has_per_index_retries())
    logging.getLogger(__name__).info(
        "sharded generation runs as %s", "an Indexed Job" if SETTINGS.indexed_jobs else "Jobs"
    )
    _state["launchers"] = kube.served_launchers()
    _state["launchers_at"] = time.monotonic()
    logging.getLogger(__name__).info("training launchers served: %s", sorted(_state["launchers"]))
    kube.watch(SETTINGS.namespaces, notify=changed)


# How long the served launchers (API discovery) are trusted, and how often they are looked up
# again while a run waits for one that is missing, so that it proceeds soon after its
# launcher's CRD is installed.
LAUNCHERS_TTL_SECONDS = 60.0
LAUNCHERS_RECHECK_SECONDS = 10.0
LAUNCHER_UNAVAILABLE = "LauncherUnavailable"


def _served_launchers(wanted: str) -> frozenset[str]:
    """The training launchers this cluster serves: discovered at startup and again once the
    answer is LAUNCHERS_TTL_SECONDS old, or LAUNCHERS_RECHECK_SECONDS old when it lacks
    `wanted`. A failed lookup keeps the last answer (and is tried again on the next call)."""
    age = time.monotonic() - _state["launchers_at"]
    missing = wanted not in _state["launchers"]
    if age < LAUNCHERS_TTL_SECONDS and not (missing and age >= LAUNCHERS_RECHECK_SECONDS):
        return _state["launchers"]
    log = logging.getLogger(__name__)
    try:
        served = _state["kube"].served_launchers()
    except Exception as err:  # the API server's discovery, briefly unavailable
        log.warning("training launchers not rediscovered, keeping %s: %s", _state["launchers"], err)
        return _state["launchers"]
    if served != _state["launchers"]:
        log.info(
            "training launchers served: %s (were %s)", sorted(served), sorted(_state["launchers"])
        )
        _state["kube"].watch_launchers(served)
    _state["launchers"], _state["launchers_at"] = served, time.monotonic()
    return served


def _await_launcher(body, patch, run: SAMIRun, launcher: str) -> str:
    """A run whose training launcher this cluster does not serve waits (nothing is created) until
    it does: its status is what its stages say, with the served launchers in status.message and
    the Stalled condition True with reason LauncherUnavailable; a Warning event when the wait
    begins. Returns the phase."""
    meta = body["metadata"]
    uid = meta["uid"]
    status_doc = body.get("status") or {}
    previous = SAMIRunStatus.model_validate(status_doc) if status_doc.get("phase") else None
    now = _stamp(_now())
    status = derive_status(run, uid, records_from_status(run, uid, previous), now, previous)
    status.message = (
        f"spec.training.launcher: {launcher} is not served by this cluster (served: "
        f"{', '.join(sorted(_state['launchers']))}); waiting for its API (CRD) to be installed"
    )
    before = next((c for c in (previous.conditions if previous else []) if c.type == STALLED), None)
    waiting = (
        before is not None and before.status == "True" and before.reason == LAUNCHER_UNAVAILABLE
    )
    stalled = next(c for c in status.conditions if c.type == STALLED)
    stalled.status, stalled.reason, stalled.message = "True", LAUNCHER_UNAVAILABLE, status.message
    stalled.last_transition_time = (
        before.last_transition_time if before is not None and before.status == "True" else now
    )
    if status != previous:
        patch.status.update(status.model_dump(mode="json", by_alias=True))
    if not waiting:
        kopf.event(body, type="Warning", reason=LAUNCHER_UNAVAILABLE, message=status.message)
    return status.phase.value


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


_wakers: dict[str, asyncio.Event] = {}
# Per run: the resourceVersion its last patch produced, and until when (time.monotonic()) a
# pass waits for the watch to bring the run at that version: a body older than what the
# operator wrote would have it redo what it just did.
_written: dict[str, tuple[str, float]] = {}


def _wake(key: str) -> None:
    waker = _wakers.get(key)
    if waker is not None:
        waker.set()


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0)
async def drive(body: kopf.Body, stopped: kopf.DaemonStopped, logger, **_: Any) -> None:
    """The run's passes, one at a time: when a child of it changed (the watches wake it), and
    at the latest SAMI_RECONCILE_SECONDS after the last (a spec edit, a deadline). `body` is
    Kopf's live view of the run."""
    key = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
    waker = _wakers.setdefault(key, asyncio.Event())
    try:
        while not stopped:
            waker.clear()
            snapshot = {k: body[k] for k in body}  # the run as the watch last showed it
            await asyncio.to_thread(_drive_once, snapshot, logger)
            await _sleep(waker, stopped, SETTINGS.reconcile_seconds)
    finally:
        _wakers.pop(key, None)
        _written.pop(key, None)


async def _sleep(waker: asyncio.Event, stopped: kopf.DaemonStopped, seconds: float) -> None:
    """Until the run is woken or its daemon stopped (the run deleted, the operator exiting),
    at most `seconds`."""

    async def until_stopped() -> None:
        await stopped.wait()

    waits = [asyncio.ensure_future(waker.wait()), asyncio.ensure_future(until_stopped())]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _drive_once(body, logger: logging.Logger) -> None:
    """One pass, its patch applied (status and, once, the default-storage annotation)."""
    meta = body["metadata"]
    key = f"{meta['namespace']}/{meta['name']}"
    if _older_than_written(key, meta.get("resourceVersion", "")):
        return
    patch = kopf.Patch()
    try:
        _reconcile(body, patch, logger)
        if patch:
            written = _state["kube"].patch_run(meta["namespace"], meta["name"], dict(patch))
            _written[key] = (written, time.monotonic() + 2 * SETTINGS.reconcile_seconds)
    except Exception:
        RECONCILE_ERRORS.inc()
        _quiet.pop(key, None)
        logger.exception("A reconcile pass failed with an exception; trying again")


def _older_than_written(key: str, version: str) -> bool:
    """Whether the run's body predates the operator's last patch of it: however long the watch
    takes to bring it where resource versions are numbers (etcd's are); where they are not,
    until it brings that very version or two reconcile intervals pass."""
    written = _written.get(key)
    if written is None:
        return False
    wrote, until = written
    try:
        stale = int(version) < int(wrote)
    except ValueError:
        stale = version != wrote and time.monotonic() <= until
    if not stale:
        del _written[key]
    return stale


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
        _quiet.pop(key, None)
        _count(key, status_doc["phase"])
        return
    kube: kube_module.Kube = _state["kube"]
    seen = (meta.get("resourceVersion", ""), kube.changes(meta["namespace"], meta["name"]))
    now = _now()
    if _nothing_new(key, seen, now):
        return
    _quiet.pop(key, None)
    try:
        run = _parse(body, patch)
    except SpecError as err:
        _invalid(body, patch, "; ".join(err.problems))
        _count(key, Phase.failed.value)
        return
    launcher = run.spec.training.launcher
    if launcher != Launcher.job and launcher.value not in _served_launchers(launcher.value):
        _count(key, _await_launcher(body, patch, run, launcher.value))
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
    # Only the children whose outcome is not yet recorded need their pods looked at.
    unsettled = {
        r.child
        for stage in records.values()
        for r in (stage, *stage.shards)
        if r.child and r.phase not in (StagePhase.succeeded, StagePhase.failed)
    }
    observed = kube.observe_children(meta["namespace"], meta["name"], unsettled)
    created = datetime.fromisoformat(meta["creationTimestamp"].replace("Z", "+00:00"))
    stages = plan(run, uid)  # once per pass: decide and derive_status walk the same stages
    decision = decide(run, uid, records, observed, SETTINGS, now, created, stages)
    refused = False
    for obj in decision.create:
        try:
            if not kube.create(obj):
                name = obj["metadata"]["name"]
                logger.info("%s %s already exists; adopting it", obj["kind"], name)
                _adopted(decision, name)
        except kube_module.CreateRefusedError as err:
            create_refused(decision, err.refused, before, now)
            refused = True
            break
    for name in decision.delete:
        kube.delete_child(meta["namespace"], name)
    for kind, reason, message in decision.events:
        kopf.event(body, type=kind, reason=reason, message=message)
        if reason == "StageSucceeded":
            _observe_duration(decision.records, message)
    status = derive_status(run, uid, decision.records, _stamp(now), previous, stages)
    if previous is None or status != previous:
        patch.status.update(status.model_dump(mode="json", by_alias=True))
    if not refused:  # a refused create is tried again on the next pass
        _quiet[key] = (seen, decision.wake_at)
    _count(key, status.phase.value)


def _adopted(decision, name: str) -> None:
    """A child created by an earlier pass whose status never recorded it (an operator stopped
    in between): its StageCreated event was posted then; this pass says it adopted it."""
    created = f"created {name}"
    decision.events = [
        ("Normal", "StageAdopted", message.replace(created, f"adopted {name}"))
        if reason == "StageCreated" and message.endswith(created)
        else (kind, reason, message)
        for kind, reason, message in decision.events
    ]


def _nothing_new(key: str, seen: tuple[str, int], now: datetime) -> bool:
    """The run and its children are as the last full pass saw them, and no deadline is due."""
    quiet = _quiet.get(key)
    if quiet is None or quiet[0] != seen:
        return False
    wake_at = quiet[1]
    return wake_at is None or now < wake_at


def _observe_duration(records, message: str) -> None:
    stage_id = message.split(" ", 1)[0]
    record = records.get(stage_id)
    if record and record.start_time and record.completion_time:
        start = datetime.fromisoformat(record.start_time.replace("Z", "+00:00"))
        end = datetime.fromisoformat(record.completion_time.replace("Z", "+00:00"))
        STAGE_SECONDS.labels(stage=stage_id.split("-")[0]).observe((end - start).total_seconds())


def _count(key: str, phase: str | None) -> None:
    """The sami_runs gauge: the run `key` is in `phase` now (None: gone). Passes run on
    several threads."""
    with _phases_lock:
        before = _phases.pop(key, None)
        if phase is not None:
            _phases[key] = phase
        if before != phase:
            if before is not None:
                RUNS.labels(phase=before).dec()
            if phase is not None:
                RUNS.labels(phase=phase).inc()


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def forget(body: kopf.Body, **_: Any) -> None:
    """Children go with their owner (ownerReferences); only the metrics forget the run."""
    key = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
    _count(key, None)
    _quiet.pop(key, None)


def _deletes_storage(spec: kopf.Spec, **_: Any) -> bool:
    return (spec.get("cleanup") or {}).get("storageOnDelete") == "delete"


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_deletes_storage)
def delete_storage(body: kopf.Body, patch: kopf.Patch, runtime: timedelta, **_: Any) -> None:
    """cleanup.storageOnDelete: delete. Kopf holds the SAMIRun (a finalizer) until this
    returns: first the run's workloads are deleted (nothing may write under the prefix
    meanwhile), then a Job empties the prefix with the run's own credentials (the operator
    never touches the bucket), then the SAMIRun goes and its children with it.

    Bounded: a failed cleanup Job is kept (for its logs) and the next attempt is a new Job,
    `<run>-cleanup-r<N>`. The operator gives up when the Job cannot be created (the API server
    refuses it: the namespace is being deleted, RBAC, an invalid pod spec), when
    SETTINGS.storage_cleanup_attempts Jobs have failed, or after
    SETTINGS.storage_cleanup_seconds: a Warning event StorageNotDeleted (and a log line, as a
    namespace being deleted takes no events) names the prefix left behind, and the SAMIRun
    goes."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    try:
        run = _parse(body, patch)
    except SpecError:
        return  # an invalid run never ran: nothing of it is in storage
    kube: kube_module.Kube = _state["kube"]
    stage = cleanup_stage(run, meta["uid"])
    if runtime.total_seconds() > SETTINGS.storage_cleanup_seconds:
        _storage_not_deleted(
            body, stage.prefix, f"not deleted within {SETTINGS.storage_cleanup_seconds:g} s"
        )
        return
    cleanups = [child_name(name, stage, attempt) for attempt in range(1, MAX_RESTARTS + 2)]
    observed = kube.observe_children(namespace, name)
    workloads = sorted(n for n in observed if n not in cleanups)
    for child in workloads:
        kube.delete_child(namespace, child)
    if workloads:
        raise kopf.TemporaryError(f"waiting for {len(workloads)} workloads to stop", delay=2)
    tried = [(a, observed[n]) for a, n in enumerate(cleanups, 1) if n in observed]
    if any(state.phase == StagePhase.succeeded for _, state in tried):
        return
    if any(state.phase != StagePhase.failed for _, state in tried):
        raise kopf.TemporaryError(f"deleting {stage.prefix}", delay=5)
    attempt = max((a for a, _ in tried), default=0) + 1
    if tried and (len(tried) >= SETTINGS.storage_cleanup_attempts or attempt > MAX_RESTARTS + 1):
        last, state = tried[-1]
        _storage_not_deleted(
            body,
            stage.prefix,
            f"the cleanup failed {len(tried)} times, last {cleanups[last - 1]}: "
            f"{error_text(state)}",
        )
        return
    if tried:
        last, state = tried[-1]
        kopf.event(
            body,
            type="Warning",
            reason="DeleteStorageFailed",
            message=f"{cleanups[last - 1]}: {error_text(state)}; trying again "
            f"({attempt} of {SETTINGS.storage_cleanup_attempts})",
        )
    try:
        for obj in build_children(run, stage, meta["uid"], SETTINGS, attempt):
            kube.create(obj)
    except kube_module.CreateRefusedError as err:
        if err.refused.code == 429 or err.refused.code >= 500:
            raise  # a passing server trouble: Kopf tries again
        _storage_not_deleted(body, stage.prefix, _refusal(err.refused, namespace))
        return
    kopf.event(body, type="Normal", reason="DeletingStorage", message=stage.prefix)
    raise kopf.TemporaryError(f"deleting {stage.prefix}", delay=5)


def _refusal(refused: CreateRefused, namespace: str) -> str:
    """Why the API server refused the cleanup Job, in words."""
    if "being terminated" in refused.message:
        return f"namespace {namespace} is being deleted, so no cleanup Job can be created there"
    return f"the cleanup Job was refused: {refused.code} {refused.message}"


def _storage_not_deleted(body, prefix: str, why: str) -> None:
    """Gives up on the storage cleanup, saying what is left behind where users look."""
    meta = body["metadata"]
    message = f"{prefix} left in storage ({why}); delete it by hand"
    logging.getLogger(__name__).warning(
        "SAMIRun %s/%s: StorageNotDeleted: %s", meta["namespace"], meta["name"], message
    )
    kopf.event(body, type="Warning", reason="StorageNotDeleted", message=message)
