"""The one module that talks to the Kubernetes API server (besides Kopf itself)."""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from datetime import datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from sami_operator.builders import MANAGED_BY
from sami_operator.launchers import BY_KIND, CUSTOM, JOB, LAUNCHERS
from sami_operator.models import GROUP, StagePhase
from sami_operator.reconcile import ChildState, CreateRefused

log = logging.getLogger(__name__)

JOB_API = JOB.api
# How each workload kind labels its pods (rank 0's pod sorts first by name: launchers.py).
_POD_SELECTORS = {w.api: w.pod_selector for w in LAUNCHERS.values()}
# Waiting reasons that do not go away by themselves: shown in the run's status.
STUCK_REASONS = {
    "CreateContainerConfigError",
    "CreateContainerError",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CrashLoopBackOff",
}
# Events of a workload controller that could not create a pod (the Job and JobSet
# controllers': FailedCreate; Kubeflow's training operator: FailedCreatePod).
FAILED_CREATE = ("FailedCreate", "FailedCreatePod")
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


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None):
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

    def create(self, obj: dict[str, Any]) -> bool:
        """Create an object; False when it already exists (created by an earlier pass).
        Raises CreateRefusedError with the API server's message when it refuses it."""
        ns = obj["metadata"]["namespace"]
        kind = obj["kind"]
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
                return False
            raise CreateRefusedError(
                CreateRefused(kind, obj["metadata"]["name"], err.status, _api_message(err))
            ) from err
        return True

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

    def observe_children(
        self, namespace: str, run: str, look_into: Collection[str] | None = None
    ) -> dict[str, ChildState]:
        """Every workload of a run, by name, with its phase; with its pods' story (rank 0's
        exit, why they wait) only for those in `look_into` (None: all), so that children
        whose outcome is already recorded cost no pod listing."""
        selector = f"{GROUP}/run={run},app.kubernetes.io/managed-by={MANAGED_BY}"
        found: dict[str, ChildState] = {}
        for job in self.batch.list_namespaced_job(namespace, label_selector=selector).items:
            if look_into is not None and job.metadata.name not in look_into:
                found[job.metadata.name] = ChildState(_job_phase(job))
                continue
            found[job.metadata.name] = self._job_state(namespace, job)
        for api in (w.api for w in CUSTOM):
            group, version, plural = api
            try:
                items = self.custom.list_namespaced_custom_object(
                    group, version, namespace, plural, label_selector=selector
                )["items"]
            except ApiException as err:
                if err.status == 404:
                    continue  # the API is not served here
                raise
            for obj in items:
                name = obj["metadata"]["name"]
                if look_into is not None and name not in look_into:
                    found[name] = ChildState(_custom_phase(obj))
                    continue
                found[name] = self._custom_state(namespace, api, obj)
        return found

    def _pods(self, namespace: str, api, name: str) -> list:
        selector = _POD_SELECTORS[api].format(name=name)
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        return sorted(pods, key=lambda p: p.metadata.name)

    def _unfinished(
        self, namespace: str, api, name: str, created: datetime | None, since: datetime | None
    ) -> ChildState:
        """A child still waiting for or running its pods. Running once every pod of it runs
        (a Job's `active` and a JobSet's active Jobs count Pending pods too); else waiting
        since its oldest Pending pod was created, or since the child was (`since`: when it
        was queued, if it was), with what stalls it, if anything does."""
        pods = self._pods(namespace, api, name)
        pending = [p for p in pods if p.status.phase in (None, "Pending")]
        if pods and not pending:
            return ChildState(StagePhase.running)
        if pending:
            since = min(p.metadata.creation_timestamp for p in pending)
        stalled, message = stuck(pending)
        if not pods:
            stalled, message = self._failed_create(namespace, name)
        return ChildState(
            StagePhase.pending, message=message, waiting_since=since or created, stalled=stalled
        )

    def _failed_create(self, namespace: str, name: str) -> tuple[str | None, str | None]:
        """The latest event saying a workload controller could not create the child's pods
        (a quota, Pod Security or a webhook refusing them, a missing ServiceAccount)."""
        try:
            found = self.core.list_namespaced_event(namespace, field_selector="type=Warning")
        except ApiException as err:
            if err.status != 403:
                raise
            log.warning("cannot list events in %s (RBAC: list events): %s", namespace, err.reason)
            return None, None
        events = found.items
        mine = [
            e
            for e in events
            if e.reason in FAILED_CREATE
            and (e.involved_object.name == name or e.involved_object.name.startswith(f"{name}-"))
        ]
        if not mine:
            return None, None
        latest = max(
            mine, key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp
        )
        return (
            "FailedCreate",
            f"{latest.involved_object.kind} {latest.involved_object.name}: {latest.message}",
        )

    def _job_state(self, namespace: str, job) -> ChildState:
        conditions = {c.type: c for c in (job.status.conditions or [])}
        name, phase = job.metadata.name, _job_phase(job)
        if phase in (StagePhase.succeeded, StagePhase.failed):
            return self._terminal(namespace, JOB_API, name, phase)
        created = job.metadata.creation_timestamp
        if phase == StagePhase.queued:
            return ChildState(phase, waiting_since=_since(conditions, created))
        return self._unfinished(namespace, JOB_API, name, created, None)

    def _custom_state(self, namespace: str, api, obj: dict[str, Any]) -> ChildState:
        conditions = {c["type"]: c for c in obj.get("status", {}).get("conditions", []) or []}
        name, phase = obj["metadata"]["name"], _custom_phase(obj)
        if phase in (StagePhase.succeeded, StagePhase.failed):
            return self._terminal(namespace, api, name, phase)
        created = _parse_time(obj["metadata"].get("creationTimestamp"))
        since = _since(conditions, created)
        if phase == StagePhase.queued:
            return ChildState(phase, waiting_since=since)
        # Resumed (admitted again): its wait starts when it was.
        resumed = since if "Suspended" in conditions else None
        return self._unfinished(namespace, api, name, created, resumed)

    def _terminal(self, namespace: str, api, name: str, phase: StagePhase) -> ChildState:
        pods = self._pods(namespace, api, name)
        disrupted = phase == StagePhase.failed and disruption(pods)
        # Pods being deleted (a launcher stopping the survivors of a failure) were killed:
        # their exit code would hide the one that says why the workload failed.
        pods = [p for p in pods if p.metadata.deletion_timestamp is None] or pods
        for pod in pods:
            for status in pod.status.container_statuses or []:
                terminated = status.state.terminated if status.state else None
                if terminated is not None:
                    return ChildState(
                        phase,
                        terminated.exit_code,
                        terminated.message,
                        terminated.reason,
                        disrupted=disrupted,
                    )
        return ChildState(phase, disrupted=disrupted)


