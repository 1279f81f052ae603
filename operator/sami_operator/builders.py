"""Pure builders: a planned stage -> the Kubernetes objects that run it.

Each stage becomes a ConfigMap holding its task JSON and one workload owned by the SAMIRun:
a batch/v1 Job for principles, generation and evaluation; for training a Kubeflow PyTorchJob
(default), a JobSet, a Kubeflow Trainer TrainJob, or a single-node Job, as
`spec.training.launcher` says (TRAINING_WORKLOADS; the table of their APIs, which kube.py
reads: launchers.py). Names are deterministic (`<run>-it<N>-<stage>`, `-r<attempt>` for
retries), valid DNS-1035 labels, and short enough for the pod names launchers derive from them
(models.MAX_RUN_NAME).

Every stage pod meets the Pod Security Standards' `restricted` profile unless spec.pods asks
for more (https://kubernetes.io/docs/concepts/security/pod-security-standards/).
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable
from typing import Any

from sami_operator.models import (
    API_VERSION,
    GROUP,
    KIND,
    MAX_CHILD_NAME,
    Launcher,
    PodSpec,
    SAMIRun,
)
from sami_operator.planner import Stage
from sami_operator.settings import OperatorSettings
from sami_worker.contract import RESULT_FILE_ENV
from sami_worker.tasks import dump_task

MANAGED_BY = "sami-operator"
TASK_DIR = "/etc/sami/task"
TASK_FILE = f"{TASK_DIR}/task.json"
CACHE_DIR = "/var/cache/sami"
TMP_DIR = "/tmp"
TERMINATION_LOG = "/dev/termination-log"
MASTER_PORT = 29500
# Launchers append up to 12 characters ("-worker-1022", "-node-1023-0") to a training child's
# name for its pods and Services, which must stay within 63 (models.MAX_CHILD_NAME). A run name
# within models.MAX_RUN_NAME never needs the digest below.
MAX_NAME = MAX_CHILD_NAME
KUEUE_LABELS = ("kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class")
# The worker image's user and group (images/worker/Dockerfile: USER 10001:10001).
WORKER_UID = 10001

# Pod Security Standards, 'restricted' profile: runAsNonRoot, a seccomp profile of
# RuntimeDefault (or Localhost), no privilege escalation, every capability dropped. fsGroup
# makes the mounted volumes writable by the worker user; OnRootMismatch skips the recursive
# ownership change of a volume (a model PVC with many files) that already has it.
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": WORKER_UID,
    "runAsGroup": WORKER_UID,
    "fsGroup": WORKER_UID,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
}

# Kubeflow Trainer: the container its torch runtimes run torchrun in (and name their trainer
# Job after), and the manager of the operator's entry in a TrainJob's spec.runtimePatches.
TRAINER_CONTAINER = "node"
RUNTIME_PATCH_MANAGER = f"{GROUP}/sami-operator"


def child_name(run_name: str, stage: Stage, attempt: int = 1, shard: int | None = None) -> str:
    """`<run>-it<N>-<stage>[-s<shard>][-r<attempt>]`, at most MAX_NAME characters (`shard`:
    a shard's own Job, generation.shards on clusters without per-index retries)."""
    stem = stage.name if stage.iteration is None else f"it{stage.iteration}-{stage.name}"
    stem += "" if shard is None else f"-s{shard}"
    name = f"{run_name}-{stem}" + (f"-r{attempt}" if attempt > 1 else "")
    name = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME - 9].rstrip('-')}-{digest}"


def labels(run: SAMIRun, stage: Stage, workload: bool = False) -> dict[str, str]:
    """The labels of a stage's objects. Kueue's only on the workload (`workload`): Kueue
    admits a Job, PyTorchJob, JobSet or TrainJob as a whole, while a pod template carrying
    the queue label would have Kueue's pod integration queue each pod on its own."""
    out = {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/name": "sami",
        f"{GROUP}/run": run.metadata.name,
        f"{GROUP}/stage": stage.name,
    }
    if stage.iteration is not None:
        out[f"{GROUP}/iteration"] = str(stage.iteration)
    if not workload:
        return out
    for key in KUEUE_LABELS:
        if key in run.metadata.labels:
            out[key] = run.metadata.labels[key]
    if run.spec.queue_name:
        out["kueue.x-k8s.io/queue-name"] = run.spec.queue_name
    return out


def owner_reference(run: SAMIRun, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": run.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(
    run: SAMIRun, stage: Stage, name: str, uid: str, workload: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": run.metadata.namespace,
        "labels": labels(run, stage, workload),
        "ownerReferences": [owner_reference(run, uid)],
    }


