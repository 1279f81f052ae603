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
  headless Service ``<job>-master-0``, not created here; an init container's env value naming
  that Service, optionally with ``.<namespace>[.svc[.cluster.local]]``, becomes ``127.0.0.1``
  too), no ``init-pytorch`` init container is added to the workers (upstream: one that waits
  for the master's Service name to resolve, 100 tries 2 s apart by default), and without a
  container port named ``pytorchjob-port`` on the master's ``pytorch`` container the port is a
  free local port chosen per job (upstream default 23456), so concurrent jobs do not collide.
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

``JobSetController`` plays the JobSet controller (jobset.x-k8s.io/v1alpha2; CRD stand-in in
tests/k8s/crds/jobset.x-k8s.io_jobsets.yaml). It creates batch/v1 Jobs; the real Job controller
of the test control plane creates their pods, which ``LocalKubelet`` runs:

- Defaults, as upstream's webhook sets them: ``replicas`` 1, ``network.enableDNSHostnames`` true,
  ``network.subdomain`` the JobSet's name, ``successPolicy`` {operator: All, all replicated
  jobs}, pod ``restartPolicy`` OnFailure when the template leaves it out.
- For each ``spec.replicatedJobs[]`` entry, ``replicas`` Jobs named
  ``<jobset>-<replicatedJob>-<jobIndex>``, from its Job template, owned by the JobSet (controller
  ownerReference). The Jobs and their pod templates carry the labels AND annotations
  ``jobset.sigs.k8s.io/{jobset-name,replicatedjob-name,replicatedjob-replicas,global-replicas,
  job-index,job-global-index,job-key,restart-attempt}`` (restart-attempt: ``status.restarts``
  when the Job was made). With DNS hostnames on, the pod template gets
  ``subdomain: <subdomain>`` and a headless Service of that name selecting
  ``jobset-name=<jobset>`` is created, owned by the JobSet. A missing Job of an unfinished
  JobSet is (re)created, once an older Job of that name is gone.
- Failure: when a Job of the current attempt fails, with no ``failurePolicy`` the JobSet fails
  (reason ``FailedJobs``); else, while ``status.restartsCountTowardsMax`` <
  ``failurePolicy.maxRestarts``, ``restarts`` and ``restartsCountTowardsMax`` go up by one and every
  Job of an older attempt is deleted (foreground propagation: its pods go first) and recreated
  with the new restart-attempt; once the restarts are used up the JobSet fails (reason
  ``ReachedMaxRestarts``). The message names the first Job that failed.
- Success: once the succeeded Jobs of the ``successPolicy.targetReplicatedJobs`` (default: all)
  reach every one of their replicas (``operator: All``) or one (``Any``): Completed, reason
  ``AllJobsCompleted``. Once Completed or Failed, ``status.terminalState`` says which and the
  still active Jobs are deleted; nothing else changes.
- ``status``: ``conditions`` (metav1.Condition: type, status, reason, message,
  lastTransitionTime; a new condition is added only when True, an existing one changes when its
  status does), ``restarts``, ``restartsCountTowardsMax``, ``terminalState``,
  ``replicatedJobsStatus`` [{name, ready, succeeded, failed, active, suspended}] over the Jobs of
  the current attempt (ready: a Job whose Ready plus succeeded pods reach min(parallelism,
  completions)). There is no Running condition upstream: a running JobSet has active Jobs.
- ``spec.suspend``: Suspended condition True (reason ``SuspendedJobs``); False (``ResumeJobs``)
  when resumed. JobSets with a ``spec.managedBy`` other than the built-in controller's are left
  alone.
Deviations for a 1.20 control plane on one machine:
- 1.20 has neither Indexed Jobs nor Job ``suspend``. Jobs are NonIndexed (upstream defaults
  ``completionMode: Indexed``); a Job of one pod (completions and parallelism 1) gets the pod
  hostname ``<job>-0`` that Indexed mode would give its pod, larger Jobs none (no
  JOB_COMPLETION_INDEX either). A suspended JobSet has its active Jobs deleted (upstream: kept
  with ``suspend: true``, so their pods go) and its Jobs created again on resume.
