"""The operator on a cluster that says no: admission, quotas, missing objects, images that never
pull, a drained node. Real kube-apiserver admission (ServiceAccount, ResourceQuota, a
validating webhook enforcing Pod Security 'restricted'), the real Job and resource-quota
controllers, pods run by LocalKubelet (tests/k8s). Each case ends in its documented state
with the reason in the SAMIRun's status (README: "When a run does not progress").

Runs here use an image under the reserved .invalid domain wherever their pods need not run:
LocalKubelet keeps such pods in ErrImagePull/ImagePullBackOff, as a kubelet would, so no
worker starts and the tests stay light.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
import yaml

from tests.conftest import EXAMPLES
from tests.k8s.admission import LABEL
from tests.test_operator import Operator, get_run

UNPULLABLE = "registry.invalid/sami-worker:0"


@pytest.fixture
def operator(control_plane, k8s_namespace, kubelet, tmp_path):
    op = Operator(control_plane, k8s_namespace, tmp_path / "operator.log").start()
    yield op
    op.kill()


@pytest.fixture
def blackhole():
    """An S3 endpoint that accepts connections and never answers: a worker reading from it
    stays busy (and idle) for its read timeout."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def run_doc(name: str, endpoint: str, **pods) -> dict:
    doc = yaml.safe_load((EXAMPLES / "samirun-tiny.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["storage"]["endpointUrl"] = endpoint
    doc["spec"]["training"]["maxRestarts"] = 0
    doc["spec"]["pods"]["default"].update(pods)
    return doc


def wait_status(cp, ns, name, what, predicate, operator, timeout=180.0) -> dict:
    """Polls the run's status until predicate(status) holds; fails at once if the operator
    exits, else after a generous backstop (a busy machine slows it, never fails it)."""
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        assert operator.proc.poll() is None, operator.log.read_text()[-4000:]
        status = get_run(cp, ns, name).get("status") or {}
        if predicate(status):
            return status
        time.sleep(1)
    pytest.fail(
        f"{name}: never {what}: {json.dumps(status, indent=1)[-3000:]}\n"
        f"operator log:\n{operator.log.read_text()[-3000:]}"
    )


def condition(status: dict, kind: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def stalled(reason: str, *texts: str):
    def check(status: dict) -> bool:
        c = condition(status, "Stalled")
        return (
            c.get("status") == "True"
            and c.get("reason") == reason
            and all(t in c.get("message", "") and t in status.get("message", "") for t in texts)
        )

    return check


def first_stage(status: dict) -> dict:
    stage = status["stage"]
    if "-" not in stage:
        return status[stage]
    kind, iteration = stage.split("-")
    return status["iterations"][int(iteration)][kind]


def events(cp, ns: str, name: str) -> list[dict]:
    selector = f"involvedObject.name={name},involvedObject.kind=SAMIRun"
    return cp.kubectl_json("get", "events", "-n", ns, "--field-selector", selector)["items"]


def test_pod_security_refusals_missing_service_accounts_and_unpullable_images_show_in_status(
    control_plane, k8s_namespace, restricted_admission, operator, blackhole
):
    cp, ns = control_plane, k8s_namespace
    cp.kubectl("label", "namespace", ns, f"{LABEL}=restricted")
    fits = run_doc("fits", blackhole, image=UNPULLABLE)
    fits["spec"]["deadlines"] = {"startSeconds": 60}
    ipc_lock = run_doc(
        "ipc-lock", blackhole, image=UNPULLABLE,
        containerSecurityContext={"capabilities": {"add": ["IPC_LOCK"]}},
    )  # fmt: skip
    no_sa = run_doc("no-sa", blackhole, image=UNPULLABLE, serviceAccountName="missing-sa")
    cp.apply([fits, ipc_lock, no_sa], namespace=ns)

    # The defaults meet 'restricted': the webhook admits the pod, which then cannot pull.
    status = wait_status(
        cp, ns, "fits", "showed the image pull error",
        lambda s: condition(s, "Stalled").get("reason") in ("ErrImagePull", "ImagePullBackOff")
        and UNPULLABLE in s["message"],
        operator,
    )  # fmt: skip
    child = first_stage(status)["child"]
    pods = cp.kubectl_json("get", "pods", "-n", ns, "-l", f"job-name={child}")["items"]
    assert len(pods) == 1

    # A capability 'restricted' forbids: the Job controller cannot create the pod.
    status = wait_status(
        cp, ns, "ipc-lock", "showed the Pod Security refusal",
        stalled("FailedCreate", 'violates PodSecurity "restricted:latest"', "IPC_LOCK"),
        operator,
    )  # fmt: skip
    assert status["phase"] in ("Pending", "Running") and first_stage(status)["attempts"] == 1
    reasons = [e["reason"] for e in events(cp, ns, "ipc-lock")]
    assert reasons.count("FailedCreate") == 1, reasons  # one event per new message

    wait_status(
        cp, ns, "no-sa", "showed the missing ServiceAccount",
        stalled("FailedCreate", 'serviceaccount "missing-sa" not found'),
        operator,
    )  # fmt: skip

    # The image never pulls: the start deadline fails the run, saying why.
    status = wait_status(
        cp, ns, "fits", "failed on its start deadline",
        lambda s: s.get("phase") == "Failed", operator,
    )  # fmt: skip
    failed = condition(status, "Failed")
    assert failed["reason"] == "StartDeadlineExceeded", failed
    assert "did not run within 60s" in failed["message"] and UNPULLABLE in failed["message"]


def test_quota_refusals_wait_and_show_in_status(control_plane, k8s_namespace, operator, blackhole):
    cp, ns = control_plane, k8s_namespace

    def quota(name: str, hard: dict) -> dict:
        return {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": name},
                "spec": {"hard": hard}}  # fmt: skip

    cp.apply(quota("no-jobs", {"count/jobs.batch": "0"}), namespace=ns)
    cp.wait_for(
        "the quota's usage",
        lambda: cp.kubectl_json("get", "resourcequota", "no-jobs", "-n", ns).get("status"),
    )
    cp.apply(run_doc("quota", blackhole, image=UNPULLABLE), namespace=ns)

    # The API server refuses the Job: retried on later passes, no attempt spent.
    status = wait_status(
        cp, ns, "quota", "showed the refused Job",
        stalled("QuotaExceeded", "exceeded quota: no-jobs", "(retrying)"), operator,
    )  # fmt: skip
    assert status["phase"] == "Pending" and first_stage(status)["attempts"] == 0

    # Jobs allowed, pods not: the Job controller's FailedCreate event reaches the status.
    cp.apply(quota("no-pods", {"pods": "0"}), namespace=ns)
    cp.wait_for(
        "the pod quota's usage",
        lambda: cp.kubectl_json("get", "resourcequota", "no-pods", "-n", ns).get("status"),
    )
    cp.kubectl("delete", "resourcequota", "no-jobs", "-n", ns)
    status = wait_status(
        cp, ns, "quota", "showed the refused pods",
        stalled("FailedCreate", "exceeded quota: no-pods"), operator,
    )  # fmt: skip
    assert first_stage(status)["attempts"] == 1


def test_a_drained_node_does_not_spend_an_attempt(
    control_plane, k8s_namespace, operator, kubelet, blackhole
):
    """kubectl drain evicts the stage's pod (the Eviction API); with maxRestarts 0 the run
    goes on, its attempt unspent. On this 1.20 control plane the Job controller replaces the
    evicted pod itself; on clusters whose Job controller counts it as a failure, the operator
    retries the stage as a disruption (tests/test_reconcile.py)."""
    cp, ns = control_plane, k8s_namespace
    keys = ("--from-literal=AWS_ACCESS_KEY_ID=k", "--from-literal=AWS_SECRET_ACCESS_KEY=s")
    cp.kubectl("create", "secret", "generic", "sami-s3", "-n", ns, *keys)
    cp.apply(run_doc("drained", blackhole), namespace=ns)

    def running_pod():
        status = get_run(cp, ns, "drained").get("status") or {}
        if status.get("phase") != "Running":
            return None
        child = first_stage(status)["child"]
        for pod in cp.kubectl_json("get", "pods", "-n", ns, "-l", f"job-name={child}")["items"]:
            run = kubelet.run_for(ns, pod["metadata"]["name"])
            if run and run.proc and run.proc.poll() is None:
                return pod
        return None

    try:
        pod = cp.wait_for("the stage's running worker", running_pod, timeout=180)
    except TimeoutError:
        pytest.fail(f"no running worker: {get_run(cp, ns, 'drained').get('status')}")
    name = pod["metadata"]["name"]
    with cp.client() as api:
        api.create(
            f"/api/v1/namespaces/{ns}/pods/{name}/eviction",
            {"apiVersion": "policy/v1beta1", "kind": "Eviction",
             "metadata": {"name": name, "namespace": ns}},
        )  # fmt: skip
    replacement = cp.wait_for(
        "a worker in a new pod",
        lambda: (p := running_pod()) and p["metadata"]["uid"] != pod["metadata"]["uid"] and p,
        timeout=180,
    )
    assert replacement
    status = get_run(cp, ns, "drained")["status"]
    assert status["phase"] == "Running", status
    stage = first_stage(status)
    assert stage["attempts"] - stage.get("disruptions", 0) == 1, stage


def test_a_run_reaching_into_another_namespaces_storage_is_refused(
    control_plane, k8s_namespace, kubelet, tmp_path
):
    """With a shared default storage, team-a's run naming team-b's data fails at once, with
    nothing created."""
    cp, ns = control_plane, k8s_namespace
    op = Operator(cp, ns, tmp_path / "operator.log")
    op.env["SAMI_DEFAULT_STORAGE"] = json.dumps({"uri": "s3://shared/runs"})
    op.start()
    try:
        doc = run_doc("trespass", "http://127.0.0.1:1")
        doc["spec"].pop("storage")
        doc["spec"]["data"]["train"]["uri"] = "s3://shared/runs/team-b/r/u/generate/x.jsonl"
        cp.apply(doc, namespace=ns)
        status = wait_status(
            cp, ns, "trespass", "was refused", lambda s: s.get("phase") == "Failed", op
        )
        failed = condition(status, "Failed")
        assert failed["reason"] == "ForeignStorage"
        assert (
            "spec.data.train.uri" in failed["message"]
            and f"s3://shared/runs/{ns}/" in failed["message"]
        )
        jobs = cp.kubectl_json("get", "jobs,configmaps", "-n", ns, "-l", "sami.dev/run=trespass")
        assert jobs["items"] == []
    finally:
        op.kill()
