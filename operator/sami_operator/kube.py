"""The one module that talks to the Kubernetes API server (besides Kopf itself)."""

from __future__ import annotations

import logging
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from sami_operator.builders import JOB_API, JOBSET_API, MANAGED_BY, PYTORCHJOB_API
from sami_operator.models import GROUP, StagePhase
from sami_operator.reconcile import ChildState

log = logging.getLogger(__name__)

# How each workload kind labels its pods, and which pod speaks for it (rank 0).
_POD_SELECTORS = {
    JOB_API: "job-name={name}",
    PYTORCHJOB_API: (
        "training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master"
    ),
    JOBSET_API: "jobset.sigs.k8s.io/jobset-name={name}",
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
        served = {"Job"}
        if PYTORCHJOB_API[:2] in versions:
            served.add("PyTorchJob")
        if JOBSET_API[:2] in versions:
            served.add("JobSet")
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
                group, version = obj["apiVersion"].split("/")
                plural = {"PyTorchJob": "pytorchjobs", "JobSet": "jobsets"}[kind]
                self.custom.create_namespaced_custom_object(group, version, ns, plural, obj)
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        return True

    def observe_children(self, namespace: str, run: str) -> dict[str, ChildState]:
        """Every workload of a run, by name, with its phase and rank-0 exit."""
        selector = f"{GROUP}/run={run},app.kubernetes.io/managed-by={MANAGED_BY}"
        found: dict[str, ChildState] = {}
        for job in self.batch.list_namespaced_job(namespace, label_selector=selector).items:
            found[job.metadata.name] = self._job_state(namespace, job)
        for api in (PYTORCHJOB_API, JOBSET_API):
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

    def _job_state(self, namespace: str, job) -> ChildState:
        conditions = {c.type: c.status for c in (job.status.conditions or [])}
        if conditions.get("Complete") == "True":
            return self._terminal(namespace, JOB_API, job.metadata.name, StagePhase.succeeded)
        if conditions.get("Failed") == "True":
            return self._terminal(namespace, JOB_API, job.metadata.name, StagePhase.failed)
        if job.spec.suspend:
            return ChildState(StagePhase.queued)
        return ChildState(StagePhase.running if job.status.active else StagePhase.pending)

    def _custom_state(self, namespace: str, api, obj: dict[str, Any]) -> ChildState:
        conditions = {
            c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", []) or []
        }
        name = obj["metadata"]["name"]
        if conditions.get("Succeeded") == "True" or conditions.get("Completed") == "True":
            return self._terminal(namespace, api, name, StagePhase.succeeded)
        if conditions.get("Failed") == "True":
            return self._terminal(namespace, api, name, StagePhase.failed)
        if conditions.get("Suspended") == "True":
            return ChildState(StagePhase.queued)
        running = conditions.get("Running") == "True"
        return ChildState(StagePhase.running if running else StagePhase.pending)

    def _terminal(self, namespace: str, api, name: str, phase: StagePhase) -> ChildState:
        selector = _POD_SELECTORS[api].format(name=name)
        pods = self.core.list_namespaced_pod(namespace, label_selector=selector).items
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            for status in pod.status.container_statuses or []:
                terminated = status.state.terminated if status.state else None
                if terminated is not None:
                    return ChildState(phase, terminated.exit_code, terminated.message)
        return ChildState(phase)