- All pods share 127.0.0.1 and there is no cluster DNS (LocalKubelet sets HOSTNAME to the pod
  name). As ``PyTorchJobController`` does for the master address, the emulation rewrites the
  Jobs' pod templates: in every container's ``env`` values, a DNS name of one of this JobSet's
  pods (``<jobset>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain>``, optionally followed by
  ``.<namespace>[.svc[.cluster.local]]``) becomes ``127.0.0.1``, and a literal ``MASTER_PORT`` /
  ``PET_MASTER_PORT`` value becomes a free local port chosen per JobSet and restart attempt
  (upstream every pod has its own IP, so a fixed port such as 29500 is fine there; here it would
  collide with other jobs on the machine). Command and args are not rewritten: pass the
  address through env (torchrun reads PET_MASTER_ADDR/PET_MASTER_PORT).
Not emulated: failurePolicy.rules (every failure takes the default RestartJobSet action) and
restartStrategy, startupPolicy, dependsOn, coordinator, ttlSecondsAfterFinished, exclusive
placement, Events, the headless Service's endpoints (no endpoints controller runs).
``TrainJobController`` plays Kubeflow Trainer's TrainJob controller (trainer.kubeflow.org/v1alpha1)
on top of ``JobSetController``; its docstring says what it does and where it deviates.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import re
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

JOBSET_CRD = CRD_DIR / "jobset.x-k8s.io_jobsets.yaml"
JOBSET_API = "/apis/jobset.x-k8s.io/v1alpha2"
JS = "jobset.sigs.k8s.io"
JOBSET_CONTROLLER_NAME = f"{JS}/jobset-controller"
PORT_VARS = ("MASTER_PORT", "PET_MASTER_PORT")


def install_crd(cp: ControlPlane, path: Path, name: str) -> None:
    cp.kubectl("apply", "--validate=false", "-f", str(path))
    cp.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=30s")


def install_pytorchjob_crd(cp: ControlPlane) -> None:
    install_crd(cp, PYTORCHJOB_CRD, "pytorchjobs.kubeflow.org")


def install_jobset_crd(cp: ControlPlane) -> None:
    install_crd(cp, JOBSET_CRD, "jobsets.jobset.x-k8s.io")