def build_config_map(run: SAMIRun, stage: Stage, name: str, uid: str, task=None) -> dict[str, Any]:
    """The ConfigMap with the task (`task`: a shard's; by default the stage's)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run, stage, name, uid),
        "data": {"task.json": dump_task(task or stage.task)},
    }


# The spec.pods entry of each stage: the reference model's evaluation runs the evaluation
# program on the same kind of machine; the storage cleanup needs no more than the defaults.
_POD_KNOBS = {"reference": "evaluate", "cleanup": None}


def _pod_settings(run: SAMIRun, stage: Stage) -> PodSpec:
    pods = run.spec.pods
    knobs = _POD_KNOBS.get(stage.name, stage.name)
    return pods.default if knobs is None else getattr(pods, knobs).merged_over(pods.default)


def _env(run: SAMIRun, stage: Stage) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "SAMI_CACHE_DIR", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": RESULT_FILE_ENV, "value": TERMINATION_LOG},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # Writes go to the pod's volumes, not to the image's filesystem (which a cluster may
        # make read-only): HOME (~/.triton, ~/.nv, ...) to the /tmp volume, where temporary
        # files go by default, and ~/.cache to the cache volume. TMPDIR stays unset: vLLM
        # puts its IPC sockets there, whose paths must stay short.
        {"name": "HOME", "value": TMP_DIR},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
    ]
    creds = run.spec.storage.credentials
    if creds is not None:
        for var, key in (
            ("AWS_ACCESS_KEY_ID", creds.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", creds.secret_access_key_key),
        ):
            ref = {"name": creds.secret_name, "key": key}
            env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    if run.spec.storage.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": run.spec.storage.region})
    secret = _api_key_secret(run, stage)
    if secret is not None:
        ref = {"name": secret.name, "key": secret.key}
        env.append({"name": "SAMI_API_KEY", "valueFrom": {"secretKeyRef": ref}})
    return env


def _api_key_secret(run: SAMIRun, stage: Stage):
    if stage.name == "principles" and run.spec.principles.writer is not None:
        endpoint = run.spec.principles.writer.endpoint
        return endpoint.api_key_secret if endpoint else None
    # evaluate-0 (the base model's) has nothing to compare with: it never judges.
    if stage.name == "evaluate" and stage.iteration and run.spec.evaluation.judge is not None:
        endpoint = run.spec.evaluation.judge.endpoint  # None: a judge model, loaded in the pod
        return endpoint.api_key_secret if endpoint else None
    return None


def build_pod_template(
    run: SAMIRun,
    stage: Stage,
    settings: OperatorSettings,
    config_map: str,
    command: list[str],
    extra_env: list[dict[str, Any]] = (),
    container: str = "worker",
) -> dict[str, Any]:
    """The pod template every launcher wraps: one worker container, the task mounted from
    its ConfigMap, a memory-backed /dev/shm, a writable cache and /tmp, the restricted
    securityContext, and the spec's pod knobs."""
    pod = _pod_settings(run, stage)
    shm = pod.shm_size or ("16Gi" if stage.name == "train" else "2Gi")
    mounts = [
        {"name": "task", "mountPath": TASK_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": TMP_DIR},
        *(pod.volume_mounts or []),
    ]
    worker: dict[str, Any] = {
        "name": container,
        "image": pod.image or settings.worker_image,
        "command": command,
        "env": [*_env(run, stage), *extra_env, *(pod.env or [])],
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _merged(CONTAINER_SECURITY_CONTEXT, pod.container_security_context),
    }
    resources = pod.resources.model_dump(exclude_defaults=True) if pod.resources is not None else {}
    cache: dict[str, Any] = {}
    if pod.cache_size is not None and pod.cache_volume is None:
        cache["sizeLimit"] = str(pod.cache_size)
        # The scheduler places the pod by requests only: without one, a node with too little
        # disk takes it and the kubelet evicts it once the cache outgrows the limit. A limit
        # alone defaults the request to itself, so either one counts as already asked for.
        asked = {**resources.get("requests", {}), **resources.get("limits", {})}
        if "ephemeral-storage" not in asked:
            requests = resources.setdefault("requests", {})
            requests["ephemeral-storage"] = str(pod.cache_size)
    # A volume the spec names (a claim shared by the nodes), else an emptyDir on the node.
    cache_volume = dict(pod.cache_volume) if pod.cache_volume else {"emptyDir": cache}
    if resources:
        worker["resources"] = resources
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": _merged(POD_SECURITY_CONTEXT, pod.security_context),
        "automountServiceAccountToken": bool(pod.automount_service_account_token),
        "containers": [worker],
        "volumes": [
            {"name": "task", "configMap": {"name": config_map}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(shm)}},
            {"name": "cache", **cache_volume},
            {"name": "tmp", "emptyDir": {}},
            *(pod.volumes or []),
        ],
    }
    dns_policy = pod.dns_policy
    if dns_policy is None and pod.host_network:
        dns_policy = "ClusterFirstWithHostNet"  # ClusterFirst would fall back to the node's DNS
    optional = {
        "nodeSelector": pod.node_selector,
        "tolerations": pod.tolerations,
        "affinity": pod.affinity,
        "priorityClassName": pod.priority_class_name,
        "serviceAccountName": pod.service_account_name or settings.worker_service_account,
        "hostNetwork": pod.host_network,
        "dnsPolicy": dns_policy,
        "runtimeClassName": pod.runtime_class_name,
        "schedulerName": pod.scheduler_name,
        "topologySpreadConstraints": pod.topology_spread_constraints,
    }
    spec.update({k: v for k, v in optional.items() if v})
    if pod.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in pod.image_pull_secrets]
    metadata: dict[str, Any] = {"labels": {**(pod.labels or {}), **labels(run, stage)}}
    if pod.annotations:
        metadata["annotations"] = dict(pod.annotations)
    return {"metadata": metadata, "spec": spec}


