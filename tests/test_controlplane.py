"""The test control plane is real: CRD schema validation and defaulting, the status subresource,
the Job controller (with LocalKubelet running the pods), garbage collection and RBAC."""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from sami_operator.builders import _WAIT_FOR_HOST, WAIT_FOR_MASTER
from sami_operator.models import DNS_1035_LABEL, MAX_RUN_NAME
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
    # data.train is a list of sources, kept as written (the models validate it, not the server).
    assert [s["subset"] for s in run["spec"]["data"]["train"]] == ["helpful-base", "harmless-base"]

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


def test_run_names_are_refused_at_apply_time(control_plane, samirun_crd, k8s_namespace):
    """The CRD holds metadata.name to the run-name rule (models.check_run_name): the API server
    refuses other names, saying which rule, before the operator ever sees them."""
    cp, ns = control_plane, k8s_namespace
    refused = {
        "r" * 200: f"metadata.name in body should be at most {MAX_RUN_NAME} chars long",
        "1st-run": f"metadata.name in body should match '{DNS_1035_LABEL}'",
    }
    for name, rule in refused.items():
        doc = example()
        doc["metadata"]["name"] = name
        proc = cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc), check=False)
        assert proc.returncode != 0, proc.stdout
        assert rule in proc.stderr, proc.stderr
    longest = ("run-" + "0123456789" * 3)[:31]
    assert len(longest) == MAX_RUN_NAME
    doc = example()
    doc["metadata"]["name"] = longest
    cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc))
    names = cp.kubectl("get", "samiruns", "-n", ns, "-o", "name").stdout.split()
    assert names == [f"samirun.sami.dev/{longest}"]


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
    out = control_plane.kubectl("explain", "samirun.spec.data.train").stdout
    assert "or a list of up to 64" in out and "count (required)" in out


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
    # The worker waits for the master's Service name first, as the operator's workers do
    # (builders.WAIT_FOR_MASTER; the emulation resolves the name to 127.0.0.1).
    worker = copy.deepcopy(replica)
    worker["template"]["spec"]["initContainers"] = [
        {
            "name": WAIT_FOR_MASTER,
            "image": "sami-worker:test",
            "command": [sys.executable, "-c", _WAIT_FOR_HOST],
            "env": [
                {"name": "SAMI_MASTER_HOST", "value": "allreduce-master-0"},
                {"name": "SAMI_RENDEZVOUS_SECONDS", "value": "30"},
            ],
        }
    ]
    cp.apply(
        {
            "apiVersion": "kubeflow.org/v1",
            "kind": "PyTorchJob",
            "metadata": {"name": "allreduce"},
            "spec": {
                "nprocPerNode": "1",
                "pytorchReplicaSpecs": {"Master": replica, "Worker": worker},
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


# --------------------------------------------------------------------------------- JobSet
JS = "jobset.sigs.k8s.io"
JOBSET_MARKS = (
    "jobset-name",
    "replicatedjob-name",
    "replicatedjob-replicas",
    "job-index",
    "job-global-index",
    "restart-attempt",
)


def from_field(name: str, path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def replicated_job(name: str, command: list[str], replicas: int = 1, env: list = ()) -> dict:
    return {
        "name": name,
        "replicas": replicas,
        "template": {
            "spec": {
                "parallelism": 1,
                "completions": 1,
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [
                            {
                                "name": "main",
                                "image": "sami-worker:test",
                                "command": command,
                                "env": [
                                    from_field("INDEX", f"metadata.annotations['{JS}/job-index']"),
                                    from_field(
                                        "ATTEMPT", f"metadata.labels['{JS}/restart-attempt']"
                                    ),
                                    *env,
                                ],
                            }
                        ],
                    }
                },
            }
        },
    }


def jobset(name: str, *rjobs: dict, **spec) -> dict:
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name},
        "spec": {"replicatedJobs": list(rjobs), **spec},
    }


def wait_jobset(cp: ControlPlane, ns: str, name: str, ctypes: set[str], timeout=60) -> dict:
    """The JobSet once one of these conditions is True."""

    def done():
        js = cp.kubectl_json("get", "jobset", name, "-n", ns)
        conds = js.get("status", {}).get("conditions", [])
        return js if any(c["type"] in ctypes and c["status"] == "True" for c in conds) else None

    return cp.wait_for(f"JobSet {name}: {ctypes}", done, timeout=timeout, interval=0.5)


def jobset_jobs(cp: ControlPlane, ns: str, name: str) -> dict[str, dict]:
    items = cp.kubectl_json("get", "jobs", "-n", ns, "-l", f"{JS}/jobset-name={name}")["items"]
    return {j["metadata"]["name"]: j for j in items}