class _PollingController:
    """A background thread that lists the objects of one custom resource (all namespaces or
    the given ones) every ``poll_interval`` seconds and reconciles each; errors are logged
    and kept in ``errors`` (the last 50)."""

    api: str
    plural: str

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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def install(self) -> None:
        raise NotImplementedError

    def reconcile(self, api: KubeClient, obj: dict) -> None:
        raise NotImplementedError

    def start(self):
        self.install()
        self._thread = threading.Thread(
            target=self._loop, name=f"{type(self).__name__}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        with self.cp.client() as api:
            while not self._stop.is_set():
                try:
                    for obj in self._list(api):
                        self.reconcile(api, obj)
                except Exception as e:
                    msg = f"{type(self).__name__} error: {e!r}"
                    log.warning(msg)
                    self.errors.append(msg)
                    del self.errors[:-50]
                self._stop.wait(self.poll_interval)

    def _list(self, api: KubeClient) -> list[dict]:
        if self.namespaces is None:
            return api.get(f"{self.api}/{self.plural}")["items"]
        items = []
        for ns in sorted(self.namespaces):
            items += api.get(f"{self.api}/namespaces/{ns}/{self.plural}")["items"]
        return items


class PyTorchJobController(_PollingController):
    api = API
    plural = "pytorchjobs"

    def __init__(self, control_plane: ControlPlane, **kwargs):
        super().__init__(control_plane, **kwargs)
        self._ports: dict[str, int] = {}

    def install(self) -> None:
        install_pytorchjob_crd(self.cp)

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
        # One machine, no cluster DNS: init containers' env naming the master's Service (as the
        # operator's wait-for-master does) gets 127.0.0.1, the master address given above.
        master_dns = re.compile(
            rf"{re.escape(name)}-master-0(?:\.{re.escape(meta['namespace'])}"
            r"(?:\.svc(?:\.cluster\.local)?)?)?"
        )
        inits = []
        for c in pod_spec.get("initContainers") or []:
            c = copy.deepcopy(c)
            for var in c.get("env") or []:
                if "value" in var and master_dns.fullmatch(var["value"]):
                    var["value"] = "127.0.0.1"
            inits.append(c)
        if inits:
            pod_spec["initContainers"] = inits
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


class JobSetController(_PollingController):
    api = JOBSET_API
    plural = "jobsets"

    def __init__(self, control_plane: ControlPlane, **kwargs):
        super().__init__(control_plane, **kwargs)
        self._ports: dict[tuple[str, int], int] = {}

    def install(self) -> None:
        install_jobset_crd(self.cp)

    # ------------------------------------------------------------------------- reconcile
    def reconcile(self, api: KubeClient, js: dict) -> None:
        meta, spec = js["metadata"], js["spec"]
        if meta.get("deletionTimestamp"):
            return
        if spec.get("managedBy", JOBSET_CONTROLLER_NAME) != JOBSET_CONTROLLER_NAME:
            return
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        old_status = js.get("status") or {}
        status = copy.deepcopy(old_status)
        status.setdefault("restarts", 0)
        conditions = status.setdefault("conditions", [])
        restarts = int(status["restarts"])

        jobs = api.get(
            f"/apis/batch/v1/namespaces/{ns}/jobs", labelSelector=f"{JS}/jobset-name={name}"
        )["items"]
        jobs = [j for j in jobs if owned_by(j, uid)]
        previous, active, succeeded, failed = [], [], [], []
        for job in jobs:
            attempt = int(job["metadata"].get("labels", {}).get(f"{JS}/restart-attempt", "0"))
            if attempt < restarts:
                previous.append(job)
            elif job_condition(job, "Failed"):
                failed.append(job)
            elif job_condition(job, "Complete"):
                succeeded.append(job)
            else:
                active.append(job)
        status["replicatedJobsStatus"] = self._replicated_jobs_status(
            api, js, active, succeeded, failed
        )

        if is_true(conditions, "Completed") or is_true(conditions, "Failed"):
            self._delete_jobs(api, active)
            self._write_status(api, js, old_status, status)
            return
        self._delete_jobs(api, previous)

        if failed:
            self._fail_or_restart(js, status, failed)
        elif self._success_policy_met(js, succeeded):
            self._finish(status, "Completed", "AllJobsCompleted", "jobset completed successfully")
        else:
            if network(js)["enableDNSHostnames"]:
                self._ensure_headless_service(api, js)
            if spec.get("suspend"):
                self._delete_jobs(api, active)
                set_jobset_condition(
                    conditions, "Suspended", "True", "SuspendedJobs", "jobset is suspended"
                )
            else:
                set_jobset_condition(
                    conditions, "Suspended", "False", "ResumeJobs", "jobset is resumed"
                )
                present = {j["metadata"]["name"] for j in jobs}
                for rjob in spec["replicatedJobs"]:
                    for index in range(replicas(rjob)):
                        if job_name(js, rjob, index) not in present:
                            self._create_job(api, js, rjob, index, restarts)
        self._write_status(api, js, old_status, status)

    # -------------------------------------------------------------------------- helpers
    def _fail_or_restart(self, js: dict, status: dict, failed: list[dict]) -> None:
        first = min(failed, key=lambda j: (failed_at(j), j["metadata"]["name"]))["metadata"]
        policy = js["spec"].get("failurePolicy")
        if policy is None:
            reason, message = "FailedJobs", "jobset failed due to one or more job failures"
        elif int(status.get("restartsCountTowardsMax", 0)) >= int(policy.get("maxRestarts", 0)):
            reason, message = "ReachedMaxRestarts", "jobset failed due to reaching max restarts"
        else:
            # The next pass deletes the Jobs of this attempt and creates the new ones.
            status["restarts"] += 1
            status["restartsCountTowardsMax"] = int(status.get("restartsCountTowardsMax", 0)) + 1
            return
        self._finish(status, "Failed", reason, f"{message} (first failed job: {first['name']})")

    @staticmethod
    def _finish(status: dict, ctype: str, reason: str, message: str) -> None:
        set_jobset_condition(status["conditions"], ctype, "True", reason, message)
        status["terminalState"] = ctype

    @staticmethod
    def _success_policy_met(js: dict, succeeded: list[dict]) -> bool:
        policy = js["spec"].get("successPolicy") or {}
        rjobs = js["spec"]["replicatedJobs"]
        targets = set(policy.get("targetReplicatedJobs") or [r["name"] for r in rjobs])
        key = f"{JS}/replicatedjob-name"
        done = sum(1 for j in succeeded if j["metadata"]["labels"].get(key) in targets)
        if policy.get("operator", "All") == "Any":
            return done >= 1
        expected = sum(replicas(r) for r in rjobs if r["name"] in targets)
        return done >= expected > 0

    def _replicated_jobs_status(self, api, js, active, succeeded, failed) -> list[dict]:
        meta = js["metadata"]
        pods = api.get(
            f"/api/v1/namespaces/{meta['namespace']}/pods",
            labelSelector=f"{JS}/jobset-name={meta['name']}",
        )["items"]
        ready_pods: dict[str, int] = {}
        for p in pods:
            if not p["metadata"].get("deletionTimestamp") and pod_ready(p):
                job = p["metadata"].get("labels", {}).get("job-name", "")
                ready_pods[job] = ready_pods.get(job, 0) + 1
        out = []
        for rjob in js["spec"]["replicatedJobs"]:
            counts = {"ready": 0, "succeeded": 0, "failed": 0, "active": 0, "suspended": 0}

            def of(jobs, rjob=rjob):
                key = f"{JS}/replicatedjob-name"
                return [j for j in jobs if j["metadata"]["labels"].get(key) == rjob["name"]]

            for job in of(active):
                jspec, jstatus = job["spec"], job.get("status") or {}
                expected = min(jspec.get("parallelism", 1), jspec.get("completions", 1))
                done = jstatus.get("succeeded", 0) + ready_pods.get(job["metadata"]["name"], 0)
                counts["ready"] += done >= expected
                counts["active"] += jstatus.get("active", 0) > 0
            counts["succeeded"] = len(of(succeeded))
            counts["failed"] = len(of(failed))
            out.append({"name": rjob["name"], **counts})
        return out

    def _port(self, uid: str, attempt: int) -> int:
        if (uid, attempt) not in self._ports:
            self._ports[(uid, attempt)] = free_port()
        return self._ports[(uid, attempt)]

    def _create_job(self, api: KubeClient, js: dict, rjob: dict, index: int, attempt: int):
        meta = js["metadata"]
        ns, name = meta["namespace"], meta["name"]
        template = copy.deepcopy(rjob["template"])
        job_meta = template.get("metadata") or {}
        job_spec = template.get("spec") or {}
        pod = job_spec.setdefault("template", {})
        pod_meta = pod.setdefault("metadata", {})
        pod_spec = pod.setdefault("spec", {})
        marks = self._marks(js, rjob, index, attempt)
        for obj in (job_meta, pod_meta):
            obj["labels"] = {**(obj.get("labels") or {}), **marks}
            obj["annotations"] = {**(obj.get("annotations") or {}), **marks}
        pod_spec.setdefault("restartPolicy", "OnFailure")
        net = network(js)
        if net["enableDNSHostnames"]:
            pod_spec["subdomain"] = net["subdomain"]
            if job_spec.get("completions", 1) == 1 and job_spec.get("parallelism", 1) == 1:
                pod_spec.setdefault("hostname", f"{job_name(js, rjob, index)}-0")
        # One machine: pods' DNS names -> 127.0.0.1, a per-attempt free master port.
        pods_dns = re.compile(
            r"(?<![\w.-])"
            + "(?:"
            + "|".join(re.escape(f"{name}-{r['name']}-") for r in js["spec"]["replicatedJobs"])
            + r")\d+-\d+\."
            + re.escape(net["subdomain"])
            + rf"(?:\.{re.escape(ns)}(?:\.svc(?:\.cluster\.local)?)?)?(?![\w.-])"
        )
        port = str(self._port(meta["uid"], attempt))
        for c in [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or [])]:
            for var in c.get("env") or []:
                if "value" not in var:
                    continue
                if var["name"] in PORT_VARS:
                    var["value"] = port
                else:
                    var["value"] = pods_dns.sub("127.0.0.1", var["value"])
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                **job_meta,
                "name": job_name(js, rjob, index),
                "namespace": ns,
                "ownerReferences": [controller_ref(js, "jobset.x-k8s.io/v1alpha2", "JobSet")],
            },
            "spec": job_spec,
        }
        try:
            api.create(f"/apis/batch/v1/namespaces/{ns}/jobs", job)
        except ApiError as e:
            if e.status_code != 409:  # an old Job of that name still going: next sync
                raise

    @staticmethod
    def _marks(js: dict, rjob: dict, index: int, attempt: int) -> dict[str, str]:
        """The labels (and, same keys and values, annotations) of a child Job and its pods."""
        meta, rjobs = js["metadata"], js["spec"]["replicatedJobs"]
        before = 0
        for r in rjobs:
            if r["name"] == rjob["name"]:
                break
            before += replicas(r)
        name = job_name(js, rjob, index)
        return {
            f"{JS}/jobset-name": meta["name"],
            f"{JS}/replicatedjob-name": rjob["name"],
            f"{JS}/replicatedjob-replicas": str(replicas(rjob)),
            f"{JS}/global-replicas": str(sum(replicas(r) for r in rjobs)),
            f"{JS}/job-index": str(index),
            f"{JS}/job-global-index": str(before + index),
            f"{JS}/job-key": hashlib.sha1(f"{meta['namespace']}/{name}".encode()).hexdigest(),
            f"{JS}/restart-attempt": str(attempt),
        }

    @staticmethod
    def _ensure_headless_service(api: KubeClient, js: dict) -> None:
        meta = js["metadata"]
        net = network(js)
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": net["subdomain"],
                "namespace": meta["namespace"],
                "ownerReferences": [controller_ref(js, "jobset.x-k8s.io/v1alpha2", "JobSet")],
            },
            "spec": {
                "clusterIP": "None",
                "selector": {f"{JS}/jobset-name": meta["name"]},
                "publishNotReadyAddresses": net["publishNotReadyAddresses"],
            },
        }
        path = f"/api/v1/namespaces/{meta['namespace']}/services"
        try:
            api.get(f"{path}/{net['subdomain']}")
        except ApiError as e:
            if e.status_code != 404:
                raise
            with contextlib.suppress(ApiError):  # 409: made meanwhile
                api.create(path, service)

    @staticmethod
    def _delete_jobs(api: KubeClient, jobs: list[dict]) -> None:
        for job in jobs:
            m = job["metadata"]
            if m.get("deletionTimestamp"):
                continue
            with contextlib.suppress(ApiError):
                api.delete(
                    f"/apis/batch/v1/namespaces/{m['namespace']}/jobs/{m['name']}",
                    propagationPolicy="Foreground",
                )

    @staticmethod
    def _write_status(api: KubeClient, js: dict, old_status: dict, status: dict) -> None:
        if status == old_status:
            return
        meta = js["metadata"]
        with contextlib.suppress(ApiError):
            api.merge_patch(
                f"{JOBSET_API}/namespaces/{meta['namespace']}/jobsets/{meta['name']}/status",
                {"metadata": {"uid": meta["uid"]}, "status": status},
            )


