"""The operator against a real kube-apiserver and Job controller (tests/k8s), with pods run as
local processes, SeaweedFS as S3, vLLM on CPU and the emulated Kubeflow PyTorchJob controller.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sami_worker import storage
from tests.conftest import EXAMPLES
from tests.k8s.controlplane import ControlPlane, free_port
from tests.k8s.plugin import ensure_binaries
from tests.k8s.training_operators import PYTORCHJOB_CRD

ROOT = Path(__file__).resolve().parents[1]


class Operator:
    """`python -m sami_operator` as a process, watching one namespace."""

    def __init__(self, control_plane, namespace: str, log: Path, **env: str):
        self.env = {
            **os.environ,
            "KUBECONFIG": str(control_plane.kubeconfig),
            "SAMI_NAMESPACES": namespace,
            "SAMI_RECONCILE_SECONDS": "1",
            "SAMI_METRICS_PORT": str(free_port()),
            "SAMI_LIVENESS_PORT": str(free_port()),
            **env,
        }
        self.log = log
        self.proc = None

    def start(self) -> Operator:
        sink = self.log.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sami_operator"],
            env=self.env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def metrics(self) -> str:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.env['SAMI_METRICS_PORT']}/metrics").text


@pytest.fixture
def operator(control_plane, k8s_namespace, kubelet, pytorchjob_controller, tmp_path):
    op = Operator(control_plane, k8s_namespace, tmp_path / "operator.log").start()
    yield op
    op.kill()


def get_run(control_plane, namespace: str, name: str) -> dict:
    return control_plane.kubectl_json("get", "samirun", name, "-n", namespace, "-o", "json")


def wait_for_phase(control_plane, namespace, name, phases, timeout, operator) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = get_run(control_plane, namespace, name)
        if run.get("status", {}).get("phase") in phases:
            return run
        time.sleep(1)
    pytest.fail(
        f"{name} never reached {phases}: {json.dumps(run.get('status'), indent=1)[-3000:]}\n"
        f"operator log:\n{operator.log.read_text()[-4000:]}"
    )


def tiny_run(bucket: str, endpoint: str) -> dict:
    doc = yaml.safe_load((EXAMPLES / "samirun-tiny.yaml").read_text())
    text = json.dumps(doc).replace("s3://sami-test/", f"s3://{bucket}/")
    doc = json.loads(text)
    doc["spec"]["storage"]["endpointUrl"] = endpoint
    return doc


def open_bucket(s3_server, bucket: str) -> storage.Storage:
    settings = storage.StorageSettings(endpoint_url=s3_server.endpoint_url, force_path_style=True)
    return storage.open_storage(f"s3://{bucket}", settings)


def create_s3_secret(control_plane, namespace: str, s3_server) -> None:
    control_plane.kubectl(
        "create",
        "secret",
        "generic",
        "sami-s3",
        "-n",
        namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3_server.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3_server.secret_key}",
    )


@pytest.fixture
def s3_data(tiny_llama, s3_server, s3_bucket, s3_env):
    """The tiny model and the query files in the bucket."""
    bucket = open_bucket(s3_server, s3_bucket)
    storage.upload_stage(bucket, tiny_llama, "models/tiny-llama", stage="model")
    for name in ("dialogue-train.jsonl", "dialogue-eval.jsonl"):
        bucket.write_bytes(f"data/{name}", (EXAMPLES / "data" / name).read_bytes())
    return s3_bucket


@pytest.fixture
def s3_inputs(s3_data, s3_server, control_plane, k8s_namespace):
    """The bucket's inputs and the credentials Secret."""
    create_s3_secret(control_plane, k8s_namespace, s3_server)
    return s3_data