def _merged(default: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """`override` over `default`, key by key into nested objects (capabilities.add joins the
    default capabilities.drop); lists and other values replace."""
    out = dict(default)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def _worker_command(settings: OperatorSettings, stage: Stage) -> list[str]:
    return [settings.python, "-m", "sami_worker", stage.program, "--task", TASK_FILE]


def _torchrun(stage: Stage, *args: str) -> list[str]:
    # torchrun sits next to the Python the image runs; it reads PET_* for the rendezvous.
    return ["torchrun", *args, "-m", "sami_worker", stage.program, "--task", TASK_FILE]


# A pod taken away (drained or lost node, preemption, eviction: Kubernetes 1.26+ marks it with
# the DisruptionTarget condition) is replaced by the Job controller without counting as a
# failure; older API servers drop the field, and the operator retries such a stage itself.
IGNORE_DISRUPTIONS = {
    "rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    ]
}


# A multi-node JobSet cannot replace one node alone (its peers' collectives fail with it): a node
# taken away fails its Job at once (reason PodFailurePolicy), and JobSet restarts every node,
# resuming from the last training state, without counting the restart. Any other failure fails
# the JobSet (maxRestarts 0), and the operator decides whether to retry.
FAIL_ON_DISRUPTION = {
    "rules": [
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    ]
}
RESTART_ON_DISRUPTION = {
    "name": "node-disrupted",
    "action": "RestartJobSetAndIgnoreMaxRestarts",
    "onJobFailureReasons": ["PodFailurePolicy"],
}


def build_job(metadata: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    # Retries are the operator's (it tells retryable exit codes from bad input), so the
    # Job itself never retries a pod that failed.
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {"backoffLimit": 0, "podFailurePolicy": IGNORE_DISRUPTIONS, "template": template},
    }


def _multinode_torchrun(run: SAMIRun, stage: Stage) -> list[str]:
    """torchrun for the multi-node launchers, which give it PET_MASTER_ADDR/PORT and no
    rendezvous endpoint: the static rendezvous, a TCPStore served by node rank 0. Its
    `timeout` bounds both how long node 0 waits for every other node to connect and how long
    the others retry reaching node 0 (torch.distributed.elastic.rendezvous.
    static_tcp_rendezvous; torchrun's default 900 s). The c10d backend would read
    join_timeout instead; no launcher here uses it."""
    return _torchrun(stage, f"--rdzv-conf=timeout={run.spec.training.rendezvous_seconds}")


def build_training_job(
    metadata: dict[str, Any],
    run: SAMIRun,
    stage: Stage,
    settings: OperatorSettings,
    config_map: str,
) -> dict[str, Any]:
    """launcher Job: torchrun on one node (--standalone: no peers to wait for)."""
    n = run.spec.training.procs_per_node
    command = _torchrun(stage, "--standalone", f"--nproc_per_node={n}")
    return build_job(metadata, build_pod_template(run, stage, settings, config_map, command))


# Kubeflow Training Operator v1 gives every Worker pod of a PyTorchJob with a Master an init
# container, init-pytorch, appended after the template's own, that looks up the master's
# Service name 100 times 2 s apart (its --pytorch-init-container-max-tries) and fails the pod
# when the name does not resolve in time: about 200 s, less than a GPU node's autoscaling plus
# a large image pull on the master's node. The master's headless Service resolves once the
# master pod runs. This init container, ahead of theirs, waits for the name for the run's
# rendezvousSeconds, so theirs then finds it at once.
WAIT_FOR_MASTER = "wait-for-master"
_WAIT_FOR_HOST = """\
import os, socket, sys, time
host, seconds = os.environ["SAMI_MASTER_HOST"], int(os.environ["SAMI_RENDEZVOUS_SECONDS"])
deadline = time.monotonic() + seconds
while True:
    try:
        socket.getaddrinfo(host, None)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"{host} did not resolve within {seconds} s (training.rendezvousSeconds)")
        time.sleep(2)
"""


def _wait_for_master(
    settings: OperatorSettings, run: SAMIRun, worker: dict[str, Any], host: str
) -> dict[str, Any]:
    return {
        "name": WAIT_FOR_MASTER,
        "image": worker["image"],
        "command": [settings.python, "-c", _WAIT_FOR_HOST],
        "env": [
            {"name": "SAMI_MASTER_HOST", "value": host},
            {"name": "SAMI_RENDEZVOUS_SECONDS", "value": str(run.spec.training.rendezvous_seconds)},
        ],
        # The defaults alone: a DNS lookup needs none of what spec.pods may add (IPC_LOCK).
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def build_pytorchjob(
    metadata: dict[str, Any],
    run: SAMIRun,
    stage: Stage,
    settings: OperatorSettings,
    config_map: str,
) -> dict[str, Any]:
    t = run.spec.training
    template = build_pod_template(
        run, stage, settings, config_map, _multinode_torchrun(run, stage), container="pytorch"
    )
    replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
    if t.nodes > 1:
        worker = copy.deepcopy(template)
        (container,) = worker["spec"]["containers"]
        # The master's Service: <job>-master-0 in the job's namespace.
        master = f"{metadata['name']}-master-0"
        worker["spec"]["initContainers"] = [_wait_for_master(settings, run, container, master)]
        replicas["Worker"] = {
            "replicas": t.nodes - 1,
            "restartPolicy": "Never",
            "template": worker,
        }
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(t.procs_per_node),
            # Running: once the job has finished (failed: a peer died), the surviving pods are
            # deleted instead of waiting out their collective timeouts on the GPUs; the
            # operator then recreates the stage as a whole, resuming from its checkpoint.
            "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "Running"},
            "pytorchReplicaSpecs": replicas,
        },
    }