def replicas(rjob: dict) -> int:
    return int(rjob.get("replicas", 1))


def job_name(js: dict, rjob: dict, index: int) -> str:
    return f"{js['metadata']['name']}-{rjob['name']}-{index}"


def network(js: dict) -> dict:
    """spec.network with upstream's defaults."""
    net = js["spec"].get("network") or {}
    return {
        "enableDNSHostnames": net.get("enableDNSHostnames", True),
        "subdomain": net.get("subdomain") or js["metadata"]["name"],
        "publishNotReadyAddresses": net.get("publishNotReadyAddresses", True),
    }


def controller_ref(obj: dict, api_version: str, kind: str) -> dict:
    meta = obj["metadata"]
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def job_condition(job: dict, ctype: str) -> bool:
    return is_true((job.get("status") or {}).get("conditions") or [], ctype)


def failed_at(job: dict) -> str:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c["type"] == "Failed" and c["status"] == "True":
            return c.get("lastTransitionTime") or ""
    return ""


def pod_ready(pod: dict) -> bool:
    return is_true((pod.get("status") or {}).get("conditions") or [], "Ready")


def set_jobset_condition(
    conditions: list[dict], ctype: str, status: str, reason: str, message: str
) -> None:
    """JobSet's condition rules: a condition is added only when True; an existing one changes
    only when its status does."""
    current = next((c for c in conditions if c["type"] == ctype), None)
    if current is None and status != "True":
        return
    if current is not None and current["status"] == status:
        return
    new = {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now(),
    }
    if current is None:
        conditions.append(new)
    else:
        conditions[conditions.index(current)] = new


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