@pytest.mark.vllm
@pytest.mark.s3
@pytest.mark.slow
def test_samirun_tiny_reaches_succeeded_across_an_operator_restart(
    control_plane, k8s_namespace, operator, s3_inputs, s3_server, tmp_path
):
    doc = tiny_run(s3_inputs, s3_server.endpoint_url)
    control_plane.apply(doc, namespace=k8s_namespace)

    # Kill the operator mid-generation, start a new one: nothing duplicated.
    def generating() -> bool:
        status = get_run(control_plane, k8s_namespace, "tiny").get("status", {})
        if status.get("phase") == "Failed":
            log = operator.log.read_text()[-3000:]
            pytest.fail(f"the run failed: {status.get('message')}\noperator log:\n{log}")
        entries = status.get("iterations", [])
        return len(entries) > 1 and bool(entries[1].get("generate", {}).get("child"))

    control_plane.wait_for("the generation stage", generating, timeout=600)
    operator.kill()
    time.sleep(2)
    operator.start()

    run = wait_for_phase(
        control_plane, k8s_namespace, "tiny", {"Succeeded", "Failed"}, 900, operator
    )
    status = run["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)[-3000:]
    assert [i["iteration"] for i in status["iterations"]] == [0, 1]
    for entry in status["iterations"]:
        assert entry["evaluate"]["attempts"] == 1
        assert "miLowerBound" in entry["metrics"]
    assert (
        status["latestMiLowerBound"] == status["iterations"][1]["metrics"]["miLowerBound"]["value"]
    )
    assert status["iterations"][1]["train"]["child"] == "tiny-it1-train"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "True"

    jobs = control_plane.kubectl_json("get", "jobs", "-n", k8s_namespace, "-o", "json")["items"]
    names = sorted(j["metadata"]["name"] for j in jobs)
    assert names == ["tiny-it0-evaluate", "tiny-it1-evaluate", "tiny-it1-generate"]
    for job in jobs:
        assert job["metadata"]["ownerReferences"][0]["kind"] == "SAMIRun"
        assert job["metadata"]["labels"]["sami.dev/run"] == "tiny"
    pytorchjobs = control_plane.kubectl_json(
        "get", "pytorchjobs", "-n", k8s_namespace, "-o", "json"
    )["items"]
    assert [p["metadata"]["name"] for p in pytorchjobs] == ["tiny-it1-train"]

    table = control_plane.kubectl("get", "samiruns", "-n", k8s_namespace).stdout
    header, row = table.splitlines()[:2]
    assert header.split()[:5] == ["NAME", "ITERATION", "STAGE", "PHASE", "MI"]
    assert row.split()[0] == "tiny" and "Succeeded" in row

    assert 'sami_runs{phase="Succeeded"} 1.0' in operator.metrics()


def test_an_invalid_spec_fails_with_the_field_and_the_operator_keeps_running(
    control_plane, k8s_namespace, operator
):
    doc = yaml.safe_load((EXAMPLES / "samirun.yaml").read_text())
    doc["metadata"]["name"] = "both-principles"
    # Valid for the 1.20 API server (no CEL there) but not for the models.
    doc["spec"]["principles"]["writer"] = {"model": "s3://m/w", "instruction": "be good"}
    control_plane.apply(doc, namespace=k8s_namespace)
    run = wait_for_phase(control_plane, k8s_namespace, "both-principles", {"Failed"}, 60, operator)
    failed = next(c for c in run["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.principles: set exactly one of 'inline' and 'writer'" in failed["message"]
    assert operator.proc.poll() is None

    good = yaml.safe_load((EXAMPLES / "samirun.yaml").read_text())
    good["spec"]["suspend"] = True  # nothing to run here; just proves reconciliation continues
    control_plane.apply(good, namespace=k8s_namespace)
    run = wait_for_phase(control_plane, k8s_namespace, "mistral-hh", {"Suspended"}, 60, operator)
    assert run["status"]["message"] == "suspended before evaluate-0"


def follow(control_plane, operator, what: str, predicate, backstop: float = 600):
    """Waits for predicate() while the operator lives: its exit, or a handler failing with an
    exception, fails the wait at once; a live operator on a loaded machine may be slow (its
    start alone takes tens of seconds on 2 busy cores), so the bound is only a backstop."""

    def progress():
        log = operator.log.read_text(errors="replace")
        if operator.proc.poll() is not None or "failed with an exception" in log:
            pytest.fail(f"the operator, waiting for {what}:\n{log[-4000:]}")
        return predicate()

    try:
        return control_plane.wait_for(what, progress, timeout=backstop, interval=0.5)
    except TimeoutError as err:
        pytest.fail(f"{err}\noperator log:\n{operator.log.read_text()[-4000:]}")


def test_storage_cleanup_gives_up_in_a_namespace_being_deleted(
    control_plane, k8s_namespace, operator
):
    """cleanup.storageOnDelete: delete, and the namespace is deleted: the API server refuses
    the cleanup Job there, so the operator lets the SAMIRun go, saying which prefix is left
    (in its log: a namespace being deleted takes no events), and the namespace goes too."""
    cp, ns = control_plane, k8s_namespace
    doc = yaml.safe_load((EXAMPLES / "samirun.yaml").read_text())
    doc["spec"]["suspend"] = True  # nothing runs; its prefix would still be deleted
    doc["spec"]["cleanup"] = {"storageOnDelete": "delete"}
    cp.apply(doc, namespace=ns)

    def handled():
        run = get_run(cp, ns, "mistral-hh")
        phase = run.get("status", {}).get("phase")
        return phase == "Suspended" and run["metadata"].get("finalizers") and run

    run = follow(cp, operator, "the run's finalizer", handled)
    assert run["metadata"]["finalizers"] == ["sami.dev/finalizer"]
    prefix = f"s3://sami-runs/experiments/{ns}/mistral-hh/{run['metadata']['uid']}"

    cp.kubectl("delete", "namespace", ns, "--wait=false")

    def gone() -> bool:
        got = cp.kubectl("get", "samirun", "mistral-hh", "-n", ns, "-o", "json", check=False)
        if got.returncode == 0:
            # Kopf's record of the delete handler: a retry means it did not let go at once.
            annotations = json.loads(got.stdout)["metadata"].get("annotations", {})
            progress = json.loads(annotations.get("sami.dev/delete_storage", "{}"))
            if progress.get("retries"):
                log = operator.log.read_text()[-4000:]
                pytest.fail(f"the storage cleanup is retried: {progress}\n{log}")
        return "NotFound" in cp.kubectl("get", "namespace", ns, check=False).stderr

    follow(cp, operator, f"namespace {ns} to go", gone)
    log = operator.log.read_text()
    assert (
        f"SAMIRun {ns}/mistral-hh: StorageNotDeleted: {prefix} left in storage (namespace {ns} "
        "is being deleted, so no cleanup Job can be created there); delete it by hand"
    ) in log, log[-4000:]


def mark_finished(api, path: str, condition: str) -> None:
    """Gives a Job the finished condition its pods would have, unless it has it. 1.20's Job
    controller writes its whole status from its cache after a pod event, so a patch made
    before that sync is lost: callers mark again until the operator has moved on."""
    conditions = api.get(path).get("status", {}).get("conditions", [])
    if not any(c["type"] == condition and c["status"] == "True" for c in conditions):
        done = {"type": condition, "status": "True", "reason": "TestFinished"}
        api.merge_patch(f"{path}/status", {"status": {"conditions": [done]}})


@pytest.fixture
def bare_control_plane(tmp_path):
    """A control plane of its own with the SAMIRun CRD only: no training-operator CRDs, which
    a test installs while the operator runs (the shared one has them from the start)."""
    ensure_binaries()
    cp = ControlPlane(crds=sorted((ROOT / "crds").glob("*.yaml"))).start(tmp_path / "k8s")
    try:
        yield cp
    finally:
        cp.stop()


@pytest.mark.k8s
def test_a_run_waits_for_its_launcher_and_proceeds_once_it_is_served(bare_control_plane, tmp_path):
    """launcher PyTorchJob where the PyTorchJob API is not served: the run waits, creating
    nothing, its status saying why (LauncherUnavailable, the served launchers) and one Warning
    event; once the CRD is installed the operator rediscovers it and the run goes on to its
    training PyTorchJob (each stage before it marked finished, as its controller would)."""
    cp, ns = bare_control_plane, "runs"
    cp.kubectl("create", "namespace", ns)
    cp.apply(yaml.safe_load((EXAMPLES / "samirun.yaml").read_text()), namespace=ns)
    operator = Operator(cp, ns, tmp_path / "operator.log").start()
    try:

        def launcher_condition():
            status = get_run(cp, ns, "mistral-hh").get("status", {})
            if status.get("phase") == "Failed":
                pytest.fail(f"the run failed: {status.get('message')}")
            conditions = {c["type"]: c for c in status.get("conditions", [])}
            stalled = conditions.get("Stalled", {})
            return stalled.get("reason") == "LauncherUnavailable" and status

        status = follow(cp, operator, "the Stalled condition", launcher_condition)
        message = (
            "spec.training.launcher: PyTorchJob is not served by this cluster (served: Job); "
            "waiting for its API (CRD) to be installed"
        )
        assert (status["phase"], status["message"]) == ("Pending", message)
        condition = next(c for c in status["conditions"] if c["type"] == "Stalled")
        assert (condition["status"], condition["reason"]) == ("True", "LauncherUnavailable")
        time.sleep(3)  # a few more passes: still waiting, nothing created
        again = get_run(cp, ns, "mistral-hh")["status"]["conditions"]
        assert next(c for c in again if c["type"] == "Stalled") == condition
        assert (
            cp.kubectl(
                "get", "jobs,configmaps", "-n", ns, "-l", "sami.dev/run", "-o", "name"
            ).stdout
            == ""
        )

        cp.kubectl("apply", "--validate=false", "-f", str(PYTORCHJOB_CRD))
        cp.kubectl(
            "wait", "--for=condition=Established", "crd/pytorchjobs.kubeflow.org", "--timeout=30s"
        )
        jobs = f"/apis/batch/v1/namespaces/{ns}/jobs"
        steps = [
            (f"{jobs}/mistral-hh-it0-evaluate", "Complete"),
            (f"{jobs}/mistral-hh-it1-generate", "Complete"),
            (f"/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs/mistral-hh-it1-train", None),
        ]
        with cp.client() as api:
            finished_before = None
            for path, finished in steps:

                def appeared(path=path, before=finished_before):
                    if before:
                        mark_finished(api, *before)
                    return api.get(path)

                follow(cp, operator, path.rsplit("/", 1)[-1], appeared)
                finished_before = finished and (path, finished)

            def training():
                mark_finished(api, *steps[1])
                status = get_run(cp, ns, "mistral-hh")["status"]
                return status.get("stage") == "train-1" and status

            status = follow(cp, operator, "the status to show training", training)

        assert status["phase"] == "Running", status
        stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
        assert stalled["status"] == "False", status
        events = cp.kubectl_json("get", "events", "-n", ns)["items"]
        warned = [e for e in events if e["reason"] == "LauncherUnavailable"]
        assert [(e["type"], e["message"]) for e in warned] == [("Warning", message)]
    finally:
        operator.kill()


@pytest.mark.k8s
def test_a_standby_replica_takes_over_when_the_active_one_is_killed(
    control_plane, k8s_namespace, tmp_path
):
    """Two replicas elect the active one on a Lease: only it acts, the other waits (and answers
    its liveness probe). The active one killed (SIGKILL: no release), the standby takes the
    Lease once it expires and carries the run on to its next stage; no child is created twice
    (one Job per stage, one attempt each, one StageCreated event each). Each stage before the
    next is marked finished, as its controller would (no kubelet here)."""
    import httpx

    cp, ns = control_plane, k8s_namespace
    election = {
        "SAMI_LEADER_ELECTION": "sami-operator",
        "SAMI_LEADER_ELECTION_NAMESPACE": ns,
        "SAMI_LEASE_SECONDS": "3",
    }
    replicas = [
        Operator(cp, ns, tmp_path / f"replica-{i}.log", SAMI_POD_NAME=f"replica-{i}", **election)
        for i in range(2)
    ]
    for replica in replicas:
        replica.start()
    try:
        cp.apply(yaml.safe_load((EXAMPLES / "samirun.yaml").read_text()), namespace=ns)
        jobs = f"/apis/batch/v1/namespaces/{ns}/jobs"
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/sami-operator"
        with cp.client() as api:
            holder = None

            def first_child():
                nonlocal holder
                holder = api.get(lease_path)["spec"]["holderIdentity"]
                return api.get(f"{jobs}/mistral-hh-it0-evaluate")

            follow(cp, replicas[0], "the first child", first_child)
            (active,) = [r for i, r in enumerate(replicas) if holder.startswith(f"replica-{i}_")]
            standby = replicas[1 - replicas.index(active)]
            assert "standby: waiting for Lease" in standby.log.read_text()
            assert "leading:" not in standby.log.read_text()
            probe = f"http://127.0.0.1:{standby.env['SAMI_LIVENESS_PORT']}/healthz"
            assert httpx.get(probe).status_code == 200  # a standby is alive

            active.kill()
            evaluate = (f"{jobs}/mistral-hh-it0-evaluate", "Complete")

            def next_child():
                mark_finished(api, *evaluate)
                return api.get(f"{jobs}/mistral-hh-it1-generate")

            follow(cp, standby, "the standby to create the next child", next_child)
            taken = api.get(lease_path)["spec"]["holderIdentity"]
            assert taken.startswith(f"replica-{replicas.index(standby)}_"), taken
            assert "leading: holding Lease" in standby.log.read_text()

            def recorded():
                status = get_run(cp, ns, "mistral-hh").get("status", {})
                return status.get("stage") == "generate-1" and status

            status = follow(cp, standby, "the status to show generate-1", recorded)
        names = cp.kubectl(
            "get", "jobs", "-n", ns, "-l", "sami.dev/run=mistral-hh", "-o", "name"
        ).stdout.split()
        assert sorted(names) == [
            "job.batch/mistral-hh-it0-evaluate",
            "job.batch/mistral-hh-it1-generate",
        ]
        (it0, it1) = status["iterations"][:2]
        assert (it0["evaluate"]["attempts"], it1["generate"]["attempts"]) == (1, 1), status
        events = cp.kubectl_json("get", "events", "-n", ns)["items"]
        created = [
            (e["message"], e.get("count", 1)) for e in events if e["reason"] == "StageCreated"
        ]
        assert sorted(created) == [
            ("evaluate-0: created mistral-hh-it0-evaluate", 1),
            ("generate-1: created mistral-hh-it1-generate", 1),
        ]
    finally:
        for replica in replicas:
            replica.kill()


def pods_of(control_plane, namespace: str, selector: str) -> list[dict]:
    return control_plane.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]


def running_process(kubelet, namespace: str, pod: str):
    """The local process of a pod the kubelet runs, once it runs."""
    run = kubelet.run_for(namespace, pod)
    return run.proc if run and run.proc and run.proc.poll() is None else None


@pytest.mark.vllm
@pytest.mark.s3
@pytest.mark.slow
def test_samirun_tiny_rides_out_a_missing_secret_s3_down_and_a_lost_training_pod(
    control_plane, k8s_namespace, operator, kubelet, s3_data, s3_server, tmp_path
):
    """One run through four faults, each ending in its documented state: the Secret is
    missing (the status says so, the run waits), S3 goes down during generation (the worker's
    storage retries ride it out), the operator dies mid-training, and the training master pod
    is killed (exit 137, as a preempted node's: retried as a new PyTorchJob). The run then
    succeeds with every other stage run exactly once."""
    ns, cp = k8s_namespace, control_plane
    cp.apply(tiny_run(s3_data, s3_server.endpoint_url), namespace=ns)

    # 1. No Secret yet: the first stage's pod cannot start, and the status says why.
    def stuck():
        status = get_run(cp, ns, "tiny").get("status", {})
        return "CreateContainerConfigError" in status.get("message", "") and status

    status = cp.wait_for("the missing Secret in the status", stuck, timeout=90)
    assert 'secret "sami-s3" not found' in status["message"], status["message"]
    assert status["iterations"][0]["evaluate"]["attempts"] == 1
    create_s3_secret(cp, ns, s3_server)

    # 2. S3 down for 10 s while the generation pod starts (it reads the model first).
    selector = "job-name=tiny-it1-generate"

    def generate_pod():
        pods = pods_of(cp, ns, selector)
        return pods and running_process(kubelet, ns, pods[0]["metadata"]["name"]) and pods[0]

    pod = cp.wait_for("the generation pod", generate_pod, timeout=600)
    s3_server.stop()
    time.sleep(10)
    s3_server.start()

    # 3. The operator dies mid-training; 4. meanwhile the training master pod is killed.
    master = cp.wait_for(
        "the training master",
        lambda: running_process(kubelet, ns, "tiny-it1-train-master-0"),
        timeout=600,
    )
    operator.kill()
    os.killpg(master.pid, signal.SIGKILL)
    cp.wait_for(
        "the first PyTorchJob to fail",
        lambda: any(
            c["type"] == "Failed" and c["status"] == "True"
            for c in cp.kubectl_json("get", "pytorchjob", "tiny-it1-train", "-n", ns)
            .get("status", {})
            .get("conditions", [])
        ),
        timeout=60,
    )
    operator.start()

    run = wait_for_phase(cp, ns, "tiny", {"Succeeded", "Failed"}, 900, operator)
    status = run["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)[-3000:]
    attempts = {
        (entry["iteration"], stage): entry[stage]["attempts"]
        for entry in status["iterations"]
        for stage in ("generate", "train", "evaluate")
        if stage in entry
    }
    assert attempts == {(0, "evaluate"): 1, (1, "generate"): 1, (1, "train"): 2, (1, "evaluate"): 1}
    assert status["iterations"][1]["train"]["child"] == "tiny-it1-train-r2"
    assert "retry" in kubelet.logs(ns, pod["metadata"]["name"])  # the outage was noticed

    jobs = cp.kubectl_json("get", "jobs", "-n", ns)["items"]
    assert sorted(j["metadata"]["name"] for j in jobs) == [
        "tiny-it0-evaluate",
        "tiny-it1-evaluate",
        "tiny-it1-generate",
    ]
    pytorchjobs = cp.kubectl_json("get", "pytorchjobs", "-n", ns)["items"]
    assert sorted(p["metadata"]["name"] for p in pytorchjobs) == [
        "tiny-it1-train",
        "tiny-it1-train-r2",
    ]
    # cleanPodPolicy Running: the first job's surviving worker pod was not left hanging.
    assert pods_of(cp, ns, "training.kubeflow.org/job-name=tiny-it1-train") == [] or all(
        p["status"]["phase"] in ("Succeeded", "Failed")
        for p in pods_of(cp, ns, "training.kubeflow.org/job-name=tiny-it1-train")
    )
    events = cp.kubectl_json("get", "events", "-n", ns)["items"]
    retries = [e["message"] for e in events if e["reason"] == "StageRetrying"]
    assert len(retries) == 1 and "train-1: exit code 137" in retries[0], retries

    # Nothing duplicated in storage: the training metrics hold each optimizer step once.
    bucket = open_bucket(s3_server, s3_data)
    prefix = status["storageUri"].split(f"s3://{s3_data}/", 1)[1]
    rows = bucket.read_bytes(f"{prefix}/iterations/1/train/metrics.jsonl").decode().splitlines()
    steps = run["spec"]["training"]["steps"]
    assert [json.loads(row)["step"] for row in rows] == list(range(1, steps + 1))

    # Cleanup, switched on after the fact: children deleted, then the storage with the run.
    patch = {"spec": {"cleanup": {"children": "deleteOnSuccess", "storageOnDelete": "delete"}}}
    cp.kubectl("patch", "samirun", "tiny", "-n", ns, "--type=merge", "-p", json.dumps(patch))

    def no_children():
        kinds = "jobs,pytorchjobs,configmaps"
        items = cp.kubectl_json("get", kinds, "-n", ns, "-l", "sami.dev/run=tiny")["items"]
        return not items

    cp.wait_for("the children to be deleted", no_children, timeout=60)
    cp.wait_for(
        "the storage finalizer",
        lambda: get_run(cp, ns, "tiny")["metadata"].get("finalizers"),
        timeout=30,
    )
    assert bucket.list(prefix)
    cp.kubectl("delete", "samirun", "tiny", "-n", ns, "--wait=false")
    cp.wait_for(
        "the SAMIRun to go",
        lambda: cp.kubectl("get", "samirun", "tiny", "-n", ns, check=False).returncode != 0,
        timeout=300,
    )
    assert bucket.list(prefix) == []
    reasons = {e["reason"] for e in cp.kubectl_json("get", "events", "-n", ns)["items"]}
    assert "DeletingStorage" in reasons


def dataset_records(bucket: storage.Storage, prefix: str) -> list[dict]:
    return [json.loads(row) for row in bucket.read_bytes(f"{prefix}/dataset.jsonl").splitlines()]


@pytest.mark.vllm
@pytest.mark.s3
@pytest.mark.slow
def test_two_generation_shards_run_as_jobs_and_a_killed_one_is_retried_alone(
    control_plane, k8s_namespace, operator, kubelet, s3_inputs, s3_server, tmp_path
):
    """generation.shards 2 on Kubernetes 1.20, which has no Indexed Jobs with per-index
    retries: a Job per shard. Shard 1's pod is killed once (exit 137, as a preempted
    node's): only shard 1 runs again, as a new Job, and the run succeeds. The shards'
    datasets, in order, are the dataset one worker generates from the whole task."""
    ns, cp = k8s_namespace, control_plane
    doc = tiny_run(s3_inputs, s3_server.endpoint_url)
    # Greedy: see generation.shards (vLLM on CPU does not seed requests one by one).
    doc["spec"]["generation"].update(shards=2, temperature=0.0)
    doc["spec"]["evaluation"] = {"includeBase": False}
    cp.apply(doc, namespace=ns)

    def shard_1():
        pods = pods_of(cp, ns, "job-name=tiny-it1-generate-s1")
        return pods and running_process(kubelet, ns, pods[0]["metadata"]["name"])

    os.killpg(cp.wait_for("shard 1's pod", shard_1, timeout=600).pid, signal.SIGKILL)
    run = wait_for_phase(cp, ns, "tiny", {"Succeeded", "Failed"}, 900, operator)
    status = run["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)[-3000:]
    generate = status["iterations"][0]["generate"]
    assert generate["sharding"] == "JobPerShard"
    assert [(s["index"], s["phase"], s["attempts"], s["child"]) for s in generate["shards"]] == [
        (0, "Succeeded", 1, "tiny-it1-generate-s0"),
        (1, "Succeeded", 2, "tiny-it1-generate-s1-r2"),
    ]
    jobs = cp.kubectl_json("get", "jobs", "-n", ns)["items"]
    assert sorted(j["metadata"]["name"] for j in jobs) == [
        "tiny-it1-evaluate",
        "tiny-it1-generate-s0",
        "tiny-it1-generate-s1",
        "tiny-it1-generate-s1-r2",
    ]
    events = cp.kubectl_json("get", "events", "-n", ns)["items"]
    retries = [e["message"] for e in events if e["reason"] == "StageRetrying"]
    assert len(retries) == 1 and "generate-1 shard 1: exit code 137" in retries[0], retries

    # The whole task, as one worker, beside the run: the same records, in the same order.
    config_map = cp.kubectl_json("get", "configmap", "tiny-it1-generate-s0", "-n", ns)
    whole = json.loads(config_map["data"]["task.json"])
    bucket = open_bucket(s3_server, s3_inputs)
    prefix = status["storageUri"].split(f"s3://{s3_inputs}/", 1)[1]
    whole.update(output=f"s3://{s3_inputs}/one-worker", queryOffset=0)
    del whole["queryCount"]
    task = tmp_path / "whole.json"
    task.write_text(json.dumps(whole))
    one = subprocess.run(
        [sys.executable, "-m", "sami_worker", "generate", "--task", str(task)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    shards = [f"{prefix}/iterations/1/generate/shard-0000{i}-of-00002" for i in range(2)]
    records = dataset_records(bucket, shards[0]) + dataset_records(bucket, shards[1])
    ids = [r["query_id"] for r in records]
    assert ids == sorted(set(ids)) and len(ids) > 1  # each query once, in order
    assert records == dataset_records(bucket, "one-worker")


# ------------------------------------------------------------------------- JobSet launcher
def _training_jobset(name: str, script: str) -> dict:
    """A JobSet labelled as a SAMIRun's training child: 2 Jobs of one pod running `script`
    with its Job's index in $INDEX. Its pods carry the run's labels, as builders.build_jobset
    gives them (the operator watches pods by those labels)."""
    labels = {"sami.dev/run": "r", "app.kubernetes.io/managed-by": "sami-operator"}
    index = {"fieldRef": {"fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}
    container = {
        "name": "worker",
        "image": "sami-worker:test",
        "command": ["sh", "-c", script],
        "env": [{"name": "INDEX", "valueFrom": index}],
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "failurePolicy": {"maxRestarts": 0},
            "replicatedJobs": [
                {
                    "name": "node",
                    "replicas": 2,
                    "template": {
                        "spec": {
                            "backoffLimit": 0,
                            "template": {
                                "metadata": {"labels": labels},
                                "spec": {"restartPolicy": "Never", "containers": [container]},
                            },
                        }
                    },
                }
            ],
        },
    }


def test_the_operator_reads_jobset_state(
    control_plane, k8s_namespace, kubelet, jobset_controller, request
):
    """kube.Kube's watches against the emulated JobSet controller: a JobSet has no Running
    condition, so active child Jobs mean running; Completed is success with rank 0's
    termination message; Failed carries the exit code and message of the pod that failed."""
    from kubernetes import config

    from sami_operator.kube import Kube
    from sami_operator.models import StagePhase

    cp, ns = control_plane, k8s_namespace
    kube = Kube(config.new_client_from_config(config_file=str(cp.kubeconfig)))
    kube.watch([ns])  # what it reads, it reads from its watches
    request.addfinalizer(kube.stop_watching)
    done = "sleep 4; echo rank-$INDEX > /dev/termination-log"
    bad = 'if [ "$INDEX" = 1 ]; then echo bad input > /dev/termination-log; exit 65; fi; sleep 60'
    cp.apply([_training_jobset("r-it1-train", done), _training_jobset("r-it2-train", bad)], ns)

    running = cp.wait_for(
        "the JobSet to run",
        lambda: kube.observe_children(ns, "r").get("r-it1-train"),
        timeout=30,
    )
    while running.phase == StagePhase.pending:
        time.sleep(0.3)
        running = kube.observe_children(ns, "r")["r-it1-train"]
    assert running.phase == StagePhase.running, running

    def finished(name):
        state = kube.observe_children(ns, "r").get(name)
        return state if state and state.phase in (StagePhase.succeeded, StagePhase.failed) else None

    state = cp.wait_for("the first JobSet to finish", lambda: finished("r-it1-train"), timeout=60)
    assert (state.phase, state.exit_code, state.message.strip()) == (
        StagePhase.succeeded,
        0,
        "rank-0",
    )
    state = cp.wait_for("the second JobSet to finish", lambda: finished("r-it2-train"), timeout=60)
    assert (state.phase, state.exit_code, state.message.strip()) == (
        StagePhase.failed,
        65,
        "bad input",
    )


# ----------------------------------------------------------------------- TrainJob launcher
def _training_trainjob(name: str, script: str) -> dict:
    """A TrainJob labelled as a SAMIRun's training child: 2 nodes running `script` with the
    node rank the torch runtime gives each in $PET_NODE_RANK, on the example runtime. Its
    pods get the run's labels through spec.runtimePatches, as builders.build_trainjob gives
    them (the TrainJob's own labels are not copied to its pods)."""
    labels = {"sami.dev/run": "r", "app.kubernetes.io/managed-by": "sami-operator"}
    pod_labels = {"template": {"spec": {"template": {"metadata": {"labels": labels}}}}}
    runtime = {"template": {"spec": {"replicatedJobs": [{"name": "node", **pod_labels}]}}}
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "runtimeRef": {"name": "sami-torch-distributed"},
            "trainer": {
                "numNodes": 2,
                "image": "sami-worker:test",
                "command": ["sh", "-c", script],
            },
            "runtimePatches": [{"manager": "test", "trainingRuntimeSpec": runtime}],
        },
    }


def test_the_operator_reads_trainjob_state(
    control_plane, k8s_namespace, kubelet, trainjob_controller, request
):
    """kube.Kube's watches against the emulated TrainJob controller (a JobSet underneath) and
    the example ClusterTrainingRuntime: no Running condition, so active Jobs in
    status.jobsStatus mean running; Complete is success with rank 0's termination message;
    Failed carries the exit code and message of the pod that failed."""
    from kubernetes import config

    from sami_operator.kube import Kube
    from sami_operator.models import StagePhase

    cp, ns = control_plane, k8s_namespace
    cp.apply((ROOT / "examples" / "clustertrainingruntime-sami.yaml").read_text())
    kube = Kube(config.new_client_from_config(config_file=str(cp.kubeconfig)))
    assert "TrainJob" in kube.served_launchers()
    kube.watch([ns])  # what it reads, it reads from its watches
    request.addfinalizer(kube.stop_watching)
    done = "sleep 4; echo rank-$PET_NODE_RANK > /dev/termination-log"
    bad = 'if [ "$PET_NODE_RANK" = 1 ]; then echo bad input > /dev/termination-log; exit 65; fi; '
    bad += "sleep 60"
    cp.apply([_training_trainjob("r-it1-train", done), _training_trainjob("r-it2-train", bad)], ns)

    running = cp.wait_for(
        "the TrainJob to run",
        lambda: kube.observe_children(ns, "r").get("r-it1-train"),
        timeout=30,
    )
    while running.phase == StagePhase.pending:
        time.sleep(0.3)
        running = kube.observe_children(ns, "r")["r-it1-train"]
    assert running.phase == StagePhase.running, running
    # The TrainJob's JobSet has its name but not the run's labels: one child per name.
    assert set(kube.observe_children(ns, "r")) <= {"r-it1-train", "r-it2-train"}

    def finished(name):
        state = kube.observe_children(ns, "r").get(name)
        return state if state and state.phase in (StagePhase.succeeded, StagePhase.failed) else None

    state = cp.wait_for("the first TrainJob to finish", lambda: finished("r-it1-train"), timeout=60)
    assert (state.phase, state.exit_code, state.message.strip()) == (
        StagePhase.succeeded,
        0,
        "rank-0",
    )
    state = cp.wait_for(
        "the second TrainJob to finish", lambda: finished("r-it2-train"), timeout=60
    )
    assert (state.phase, state.exit_code, state.message.strip()) == (
        StagePhase.failed,
        65,
        "bad input",
    )
    trainjob = cp.kubectl_json("get", "trainjob", "r-it2-train", "-n", ns, "-o", "json")
    failed = next(c for c in trainjob["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True"

    kube.delete_child(ns, "r-it1-train")
    cp.wait_for(
        "the TrainJob to go",
        lambda: "r-it1-train" not in kube.observe_children(ns, "r"),
        timeout=30,
    )


@pytest.mark.vllm
@pytest.mark.s3
@pytest.mark.slow
def test_samirun_tiny_trains_as_a_jobset(
    control_plane, k8s_namespace, jobset_controller, operator, s3_inputs, s3_server
):
    """examples/samirun-tiny.yaml with training.launcher JobSet (2 nodes x 1 process) reaches
    Succeeded: training runs as a JobSet (torchrun in its two Jobs' pods), no PyTorchJob.
    The JobSet CRD is installed with the control plane, so the operator serves JobSet."""
    cp, ns = control_plane, k8s_namespace
    doc = tiny_run(s3_inputs, s3_server.endpoint_url)
    doc["spec"]["training"]["launcher"] = "JobSet"
    cp.apply(doc, namespace=ns)

    def train_phase():
        iterations = get_run(cp, ns, "tiny").get("status", {}).get("iterations", [])
        phase = iterations[1].get("train", {}).get("phase") if len(iterations) > 1 else None
        return phase if phase in ("Running", "Succeeded", "Failed") else None

    # While it trains the stage shows Running, though a JobSet has no Running condition.
    assert cp.wait_for("the training stage", train_phase, timeout=900, interval=0.5) == "Running"
    run = wait_for_phase(cp, ns, "tiny", {"Succeeded", "Failed"}, 900, operator)
    status = run["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)[-3000:]
    train = status["iterations"][1]["train"]
    assert (train["child"], train["attempts"]) == ("tiny-it1-train", 1)
    assert "miLowerBound" in status["iterations"][1]["metrics"]

    jobsets = cp.kubectl_json("get", "jobsets", "-n", ns)["items"]
    assert [j["metadata"]["name"] for j in jobsets] == ["tiny-it1-train"]
    assert jobsets[0]["metadata"]["ownerReferences"][0]["kind"] == "SAMIRun"
    assert jobsets[0]["status"]["terminalState"] == "Completed"
    assert cp.kubectl_json("get", "pytorchjobs", "-n", ns)["items"] == []
    jobs = cp.kubectl_json("get", "jobs", "-n", ns)["items"]
    assert sorted(j["metadata"]["name"] for j in jobs) == [
        "tiny-it0-evaluate",
        "tiny-it1-evaluate",
        "tiny-it1-generate",
        "tiny-it1-train-node-0",  # the JobSet's, one per node
        "tiny-it1-train-node-1",
    ]
