"""The one module that talks to the Kubernetes API server (besides Kopf itself)."""

from __future__ import annotations

import logging
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from sami_operator.builders import MANAGED_BY
from sami_operator.launchers import BY_API, BY_KIND, CUSTOM, JOB, LAUNCHERS
from sami_operator.models import GROUP, StagePhase
from sami_operator.reconcile import ChildState

log = logging.getLogger(__name__)

JOB_API = JOB.api
# How each workload kind labels its pods, and which pod speaks for it (rank 0).
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
        """Create an object; False when it already exists (created by an earlier pass)."""
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
            raise
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

    def observe_children(self, namespace: str, run: str) -> dict[str, ChildState]:
        """Every workload of a run, by name, with its phase and rank-0 exit."""
        selector = f"{GROUP}/run={run},app.kubernetes.io/managed-by={MANAGED_BY}"
        found: dict[str, ChildState] = {}
        for job in self.batch.list_namespaced_job(namespace, label_selector=selector).items:
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
                found[obj["metadata"]["name"]] = self._custom_state(namespace, api, obj)
        return found

    def _waiting(self, namespace: str, api, name: str) -> str | None:
        """Why a child's pods are stuck, if they are: a container waiting for a reason a
        user must act on (a missing Secret, an image that cannot be pulled), or a pod the
        scheduler cannot place. None while they are merely starting or running."""
        selector = _POD_SELECTORS[api].format(name=name)
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            for status in pod.status.container_statuses or []:
                waiting = status.state.waiting if status.state else None
                if waiting is not None and waiting.reason in STUCK_REASONS:
                    return f"pod {pod.metadata.name}: {waiting.reason}: {waiting.message or ''}"
            for condition in pod.status.conditions or []:
                if condition.type == "PodScheduled" and condition.reason == "Unschedulable":
                    return f"pod {pod.metadata.name}: Unschedulable: {condition.message or ''}"
        return None

    def _job_state(self, namespace: str, job) -> ChildState:
        conditions = {c.type: c.status for c in (job.status.conditions or [])}
        if conditions.get("Complete") == "True":
            return self._terminal(namespace, JOB_API, job.metadata.name, StagePhase.succeeded)
        if conditions.get("Failed") == "True":
            return self._terminal(namespace, JOB_API, job.metadata.name, StagePhase.failed)
        if job.spec.suspend:
            return ChildState(StagePhase.queued)
        phase = StagePhase.running if job.status.active else StagePhase.pending
        return ChildState(phase, message=self._waiting(namespace, JOB_API, job.metadata.name))

    def _custom_state(self, namespace: str, api, obj: dict[str, Any]) -> ChildState:
        conditions = {
            c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", []) or []
        }
        name = obj["metadata"]["name"]
        workload = BY_API[api]
        if any(conditions.get(c) == "True" for c in workload.succeeded):
            return self._terminal(namespace, api, name, StagePhase.succeeded)
        if any(conditions.get(c) == "True" for c in workload.failed):
            return self._terminal(namespace, api, name, StagePhase.failed)
        if any(conditions.get(c) == "True" for c in workload.suspended):
            return ChildState(StagePhase.queued)
        # JobSet and TrainJob have no Running condition: they run while they have active
        # child Jobs (launchers.py).
        phase = StagePhase.running if workload.running(obj) else StagePhase.pending
        return ChildState(phase, message=self._waiting(namespace, api, name))

    def _terminal(self, namespace: str, api, name: str, phase: StagePhase) -> ChildState:
        selector = _POD_SELECTORS[api].format(name=name)
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        # Pods being deleted (a launcher stopping the survivors of a failure) were killed:
        # their exit code would hide the one that says why the workload failed.
        pods = [p for p in pods if p.metadata.deletion_timestamp is None] or pods
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            for status in pod.status.container_statuses or []:
                terminated = status.state.terminated if status.state else None
                if terminated is not None:
                    return ChildState(
                        phase, terminated.exit_code, terminated.message, terminated.reason
                    )
        return ChildState(phase)