# ----------------------------------------------------------------------------- TrainJob
TRAINJOB_CRD = CRD_DIR / "trainer.kubeflow.org_trainjobs.yaml"
TRAINER_API = "/apis/trainer.kubeflow.org/v1alpha1"
TRAINER = "trainer.kubeflow.org"
TRAINJOB_CONTROLLER_NAME = f"{TRAINER}/trainjob-controller"
ANCESTOR = f"{TRAINER}/trainjob-ancestor-step"
TRAINER_PORT = 29500


def install_trainjob_crds(cp: ControlPlane) -> None:
    cp.kubectl("apply", "--validate=false", "-f", str(TRAINJOB_CRD))
    for name in ("trainjobs", "clustertrainingruntimes"):
        cp.kubectl("wait", "--for=condition=Established", f"crd/{name}.{TRAINER}", "--timeout=30s")


class TrainJobController(_PollingController):
    """Plays Kubeflow Trainer's TrainJob controller (trainer.kubeflow.org/v1alpha1, release
    v2.3; CRD stand-ins for TrainJob and ClusterTrainingRuntime in
    tests/k8s/crds/trainer.kubeflow.org_trainjobs.yaml) with the torch plugin, as far as the
    operator needs. It creates a JobSet, which ``JobSetController`` runs:

    - The JobSet is named after the TrainJob, owned by it (controller ownerReference), from the
      ``spec.template`` of the ClusterTrainingRuntime named in ``spec.runtimeRef``; its labels
      and annotations are the template's plus those in each ``runtimePatches[].
      trainingRuntimeSpec.template.metadata``; the TrainJob's own labels are not copied.
    - ``spec.runtimePatches`` are merged into the template in order, as upstream's strategic
      merge does for the fields it allows: replicated Jobs by name; metadata labels and
      annotations and ``nodeSelector`` merged key by key; ``volumes``, ``containers`` and
      ``initContainers`` by name (a container's ``env`` by name, ``volumeMounts`` by
      mountPath, ``securityContext`` key by key); other pod fields replaced.
    - The trainer Job (the replicated Job labelled ``trainjob-ancestor-step: trainer``), its
      container ``node``: ``spec.trainer.image``, ``command`` and ``args`` replace the
      runtime's, ``env`` is merged by name, ``resourcesPerNode`` replaces the resources; the
      torch plugin's env is added: ``PET_NNODES`` (``numNodes``, else the runtime's
      ``mlPolicy.numNodes``, else 1), ``PET_NPROC_PER_NODE`` (``numProcPerNode``, else
      ``auto``), ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` ``<name>-node-0-0.<name>`` and
      ``PET_MASTER_PORT`` 29500, with container port 29500.
    - ``status.conditions`` (metav1.Condition): ``Complete`` and ``Failed`` copied from the
      JobSet's ``Completed`` and ``Failed`` (reason and message too) once True; ``Suspended``
      True (reason ``Suspended``) while ``spec.suspend``, False (``Resumed``) after;
      ``status.jobsStatus`` from the JobSet's ``replicatedJobsStatus``. No Running condition.
      ``spec.suspend`` is passed on to the JobSet. TrainJobs whose ``spec.managedBy`` is not the
      built-in controller's are left alone.
    Deviations, for a 1.20 control plane (no Indexed Jobs; see ``JobSetController``):
    - Upstream's trainer Job is one Indexed Job of ``numNodes`` pods (``replicas`` 1,
      ``parallelism`` and ``completions`` numNodes; pod ``<name>-node-0-<index>``, rank from
      the ``batch.kubernetes.io/job-completion-index`` annotation). Here it is ``numNodes``
      Jobs of one pod each (``replicas`` numNodes; pod hostname ``<name>-node-<index>-0``) and
      ``PET_NODE_RANK`` comes from the ``jobset.sigs.k8s.io/job-index`` annotation. Rank 0's
      hostname, ``<name>-node-0-0``, is the same in both.
    - A TrainJob whose runtime is missing waits for it (upstream's webhook refuses it).
    Not emulated: namespaced TrainingRuntimes, initializers, other ML policies (MPI, ...),
    podGroupPolicy, activeDeadlineSeconds, the runtime snapshot, the webhook's validation.
    """

    api = TRAINER_API
    plural = "trainjobs"

    def install(self) -> None:
        install_trainjob_crds(self.cp)

    def reconcile(self, api: KubeClient, tj: dict) -> None:
        meta, spec = tj["metadata"], tj["spec"]
        if meta.get("deletionTimestamp"):
            return
        if spec.get("managedBy", TRAINJOB_CONTROLLER_NAME) != TRAINJOB_CONTROLLER_NAME:
            return
        ns, name = meta["namespace"], meta["name"]
        old_status = tj.get("status") or {}
        status = copy.deepcopy(old_status)
        conditions = status.setdefault("conditions", [])
        path = f"{JOBSET_API}/namespaces/{ns}/jobsets"
        try:
            js = api.get(f"{path}/{name}")
        except ApiError as e:
            if e.status_code != 404:
                raise
            js = None
        finished = is_true(conditions, "Complete") or is_true(conditions, "Failed")
        suspend = bool(spec.get("suspend"))
        if js is None and not finished:
            ref = spec["runtimeRef"]
            runtime = api.get(f"{TRAINER_API}/clustertrainingruntimes/{ref['name']}")
            with contextlib.suppress(ApiError):  # 409: made meanwhile
                api.create(path, self._jobset(tj, runtime))
        elif js is not None and bool(js["spec"].get("suspend")) != suspend and not finished:
            api.merge_patch(f"{path}/{name}", {"spec": {"suspend": suspend}})

        if suspend:
            set_status_condition(
                conditions, "Suspended", "True", "Suspended", "TrainJob is suspended"
            )
        elif is_true(conditions, "Suspended"):
            set_status_condition(conditions, "Suspended", "False", "Resumed", "TrainJob is resumed")
        if js is not None:
            js_status = js.get("status") or {}
            for theirs, ours in (("Completed", "Complete"), ("Failed", "Failed")):
                c = next(
                    (c for c in js_status.get("conditions") or [] if c["type"] == theirs), None
                )
                if c is not None and c["status"] == "True":
                    set_status_condition(conditions, ours, "True", c["reason"], c["message"])
            jobs = [dict(r) for r in js_status.get("replicatedJobsStatus") or []]
            if jobs:
                status["jobsStatus"] = jobs
        if status != old_status:
            with contextlib.suppress(ApiError):
                api.merge_patch(
                    f"{TRAINER_API}/namespaces/{ns}/trainjobs/{name}/status",
                    {"metadata": {"uid": meta["uid"]}, "status": status},
                )

    @staticmethod
    def _jobset(tj: dict, runtime: dict) -> dict:
        meta, spec = tj["metadata"], tj["spec"]
        name = meta["name"]
        template = copy.deepcopy(runtime["spec"]["template"])
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        annotations = dict((template.get("metadata") or {}).get("annotations") or {})
        js_spec = template.get("spec") or {}
        for patch in spec.get("runtimePatches") or []:
            patch_template = (patch.get("trainingRuntimeSpec") or {}).get("template") or {}
            labels.update((patch_template.get("metadata") or {}).get("labels") or {})
            annotations.update((patch_template.get("metadata") or {}).get("annotations") or {})
            for rpatch in (patch_template.get("spec") or {}).get("replicatedJobs") or []:
                rjob = next(r for r in js_spec["replicatedJobs"] if r["name"] == rpatch["name"])
                _merge_job_template(rjob.setdefault("template", {}), rpatch.get("template") or {})

        trainer = spec.get("trainer") or {}
        ml_policy = runtime["spec"].get("mlPolicy") or {}
        nodes = int(trainer.get("numNodes", ml_policy.get("numNodes", 1)))
        nproc = str(trainer.get("numProcPerNode", "auto"))
        index = {"fieldRef": {"fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}
        pet = [
            {"name": "PET_NNODES", "value": str(nodes)},
            {"name": "PET_NPROC_PER_NODE", "value": nproc},
            {"name": "PET_NODE_RANK", "valueFrom": index},
            {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0-0.{name}"},
            {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)},
        ]
        for rjob in js_spec["replicatedJobs"]:
            job_meta = rjob["template"].get("metadata") or {}
            if (job_meta.get("labels") or {}).get(ANCESTOR) != "trainer":
                continue
            rjob["replicas"] = nodes
            job_spec = rjob["template"].setdefault("spec", {})
            job_spec["parallelism"] = job_spec["completions"] = 1
            for c in job_spec["template"]["spec"]["containers"]:
                if c["name"] != "node":
                    continue
                for key in ("image", "command", "args"):
                    if key in trainer:
                        c[key] = trainer[key]
                if "resourcesPerNode" in trainer:
                    c["resources"] = trainer["resourcesPerNode"]
                c["env"] = _merged_by(c.get("env"), [*(trainer.get("env") or []), *pet], "name")
                ports = [p for p in c.get("ports") or [] if p["containerPort"] != TRAINER_PORT]
                c["ports"] = [*ports, {"containerPort": TRAINER_PORT}]
        return {
            "apiVersion": "jobset.x-k8s.io/v1alpha2",
            "kind": "JobSet",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [controller_ref(tj, f"{TRAINER}/v1alpha1", "TrainJob")],
            },
            "spec": {**js_spec, "suspend": bool(spec.get("suspend"))},
        }


def _merged_by(base: list | None, patch: list | None, key: str) -> list:
    """A strategic merge of two lists of objects by `key`: same key, merged key by key (one
    level deep: securityContext and the like); new keys appended."""
    out = [copy.deepcopy(x) for x in base or []]
    for item in patch or []:
        current = next((x for x in out if x.get(key) == item.get(key)), None)
        if current is None:
            out.append(copy.deepcopy(item))
            continue
        for k, v in item.items():
            if isinstance(v, dict) and isinstance(current.get(k), dict):
                current[k] = {**current[k], **v}
            else:
                current[k] = copy.deepcopy(v)
    return out


def _merge_meta(base: dict, patch: dict) -> None:
    for key in ("labels", "annotations"):
        if patch.get(key):
            base[key] = {**(base.get(key) or {}), **patch[key]}


def _merge_job_template(base: dict, patch: dict) -> None:
    """A runtimePatches replicated Job template into the runtime's (see TrainJobController)."""
    _merge_meta(base.setdefault("metadata", {}), patch.get("metadata") or {})
    pod_patch = (patch.get("spec") or {}).get("template") or {}
    pod = base.setdefault("spec", {}).setdefault("template", {})
    _merge_meta(pod.setdefault("metadata", {}), pod_patch.get("metadata") or {})
    pod_spec = pod.setdefault("spec", {})
    for key, value in (pod_patch.get("spec") or {}).items():
        if key in ("containers", "initContainers"):
            merged = []
            for c in pod_spec.get(key) or []:
                p = next((p for p in value if p["name"] == c["name"]), None)
                if p is not None:
                    c = dict(c)
                    c["env"] = _merged_by(c.get("env"), p.get("env"), "name")
                    c["volumeMounts"] = _merged_by(
                        c.get("volumeMounts"), p.get("volumeMounts"), "mountPath"
                    )
                    if "securityContext" in p:
                        c["securityContext"] = {
                            **(c.get("securityContext") or {}),
                            **p["securityContext"],
                        }
                merged.append(c)
            pod_spec[key] = merged
        elif key in ("volumes", "imagePullSecrets", "schedulingGates"):
            pod_spec[key] = _merged_by(pod_spec.get(key), value, "name")
        elif key == "nodeSelector":
            pod_spec[key] = {**(pod_spec.get(key) or {}), **value}
        elif key == "securityContext":
            pod_spec[key] = {**(pod_spec.get(key) or {}), **value}
        else:
            pod_spec[key] = copy.deepcopy(value)


def set_status_condition(
    conditions: list[dict], ctype: str, status: str, reason: str, message: str
) -> None:
    """apimachinery's meta.SetStatusCondition: add, or update in place; lastTransitionTime
    changes only with the status."""
    current = next((c for c in conditions if c["type"] == ctype), None)
    if current is None:
        conditions.append(
            {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": now(),
            }
        )
        return
    if current["status"] != status:
        current["status"] = status
        current["lastTransitionTime"] = now()
    current["reason"], current["message"] = reason, message
