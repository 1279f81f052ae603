"""The one module that talks to the Kubernetes API server (besides Kopf itself): it creates
and deletes children, at a bounded rate, and reads them from the watches (watches.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from sami_operator.launchers import BY_KIND, CUSTOM, JOB, Workload
from sami_operator.models import GROUP, PLURAL, VERSION, StagePhase
from sami_operator.reconcile import ChildState, CreateRefused
from sami_operator.watches import RUN_LABEL, Watches

log = logging.getLogger(__name__)

# Waiting reasons that do not go away by themselves: shown in the run's status.
STUCK_REASONS = {
    "CreateContainerConfigError",
    "CreateContainerError",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CrashLoopBackOff",
}
UNSCHEDULABLE = "Unschedulable"
# Pod status reasons of pods taken away rather than failed: node-pressure eviction, graceful
# node shutdown, a lost node, preemption.
DISRUPTION_REASONS = {"Evicted", "Shutdown", "NodeShutdown", "Terminated", "NodeLost", "Preempting"}


class CreateRefusedError(Exception):
    def __init__(self, refused: CreateRefused):
        super().__init__(f"{refused.code}: {refused.message}")
        self.refused = refused


def _api_message(err: ApiException) -> str:
    """The Status message the API server sent with an error (its body), else the reason."""
    try:
        return json.loads(err.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(err.reason)


class RateLimit:
    """A token bucket: `acquire` takes one token, waiting for it when there is none; tokens
    come back at `per_second`, up to `burst`. Shared by every thread that creates."""

    def __init__(self, per_second: float, burst: int):
        self.per_second, self.burst = per_second, burst
        self._tokens, self._at = float(burst), time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_second)
            self._at = now
            self._tokens -= 1  # may go negative: later callers wait their turn behind it
            wait = -self._tokens / self.per_second if self._tokens < 0 else 0.0
        if wait:
            time.sleep(wait)


class Kube:
    def __init__(
        self, api_client: client.ApiClient | None = None, creates_per_second: float = 50.0
    ):
        # Bursts of one second's worth, then the rate.
        self.create_limit = RateLimit(creates_per_second, max(1, round(creates_per_second)))
        self.watches: Watches | None = None
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    # --- discovery -------------------------------------------------------------------------

    def served_launchers(self) -> frozenset[str]:
        """Which training launchers this cluster can run (their APIs are served)."""
        groups = client.ApisApi(self.api).get_api_versions().groups
        versions = {(g.name, v.version) for g in groups for v in g.versions}
        served = {JOB.kind}
        served.update(w.launcher.value for w in CUSTOM if (w.group, w.version) in versions)
        return frozenset(served)

    # --- children ----------------------------------------------------------------------------

    def has_per_index_retries(self) -> bool:
        """Whether this cluster's Indexed Jobs take backoffLimitPerIndex (Kubernetes 1.29+,
        where the feature is on by default)."""
        version = client.VersionApi(self.api).get_code()
        minor = int("".join(c for c in version.minor if c.isdigit()) or 0)
        return (int(version.major), minor) >= (1, 29)

    def create(self, obj: dict[str, Any]) -> bool:
        """Create an object, waiting for the create rate limit first; False when it already
        exists (created by an earlier pass). Raises CreateRefusedError with the API server's
        message when it refuses it."""
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        kind = obj["kind"]
        self.create_limit.acquire()
        try:
            if kind == "ConfigMap":
                self.core.create_namespaced_config_map(ns, obj)
            elif kind == "Job":
                self.batch.create_namespaced_job(ns, obj)
            else:
                group, version, plural = BY_KIND[kind].api
                self.custom.create_namespaced_custom_object(group, version, ns, plural, obj)
        except ApiException as err:
            if err.status == 409:
                self._expect(obj)
                return False
            refused = CreateRefused(kind, name, err.status, _api_message(err))
            raise CreateRefusedError(refused) from err
        self._expect(obj)
        return True

    def _expect(self, obj: dict[str, Any]) -> None:
        """A workload just created (or found): its run's passes count it until it is watched."""
        run = (obj["metadata"].get("labels") or {}).get(RUN_LABEL)
        if obj["kind"] in BY_KIND and run and self.watches is not None:
            self.watches.expect(obj["metadata"]["namespace"], run, obj["metadata"]["name"])

    def patch_run(self, namespace: str, name: str, patch: dict[str, Any]) -> str:
        """Merge-patch a SAMIRun: its metadata, then its status (the status subresource).
        Returns the resourceVersion it has after."""
        written = ""
        for part, call in (
            ("metadata", self.custom.patch_namespaced_custom_object),
            ("status", self.custom.patch_namespaced_custom_object_status),
        ):
            if patch.get(part):
                obj = call(GROUP, VERSION, namespace, PLURAL, name, {part: patch[part]})
                written = obj["metadata"]["resourceVersion"]
        return written

    def delete_child(self, namespace: str, name: str) -> None:
        """Delete a stage's workload (its pods go with it, in the background) and its task
        ConfigMap; whatever is already gone is skipped."""
        background = client.V1DeleteOptions(propagation_policy="Background")
        calls = [
            lambda: self.batch.delete_namespaced_job(name, namespace, body=background),
            lambda: self.core.delete_namespaced_config_map(name, namespace),
        ]
        for group, version, plural in (w.api for w in CUSTOM):
            calls.append(
                lambda g=group, v=version, p=plural: self.custom.delete_namespaced_custom_object(
                    g, v, namespace, p, name, body=background
                )
            )
        for call in calls:
            try:
                call()
            except ApiException as err:
                if err.status != 404:  # 404: not of this kind, already gone, or not served
                    raise

    def watch(
        self,
        namespaces: Iterable[str] = (),
        notify: Callable[[str, str], None] | None = None,
        timeout: float = 120.0,
    ) -> None:
        """Start watching the children in `namespaces` (none: all), with every training
        launcher this cluster serves, and wait until each watch has its first list.
        `notify(namespace, run)` is called (on a watch's thread) when anything of a run's
        children changes."""
        served = self.served_launchers()
        self.watches = Watches(self.api, namespaces, notify)
        self.watches.start(w for w in CUSTOM if w.launcher.value in served)
        self.watches.wait_listed(timeout)

    def stop_watching(self) -> None:
        if self.watches is not None:
            self.watches.stop()

    def watch_launchers(self, served: Iterable[str]) -> None:
        """Watch the workloads of launchers served since `watch` (their CRDs installed)."""
        self.watches.watch_workloads(w for w in CUSTOM if w.launcher.value in served)

    def changes(self, namespace: str, run: str) -> int:
        """A number that moves whenever anything of the run's children changes."""
        return self.watches.version(namespace, run)

    def observe_children(
        self, namespace: str, run: str, look_into: Collection[str] | None = None
    ) -> dict[str, ChildState]:
        """Every workload of a run, by name, with its phase, as the watches show it (no API
        call); with its pods' story (rank 0's exit, why they wait) only for those in
        `look_into` (None: all). A child created but not yet in the watch is pending."""
        found: dict[str, ChildState] = {}
        for name, (workload, obj) in self.watches.children(namespace, run).items():
            if workload is None:
                found[name] = ChildState(StagePhase.pending)
            elif look_into is not None and name not in look_into:
                found[name] = ChildState(phase_of(workload, obj))
            else:
                pods = self.watches.pods(namespace, run, workload, name)
                events = self.watches.failed_creates(namespace, name)
                found[name] = child_state(workload, obj, pods, events)
        return found