def test_jobset_emulation(control_plane, k8s_namespace, kubelet, jobset_controller):
    """Child Jobs per replicatedJob with upstream's names, labels and annotations, the headless
    Service, pods' DNS names and the master port made local, Completed with its status."""
    cp, ns = control_plane, k8s_namespace
    show = ["sh", "-c", 'echo "$INDEX $GLOBAL $ATTEMPT $PET_MASTER_ADDR $PET_MASTER_PORT $PEER"']
    env = [
        from_field("GLOBAL", f"metadata.labels['{JS}/job-global-index']"),
        {"name": "PET_MASTER_ADDR", "value": "train-leader-0-0.train"},
        {"name": "PET_MASTER_PORT", "value": "29500"},
        {"name": "PEER", "value": f"http://train-workers-1-0.train.{ns}.svc:80/x"},
    ]
    cp.apply(
        jobset(
            "train",
            replicated_job("leader", show, env=env),
            replicated_job("workers", show, replicas=2, env=env),
        ),
        ns,
    )
    js = wait_jobset(cp, ns, "train", {"Completed", "Failed"})
    status = js["status"]
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Completed"]["status"] == "True", status
    assert conds["Completed"]["reason"] == "AllJobsCompleted"
    assert "Failed" not in conds and "Suspended" not in conds
    assert status["terminalState"] == "Completed" and status["restarts"] == 0
    assert {r["name"]: (r["succeeded"], r["failed"]) for r in status["replicatedJobsStatus"]} == {
        "leader": (1, 0),
        "workers": (2, 0),
    }
    row = cp.kubectl("get", "jobset", "train", "-n", ns).stdout.splitlines()[1].split()
    assert row[:4] == ["train", "Completed", "0", "True"]

    jobs = jobset_jobs(cp, ns, "train")
    assert sorted(jobs) == ["train-leader-0", "train-workers-0", "train-workers-1"]
    expected = {
        "train-leader-0": ("leader", "1", "0", "0"),
        "train-workers-0": ("workers", "2", "0", "1"),
        "train-workers-1": ("workers", "2", "1", "2"),
    }
    for name, job in jobs.items():
        owner = job["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == ("JobSet", "train", True)
        pod_template = job["spec"]["template"]
        values = ("train", *expected[name], "0")
        for obj in (job["metadata"], pod_template["metadata"]):
            for key in ("labels", "annotations"):
                assert tuple(obj[key][f"{JS}/{k}"] for k in JOBSET_MARKS) == values, (name, key)
        assert pod_template["spec"]["subdomain"] == "train"
        assert pod_template["spec"]["hostname"] == f"{name}-0"

    service = cp.kubectl_json("get", "service", "train", "-n", ns)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {f"{JS}/jobset-name": "train"}
    assert service["metadata"]["ownerReferences"][0]["kind"] == "JobSet"

    pods = cp.kubectl_json("get", "pods", "-n", ns, "-l", f"{JS}/jobset-name=train")["items"]
    logs = {
        p["metadata"]["labels"]["job-name"]: kubelet.logs(ns, p["metadata"]["name"]) for p in pods
    }
    port = logs["train-leader-0"].split()[4]
    assert port != "29500"
    assert logs == {
        "train-leader-0": f"0 0 0 127.0.0.1 {port} http://127.0.0.1:80/x\n",
        "train-workers-0": f"0 1 0 127.0.0.1 {port} http://127.0.0.1:80/x\n",
        "train-workers-1": f"1 2 0 127.0.0.1 {port} http://127.0.0.1:80/x\n",
    }


def test_jobset_failure_policy(control_plane, k8s_namespace, kubelet, jobset_controller):
    """A failed Job restarts the whole set (restart-attempt + 1) while maxRestarts allows, then
    the JobSet fails and its still active Jobs go; without a failurePolicy it fails at once."""
    cp, ns = control_plane, k8s_namespace
    # Job 1 fails on the first attempt only; job 0 is still running then.
    flaky = ["sh", "-c", 'if [ "$INDEX$ATTEMPT" = 10 ]; then exit 3; fi; sleep 2']
    # Job 1 always fails; job 0 would run for a minute.
    broken = ["sh", "-c", 'if [ "$INDEX" = 1 ]; then sleep 1; exit 3; fi; sleep 60']
    cp.apply(
        [
            jobset("flaky", replicated_job("node", flaky, 2), failurePolicy={"maxRestarts": 2}),
            jobset("broken", replicated_job("node", broken, 2), failurePolicy={"maxRestarts": 1}),
            jobset("strict", replicated_job("node", broken, 2)),
        ],
        ns,
    )

    js = wait_jobset(cp, ns, "flaky", {"Completed", "Failed"}, timeout=90)
    assert js["status"]["terminalState"] == "Completed", js["status"]
    assert (js["status"]["restarts"], js["status"]["restartsCountTowardsMax"]) == (1, 1)
    jobs = jobset_jobs(cp, ns, "flaky")
    assert sorted(jobs) == ["flaky-node-0", "flaky-node-1"]
    for job in jobs.values():  # the first attempt's Jobs were replaced
        assert job["metadata"]["labels"][f"{JS}/restart-attempt"] == "1"
        assert job["spec"]["template"]["metadata"]["annotations"][f"{JS}/restart-attempt"] == "1"

    js = wait_jobset(cp, ns, "broken", {"Completed", "Failed"}, timeout=90)
    failed = next(c for c in js["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "ReachedMaxRestarts"
    assert "broken-node-1" in failed["message"]
    assert js["status"]["terminalState"] == "Failed"
    assert (js["status"]["restarts"], js["status"]["restartsCountTowardsMax"]) == (1, 1)
    # The running Job 0 is deleted with its pod (and process); the failed Job stays.
    cp.wait_for(
        "the active Job to go",
        lambda: sorted(jobset_jobs(cp, ns, "broken")) == ["broken-node-1"],
        timeout=30,
    )

    js = wait_jobset(cp, ns, "strict", {"Completed", "Failed"}, timeout=60)
    failed = next(c for c in js["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "FailedJobs" and js["status"]["restarts"] == 0


def test_jobset_suspend_and_resume(control_plane, k8s_namespace, kubelet, jobset_controller):
    cp, ns = control_plane, k8s_namespace
    cp.apply(jobset("later", replicated_job("node", ["sh", "-c", "true"]), suspend=True), ns)
    js = wait_jobset(cp, ns, "later", {"Suspended"})
    suspended = next(c for c in js["status"]["conditions"] if c["type"] == "Suspended")
    assert suspended["reason"] == "SuspendedJobs"
    time.sleep(2)
    assert jobset_jobs(cp, ns, "later") == {}

    cp.kubectl(
        "patch", "jobset", "later", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    js = wait_jobset(cp, ns, "later", {"Completed", "Failed"})
    conds = {c["type"]: c for c in js["status"]["conditions"]}
    assert conds["Completed"]["status"] == "True"
    assert (conds["Suspended"]["status"], conds["Suspended"]["reason"]) == ("False", "ResumeJobs")


@pytest.mark.slow
def test_torchrun_rendezvous_across_jobset_pods(
    control_plane, k8s_namespace, kubelet, jobset_controller
):
    """The operator's JobSet convention: torchrun reads PET_* env, the node rank from the
    job-index annotation and the master as pod 0 of Job 0 behind the headless Service."""
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
    node = replicated_job(
        "node",
        ["torchrun", "/opt/train/allreduce.py"],
        replicas=2,
        env=[
            {"name": "PET_NNODES", "value": "2"},
            {"name": "PET_NPROC_PER_NODE", "value": "1"},
            from_field("PET_NODE_RANK", f"metadata.annotations['{JS}/job-index']"),
            {"name": "PET_MASTER_ADDR", "value": "allreduce-node-0-0.allreduce"},
            {"name": "PET_MASTER_PORT", "value": "29500"},
        ],
    )
    pod_spec = node["template"]["spec"]["template"]["spec"]
    pod_spec["volumes"] = [{"name": "script", "configMap": {"name": "train-script"}}]
    pod_spec["containers"][0]["volumeMounts"] = [{"name": "script", "mountPath": "/opt/train"}]
    cp.apply(
        jobset(
            "allreduce",
            node,
            failurePolicy={"maxRestarts": 0},
            network={"enableDNSHostnames": True},
        ),
        ns,
    )
    js = wait_jobset(cp, ns, "allreduce", {"Completed", "Failed"}, timeout=90)
    pods = cp.kubectl_json("get", "pods", "-n", ns, "-l", f"{JS}/jobset-name=allreduce")["items"]
    logs = {
        p["metadata"]["labels"]["job-name"]: kubelet.logs(ns, p["metadata"]["name"]) for p in pods
    }
    assert js["status"]["terminalState"] == "Completed", logs
    assert "rank=0 world=2 sum=3.0" in logs["allreduce-node-0"]
    assert "rank=1 world=2 sum=3.0" in logs["allreduce-node-1"]