def build_jobset(
    metadata: dict[str, Any],
    run: SAMIRun,
    stage: Stage,
    settings: OperatorSettings,
    config_map: str,
) -> dict[str, Any]:
    t = run.spec.training
    name = metadata["name"]
    env = [
        {"name": "PET_NNODES", "value": str(t.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(t.procs_per_node)},
        {
            "name": "PET_NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}
            },
        },
        # JobSet's headless service gives pod 0 of job 0 this stable DNS name.
        {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(MASTER_PORT)},
    ]
    command = _multinode_torchrun(run, stage)
    template = build_pod_template(run, stage, settings, config_map, command, env)
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": metadata,
        "spec": {
            "failurePolicy": {"maxRestarts": 0, "rules": [RESTART_ON_DISRUPTION]},
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [{
                "name": "node", "replicas": t.nodes,
                "template": {"spec": {
                    "parallelism": 1, "completions": 1, "backoffLimit": 0,
                    "podFailurePolicy": FAIL_ON_DISRUPTION,
                    "template": template,
                }},
            }],
        },
    }  # fmt: skip


# The pod fields a TrainJob's runtimePatches can set (trainer.kubeflow.org/v1alpha1
# PodSpecPatch, Kubeflow Trainer v2.3; v2.1 had spec.podTemplateOverrides instead, v2.0
# spec.podSpecOverrides). The pod template's restartPolicy and automountServiceAccountToken and
# the container's terminationMessagePath and terminationMessagePolicy have no place there: they
# come from the ClusterTrainingRuntime (README, "Kubeflow Trainer"); models.SAMIRunSpec refuses
# the pod knobs that would be lost (models.TRAINJOB_POD_FIELDS_FROM_RUNTIME).
_TRAINJOB_POD_FIELDS = (
    "serviceAccountName",
    "volumes",
    "imagePullSecrets",
    "securityContext",
    "nodeSelector",
    "affinity",
    "tolerations",
)