# The label the Job controller puts on an Indexed Job's pods (Kubernetes 1.28+).
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


def child_state(workload: Workload, obj: dict, pods: list[dict], events: list[dict]) -> ChildState:
    """What a workload, its pods (rank 0 first) and the failed-create events about it say;
    for an Indexed Job, each shard's result line once its pod succeeded."""
    state = _child_state(workload, obj, pods, events)
    shards = _shard_messages(pods)
    return dataclasses.replace(state, shard_messages=shards) if shards else state


def _shard_messages(pods: list[dict]) -> dict[int, str]:
    """The termination message of each Indexed Job pod that succeeded, by completion index."""
    found = {}
    for pod in pods:
        index = (pod["metadata"].get("labels") or {}).get(COMPLETION_INDEX)
        if index is None or (pod.get("status") or {}).get("phase") != "Succeeded":
            continue
        for status in pod["status"].get("containerStatuses") or []:
            message = ((status.get("state") or {}).get("terminated") or {}).get("message")
            if message:
                found[int(index)] = message
    return found


def _child_state(workload: Workload, obj: dict, pods: list[dict], events: list[dict]) -> ChildState:
    phase = phase_of(workload, obj)
    if phase in (StagePhase.succeeded, StagePhase.failed):
        return _terminal(phase, pods)
    conditions = _conditions(obj)
    created = _parse_time(obj["metadata"].get("creationTimestamp"))
    since = _since(conditions, created)
    if phase == StagePhase.queued:
        return ChildState(phase, waiting_since=since)
    # A custom workload resumed (admitted again): its wait starts when it was.
    resumed = since if workload.custom and "Suspended" in conditions else None
    return _unfinished(pods, events, created, resumed)