def stuck(pods: list) -> tuple[str | None, str | None]:
    """(reason, message) of the first pod stuck for a reason someone must act on: a
    container (or init container) that cannot start, or a pod the scheduler cannot place."""
    for pod in pods:
        statuses = [
            *(pod.status.init_container_statuses or []),
            *(pod.status.container_statuses or []),
        ]
        for status in statuses:
            waiting = status.state.waiting if status.state else None
            if waiting is not None and waiting.reason in STUCK_REASONS:
                return (
                    waiting.reason,
                    f"pod {pod.metadata.name}: {waiting.reason}: {waiting.message or ''}".rstrip(
                        ": "
                    ),
                )
        for condition in pod.status.conditions or []:
            if condition.type == "PodScheduled" and condition.reason == "Unschedulable":
                return (
                    "Unschedulable",
                    f"pod {pod.metadata.name}: Unschedulable: {condition.message or ''}",
                )
    return None, None


def disruption(pods: list) -> bool:
    """Whether a failed child's pods were taken away rather than failing: none is left, or
    every one left is being deleted (a node drained or lost on clusters without disruption
    conditions; a pod that failed on its own stays), or one carries Kubernetes' DisruptionTarget
    condition (1.26+: eviction, preemption, taint manager, node shutdown) or a kubelet
    eviction's reason."""
    if all(p.metadata.deletion_timestamp is not None for p in pods):
        return True
    for pod in pods:
        if pod.status.reason in DISRUPTION_REASONS:
            return True
        for condition in pod.status.conditions or []:
            if condition.type == "DisruptionTarget" and condition.status == "True":
                return True
    return False


def _job_phase(job) -> StagePhase:
    """What a Job's conditions say (pending: not finished; its pods tell whether it runs)."""
    conditions = {c.type: c for c in (job.status.conditions or [])}
    if _true(conditions.get("Complete")):
        return StagePhase.succeeded
    if _true(conditions.get("Failed")):
        return StagePhase.failed
    return StagePhase.queued if job.spec.suspend else StagePhase.pending


def _custom_phase(obj: dict[str, Any]) -> StagePhase:
    """The same for a training launcher's workload, by its conditions (launchers.py)."""
    workload = BY_KIND[obj["kind"]]
    conditions = {c["type"]: c for c in obj.get("status", {}).get("conditions", []) or []}
    if any(_true(conditions.get(c)) for c in workload.succeeded):
        return StagePhase.succeeded
    if any(_true(conditions.get(c)) for c in workload.failed):
        return StagePhase.failed
    suspended = any(_true(conditions.get(c)) for c in workload.suspended)
    return StagePhase.queued if suspended else StagePhase.pending


def _true(condition) -> bool:
    if condition is None:
        return False
    status = condition["status"] if isinstance(condition, dict) else condition.status
    return status == "True"


def _since(conditions: dict, created: datetime | None) -> datetime | None:
    """When the Suspended condition last changed (queued, or admitted again), else `created`."""
    suspended = conditions.get("Suspended")
    if suspended is None:
        return created
    when = (
        suspended.get("lastTransitionTime")
        if isinstance(suspended, dict)
        else suspended.last_transition_time
    )
    return _parse_time(when) if isinstance(when, str) else (when or created)


def _parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