def build_trainjob(
    metadata: dict[str, Any],
    run: SAMIRun,
    stage: Stage,
    settings: OperatorSettings,
    config_map: str,
) -> dict[str, Any]:
    """A Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1) running the
    ClusterTrainingRuntime `training.trainingRuntime` (a torch runtime: its torch plugin gives
    the 'node' container PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR
    <name>-node-0-0.<name> and PET_MASTER_PORT 29500, and runs our command as it is). The
    worker container's image, command, env and resources go to spec.trainer; its mounts and
    securityContext, the pod's volumes, securityContext and scheduling fields, and the pod
    labels and annotations go to our entry in spec.runtimePatches."""
    t = run.spec.training
    command = _multinode_torchrun(run, stage)
    template = build_pod_template(
        run, stage, settings, config_map, command, container=TRAINER_CONTAINER
    )
    pod = template["spec"]
    (node,) = pod["containers"]
    trainer: dict[str, Any] = {
        "image": node["image"],
        "command": node["command"],
        "env": node["env"],
        "numNodes": t.nodes,
        "numProcPerNode": t.procs_per_node,
    }
    if "resources" in node:
        trainer["resourcesPerNode"] = node["resources"]
    pod_patch: dict[str, Any] = {k: pod[k] for k in _TRAINJOB_POD_FIELDS if k in pod}
    pod_patch["containers"] = [
        {
            "name": TRAINER_CONTAINER,
            "volumeMounts": node["volumeMounts"],
            "securityContext": node["securityContext"],
        }
    ]
    job_patch = {"spec": {"template": {"metadata": template["metadata"], "spec": pod_patch}}}
    patch = {
        "manager": RUNTIME_PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {"replicatedJobs": [{"name": TRAINER_CONTAINER, "template": job_patch}]}
            }
        },
    }
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": {
                "name": t.training_runtime,
                "apiGroup": "trainer.kubeflow.org",
                "kind": "ClusterTrainingRuntime",
            },
            "trainer": trainer,
            "runtimePatches": [patch],
        },
    }


# spec.training.launcher -> the builder of a training stage's workload: (metadata, run, stage,
# settings, config map name) -> the workload, of the kind launchers.LAUNCHERS gives it.
TRAINING_WORKLOADS: dict[Launcher, Callable[..., dict[str, Any]]] = {
    Launcher.job: build_training_job,
    Launcher.pytorchjob: build_pytorchjob,
    Launcher.jobset: build_jobset,
    Launcher.trainjob: build_trainjob,
}


def build_indexed_job(
    metadata: dict[str, Any], run: SAMIRun, stage: Stage, settings: OperatorSettings, name: str
) -> dict[str, Any]:
    """A sharded stage as one Indexed Job: a pod per shard, each running its slice of the
    stage's task (`--shard $(JOB_COMPLETION_INDEX) N`; the Job controller sets the variable).
    backoffLimitPerIndex 0 (Kubernetes 1.29+): a failed shard fails its index only, the
    others run on, and the Job fails once all are done; the operator then decides whether
    to retry, and the retry's pods of finished shards exit at once (their manifests are
    there)."""
    shards = len(stage.shards)
    command = [*_worker_command(settings, stage), "--shard", "$(JOB_COMPLETION_INDEX)", str(shards)]
    template = build_pod_template(run, stage, settings, name, command)
    spec = {
        "completionMode": "Indexed",
        "completions": shards,
        "parallelism": shards,
        "backoffLimitPerIndex": 0,
        "podFailurePolicy": IGNORE_DISRUPTIONS,
        "template": template,
    }
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def build_children(
    run: SAMIRun,
    stage: Stage,
    uid: str,
    settings: OperatorSettings,
    attempt: int = 1,
    shard: int | None = None,
) -> list[dict[str, Any]]:
    """[ConfigMap with the task, the workload], both owned by the SAMIRun. A sharded stage
    (generation.shards) is one Indexed Job of every shard, or with `shard` that shard's own
    Job (clusters without per-index retries)."""
    name = child_name(run.metadata.name, stage, attempt, shard)
    task = stage.shards[shard] if shard is not None else stage.task
    config_map = build_config_map(run, stage, name, uid, task)
    metadata = _metadata(run, stage, name, uid, workload=True)
    if stage.name == "train":
        build = TRAINING_WORKLOADS[run.spec.training.launcher]
        workload = build(metadata, run, stage, settings, name)
    elif stage.shards and shard is None:
        workload = build_indexed_job(metadata, run, stage, settings, name)
    else:
        command = _worker_command(settings, stage)
        workload = build_job(metadata, build_pod_template(run, stage, settings, name, command))
    return [config_map, workload]
