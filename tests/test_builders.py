"""Every object the operator's builders produce is accepted by a real kube-apiserver:
`kubectl create --dry-run=server`, with kubectl's schema validation (unknown or mistyped
fields of a Job or ConfigMap fail it) and the server's admission and defaulting. The training
workloads of the custom launchers, which the test API server knows only by minimal CRD
stand-ins, are checked against the upstream projects' own models: a PyTorchJob against the
`kubeflow-training` SDK's (Training Operator v1.9), a TrainJob against `kubeflow-trainer-api`'s
(Kubeflow Trainer v2.3). Every stage pod meets the Pod Security Standards' `restricted` profile,
and Kueue's labels are on the workloads only."""

from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import pytest
from kubernetes.client import ApiClient

from sami_operator.builders import MAX_NAME, build_children, child_name
from sami_operator.models import DNS_1035_LABEL, MAX_RUN_NAME
from sami_operator.planner import cleanup_stage, plan
from sami_operator.settings import OperatorSettings
from sami_operator.validate import SpecError, parse_samirun
from tests.k8s.admission import violations

SETTINGS = OperatorSettings(
    worker_image="registry.example/sami-worker:test", worker_service_account="sami-worker"
)


def run_with(samirun_doc, namespace: str, launcher: str, writer: bool = False):
    samirun_doc["metadata"]["namespace"] = namespace
    samirun_doc["spec"]["training"]["launcher"] = launcher
    samirun_doc["spec"]["training"]["nodes"] = 1 if launcher == "Job" else 2
    if writer:
        samirun_doc["spec"]["principles"] = {
            "writer": {"model": "s3://models/writer", "instruction": "Be good."}
        }
    return parse_samirun(samirun_doc)


def restricted_violations(pod: dict) -> list[str]:
    """What in a pod spec breaks the `restricted` profile, as the test control plane's Pod
    Security webhook would say (tests/k8s/admission.py); [] when nothing does."""
    return violations({"spec": pod})


