"""Emulated training-operator controllers for the test control plane.

``PyTorchJobController`` plays Kubeflow Training Operator for ``PyTorchJob`` (kubeflow.org/v1;
CRD stand-in in tests/k8s/crds/kubeflow.org_pytorchjobs.yaml), following its documented
behaviour, so that the pods it creates are run by ``LocalKubelet``:

- Pods ``<job>-master-0`` and ``<job>-worker-<i>`` from ``spec.pytorchReplicaSpecs.{Master,Worker}``
  (``replicas``, ``restartPolicy``: Always/OnFailure/Never go to the pod, ExitCode becomes Never
  with the controller recreating pods that exit with a retryable code, 128 and above), owned by
  the job (controller ownerReference, so deleting the job garbage-collects them), labelled
  ``training.kubeflow.org/{job-name,operator-name,replica-type,replica-index}`` and
  ``training.kubeflow.org/job-role=master`` on the master. A missing pod of an unfinished job is
  (re)created, as the real operator does.
- Environment added to every container, as the operator does: ``PYTHONUNBUFFERED``,
  ``MASTER_ADDR``/``MASTER_PORT`` and ``PET_MASTER_ADDR``/``PET_MASTER_PORT`` (when there is a
  Master), ``WORLD_SIZE`` (replicas x nprocPerNode when that is an integer, else replicas),
  ``RANK`` and ``PET_NODE_RANK`` (master 0, worker i -> i+1), ``PET_NPROC_PER_NODE``
  (``spec.nprocPerNode``, default ``auto``) and ``PET_NNODES`` (total replicas).
  Deviations for one machine: the master address is ``127.0.0.1`` (upstream: the master's
  headless Service ``<job>-master-0``, not created here), and without a container port named
  ``pytorchjob-port`` on the master's ``pytorch`` container the port is a free local port chosen
  per job (upstream default 23456), so concurrent jobs do not collide.
- ``status``: ``conditions`` (type, status, reason, message, lastUpdateTime,
  lastTransitionTime) with reasons ``PyTorchJobCreated``/``Running``/``Restarting``/
  ``Succeeded``/``Failed``: Created on first sight; Running while the master (or, without a
  master, any worker) runs; Succeeded when the master has succeeded (without a master: every
  worker); Failed when a replica fails under Never/OnFailure/Always or ``runPolicy.backoffLimit``
  is exceeded by container restarts; Restarting while ExitCode pods are recreated. Running turns
  False when the job finishes; nothing changes after Failed. ``replicaStatuses.<Type>``
  {active, succeeded, failed}, ``startTime``, ``completionTime``.
- ``runPolicy.cleanPodPolicy`` (None by default, Running, All) applies once the job finished;
  ``runPolicy.suspend`` deletes the pods and sets a Suspended condition.
Not emulated: elasticPolicy (rendezvous env), services, ttlSecondsAfterFinished,
activeDeadlineSeconds, schedulingPolicy.

JobSet (jobset.x-k8s.io/v1alpha2) is a later step and would live here too.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from tests.k8s.controlplane import ApiError, ControlPlane, KubeClient, free_port
from tests.k8s.kubelet import now

log = logging.getLogger("tests.k8s.training_operators")

CRD_DIR = Path(__file__).parent / "crds"
PYTORCHJOB_CRD = CRD_DIR / "kubeflow.org_pytorchjobs.yaml"
API = "/apis/kubeflow.org/v1"
LABEL = "training.kubeflow.org"
REPLICA_TYPES = ("Master", "Worker")


def install_pytorchjob_crd(cp: ControlPlane) -> None:
    cp.kubectl("apply", "--validate=false", "-f", str(PYTORCHJOB_CRD))
    cp.kubectl(
        "wait", "--for=condition=Established", "crd/pytorchjobs.kubeflow.org", "--timeout=30s"
    )


class PyTorchJobController:
    def __init__(
        self,
        control_plane: ControlPlane,
        *,
        namespaces: Iterable[str] | None = None,
        poll_interval: float = 0.3,
    ):
        self.cp = control_plane
        self.namespaces = set(namespaces) if namespaces is not None else None
        self.poll_interval = poll_interval
        self.errors: list[str] = []
        self._ports: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PyTorchJobController:
        install_pytorchjob_crd(self.cp)
        self._thread = threading.Thread(
            target=self._loop, name="pytorchjob-controller", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def __enter__(self) -> PyTorchJobController:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------ loop
    def _loop(self) -> None:
        with self.cp.client() as api:
            while not self._stop.is_set():
                try:
                    for job in self._list(api):
                        self.reconcile(api, job)
                except Exception as e:
                    msg = f"PyTorchJobController error: {e!r}"
                    log.warning(msg)
                    self.errors.append(msg)
                    del self.errors[:-50]
                self._stop.wait(self.poll_interval)

    def _list(self, api: KubeClient) -> list[dict]:
        if self.namespaces is None:
            return api.get(f"{API}/pytorchjobs")["items"]
        jobs = []
        for ns in sorted(self.namespaces):
            jobs += api.get(f"{API}/namespaces/{ns}/pytorchjobs")["items"]
        return jobs

    # ------------------------------------------------------------------------- reconcile
    def reconcile(self, api: KubeClient, job: dict) -> None:
        meta, spec = job["metadata"], job["spec"]
        if meta.get("deletionTimestamp"):
            return
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        status = job.get("status") or {}
        old_status = {k: v for k, v in status.items()}
        conditions = [dict(c) for c in status.get("conditions") or []]
        run_policy = spec.get("runPolicy") or {}
        replica_specs = spec.get("pytorchReplicaSpecs") or {}

        if not conditions:
            set_condition(
                conditions, "Created", "PyTorchJobCreated", f"PyTorchJob {name} is created."
            )
        pods = api.get(f"/api/v1/namespaces/{ns}/pods", labelSelector=f"{LABEL}/job-name={name}")[
            "items"
        ]
        pods = [p for p in pods if owned_by(p, uid)]
        by_name = {p["metadata"]["name"]: p for p in pods}
        finished = is_true(conditions, "Succeeded") or is_true(conditions, "Failed")

        if finished:
            self._clean_pods(api, pods, run_policy.get("cleanPodPolicy", "None"))
            return
        if run_policy.get("suspend"):
            for p in pods:
                self._delete_pod(api, p)
            set_condition(
                conditions, "Suspended", "PyTorchJobSuspended", f"PyTorchJob {name} is suspended."
            )
            self._write_status(api, job, old_status, conditions, {}, status.get("startTime"))
            return
        if is_true(conditions, "Suspended"):
            set_condition(
                conditions,
                "Suspended",
                "PyTorchJobResumed",
                f"PyTorchJob {name} is resumed.",
                status="False",
            )

        # Create missing pods; recreate ExitCode pods that failed with a retryable code.
        restarting = False
        for rtype in REPLICA_TYPES:
            rspec = replica_specs.get(rtype)
            if not rspec:
                continue
            for index in range(int(rspec.get("replicas", 1))):
                pod_name = f"{name}-{rtype.lower()}-{index}"
                pod = by_name.get(pod_name)
                if pod is not None and rspec.get("restartPolicy") == "ExitCode":
                    code = exit_code(pod)
                    if pod["status"].get("phase") == "Failed" and code is not None and code >= 128:
                        self._delete_pod(api, pod)
                        restarting = True
                        continue
                if pod is None:
                    self._create_pod(api, job, rtype, index)

        # Replica statuses and conditions.
        counts: dict[str, dict[str, int]] = {}
        for rtype in REPLICA_TYPES:
            if rtype not in replica_specs:
                continue
            c = {"active": 0, "succeeded": 0, "failed": 0}
            for p in pods:
                if p["metadata"]["labels"].get(f"{LABEL}/replica-type") != rtype.lower():
                    continue
                phase = (p.get("status") or {}).get("phase")
                if phase == "Running":
                    c["active"] += 1
                elif phase == "Succeeded":
                    c["succeeded"] += 1
                elif phase == "Failed":
                    c["failed"] += 1
            counts[rtype] = c
        start_time = status.get("startTime") or now()

        backoff = run_policy.get("backoffLimit")
        restarts = sum(
            cs.get("restartCount", 0)
            for p in pods
            for cs in (p.get("status") or {}).get("containerStatuses") or []
        )
        master = "Master" in replica_specs
        for rtype, c in counts.items():
            rspec = replica_specs[rtype]
            replicas = int(rspec.get("replicas", 1))
            decides = rtype == "Master" or not master
            if decides and c["succeeded"] == replicas:
                set_condition(
                    conditions,
                    "Succeeded",
                    "PyTorchJobSucceeded",
                    f"PyTorchJob {ns}/{name} successfully completed.",
                )
            elif decides and c["active"] > 0:
                set_condition(
                    conditions,
                    "Running",
                    "PyTorchJobRunning",
                    f"PyTorchJob {ns}/{name} is running.",
                )
            if c["failed"] > 0:
                if rspec.get("restartPolicy") == "ExitCode" and restarting:
                    set_condition(
                        conditions,
                        "Restarting",
                        "PyTorchJobRestarting",
                        f"PyTorchJob {name} is restarting because {c['failed']} "
                        f"{rtype} replica(s) failed.",
                    )
                elif rspec.get("restartPolicy") != "ExitCode" or not restarting:
                    set_condition(
                        conditions,
                        "Failed",
                        "PyTorchJobFailed",
                        f"PyTorchJob {name} is failed because {c['failed']} {rtype} "
                        "replica(s) failed.",
                    )
        if backoff is not None and restarts > int(backoff):
            set_condition(
                conditions,
                "Failed",
                "PyTorchJobFailed",
                f"PyTorchJob {name} has failed because it has reached the specified backoff limit",
            )
        self._write_status(api, job, old_status, conditions, counts, start_time)

    # -------------------------------------------------------------------------- helpers
    def _write_status(self, api, job, old_status, conditions, counts, start_time) -> None:
        status = dict(old_status)
        status["conditions"] = conditions
        if counts:
            status["replicaStatuses"] = counts
        if start_time:
            status["startTime"] = start_time
        if (is_true(conditions, "Succeeded") or is_true(conditions, "Failed")) and not status.get(
            "completionTime"
        ):
            status["completionTime"] = now()
        if status == old_status:
            return
        meta = job["metadata"]
        with contextlib.suppress(ApiError):
            api.merge_patch(
                f"{API}/namespaces/{meta['namespace']}/pytorchjobs/{meta['name']}/status",
                {"metadata": {"uid": meta["uid"]}, "status": status},
            )

    def _master_port(self, job: dict) -> int:
        master = (job["spec"].get("pytorchReplicaSpecs") or {}).get("Master") or {}
        containers = ((master.get("template") or {}).get("spec") or {}).get("containers") or []
        for c in containers:
            if c.get("name") == "pytorch":
                for p in c.get("ports") or []:
                    if p.get("name") == "pytorchjob-port":
                        return int(p["containerPort"])
        uid = job["metadata"]["uid"]
        if uid not in self._ports:
            self._ports[uid] = free_port()
        return self._ports[uid]

    def _create_pod(self, api: KubeClient, job: dict, rtype: str, index: int) -> None:
        meta, spec = job["metadata"], job["spec"]
        name = meta["name"]
        rspecs = spec["pytorchReplicaSpecs"]
        rspec = rspecs[rtype]
        template = rspec.get("template") or {}
        pod_meta = dict(template.get("metadata") or {})
        labels = dict(pod_meta.get("labels") or {})
        labels.update(
            {
                f"{LABEL}/job-name": name,
                f"{LABEL}/operator-name": "pytorchjob-controller",
                f"{LABEL}/replica-type": rtype.lower(),
                f"{LABEL}/replica-index": str(index),
            }
        )
        if rtype == "Master":
            labels[f"{LABEL}/job-role"] = "master"
        pod_spec = dict(template.get("spec") or {})
        policy = rspec.get("restartPolicy", "Never")
        pod_spec["restartPolicy"] = "Never" if policy == "ExitCode" else policy

        total = sum(int(r.get("replicas", 1)) for r in rspecs.values())
        nproc = str(spec.get("nprocPerNode") or "auto")
        rank = index + 1 if rtype == "Worker" and "Master" in rspecs else index
        env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
        if "Master" in rspecs:
            port = str(self._master_port(job))
            env += [
                {"name": "MASTER_PORT", "value": port},
                {"name": "MASTER_ADDR", "value": "127.0.0.1"},
                {"name": "PET_MASTER_PORT", "value": port},
                {"name": "PET_MASTER_ADDR", "value": "127.0.0.1"},
                {
                    "name": "WORLD_SIZE",
                    "value": str(total * int(nproc)) if nproc.isdigit() else str(total),
                },
                {"name": "RANK", "value": str(rank)},
                {"name": "PET_NPROC_PER_NODE", "value": nproc},
                {"name": "PET_NODE_RANK", "value": str(rank)},
            ]
        env.append({"name": "PET_NNODES", "value": str(total)})
        containers = []
        for c in pod_spec.get("containers") or []:
            c = dict(c)
            c["env"] = list(c.get("env") or []) + env
            containers.append(c)
        pod_spec["containers"] = containers
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                **pod_meta,
                "name": f"{name}-{rtype.lower()}-{index}",
                "namespace": meta["namespace"],
                "labels": labels,
                "ownerReferences": [
                    {
                        "apiVersion": "kubeflow.org/v1",
                        "kind": "PyTorchJob",
                        "name": name,
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": pod_spec,
        }
        try:
            api.create(f"/api/v1/namespaces/{meta['namespace']}/pods", pod)
        except ApiError as e:
            if e.status_code != 409:  # an old pod still terminating: next sync
                raise

    def _delete_pod(self, api: KubeClient, pod: dict) -> None:
        m = pod["metadata"]
        with contextlib.suppress(ApiError):
            api.delete(f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}")

    def _clean_pods(self, api: KubeClient, pods: list[dict], policy: str) -> None:
        for p in pods:
            if p["metadata"].get("deletionTimestamp"):
                continue
            phase = (p.get("status") or {}).get("phase")
            if policy == "All" or (policy == "Running" and phase in ("Running", "Pending")):
                self._delete_pod(api, p)


def owned_by(obj: dict, uid: str) -> bool:
    return any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])


def exit_code(pod: dict) -> int | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return term.get("exitCode")
    return None


def is_true(conditions: list[dict], ctype: str) -> bool:
    return any(c["type"] == ctype and c["status"] == "True" for c in conditions)


def set_condition(
    conditions: list[dict], ctype: str, reason: str, message: str, status: str = "True"
) -> None:
    """Kubeflow's condition rules: nothing changes after Failed; Running and Restarting replace
    each other; Succeeded/Failed turn Running to False; an unchanged condition is kept as is."""
    if is_true(conditions, "Failed"):
        return
    current = next((c for c in conditions if c["type"] == ctype), None)
    if current and current["status"] == status and current.get("reason") == reason:
        return
    t = now()
    new = {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastUpdateTime": t,
        "lastTransitionTime": current["lastTransitionTime"]
        if current and current["status"] == status
        else t,
    }
    kept = []
    for c in conditions:
        if c["type"] == ctype:
            continue
        if {ctype, c["type"]} == {"Running", "Restarting"}:
            continue
        if ctype in ("Succeeded", "Failed") and c["type"] == "Running":
            c = {**c, "status": "False", "lastTransitionTime": t, "lastUpdateTime": t}
        kept.append(c)
    conditions[:] = kept + [new]