def _unfinished(
    pods: list[dict], events: list[dict], created: datetime | None, since: datetime | None
) -> ChildState:
    """A child still waiting for or running its pods. Running once every pod of it runs
    (a Job's `active` and a JobSet's active Jobs count Pending pods too); else waiting
    since its oldest Pending pod was created, or since the child was (`since`: when it
    was queued, if it was), with what stalls it, if anything does."""
    pending = [p for p in pods if (p.get("status") or {}).get("phase") in (None, "Pending")]
    if pods and not pending:
        return ChildState(StagePhase.running)
    if pending:
        since = min(_parse_time(p["metadata"]["creationTimestamp"]) for p in pending)
    stalled, message = stuck(pending)
    if not pods:
        stalled, message = _failed_create(events)
    return ChildState(
        StagePhase.pending, message=message, waiting_since=since or created, stalled=stalled
    )


def _failed_create(events: list[dict]) -> tuple[str | None, str | None]:
    """The latest event saying a workload controller could not create the child's pods
    (a quota, Pod Security or a webhook refusing them, a missing ServiceAccount)."""
    if not events:
        return None, None

    def when(event: dict) -> str:
        stamp = event.get("lastTimestamp") or event.get("eventTime")
        return stamp or event["metadata"].get("creationTimestamp") or ""

    latest = max(events, key=lambda e: _parse_time(when(e)) or datetime.min.replace(tzinfo=UTC))
    involved = latest.get("involvedObject") or {}
    return "FailedCreate", f"{involved.get('kind')} {involved.get('name')}: {latest.get('message')}"


def _latest_per_index(pods: list[dict]) -> list[dict]:
    """An Indexed Job's pods: the newest of each completion index (a pod replaced after a
    disruption leaves the old one behind, failed)."""
    newest: dict[str, dict] = {}
    for pod in pods:
        index = pod["metadata"]["labels"][COMPLETION_INDEX]
        stamp = pod["metadata"].get("creationTimestamp") or ""
        if index not in newest or stamp >= (
            newest[index]["metadata"].get("creationTimestamp") or ""
        ):
            newest[index] = pod
    return list(newest.values())


