"""The test control plane is real: CRD schema validation and defaulting, the status subresource,
the Job controller (with LocalKubelet running the pods), garbage collection and RBAC."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from tests.k8s.controlplane import ApiError, ControlPlane
from tests.k8s.kubelet import LocalKubelet

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "crds" / "sami.dev_samiruns.yaml"
EXAMPLE = ROOT / "examples" / "samirun.yaml"


@pytest.fixture(scope="module")
def samirun_crd(control_plane: ControlPlane) -> str:
    # kubectl's client-side schema check (a 1.20 server has no server-side field validation)
    # rejects x-kubernetes-validations, which 1.20 does not know; the server drops it.
    control_plane.kubectl("apply", "--validate=false", "-f", str(CRD))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "crd/samiruns.sami.dev", "--timeout=30s"
    )
    return "samiruns.sami.dev"


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def job(name: str, command: list[str], backoff_limit: int = 0) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "main", "image": "sami-worker:test", "command": command}
                    ],
                }
            },
        },
    }


def wait_job(cp: ControlPlane, ns: str, name: str, condition: str, timeout: int = 40) -> dict:
    cp.kubectl(
        "wait", "-n", ns, f"--for=condition={condition}", f"job/{name}", f"--timeout={timeout}s"
    )
    return cp.kubectl_json("get", "-n", ns, "job", name)


def job_pod(cp: ControlPlane, ns: str, name: str) -> dict:
    pods = cp.kubectl_json("get", "pods", "-n", ns, "-l", f"job-name={name}")["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def test_samirun_crd_validates_and_defaults(control_plane, samirun_crd, k8s_namespace):
    cp, ns = control_plane, k8s_namespace
    cp.kubectl("apply", "-n", ns, "-f", str(EXAMPLE))
    run = cp.kubectl_json("get", "samirun", "-n", ns, "mistral-hh")
    assert run["spec"]["training"]["optimizer"]["lr"] == 5e-7
    assert run["spec"]["model"]["uri"] == "s3://models/mistral-7b-v0.1/"

    # Schema validation happens in the apiserver, and names the field.
    bad = example()
    bad["metadata"]["name"] = "bad-lr"
    bad["spec"]["training"]["optimizer"]["lr"] = 5
    proc = cp.kubectl(
        "create", "-n", ns, "--validate=false", "-f", "-", input=json.dumps(bad), check=False
    )
    assert proc.returncode != 0
    assert "spec.training.optimizer.lr" in proc.stderr, proc.stderr

    # Structural schema: defaults are applied and unknown fields pruned by the server.
    minimal = example()
    minimal["metadata"]["name"] = "minimal"
    del minimal["spec"]["training"]["optimizer"]["lr"]
    minimal["spec"]["unknownField"] = "dropped"
    cp.kubectl("create", "-n", ns, "--validate=false", "-f", "-", input=json.dumps(minimal))
    got = cp.kubectl_json("get", "samirun", "-n", ns, "minimal")
    assert got["spec"]["training"]["optimizer"]["lr"] == 5e-7
    assert "unknownField" not in got["spec"]

    # Kubernetes 1.20 predates CEL (x-kubernetes-validations): the server drops the rules, so
    # this spec (both principles.inline and principles.writer) is accepted here; clusters
    # >= 1.25 reject it. Operator-side validation must cover what CEL covers.
    both = example()
    both["metadata"]["name"] = "both-principles"
    both["spec"]["principles"]["writer"] = {
        "instruction": "Write principles.",
        "model": "s3://models/writer/",
    }
    cp.kubectl("create", "-n", ns, "--validate=false", "-f", "-", input=json.dumps(both))
    crd = cp.kubectl_json("get", "crd", samirun_crd)
    assert "x-kubernetes-validations" not in json.dumps(crd["spec"])


def test_kubectl_explain(control_plane, samirun_crd):
    out = control_plane.wait_for(
        "samirun in the published OpenAPI",
        lambda: control_plane.kubectl("explain", "samirun.spec.training", check=False).stdout,
        timeout=30,
    )
    assert "optimizer" in out
    assert "launcher" in out
    out = control_plane.kubectl("explain", "samirun.spec.training.optimizer.lr").stdout
    assert "Peak learning rate" in out


def test_status_subresource_and_printer_columns(control_plane, samirun_crd, k8s_namespace):
    # Patches go through the API (what Kopf does); `kubectl patch --subresource` needs
    # kubectl >= 1.24, and kube-build.sh's kubectl, when built, is 1.20.
    cp, ns = control_plane, k8s_namespace
    cp.kubectl("apply", "-n", ns, "-f", str(EXAMPLE))
    path = f"/apis/sami.dev/v1alpha1/namespaces/{ns}/samiruns/mistral-hh"
    status = {"phase": "Running", "iteration": 1, "stage": "generate", "message": "generating"}
    with cp.client() as api:
        api.merge_patch(f"{path}/status", {"status": status, "spec": {"task": "summarization"}})
        # The main resource ignores status; the status subresource ignored spec.
        api.merge_patch(path, {"status": {"phase": "Failed"}})
        run = api.get(path)
        assert run["status"]["phase"] == "Running"
        assert run["status"]["iteration"] == 1
        assert run["spec"]["task"] == "dialogue"
        assert run["metadata"]["generation"] == 1
        # A value outside the status enum is rejected.
        with pytest.raises(ApiError) as bad:
            api.merge_patch(f"{path}/status", {"status": {"phase": "Exploded"}})
        assert bad.value.status_code == 422 and "status.phase" in str(bad.value)
    table = cp.kubectl("get", "samiruns", "-n", ns).stdout
    header, row = table.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "ITERATION", "STAGE", "PHASE"]
    assert row.split()[:4] == ["mistral-hh", "1", "generate", "Running"]


def test_job_completes(control_plane, k8s_namespace, kubelet: LocalKubelet):
    cp, ns = control_plane, k8s_namespace
    cp.apply(job("hello", ["python", "-c", "print('hi')"]), namespace=ns)
    done = wait_job(cp, ns, "hello", "complete")
    assert done["status"]["succeeded"] == 1
    pod = job_pod(cp, ns, "hello")
    assert pod["spec"]["nodeName"] == kubelet.node_name
    assert pod["status"]["phase"] == "Succeeded"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    assert kubelet.logs(ns, pod["metadata"]["name"]) == "hi\n"


def test_job_fails_with_backoff_limit_0(control_plane, k8s_namespace, kubelet: LocalKubelet):
    cp, ns = control_plane, k8s_namespace
    cmd = ["sh", "-c", "echo 'out of memory' > /dev/termination-log; exit 3"]
    cp.apply(job("boom", cmd, backoff_limit=0), namespace=ns)
    failed = wait_job(cp, ns, "boom", "failed")
    reasons = [c["reason"] for c in failed["status"]["conditions"] if c["type"] == "Failed"]
    assert reasons == ["BackoffLimitExceeded"]
    pod = job_pod(cp, ns, "boom")  # backoffLimit 0: exactly one pod
    assert pod["status"]["phase"] == "Failed"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"
    assert terminated["message"] == "out of memory"


def test_job_on_failure_restarts_count_against_backoff_limit(control_plane, k8s_namespace, kubelet):
    cp, ns = control_plane, k8s_namespace
    flaky = job("flaky", ["sh", "-c", "exit 1"], backoff_limit=1)
    flaky["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    cp.apply(flaky, ns)
    failed = wait_job(cp, ns, "flaky", "failed")
    reasons = [c["reason"] for c in failed["status"]["conditions"] if c["type"] == "Failed"]
    assert reasons == ["BackoffLimitExceeded"]
    # One pod, restarted in place by the kubelet until the Job controller gave up on it.
    runs = [r for r in list(kubelet.runs.values()) if r.namespace == ns]
    assert len(runs) == 1
    assert runs[0].done.wait(10)
    assert kubelet.logs(ns, runs[0].name) == ""


def test_pod_reads_mounted_configmap_and_env(control_plane, k8s_namespace, kubelet):
    cp, ns = control_plane, k8s_namespace
    task = {"stage": "generate", "iteration": 1}
    cp.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "task"},
                "data": {"task.json": json.dumps(task), "mode": "pair"},
            },
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "s3"},
                "stringData": {"AWS_ACCESS_KEY_ID": "AKIATEST"},
            },
        ],
        namespace=ns,
    )
    script = (
        "import json, os, sys; task = json.load(open(sys.argv[1])); "
        "print(task['stage'], os.environ['MODE'], os.environ['AWS_ACCESS_KEY_ID'], "
        "os.environ['POD'], os.path.isdir(os.environ['SCRATCH']))"
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "reader"},
        "spec": {
            "restartPolicy": "Never",
            "volumes": [
                {"name": "task", "configMap": {"name": "task"}},
                {"name": "scratch", "emptyDir": {}},
            ],
            "containers": [
                {
                    "name": "main",
                    "image": "sami-worker:test",
                    "command": ["python", "-c", script],
                    "args": ["/etc/sami/task.json"],
                    "env": [
                        {
                            "name": "MODE",
                            "valueFrom": {"configMapKeyRef": {"name": "task", "key": "mode"}},
                        },
                        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "SCRATCH", "value": "/scratch"},
                    ],
                    "envFrom": [{"secretRef": {"name": "s3"}}],
                    "volumeMounts": [
                        {"name": "task", "mountPath": "/etc/sami", "readOnly": True},
                        {"name": "scratch", "mountPath": "/scratch"},
                    ],
                }
            ],
        },
    }
    cp.apply(pod, namespace=ns)
    phase = cp.wait_for(
        "pod reader to finish",
        lambda: (
            cp.kubectl_json("get", "pod", "reader", "-n", ns)["status"].get("phase")
            in ("Succeeded", "Failed")
        ),
    )
    assert phase
    got = cp.kubectl_json("get", "pod", "reader", "-n", ns)
    assert got["status"]["phase"] == "Succeeded", kubelet.logs(ns, "reader")
    assert kubelet.logs(ns, "reader") == "generate pair AKIATEST reader True\n"


def test_garbage_collection_of_owned_objects(control_plane, k8s_namespace):
    cp, ns = control_plane, k8s_namespace
    cp.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}, ns)
    owner = cp.kubectl_json("get", "configmap", "owner", "-n", ns)
    cp.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "child",
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "name": "owner",
                        "uid": owner["metadata"]["uid"],
                    }
                ],
            },
        },
        ns,
    )
    cp.kubectl("delete", "configmap", "owner", "-n", ns)
    cp.wait_for(
        "the garbage collector to delete the child",
        lambda: cp.kubectl("get", "configmap", "child", "-n", ns, check=False).returncode != 0,
        timeout=30,
    )


def test_rbac_with_service_account_token(control_plane, k8s_namespace):
    cp, ns = control_plane, k8s_namespace
    cp.apply(
        [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "visible"},
                "data": {"k": "v"},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "get-configmaps"},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "reader-get-configmaps"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "get-configmaps",
                },
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}],
            },
        ],
        ns,
    )
    token = cp.token_for_service_account(ns, "reader")
    got = cp.kubectl(
        "get", "configmap", "visible", "-n", ns, "-o", "jsonpath={.data.k}", token=token
    )
    assert got.stdout == "v"
    listed = cp.kubectl("get", "configmaps", "-n", ns, token=token, check=False)
    assert listed.returncode != 0
    assert "forbidden" in listed.stderr.lower()
    assert f"system:serviceaccount:{ns}:reader" in listed.stderr
    with cp.client(token) as api:
        assert api.get(f"/api/v1/namespaces/{ns}/configmaps/visible")["data"] == {"k": "v"}


def test_deleting_a_running_pod_kills_its_process(control_plane, k8s_namespace, kubelet):
    cp, ns = control_plane, k8s_namespace
    pod = copy.deepcopy(job("sleeper", ["sh", "-c", "sleep 600"])["spec"]["template"])
    pod.update(apiVersion="v1", kind="Pod", metadata={"name": "sleeper"})
    cp.apply(pod, ns)
    cp.kubectl("wait", "-n", ns, "pod/sleeper", "--for=condition=Ready", "--timeout=30s")
    run = kubelet.run_for(ns, "sleeper")
    assert run is not None and run.proc is not None and run.proc.poll() is None
    cp.kubectl("delete", "pod", "sleeper", "-n", ns, "--timeout=30s")
    assert run.proc.poll() is not None


def test_pytorchjob_emulation(control_plane, k8s_namespace, kubelet, pytorchjob_controller):
    cp, ns = control_plane, k8s_namespace
    show_env = (
        "import os; print(*(os.environ[k] for k in ('PET_NNODES', 'PET_NPROC_PER_NODE', "
        "'PET_NODE_RANK', 'PET_MASTER_ADDR', 'WORLD_SIZE')))"
    )
    template = {
        "spec": {
            "containers": [
                {
                    "name": "pytorch",
                    "image": "sami-worker:test",
                    "command": ["python", "-c", show_env],
                }
            ]
        }
    }
    cp.apply(
        {
            "apiVersion": "kubeflow.org/v1",
            "kind": "PyTorchJob",
            "metadata": {"name": "train"},
            "spec": {
                "nprocPerNode": "2",
                "pytorchReplicaSpecs": {
                    "Master": {"replicas": 1, "restartPolicy": "Never", "template": template},
                    "Worker": {"replicas": 1, "restartPolicy": "Never", "template": template},
                },
            },
        },
        ns,
    )

    def succeeded():
        job = cp.kubectl_json("get", "pytorchjob", "train", "-n", ns)
        conds = {c["type"]: c["status"] for c in job.get("status", {}).get("conditions", [])}
        return job if conds.get("Succeeded") == "True" else None

    job = cp.wait_for("the PyTorchJob to succeed", succeeded, timeout=30)
    conds = {c["type"]: c for c in job["status"]["conditions"]}
    assert conds["Created"]["reason"] == "PyTorchJobCreated"
    assert conds["Succeeded"]["reason"] == "PyTorchJobSucceeded"
    assert job["status"]["replicaStatuses"]["Master"]["succeeded"] == 1
    assert job["status"]["completionTime"]
    assert kubelet.logs(ns, "train-master-0") == "2 2 0 127.0.0.1 4\n"
    cp.wait_for(
        "the worker to finish",
        lambda: (
            cp.kubectl_json("get", "pod", "train-worker-0", "-n", ns)["status"]["phase"]
            == "Succeeded"
        ),
    )
    assert kubelet.logs(ns, "train-worker-0") == "2 2 1 127.0.0.1 4\n"


def test_deleting_a_samirun_collects_its_job_and_pods(
    control_plane, samirun_crd, k8s_namespace, kubelet
):
    # The control_plane fixture installs crds/ before the controller-manager starts, so its
    # garbage collector already watches SAMIRuns (1.20 rediscovers new kinds only every 30 s).
    cp, ns = control_plane, k8s_namespace
    cp.kubectl("apply", "-n", ns, "-f", str(EXAMPLE))
    run = cp.kubectl_json("get", "samirun", "mistral-hh", "-n", ns)
    child = job("mistral-hh-it1-generate", ["sh", "-c", "sleep 600"])
    child["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "sami.dev/v1alpha1",
            "kind": "SAMIRun",
            "name": "mistral-hh",
            "uid": run["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    cp.apply(child, ns)
    cp.kubectl(
        "wait",
        "-n",
        ns,
        "pod",
        "-l",
        "job-name=mistral-hh-it1-generate",
        "--for=condition=Ready",
        "--timeout=30s",
    )
    cp.kubectl("delete", "samirun", "mistral-hh", "-n", ns)
    cp.wait_for(
        "the Job and its pod to be collected",
        lambda: not cp.kubectl("get", "jobs,pods", "-n", ns, "-o", "name").stdout.strip(),
        timeout=20,
    )


ALLREDUCE = """\
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"rank={dist.get_rank()} world={dist.get_world_size()} sum={t.item()}")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_rendezvous_across_pytorchjob_pods(
    control_plane, k8s_namespace, kubelet, pytorchjob_controller
):
    """torchrun in each pod reads only the PET_* env the (emulated) operator injects."""
    pytest.importorskip("torch")
    cp, ns = control_plane, k8s_namespace
    cp.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "train-script"},
            "data": {"allreduce.py": ALLREDUCE},
        },
        ns,
    )
    template = {
        "spec": {
            "volumes": [{"name": "script", "configMap": {"name": "train-script"}}],
            "containers": [
                {
                    "name": "pytorch",
                    "image": "sami-worker:test",
                    "command": ["torchrun", "/opt/train/allreduce.py"],
                    "volumeMounts": [{"name": "script", "mountPath": "/opt/train"}],
                }
            ],
        }
    }
    replica = {"replicas": 1, "restartPolicy": "Never", "template": template}
    cp.apply(
        {
            "apiVersion": "kubeflow.org/v1",
            "kind": "PyTorchJob",
            "metadata": {"name": "allreduce"},
            "spec": {
                "nprocPerNode": "1",
                "pytorchReplicaSpecs": {"Master": replica, "Worker": replica},
            },
        },
        ns,
    )

    def finished():
        job = cp.kubectl_json("get", "pytorchjob", "allreduce", "-n", ns)
        conds = {c["type"]: c["status"] for c in job.get("status", {}).get("conditions", [])}
        return job if "True" in (conds.get("Succeeded"), conds.get("Failed")) else None

    job = cp.wait_for("the PyTorchJob to finish", finished, timeout=90, interval=0.5)
    assert kubelet.run_for(ns, "allreduce-worker-0").done.wait(30)
    logs = {p: kubelet.logs(ns, f"allreduce-{p}-0") for p in ("master", "worker")}
    conds = {c["type"]: c["status"] for c in job["status"]["conditions"]}
    assert conds.get("Succeeded") == "True", logs
    assert "rank=0 world=2 sum=3.0" in logs["master"]
    assert "rank=1 world=2 sum=3.0" in logs["worker"]