def trainjob_pod_template(trainjob: dict) -> dict:
    """What a TrainJob sets of its trainer pods' template, as one pod template: the operator's
    runtimePatches entry with the 'node' container completed from spec.trainer (the rest
    comes from the ClusterTrainingRuntime)."""
    spec = trainjob["spec"]
    (patch,) = spec["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    template = copy.deepcopy(rjob["template"]["spec"]["template"])
    trainer = spec["trainer"]
    (node,) = template["spec"]["containers"]
    node.update({k: trainer[k] for k in ("image", "command", "env")})
    if "resourcesPerNode" in trainer:
        node["resources"] = trainer["resourcesPerNode"]
    return template


def pod_templates(workload: dict) -> list[dict]:
    """The pod templates of a Job, PyTorchJob, JobSet or TrainJob."""
    spec = workload["spec"]
    if workload["kind"] == "PyTorchJob":
        return [r["template"] for r in spec["pytorchReplicaSpecs"].values()]
    if workload["kind"] == "JobSet":
        return [r["template"]["spec"]["template"] for r in spec["replicatedJobs"]]
    if workload["kind"] == "TrainJob":
        return [trainjob_pod_template(workload)]
    return [spec["template"]]


def all_children(run, attempt: int = 1) -> list[list[dict]]:
    stages = plan(run, "0b1c2d3e-uid") + [cleanup_stage(run, "0b1c2d3e-uid")]
    return [build_children(run, stage, "0b1c2d3e-uid", SETTINGS, attempt) for stage in stages]


def dry_run(cp, objects: list[dict], namespace: str) -> list[dict]:
    """What the API server would store; raises when it or kubectl's validation refuses.
    A Job's podFailurePolicy (Kubernetes 1.26+) is checked against the Kubernetes client's
    model instead: the 1.20 test control plane predates it (and would drop it)."""
    objects = [dict(o, spec=dict(o["spec"])) if o["kind"] == "Job" else o for o in objects]
    for obj in objects:
        if obj["kind"] == "Job":
            policy = obj["spec"].pop("podFailurePolicy")
            response = type("Response", (), {"data": json.dumps(policy)})
            assert ApiClient().deserialize(response, "V1PodFailurePolicy").rules
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    args = ["create", "--dry-run=server", "--validate=true", "-n", namespace, "-o", "json"]
    out = cp.kubectl(*args, "-f", "-", input=manifest).stdout
    decoder, stored, at = json.JSONDecoder(), [], 0
    while out[at:].strip():  # one JSON document per object, back to back
        obj, end = decoder.raw_decode(out[at:].lstrip())
        at = len(out) - len(out[at:].lstrip()) + end
        stored.append(obj)
    return stored


@pytest.mark.parametrize("launcher", ["PyTorchJob", "JobSet", "TrainJob", "Job"])
def test_every_stage_is_accepted_by_the_api_server(
    control_plane, k8s_namespace, samirun_doc, launcher
):
    samirun_doc["spec"]["pods"]["default"]["cacheSize"] = "20Gi"
    run = run_with(samirun_doc, k8s_namespace, launcher, writer=True)
    stages = plan(run, "0b1c2d3e-uid") + [cleanup_stage(run, "0b1c2d3e-uid")]
    assert [s.name for s in stages][:3] == ["principles", "evaluate", "generate"]
    for stage in stages:
        objects = build_children(run, stage, "0b1c2d3e-uid", SETTINGS, attempt=2)
        stored = dry_run(control_plane, objects, k8s_namespace)
        assert [o["kind"] for o in stored] == [o["kind"] for o in objects], stage.id
        workload = stored[1]
        for template in pod_templates(workload):  # as the server stored and defaulted it
            assert restricted_violations(template["spec"]) == [], stage.id
        assert workload["metadata"]["name"].endswith("-r2")
        assert workload["metadata"]["ownerReferences"][0]["kind"] == "SAMIRun"
        if workload["kind"] == "Job":
            pod = workload["spec"]["template"]["spec"]
            # The server kept what matters (nothing pruned as unknown) and defaulted the rest.
            assert pod["restartPolicy"] == "Never" and workload["spec"]["backoffLimit"] == 0
            assert {v["name"] for v in pod["volumes"]} >= {"task", "dshm", "cache"}
            size = "64Gi" if stage.name == "train" else "20Gi"  # examples/samirun.yaml: 64Gi
            cache = next(v for v in pod["volumes"] if v["name"] == "cache")
            assert cache["emptyDir"] == {"sizeLimit": size}
            requests = pod["containers"][0]["resources"]["requests"]
            assert requests["ephemeral-storage"] == size
            assert pod["serviceAccountName"] == "sami-worker"
            assert pod["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"
            assert pod["containers"][0]["imagePullPolicy"] == "IfNotPresent"  # defaulted


def test_an_invalid_object_is_refused(control_plane, k8s_namespace, samirun_doc):
    """The check above can fail: a misspelt field in a Job is refused by validation."""
    run = run_with(samirun_doc, k8s_namespace, "Job")
    config_map, job = build_children(run, plan(run, "uid")[0], "uid", SETTINGS)
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(Exception, match="restartPolicyy"):
        dry_run(control_plane, [config_map, job], k8s_namespace)


def _worker_pod(run, stage_name: str) -> dict:
    stage = next(s for s in plan(run, "uid") if s.name == stage_name)
    workload = build_children(run, stage, "uid", SETTINGS)[1]
    if workload["kind"] == "PyTorchJob":
        return workload["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def test_cache_size_limits_the_cache_and_requests_the_disk(samirun_doc):
    del samirun_doc["spec"]["pods"]["train"]["cacheSize"]
    pod = _worker_pod(parse_samirun(samirun_doc), "train")
    assert next(v for v in pod["volumes"] if v["name"] == "cache")["emptyDir"] == {}
    assert "ephemeral-storage" not in pod["containers"][0]["resources"]["requests"]

    # A 70B bfloat16 download (141 GB) and a few export shards in flight.
    samirun_doc["spec"]["pods"]["train"]["cacheSize"] = "160G"
    pod = _worker_pod(parse_samirun(samirun_doc), "train")
    assert next(v for v in pod["volumes"] if v["name"] == "cache")["emptyDir"] == {
        "sizeLimit": "160G"
    }
    resources = pod["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": 32, "memory": "400Gi", "ephemeral-storage": "160G"}
    assert resources["limits"] == {"nvidia.com/gpu": 8}

    # What the pod asks for itself stays as written, a request or a limit alone.
    for part in ("requests", "limits"):
        samirun_doc["spec"]["pods"]["train"]["resources"][part]["ephemeral-storage"] = "500G"
        resources = _worker_pod(parse_samirun(samirun_doc), "train")["containers"][0]["resources"]
        assert resources[part]["ephemeral-storage"] == "500G"
        assert "160G" not in (resources.get("requests", {}).values())
        del samirun_doc["spec"]["pods"]["train"]["resources"][part]["ephemeral-storage"]

    # A pod without resources gets the request alone; spec.pods.default sets it for all.
    samirun_doc["spec"]["pods"]["default"]["cacheSize"] = "20Gi"
    del samirun_doc["spec"]["pods"]["generate"]
    pod = _worker_pod(parse_samirun(samirun_doc), "generate")
    assert pod["containers"][0]["resources"] == {"requests": {"ephemeral-storage": "20Gi"}}


def test_a_cache_volume_replaces_the_emptydir_for_every_launcher(samirun_doc):
    claim = {"persistentVolumeClaim": {"claimName": "sami-models"}}
    samirun_doc["spec"]["pods"]["default"]["cacheVolume"] = claim
    for launcher in ("PyTorchJob", "JobSet", "TrainJob", "Job"):
        samirun_doc["spec"]["training"]["launcher"] = launcher
        samirun_doc["spec"]["training"]["nodes"] = 1 if launcher == "Job" else 4
        run = parse_samirun(samirun_doc)
        for children in all_children(run):
            for template in pod_templates(children[1]):
                volumes = template["spec"]["volumes"]
                cache = next(v for v in volumes if v["name"] == "cache")
                assert cache == {"name": "cache", **claim}, children[1]["metadata"]["name"]
                assert restricted_violations(template["spec"]) == []
    # cacheSize sizes an emptyDir only: no ephemeral-storage request for a claim.
    pod = _worker_pod(parse_samirun(samirun_doc), "train")
    assert "ephemeral-storage" not in pod["containers"][0]["resources"]["requests"]


@pytest.mark.parametrize(
    "volume, problem",
    [
        ({"hostPath": {"path": "/models"}}, "exactly one of persistentVolumeClaim, ephemeral, csi"),
        (
            {"persistentVolumeClaim": {"claimName": "a"}, "ephemeral": {}},
            "exactly one of persistentVolumeClaim",
        ),
        ({"ephemeral": "big"}, "cacheVolume.ephemeral: must be an object"),
    ],
)
def test_a_cache_volume_is_one_restricted_source(samirun_doc, volume, problem):
    samirun_doc["spec"]["pods"]["train"]["cacheVolume"] = volume
    with pytest.raises(SpecError, match="spec.pods.train.cacheVolume") as err:
        parse_samirun(samirun_doc)
    assert problem in str(err.value)


@pytest.mark.parametrize("launcher", ["PyTorchJob", "JobSet", "TrainJob", "Job"])
def test_every_stage_pod_meets_pod_security_restricted(samirun_doc, launcher):
    run = run_with(samirun_doc, "team-a", launcher, writer=True)
    for _, workload in all_children(run):
        for template in pod_templates(workload):
            pod = template["spec"]
            assert restricted_violations(pod) == [], workload["metadata"]["name"]
            assert pod["securityContext"] == {
                "runAsNonRoot": True,
                "runAsUser": 10001,  # images/worker/Dockerfile: USER 10001:10001
                "runAsGroup": 10001,
                "fsGroup": 10001,
                "fsGroupChangePolicy": "OnRootMismatch",
                "seccompProfile": {"type": "RuntimeDefault"},
            }
            if workload["kind"] != "TrainJob":  # a TrainJob's runtime sets it
                assert pod["automountServiceAccountToken"] is False
            assert not {"hostNetwork", "dnsPolicy", "runtimeClassName"} & set(pod)
            # The worker writes only under its volumes: a read-only root filesystem works.
            (worker,) = pod["containers"]
            mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
            assert mounts["/tmp"] == "tmp" and mounts["/var/cache/sami"] == "cache"
            assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
            env = {e["name"]: e.get("value") for e in worker["env"]}
            assert env["HOME"] == "/tmp" and "TMPDIR" not in env  # tempfile's default: /tmp
            assert env["XDG_CACHE_HOME"] == env["SAMI_CACHE_DIR"] == "/var/cache/sami"
            assert env["HF_HOME"] == "/var/cache/sami/huggingface"


def test_the_checker_sees_what_breaks_restricted():
    pod = {
        "hostNetwork": True,
        "securityContext": {"runAsUser": 0},
        "volumes": [{"name": "models", "hostPath": {"path": "/models"}}],
        "containers": [{"name": "w", "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}}}],
    }
    assert restricted_violations(pod) == [
        "host namespaces (hostNetwork=true)",
        "hostPath volumes (volume 'models')",
        "runAsUser=0 (pod must not set runAsUser=0)",
        'allowPrivilegeEscalation != false (container "w" must set '
        "securityContext.allowPrivilegeEscalation=false)",
        'unrestricted capabilities (container "w" must set securityContext.capabilities.drop='
        '["ALL"]; container "w" must not include "IPC_LOCK" in securityContext.capabilities.add)',
        'runAsNonRoot != true (pod or container "w" must set securityContext.runAsNonRoot=true)',
        'seccompProfile (pod or container "w" must set securityContext.seccompProfile.type to '
        '"RuntimeDefault" or "Localhost")',
    ]


def _with_knobs(samirun_doc, namespace: str, launcher: str):
    pods = samirun_doc["spec"]["pods"]
    pods["default"].update(
        securityContext={"runAsUser": 2000, "supplementalGroups": [44]},
        runtimeClassName="nvidia",
        labels={"team": "alignment"},
        topologySpreadConstraints=[
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"sami.dev/stage": "generate"}},
            }
        ],
    )
    pods["train"].update(
        containerSecurityContext={"capabilities": {"add": ["IPC_LOCK"]}},
        hostNetwork=True,
        schedulerName="volcano",
        automountServiceAccountToken=True,
        labels={"fabric": "rdma"},
        cacheVolume={"persistentVolumeClaim": {"claimName": "sami-models"}},
    )
    return run_with(samirun_doc, namespace, launcher)


def _check_knobs(workload: dict) -> None:
    for template in pod_templates(workload):
        pod, labels = template["spec"], template["metadata"]["labels"]
        (worker,) = pod["containers"]
        assert pod["securityContext"]["runAsUser"] == 2000  # merged over the defaults
        assert pod["securityContext"]["supplementalGroups"] == [44]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["runtimeClassName"] == "nvidia"
        assert pod["topologySpreadConstraints"][0]["maxSkew"] == 1
        if labels["sami.dev/stage"] == "train":
            assert worker["securityContext"]["capabilities"] == {
                "drop": ["ALL"],
                "add": ["IPC_LOCK"],
            }
            assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
            assert pod["schedulerName"] == "volcano"
            assert pod["automountServiceAccountToken"] is True
            assert labels["fabric"] == "rdma" and "team" not in labels  # a stage's own wins
            cache = next(v for v in pod["volumes"] if v["name"] == "cache")
            assert cache["persistentVolumeClaim"] == {"claimName": "sami-models"}
            assert restricted_violations(pod) == [
                "host namespaces (hostNetwork=true)",
                f'unrestricted capabilities (container "{worker["name"]}" must not include '
                '"IPC_LOCK" in securityContext.capabilities.add)',
            ]
        else:
            assert worker["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            # The server defaults what the builders leave out.
            assert not pod.get("hostNetwork")
            assert pod.get("schedulerName", "default-scheduler") == "default-scheduler"
            assert pod["automountServiceAccountToken"] is False
            assert labels["team"] == "alignment"
            assert restricted_violations(pod) == []


@pytest.mark.parametrize("launcher", ["PyTorchJob", "JobSet", "Job"])
def test_pod_knobs_reach_the_pods(samirun_doc, launcher):
    run = _with_knobs(samirun_doc, "team-a", launcher)
    for _, workload in all_children(run):
        _check_knobs(workload)


@pytest.mark.parametrize("launcher", ["PyTorchJob", "JobSet"])
def test_pod_knobs_are_accepted_by_the_api_server(
    control_plane, k8s_namespace, samirun_doc, launcher
):
    run = _with_knobs(samirun_doc, k8s_namespace, launcher)
    for objects in all_children(run):
        stored = dry_run(control_plane, objects, k8s_namespace)
        _check_knobs(stored[1])


KUEUE = ("kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class")


@pytest.mark.parametrize("launcher", ["PyTorchJob", "JobSet", "TrainJob", "Job"])
def test_kueue_labels_are_on_the_workload_and_never_on_a_pod(samirun_doc, launcher):
    samirun_doc["metadata"].setdefault("labels", {})["kueue.x-k8s.io/priority-class"] = "high"
    samirun_doc["spec"]["queueName"] = "team-a-queue"
    run = run_with(samirun_doc, "team-a", launcher, writer=True)
    for config_map, workload in all_children(run):
        assert workload["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-queue"
        assert workload["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
        assert not set(KUEUE) & set(config_map["metadata"]["labels"])
        for template in pod_templates(workload):
            assert not set(KUEUE) & set(template["metadata"]["labels"])
            assert template["metadata"]["labels"]["sami.dev/run"] == run.metadata.name


def test_the_longest_run_name_needs_no_shortening(samirun_doc):
    """A run name of MAX_RUN_NAME characters, at the API's limits (100 iterations, 101
    attempts, 1024 nodes): every child is named <run>-<stem>[-r<attempt>] in full, within
    MAX_NAME, and the pods and Services launchers name after a training child stay DNS-1035
    labels within 63 characters."""
    name = "r" + "-a1" * ((MAX_RUN_NAME - 1) // 3) + "x" * ((MAX_RUN_NAME - 1) % 3)
    assert len(name) == MAX_RUN_NAME
    samirun_doc["metadata"]["name"] = name
    samirun_doc["spec"]["training"].update(iterations=100, maxRestarts=100, nodes=1024)
    run = parse_samirun(samirun_doc)
    longest = []
    for stage in plan(run, "uid") + [cleanup_stage(run, "uid")]:
        child = child_name(name, stage, attempt=101)
        stem = stage.name if stage.iteration is None else f"it{stage.iteration}-{stage.name}"
        assert child == f"{name}-{stem}-r101" and len(child) <= MAX_NAME, child
        longest.append(child)
        if stage.name == "train":
            for pod in (f"{child}-worker-1022", f"{child}-node-1023-0", f"{child}-master-0"):
                assert re.match(DNS_1035_LABEL, pod) and len(pod) <= 63, pod
    assert max(map(len, longest)) == MAX_NAME  # the bound is tight: one more would not fit


# ------------------------------------------------------------------ upstream models and launchers
def _train_workload(run) -> dict:
    stage = next(s for s in plan(run, "uid") if s.name == "train")
    return build_children(run, stage, "uid", SETTINGS)[1]


def _quantities_as_strings(obj: dict) -> dict:
    """Kubernetes quantities (resources, emptyDir sizeLimit) as strings. The API server takes
    a JSON number for a quantity too, but the Training SDK's models (generated for the
    kubernetes client) type quantities as strings and would turn 8 into "8"."""
    out = copy.deepcopy(obj)

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("limits", "requests") and isinstance(value, dict):
                    node[key] = {k: str(v) for k, v in value.items()}
                elif key == "sizeLimit":
                    node[key] = str(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(out)
    return out


def check_pytorchjob(obj: dict) -> None:
    """A PyTorchJob against kubeflow-training's KubeflowOrgV1PyTorchJob: deserialised by the
    SDK's ApiClient (required fields and enums checked), then serialised back to the same
    document. The SDK's models ignore unknown keys and coerce primitives (8 -> "8"), so the
    round trip is what catches a misspelt field or a wrong type."""
    from kubeflow.training import ApiClient

    class Client(ApiClient):
        # kubernetes>=36's models write map types as "dict[str, X]"; the SDK's deserialiser
        # (generated for older kubernetes clients, hence kubeflow-training 1.9.4's
        # kubernetes<36) parses only "dict(str, X)".
        def _ApiClient__deserialize(self, data, klass):
            if isinstance(klass, str) and klass.startswith("dict["):
                klass = f"dict({klass[5:-1]})"
            return super()._ApiClient__deserialize(data, klass)

    client = Client()
    response = SimpleNamespace(data=json.dumps(obj))
    model = client.deserialize(response, "KubeflowOrgV1PyTorchJob")
    assert client.sanitize_for_serialization(model) == obj


def check_trainjob(obj: dict) -> None:
    """A TrainJob against kubeflow-trainer-api's TrainerV1alpha1TrainJob (pydantic, strict
    types: a wrong type raises), serialised back to the same document (its from_dict ignores
    unknown keys, so the round trip catches them)."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    assert TrainerV1alpha1TrainJob.from_dict(obj).to_dict() == obj


@pytest.mark.parametrize("knobs", [False, True])
def test_the_pytorchjob_matches_the_training_operator_models(samirun_doc, knobs):
    run = (_with_knobs if knobs else run_with)(samirun_doc, "team-a", "PyTorchJob")
    pytorchjob = _quantities_as_strings(_train_workload(run))
    assert set(pytorchjob["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}
    check_pytorchjob(pytorchjob)

    # The check can fail: a wrong type, a misspelt field, a missing required field.
    wrong = copy.deepcopy(pytorchjob)
    wrong["spec"]["nprocPerNode"] = 8  # a string in the API (it may be "auto")
    with pytest.raises(AssertionError):
        check_pytorchjob(wrong)
    wrong = copy.deepcopy(pytorchjob)
    wrong["spec"]["runPolicy"]["cleanPodPolicyy"] = "Running"
    with pytest.raises(AssertionError):
        check_pytorchjob(wrong)
    wrong = copy.deepcopy(pytorchjob)
    del wrong["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ValueError, match="name"):
        check_pytorchjob(wrong)


def test_the_trainjob_matches_the_trainer_models(samirun_doc):
    samirun_doc["spec"]["pods"]["train"].update(
        nodeSelector={"gpu": "h100"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        imagePullSecrets=["registry"],
        env=[{"name": "NCCL_DEBUG", "value": "WARN"}],
        annotations={"team": "alignment"},
    )
    samirun_doc["spec"]["training"]["trainingRuntime"] = "sami-torch-distributed"
    run = run_with(samirun_doc, "team-a", "TrainJob")
    trainjob = _train_workload(run)
    check_trainjob(trainjob)
    spec = trainjob["spec"]
    assert spec["runtimeRef"] == {
        "name": "sami-torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    assert (spec["trainer"]["numNodes"], spec["trainer"]["numProcPerNode"]) == (2, 8)
    assert spec["trainer"]["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": 8}
    # torchrun's rendezvous env is the torch runtime's (it refuses PET_* in trainer.env).
    names = {e["name"] for e in spec["trainer"]["env"]}
    assert "NCCL_DEBUG" in names and not {n for n in names if n.startswith("PET_")}
    pod = trainjob_pod_template(trainjob)
    assert pod["metadata"]["annotations"] == {"team": "alignment"}
    assert pod["spec"]["nodeSelector"] == {"gpu": "h100"}
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["spec"]["serviceAccountName"] == "sami-worker"
    (node,) = pod["spec"]["containers"]
    assert node["name"] == "node"  # the torch runtime's trainer container
    assert {m["name"] for m in node["volumeMounts"]} == {"task", "dshm", "cache", "tmp"}

    # The check can fail: a wrong type, a misspelt field.
    wrong = copy.deepcopy(trainjob)
    wrong["spec"]["trainer"]["numProcPerNode"] = "8"
    with pytest.raises(ValueError, match="numProcPerNode|num_proc_per_node"):
        check_trainjob(wrong)
    wrong = copy.deepcopy(trainjob)
    wrong["spec"]["trainer"]["numNode"] = 2
    with pytest.raises(AssertionError):
        check_trainjob(wrong)


@pytest.mark.parametrize("launcher", ["PyTorchJob", "JobSet", "TrainJob"])
def test_the_rendezvous_window_reaches_torchrun(samirun_doc, launcher):
    """Every node's torchrun waits training.rendezvousSeconds for the others (static
    rendezvous: the TCPStore's timeout; torchrun's own default is 900 s)."""
    run = run_with(samirun_doc, "team-a", launcher)
    commands = [t["spec"]["containers"][0]["command"] for t in pod_templates(_train_workload(run))]
    assert all("--rdzv-conf=timeout=1800" in c for c in commands)
    samirun_doc["spec"]["training"]["rendezvousSeconds"] = 3600
    run = run_with(samirun_doc, "team-a", launcher)
    for template in pod_templates(_train_workload(run)):
        command = template["spec"]["containers"][0]["command"]
        assert command[:2] == ["torchrun", "--rdzv-conf=timeout=3600"], command


def test_pytorchjob_workers_wait_for_the_master_within_the_window(samirun_doc):
    """Training Operator v1 gives each worker an init container that gives up on the master's
    Service name after about 200 s; ours, ahead of it, waits rendezvousSeconds."""
    samirun_doc["spec"]["training"]["rendezvousSeconds"] = 2400
    replicas = _train_workload(run_with(samirun_doc, "team-a", "PyTorchJob"))["spec"][
        "pytorchReplicaSpecs"
    ]
    assert "initContainers" not in replicas["Master"]["template"]["spec"]
    (init,) = replicas["Worker"]["template"]["spec"]["initContainers"]
    (worker,) = replicas["Worker"]["template"]["spec"]["containers"]
    assert init["name"] == "wait-for-master" and init["image"] == worker["image"]
    assert {e["name"]: e["value"] for e in init["env"]} == {
        "SAMI_MASTER_HOST": "mistral-hh-it1-train-master-0",
        "SAMI_RENDEZVOUS_SECONDS": "2400",
    }
    assert init["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }


def test_launcher_job_trains_standalone(samirun_doc):
    run = run_with(samirun_doc, "team-a", "Job")
    (template,) = pod_templates(_train_workload(run))
    command = template["spec"]["containers"][0]["command"]
    assert command[:3] == ["torchrun", "--standalone", "--nproc_per_node=8"]
    assert not any(a.startswith("--rdzv-conf") for a in command)


def test_one_table_entry_per_launcher(samirun_doc):
    """Every models.Launcher has an entry and a builder, and the kinds the builders make are
    the table's."""
    from sami_operator.builders import TRAINING_WORKLOADS
    from sami_operator.launchers import BY_KIND, LAUNCHERS
    from sami_operator.models import Launcher

    assert set(LAUNCHERS) == set(Launcher) == set(TRAINING_WORKLOADS)
    for launcher, workload in LAUNCHERS.items():
        assert workload.launcher == launcher and BY_KIND[workload.kind] is workload
        assert launcher.value == workload.kind
        built = _train_workload(run_with(copy.deepcopy(samirun_doc), "team-a", launcher.value))
        assert (built["apiVersion"], built["kind"]) == (workload.api_version, workload.kind)