def _terminal(phase: StagePhase, pods: list[dict]) -> ChildState:
    disrupted = phase == StagePhase.failed and disruption(pods)
    if pods and all(COMPLETION_INDEX in (p["metadata"].get("labels") or {}) for p in pods):
        # An Indexed Job: what its shards ended with, each shard's last pod (one disrupted
        # and replaced ended on the replacement); disrupted only if every shard that failed
        # was, so a shard's own failure is not retried for free.
        pods = _latest_per_index(pods)
        if phase == StagePhase.failed:
            failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
            disrupted = bool(failed) and all(disruption([p]) for p in failed)
            pods = failed or pods
    # Pods being deleted (a launcher stopping the survivors of a failure) were killed:
    # their exit code would hide the one that says why the workload failed.
    pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")] or pods
    if phase == StagePhase.failed:  # the pod that failed says why, not a finished shard's
        pods = sorted(pods, key=lambda p: (p.get("status") or {}).get("phase") != "Failed")
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated")
            if terminated is not None:
                return ChildState(
                    phase,
                    terminated.get("exitCode"),
                    terminated.get("message"),
                    terminated.get("reason"),
                    disrupted=disrupted,
                )
    return ChildState(phase, disrupted=disrupted)


def stuck(pods: list[dict]) -> tuple[str | None, str | None]:
    """(reason, message) of the first pod stuck for a reason someone must act on: a
    container (or init container) that cannot start, or a pod the scheduler cannot place."""
    for pod in pods:
        status, name = pod.get("status") or {}, pod["metadata"]["name"]
        containers = [
            *(status.get("initContainerStatuses") or []),
            *(status.get("containerStatuses") or []),
        ]
        for container in containers:
            waiting = (container.get("state") or {}).get("waiting")
            if waiting is not None and waiting.get("reason") in STUCK_REASONS:
                reason = waiting["reason"]
                return reason, f"pod {name}: {reason}: {waiting.get('message') or ''}".rstrip(": ")
        for condition in status.get("conditions") or []:
            if (condition.get("type"), condition.get("reason")) == ("PodScheduled", UNSCHEDULABLE):
                why = condition.get("message") or ""
                return UNSCHEDULABLE, f"pod {name}: {UNSCHEDULABLE}: {why}"
    return None, None


def disruption(pods: list[dict]) -> bool:
    """Whether a failed child's pods were taken away rather than failing: none is left, or
    every one left is being deleted (a node drained or lost on clusters without disruption
    conditions; a pod that failed on its own stays), or one carries Kubernetes' DisruptionTarget
    condition (1.26+: eviction, preemption, taint manager, node shutdown) or a kubelet
    eviction's reason."""
    if all(p["metadata"].get("deletionTimestamp") for p in pods):
        return True
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("reason") in DISRUPTION_REASONS:
            return True
        for condition in status.get("conditions") or []:
            if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
                return True
    return False


def phase_of(workload: Workload, obj: dict) -> StagePhase:
    """What a workload's conditions say (pending: not finished; its pods tell whether it
    runs). A Job is queued while spec.suspend; a custom workload by its Suspended condition
    (launchers.py)."""
    conditions = _conditions(obj)
    if any(_true(conditions.get(c)) for c in workload.succeeded):
        return StagePhase.succeeded
    if any(_true(conditions.get(c)) for c in workload.failed):
        return StagePhase.failed
    if workload.custom:
        suspended = any(_true(conditions.get(c)) for c in workload.suspended)
    else:
        suspended = bool((obj.get("spec") or {}).get("suspend"))
    return StagePhase.queued if suspended else StagePhase.pending


def _conditions(obj: dict) -> dict[str, dict]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def _true(condition: dict | None) -> bool:
    return condition is not None and condition.get("status") == "True"


def _since(conditions: dict[str, dict], created: datetime | None) -> datetime | None:
    """When the Suspended condition last changed (queued, or admitted again), else `created`."""
    suspended = conditions.get("Suspended")
    if suspended is None:
        return created
    return _parse_time(suspended.get("lastTransitionTime")) or created


def _parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
