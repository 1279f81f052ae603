"""Operator logic without a cluster: child manifests and reconcile decisions (pure)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from sami_operator.builders import MAX_NAME, build_children, child_name
from sami_operator.models import Launcher, StagePhase
from sami_operator.planner import plan
from sami_operator.reconcile import (
    ChildState,
    CreateRefused,
    create_refused,
    decide,
    records_from_status,
)
from sami_operator.settings import OperatorSettings, from_env
from sami_operator.status import derive_status
from sami_operator.validate import parse_samirun
from sami_worker.contract import parse_result_line

SETTINGS = OperatorSettings(
    worker_image="registry.example/sami-worker:test", worker_service_account="sami-operator-worker"
)
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def run(samirun_doc):
    samirun_doc["metadata"]["namespace"] = "team-a"
    return parse_samirun(samirun_doc)


def stages(run):
    return {s.id: s for s in plan(run, "uid-1")}


def test_child_names_are_deterministic_dns_labels(run):
    s = stages(run)
    assert child_name("mistral-hh", s["train-2"]) == "mistral-hh-it2-train"
    assert child_name("mistral-hh", s["train-2"], attempt=3) == "mistral-hh-it2-train-r3"
    long = child_name("a" * 80, s["evaluate-0"])
    assert len(long) <= MAX_NAME and long == child_name("a" * 80, s["evaluate-0"])
    assert long != child_name("a" * 79 + "b", s["evaluate-0"])


def test_generation_job_carries_task_labels_and_pod_knobs(run):
    config_map, job = build_children(run, stages(run)["generate-1"], "uid-1", SETTINGS)
    assert job["kind"] == "Job" and job["spec"]["backoffLimit"] == 0
    # Pods taken away by a drain or preemption are replaced, not counted as failures.
    rule = job["spec"]["podFailurePolicy"]["rules"][0]
    condition = {"type": "DisruptionTarget", "status": "True"}
    assert rule == {"action": "Ignore", "onPodConditions": [condition]}
    task = json.loads(config_map["data"]["task.json"])
    assert task["kind"] == "generate" and task["output"].endswith("/iterations/1/generate")
    labels = job["metadata"]["labels"]
    assert labels["sami.dev/run"] == "mistral-hh" and labels["sami.dev/iteration"] == "1"
    assert "kueue.x-k8s.io/queue-name" not in labels  # the example names no Kueue queue
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("SAMIRun", "uid-1", True)
    pod = job["spec"]["template"]["spec"]
    worker = pod["containers"][0]
    assert worker["command"][-2:] == ["--task", "/etc/sami/task/task.json"]
    assert worker["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert pod["serviceAccountName"] == "sami-operator-worker"  # the operator's default
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    env = {e["name"]: e for e in worker["env"]}
    # Credentials only as Secret references, never values.
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "sami-s3",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert "value" not in env["AWS_ACCESS_KEY_ID"]


def test_training_launchers(run):
    _, pytorchjob = build_children(run, stages(run)["train-1"], "uid-1", SETTINGS)
    assert pytorchjob["kind"] == "PyTorchJob" and pytorchjob["spec"]["nprocPerNode"] == "8"
    master = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]
    assert "Worker" not in pytorchjob["spec"]["pytorchReplicaSpecs"]  # nodes: 1
    container = master["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["command"][0] == "torchrun"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    shm = next(v for v in master["template"]["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["sizeLimit"] == "32Gi"

    run.spec.training.launcher = Launcher.jobset
    run.spec.training.nodes = 3
    _, jobset = build_children(run, stages(run)["train-1"], "uid-1", SETTINGS)
    replicated = jobset["spec"]["replicatedJobs"][0]
    assert replicated["replicas"] == 3
    env = {
        e["name"]: e
        for e in replicated["template"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["PET_NNODES"]["value"] == "3"
    assert env["PET_MASTER_ADDR"]["value"] == "mistral-hh-it1-train-node-0-0.mistral-hh-it1-train"
    # A drained node fails its Job (PodFailurePolicy) and JobSet restarts all nodes, uncounted.
    [rule] = replicated["template"]["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onPodConditions"][0]["type"] == "DisruptionTarget"
    [restart] = jobset["spec"]["failurePolicy"]["rules"]
    assert restart["action"] == "RestartJobSetAndIgnoreMaxRestarts"
    assert restart["onJobFailureReasons"] == ["PodFailurePolicy"]
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 0

    run.spec.training.launcher = Launcher.job
    run.spec.training.nodes = 1
    _, job = build_children(run, stages(run)["train-1"], "uid-1", SETTINGS)
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["torchrun", "--standalone", "--nproc_per_node=8"]


def test_first_pass_creates_the_first_stage_once(run):
    first = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0)
    assert [o["kind"] for o in first.create] == ["ConfigMap", "Job"]
    assert first.records["evaluate-0"].child == "mistral-hh-it0-evaluate"
    # The next pass sees the child running: nothing new is created.
    observed = {"mistral-hh-it0-evaluate": ChildState(StagePhase.running)}
    second = decide(run, "uid-1", first.records, observed, SETTINGS, T0, T0)
    assert second.create == []
    assert second.records["evaluate-0"].phase == StagePhase.running


def _status_round_trip(run, records):
    """What the operator writes to .status and reads back on its next pass."""
    status = derive_status(run, "uid-1", records, "2026-01-01T00:00:00Z")
    return records_from_status(run, "uid-1", status)


def test_success_moves_on_and_keeps_metrics_through_status(run):
    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    line = json.dumps({"summary": {"metrics": {"miLowerBound": {"value": 0.3}}}})
    observed = {"mistral-hh-it0-evaluate": ChildState(StagePhase.succeeded, 0, line)}
    decision = decide(run, "uid-1", records, observed, SETTINGS, T0, T0)
    assert decision.records["evaluate-0"].phase == StagePhase.succeeded
    assert decision.create[1]["metadata"]["name"] == "mistral-hh-it1-generate"
    # After a restart, with the finished child deleted, nothing is redone.
    restored = _status_round_trip(run, decision.records)
    assert restored["evaluate-0"].meta["metrics"]["miLowerBound"]["value"] == 0.3
    again = decide(run, "uid-1", restored, {}, SETTINGS, T0, T0)
    created = [o["metadata"]["name"] for o in again.create]
    assert "mistral-hh-it0-evaluate" not in created


def test_retryable_failures_are_retried_within_budget(run):
    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    for attempt in range(2, run.spec.training.max_restarts + 2):
        name = records["evaluate-0"].child
        observed = {name: ChildState(StagePhase.failed, 75, '{"error": "S3 down"}')}
        decision = decide(run, "uid-1", records, observed, SETTINGS, T0, T0)
        assert decision.records["evaluate-0"].child.endswith(f"-r{attempt}")
        records = decision.records
    observed = {records["evaluate-0"].child: ChildState(StagePhase.failed, 75, None)}
    final = decide(run, "uid-1", records, observed, SETTINGS, T0, T0)
    assert final.failure == "RetriesExhausted" and final.create == []


def test_bad_input_fails_the_run_with_the_reason(run):
    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    line = json.dumps({"exit_code": 65, "error": "model.uri: 's3://models/x' is missing"})
    observed = {"mistral-hh-it0-evaluate": ChildState(StagePhase.failed, 65, line)}
    decision = decide(run, "uid-1", records, observed, SETTINGS, T0, T0)
    assert decision.failure == "StageFailed"
    assert "model.uri: 's3://models/x' is missing" in decision.records["evaluate-0"].message
    status = derive_status(run, "uid-1", decision.records, "t")
    assert status.phase.value == "Failed" and "is missing" in status.message


@pytest.mark.parametrize(
    "state, retried",
    [
        (ChildState(StagePhase.failed, 137, None, "Error"), True),  # killed: preempted, evicted
        (ChildState(StagePhase.failed, 143, None, "Error"), True),  # SIGTERM from a drain
        (ChildState(StagePhase.failed, 137, None, "OOMKilled"), False),  # would die again
        (ChildState(StagePhase.failed, 1, '{"exit_code": 75, "error": "peer"}'), True),
        (ChildState(StagePhase.failed, 1, None, "Error"), False),  # a bug
        (ChildState(StagePhase.failed), True),  # the pod is gone: nothing said otherwise
    ],
)
def test_which_failures_are_retried(run, state, retried):
    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    decision = decide(run, "uid-1", records, {"mistral-hh-it0-evaluate": state}, SETTINGS, T0, T0)
    assert (decision.records["evaluate-0"].child == "mistral-hh-it0-evaluate-r2") == retried
    assert (decision.failure is None) == retried
    if state.reason == "OOMKilled":
        assert "OOMKilled" in decision.records["evaluate-0"].message


def test_stuck_pods_show_in_the_status_until_they_start(run):
    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    stuck = 'pod mistral-hh-it0-evaluate-x: CreateContainerConfigError: secret "s3" not found'
    observed = {"mistral-hh-it0-evaluate": ChildState(StagePhase.pending, message=stuck)}
    decision = decide(run, "uid-1", records, observed, SETTINGS, T0, T0)
    status = derive_status(run, "uid-1", decision.records, "t")
    assert status.message == f"running evaluate-0 ({stuck})"
    observed = {"mistral-hh-it0-evaluate": ChildState(StagePhase.running)}
    decision = decide(run, "uid-1", _status_round_trip(run, records), observed, SETTINGS, T0, T0)
    assert derive_status(run, "uid-1", decision.records, "t").message == "running evaluate-0"


def test_suspend_and_deadlines(run):
    run.spec.suspend = True
    assert decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).create == []
    run.spec.suspend = False
    run.spec.deadlines.start_seconds = 600
    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    observed = {"mistral-hh-it0-evaluate": ChildState(StagePhase.pending)}
    late = T0 + timedelta(seconds=601)
    decision = decide(run, "uid-1", records, observed, SETTINGS, late, T0)
    assert decision.failure == "StartDeadlineExceeded"


def test_the_start_deadline_counts_until_each_stage_runs(run):
    """Every stage's pods must run within startSeconds of when its child began waiting, not
    only the first stage's; a running stage is never late."""
    run.spec.deadlines.start_seconds = 600
    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    records = _succeed(run, records, "mistral-hh-it0-evaluate").records  # creates generate
    later = T0 + timedelta(hours=5)
    stuck = "pod mistral-hh-it1-generate-x: ImagePullBackOff: not found"
    waiting = ChildState(
        StagePhase.pending, message=stuck, waiting_since=later, stalled="ImagePullBackOff"
    )
    observed = {"mistral-hh-it1-generate": waiting}
    on_time = decide(run, "uid-1", records, observed, SETTINGS, later + timedelta(seconds=599), T0)
    assert on_time.failure is None
    # Nothing of the run changes by then, but a pass is due when the deadline is.
    assert on_time.wake_at == later + timedelta(seconds=600)
    late = decide(run, "uid-1", records, observed, SETTINGS, later + timedelta(seconds=601), T0)
    assert late.failure == "StartDeadlineExceeded"
    assert "did not run within 600s" in late.records["generate-1"].message
    assert "ImagePullBackOff" in late.records["generate-1"].message
    running = {"mistral-hh-it1-generate": ChildState(StagePhase.running)}
    hours = decide(run, "uid-1", records, running, SETTINGS, later + timedelta(hours=9), T0)
    assert hours.failure is None
    # A pass is due when a deadline of the stage in progress is: none once it runs, but the
    # run's own (activeSeconds).
    fresh = _succeed(
        run, decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records, "mistral-hh-it0-evaluate"
    )
    running_on = decide(run, "uid-1", fresh.records, running, SETTINGS, later, T0)
    assert (running_on.failure, running_on.wake_at) == (None, None)
    run.spec.deadlines.active_seconds = 86400
    running_on = decide(run, "uid-1", fresh.records, running, SETTINGS, later, T0)
    assert running_on.wake_at == T0 + timedelta(days=1)


def test_stuck_pods_set_the_stalled_condition_and_one_event(run):
    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    stuck = "Job mistral-hh-it0-evaluate: Error creating: pods is forbidden: exceeded quota"
    state = ChildState(StagePhase.pending, message=stuck, waiting_since=T0, stalled="FailedCreate")
    observed = {"mistral-hh-it0-evaluate": state}
    first = decide(run, "uid-1", records, observed, SETTINGS, T0, T0)
    assert first.events == [("Warning", "FailedCreate", f"evaluate-0: {stuck}")]
    status = derive_status(run, "uid-1", first.records, "t")
    stalled = next(c for c in status.conditions if c.type == "Stalled")
    assert (stalled.status, stalled.reason) == ("True", "FailedCreate")
    assert stuck in stalled.message and stuck in status.message
    again = decide(
        run, "uid-1", records_from_status(run, "uid-1", status), observed, SETTINGS, T0, T0
    )
    assert again.events == []  # the same news: no second event
    running = {"mistral-hh-it0-evaluate": ChildState(StagePhase.running)}
    later = decide(run, "uid-1", again.records, running, SETTINGS, T0, T0)
    status = derive_status(run, "uid-1", later.records, "t", status)
    assert next(c for c in status.conditions if c.type == "Stalled").status == "False"


def test_disruptions_are_retried_without_spending_max_restarts(run):
    run.spec.training.max_restarts = 0
    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    drained = ChildState(StagePhase.failed, 143, None, "Error", disrupted=True)
    decision = decide(run, "uid-1", records, {"mistral-hh-it0-evaluate": drained}, SETTINGS, T0, T0)
    assert decision.failure is None
    record = decision.records["evaluate-0"]
    assert (record.child, record.attempts, record.disruptions) == (
        "mistral-hh-it0-evaluate-r2",
        2,
        1,
    )
    restored = _status_round_trip(run, decision.records)
    assert restored["evaluate-0"].disruptions == 1
    # A failure of its own afterwards spends the (empty) budget.
    failed = {"mistral-hh-it0-evaluate-r2": ChildState(StagePhase.failed, 75, None)}
    final = decide(run, "uid-1", restored, failed, SETTINGS, T0, T0)
    assert final.failure == "RetriesExhausted"


def test_a_refused_child_waits_for_quota_and_fails_on_invalid(run):
    before = {}
    decision = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0)
    quota = 'jobs.batch "mistral-hh-it0-evaluate" is forbidden: exceeded quota: q, requested: ...'
    refused = CreateRefused("Job", "mistral-hh-it0-evaluate", 403, quota)
    create_refused(decision, refused, before, T0)
    record = decision.records["evaluate-0"]
    assert decision.failure is None and (record.child, record.attempts) == (None, 0)
    assert [e[1] for e in decision.events] == ["QuotaExceeded"]
    status = derive_status(run, "uid-1", decision.records, "t")
    stalled = next(c for c in status.conditions if c.type == "Stalled")
    assert stalled.reason == "QuotaExceeded" and "exceeded quota" in status.message
    # The next pass creates it again under the same name; the same refusal: no new event.
    records = records_from_status(run, "uid-1", status)
    before = {k: r.message for k, r in records.items()}
    again = decide(run, "uid-1", records, {}, SETTINGS, T0, T0)
    assert again.records["evaluate-0"].child == "mistral-hh-it0-evaluate"
    create_refused(again, refused, before, T0)
    assert again.events == []

    invalid = CreateRefused("ConfigMap", "mistral-hh-it0-evaluate", 422, "data: Too long")
    decision = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0)
    create_refused(decision, invalid, {}, T0)
    assert decision.failure == "CreateRefused"
    assert "data: Too long" in derive_status(run, "uid-1", decision.records, "t").message


def test_summary_parsing_and_settings():
    assert parse_result_line('{"summary": {"kept": 3}}').summary == {"kept": 3}
    assert parse_result_line("Traceback ...") is None
    settings = from_env({"SAMI_NAMESPACES": "a, b", "SAMI_WORKER_IMAGE": "img:1"})
    assert settings.namespaces == ("a", "b") and settings.worker_image == "img:1"


def _succeed(run, records, name):
    observed = {name: ChildState(StagePhase.succeeded, 0, "{}")}
    return decide(run, "uid-1", records, observed, SETTINGS, T0, T0)


def test_cleanup_children_delete_goes_stage_by_stage(run):
    run.spec.cleanup.children = "delete"
    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    failed = {"mistral-hh-it0-evaluate": ChildState(StagePhase.failed, 75, None)}
    records = decide(run, "uid-1", records, failed, SETTINGS, T0, T0).records  # a retry, -r2
    observed = {
        "mistral-hh-it0-evaluate": ChildState(StagePhase.failed, 75, None),
        "mistral-hh-it0-evaluate-r2": ChildState(StagePhase.succeeded, 0, "{}"),
    }
    decision = decide(run, "uid-1", records, observed, SETTINGS, T0, T0)
    assert decision.delete == ["mistral-hh-it0-evaluate", "mistral-hh-it0-evaluate-r2"]
    assert decision.create[1]["metadata"]["name"] == "mistral-hh-it1-generate"
    # Deleted children are not observed any more: nothing is redone, nothing deleted again.
    again = decide(run, "uid-1", decision.records, {}, SETTINGS, T0, T0)
    assert again.delete == [] and again.records["evaluate-0"].phase == StagePhase.succeeded


def test_cleanup_children_delete_on_success_waits_for_the_last_stage(run):
    run.spec.cleanup.children = "deleteOnSuccess"
    run.spec.training.iterations = 1
    records: dict = {}
    observed: dict = {}
    for stage in ("it0-evaluate", "it1-generate", "it1-train", "it1-evaluate"):
        decision = decide(run, "uid-1", records, observed, SETTINGS, T0, T0)
        records = decision.records
        name = f"mistral-hh-{stage}"
        observed[name] = ChildState(StagePhase.succeeded, 0, "{}")
        assert decision.delete == []
    final = decide(run, "uid-1", records, observed, SETTINGS, T0, T0)
    assert final.delete == sorted(observed)
    assert derive_status(run, "uid-1", final.records, "t").phase.value == "Succeeded"


def test_keep_is_the_default(run):
    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    assert _succeed(run, records, "mistral-hh-it0-evaluate").delete == []


def test_suspend_stop_stage_deletes_the_running_child_and_reruns_it_on_resume(run):
    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    running = {"mistral-hh-it0-evaluate": ChildState(StagePhase.running)}
    run.spec.suspend = True
    # finishStage (the default) leaves it running.
    assert decide(run, "uid-1", records, running, SETTINGS, T0, T0).delete == []
    run.spec.suspend_policy = "stopStage"
    decision = decide(run, "uid-1", records, running, SETTINGS, T0, T0)
    assert decision.delete == ["mistral-hh-it0-evaluate"] and decision.create == []
    status = derive_status(run, "uid-1", decision.records, "t")
    assert status.phase.value == "Suspended"
    run.spec.suspend = False
    resumed = decide(run, "uid-1", _status_round_trip(run, decision.records), {}, SETTINGS, T0, T0)
    assert resumed.create[1]["metadata"]["name"] == "mistral-hh-it0-evaluate-r2"


def test_default_storage_is_recorded_on_the_run_and_kept(samirun_doc, monkeypatch):
    import kopf

    from sami_operator import handlers
    from sami_operator.validate import SpecError

    del samirun_doc["spec"]["storage"]
    samirun_doc["metadata"].update(namespace="team-a", uid="u", generation=1)
    monkeypatch.setattr(handlers, "SETTINGS", OperatorSettings())
    with pytest.raises(SpecError, match="spec.storage: required: this operator has no default"):
        handlers._parse(samirun_doc, kopf.Patch())

    default = '{"uri": "s3://defaults/runs", "credentials": {"secretName": "s3"}}'
    monkeypatch.setattr(handlers, "SETTINGS", from_env({"SAMI_DEFAULT_STORAGE": default}))
    patch = kopf.Patch()
    run = handlers._parse(samirun_doc, patch)
    assert run.spec.storage.uri == "s3://defaults/runs"
    recorded = patch["metadata"]["annotations"]["sami.dev/default-storage"]
    # Later passes use the recorded storage, even after the operator's default changed.
    samirun_doc["metadata"]["annotations"] = {"sami.dev/default-storage": recorded}
    other = from_env({"SAMI_DEFAULT_STORAGE": '{"uri": "s3://elsewhere"}'})
    monkeypatch.setattr(handlers, "SETTINGS", other)
    patch = kopf.Patch()
    assert handlers._parse(samirun_doc, patch).spec.storage.uri == "s3://defaults/runs"
    assert not patch


def test_the_reference_stage_runs_once_and_survives_an_operator_restart(samirun_doc):
    judge = {"endpoint": {"url": "http://judge.svc:8000/v1", "model": "judge"}}
    judge["reference"] = {"uri": "s3://models/mistral-7b-instruct/", "promptFormat": "chat"}
    samirun_doc["spec"]["evaluation"]["judge"] = judge
    samirun_doc["metadata"]["namespace"] = "team-a"
    run = parse_samirun(samirun_doc)
    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    decision = _succeed(run, records, "mistral-hh-it0-evaluate")
    # After the base model: the reference model's evaluation, a Job of the evaluate program
    # with the evaluation pods' settings.
    config_map, job = decision.create
    assert job["metadata"]["name"] == "mistral-hh-reference"
    assert job["metadata"]["labels"]["sami.dev/stage"] == "reference"
    assert "sami.dev/iteration" not in job["metadata"]["labels"]
    worker = job["spec"]["template"]["spec"]["containers"][0]
    assert worker["command"][-4:-2] == ["sami_worker", "evaluate"]
    assert worker["resources"] == {"limits": {"nvidia.com/gpu": 1}}  # pods.evaluate
    assert not any(e["name"] == "SAMI_API_KEY" for e in worker["env"])  # it judges nothing
    task = json.loads(config_map["data"]["task.json"])
    assert task["reference"] is True and task["output"].endswith("/uid-1/reference")
    assert task["model"]["uri"] == "s3://models/mistral-7b-instruct/"
    assert task["baselines"] == []

    line = json.dumps({"summary": {"metrics": {"miLowerBound": {"value": 0.1}}}})
    observed = {"mistral-hh-reference": ChildState(StagePhase.succeeded, 0, line)}
    decision = decide(run, "uid-1", decision.records, observed, SETTINGS, T0, T0)
    assert decision.records["reference"].phase == StagePhase.succeeded
    assert decision.create[1]["metadata"]["name"] == "mistral-hh-it1-generate"
    # The operator restarts and the finished children are gone: .status alone says the
    # reference stage is done, so it is not created again.
    restored = _status_round_trip(run, decision.records)
    assert restored["reference"].phase == StagePhase.succeeded
    assert restored["reference"].child == "mistral-hh-reference"
    again = decide(run, "uid-1", restored, {}, SETTINGS, T0, T0)
    assert again.records["reference"].phase == StagePhase.succeeded
    # (generate-1's child is gone too, so that stage is the one created again.)
    assert {o["metadata"]["labels"]["sami.dev/stage"] for o in again.create} == {"generate"}
    # evaluate-1 judges against both.
    evaluate_1 = stages(run)["evaluate-1"].task
    assert [b.name for b in evaluate_1.baselines] == ["base", "reference"]


SECRET = {"name": "judge-api", "key": "api-key"}


@pytest.mark.parametrize(
    "judge, key",
    [
        ({"endpoint": {"url": "http://j/v1", "model": "j", "apiKeySecret": SECRET}}, True),
        ({"endpoint": {"url": "http://j/v1", "model": "j"}}, False),
        ({"model": "s3://models/judge/"}, False),  # loaded by the evaluation worker itself
    ],
)
def test_only_an_endpoint_judge_with_a_secret_gets_an_api_key(samirun_doc, judge, key):
    samirun_doc["spec"]["evaluation"]["judge"] = judge
    run = parse_samirun(samirun_doc)
    _, job = build_children(run, stages(run)["evaluate-1"], "uid-1", SETTINGS)
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert any(e["name"] == "SAMI_API_KEY" for e in env) == key
    # The base model's evaluation has nothing to judge against: no key.
    _, job = build_children(run, stages(run)["evaluate-0"], "uid-1", SETTINGS)
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert not any(e["name"] == "SAMI_API_KEY" for e in env)


def test_result_lines_from_newer_or_broken_workers_never_crash_a_pass(run):
    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    newer = json.dumps(
        {
            "exit_code": 0,
            "new_field": [1, 2],
            "summary": {"metrics": {"miLowerBound": {"value": 0.3, "ci": [0.2, 0.4]}, "x": 1}},
        }
    )
    ok = decide(
        run,
        "uid-1",
        records,
        {"mistral-hh-it0-evaluate": ChildState(StagePhase.succeeded, 0, newer)},
        SETTINGS,
        T0,
        T0,
    )
    assert ok.records["evaluate-0"].phase == StagePhase.succeeded
    status = derive_status(run, "uid-1", ok.records, "t")
    assert status.iterations[0].metrics.mi_lower_bound.value == 0.3  # unknown fields dropped

    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    broken = json.dumps({"summary": {"metrics": {"miLowerBound": {"value": "high"}}}})
    bad = decide(
        run,
        "uid-1",
        records,
        {"mistral-hh-it0-evaluate": ChildState(StagePhase.succeeded, 0, broken)},
        SETTINGS,
        T0,
        T0,
    )
    assert bad.failure == "StageFailed"
    assert "metrics.miLowerBound.value" in bad.records["evaluate-0"].message
    derive_status(run, "uid-1", bad.records, "t")  # and the status still derives

    for line in ('{"exit_code": "75"}', '{"summary": [1]}', "[]", '{"exit_code": null}'):
        records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
        state = ChildState(StagePhase.failed, 1, line, "Error")
        decision = decide(
            run, "uid-1", records, {"mistral-hh-it0-evaluate": state}, SETTINGS, T0, T0
        )
        assert decision.failure == "StageFailed"  # the container's own exit code, 1: not retried
        assert "exit code 1" in decision.records["evaluate-0"].message


def test_a_malformed_default_storage_annotation_is_an_invalid_spec(samirun_doc):
    import kopf

    from sami_operator import handlers
    from sami_operator.validate import SpecError

    samirun_doc["spec"].pop("storage")
    body = {
        **samirun_doc,
        "metadata": {
            "name": "mistral-hh",
            "namespace": "team-a",
            "annotations": {"sami.dev/default-storage": "{not json"},
        },
    }
    with pytest.raises(SpecError, match=r"metadata.annotations\[sami.dev/default-storage\]"):
        handlers._parse(body, kopf.Patch())


class _CleanupKube:
    """What delete_storage sees of the API server: the run's children, and creates that are
    refused with `refusal` when set."""

    def __init__(self, observed: dict[str, ChildState], refusal=None):
        self.observed, self.refusal, self.created = observed, refusal, []

    def observe_children(self, namespace, run):
        return dict(self.observed)

    def delete_child(self, namespace, name):
        self.observed.pop(name, None)

    def create(self, obj):
        if self.refusal is not None:
            raise self.refusal
        self.created.append((obj["kind"], obj["metadata"]["name"]))
        return True


@pytest.fixture
def cleanup(samirun_doc, monkeypatch):
    """delete_storage against a _CleanupKube: (call, events, kubes); call(observed, runtime=0,
    refusal=None) runs it (raising what it raises), its kube last in kubes."""
    import kopf

    from sami_operator import handlers

    samirun_doc["metadata"].update(namespace="team-a", uid="u1", generation=1)
    samirun_doc["spec"]["cleanup"] = {"storageOnDelete": "delete"}
    events: list[tuple[str, str, str]] = []
    kubes: list[_CleanupKube] = []
    monkeypatch.setattr(handlers, "SETTINGS", OperatorSettings(storage_cleanup_seconds=600))
    monkeypatch.setattr(
        kopf, "event", lambda body, type, reason, message: events.append((type, reason, message))
    )

    def call(observed, runtime=0.0, refusal=None):
        kubes.append(_CleanupKube(dict(observed), refusal))
        monkeypatch.setitem(handlers._state, "kube", kubes[-1])
        handlers.delete_storage(
            body=samirun_doc, patch=kopf.Patch(), runtime=timedelta(seconds=runtime)
        )
        return kubes[-1]

    return call, events, kubes


class FakeKubeWithoutChildren:
    """In-memory stand-in for sami_operator.kube in one handler pass (the real API server is
    in tests/test_operator.py): a cluster with no children yet; records what is created."""

    def __init__(self):
        self.created: list[tuple[str, str]] = []

    def observe_children(self, namespace, run, look_into=None):
        return {}

    def changes(self, namespace, run):
        return 0

    def create(self, obj):
        self.created.append((obj["kind"], obj["metadata"]["name"]))
        return True


def test_a_reconcile_pass_plans_the_run_once(samirun_doc, monkeypatch):
    """decide and derive_status walk the stages the pass planned, not a plan of their own."""
    import logging

    import kopf

    from sami_operator import handlers, planner, reconcile, status

    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    samirun_doc["metadata"].update(
        namespace="team-a", uid="u1", generation=1, creationTimestamp=created
    )
    samirun_doc["spec"]["training"]["launcher"] = "Job"
    kube = FakeKubeWithoutChildren()
    monkeypatch.setattr(handlers, "SETTINGS", SETTINGS)
    monkeypatch.setitem(handlers._state, "kube", kube)
    monkeypatch.setattr(kopf, "event", lambda body, type, reason, message: None)
    plans = []

    def counted(run, uid):
        plans.append(uid)
        return planner.plan(run, uid)

    for module in (handlers, reconcile, status):
        monkeypatch.setattr(module, "plan", counted)
    patch = kopf.Patch()
    handlers._reconcile(samirun_doc, patch, logging.getLogger(__name__))
    assert plans == ["u1"]
    assert kube.created == [
        ("ConfigMap", "mistral-hh-it0-evaluate"),
        ("Job", "mistral-hh-it0-evaluate"),
    ]
    assert patch.status["stage"] == "evaluate-0"


class FakeKubeThatRemembers:
    """In-memory stand-in for sami_operator.kube over several handler passes (the real API
    server and watches are in tests/test_operator.py): what it created shows as pending
    children; `changes` moves when the test says a child changed; every call is counted."""

    def __init__(self):
        self.created: list[tuple[str, str]] = []
        self.observed = 0
        self.version = 0

    def observe_children(self, namespace, run, look_into=None):
        self.observed += 1
        return {
            name: ChildState(StagePhase.pending) for kind, name in self.created if kind == "Job"
        }

    def changes(self, namespace, run):
        return self.version

    def create(self, obj):
        self.created.append((obj["kind"], obj["metadata"]["name"]))
        return True


def test_a_pass_that_learns_nothing_new_does_nothing(samirun_doc, monkeypatch):
    """After the pass that created a stage, a pass over the run as that pass left it patches
    nothing and emits nothing; one over the same run and children is not even a pass (it
    reads nothing); a child's change is worth a full pass again, which finds nothing to do."""
    import logging

    import kopf

    from sami_operator import handlers

    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    samirun_doc["metadata"].update(
        namespace="team-a", uid="u1", generation=1, creationTimestamp=created, resourceVersion="1"
    )
    kube = FakeKubeThatRemembers()
    events: list[tuple[str, str]] = []
    monkeypatch.setattr(handlers, "SETTINGS", SETTINGS)
    monkeypatch.setattr(handlers, "_quiet", {})
    monkeypatch.setitem(handlers._state, "kube", kube)
    monkeypatch.setitem(handlers._state, "launchers", frozenset({"Job", "PyTorchJob"}))
    monkeypatch.setitem(handlers._state, "launchers_at", float("inf"))  # no rediscovery
    monkeypatch.setattr(kopf, "event", lambda body, type, reason, message: events.append(reason))
    log = logging.getLogger(__name__)

    def one_pass(body) -> kopf.Patch:
        patch = kopf.Patch()
        handlers._reconcile(body, patch, log)
        return patch

    first = one_pass(samirun_doc)
    assert kube.created == [
        ("ConfigMap", "mistral-hh-it0-evaluate"),
        ("Job", "mistral-hh-it0-evaluate"),
    ]
    assert first.status["stage"] == "evaluate-0" and events == ["StageCreated"]
    # The watch brings the run back with the status that pass wrote (a new resourceVersion).
    body = {**samirun_doc, "status": dict(first.status)}
    body["metadata"] = {**samirun_doc["metadata"], "resourceVersion": "2"}
    assert one_pass(body) == {}
    assert (len(kube.created), events, kube.observed) == (2, ["StageCreated"], 2)
    assert one_pass(body) == {} and kube.observed == 2  # nothing new: nothing read
    kube.version += 1  # say its pod was created
    assert one_pass(body) == {}
    assert (len(kube.created), events, kube.observed) == (2, ["StageCreated"], 3)


def test_a_child_that_already_exists_is_adopted_not_created_again(samirun_doc, monkeypatch):
    """An operator stopped between creating a stage's child and recording it in the status:
    the next pass (another replica's) finds it there (HTTP 409) and says it adopted it; the
    StageCreated event stays the one the first pass posted."""
    import logging

    import kopf

    from sami_operator import handlers

    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    samirun_doc["metadata"].update(
        namespace="team-a", uid="u1", generation=1, creationTimestamp=created, resourceVersion="1"
    )

    class Existing(FakeKubeThatRemembers):
        def create(self, obj):
            return False  # created before, by the replica that stopped

    events: list[tuple[str, str]] = []
    monkeypatch.setattr(handlers, "SETTINGS", SETTINGS)
    monkeypatch.setattr(handlers, "_quiet", {})
    monkeypatch.setitem(handlers._state, "kube", Existing())
    monkeypatch.setitem(handlers._state, "launchers", frozenset({"Job", "PyTorchJob"}))
    monkeypatch.setitem(handlers._state, "launchers_at", float("inf"))
    monkeypatch.setattr(
        kopf, "event", lambda body, type, reason, message: events.append((reason, message))
    )
    patch = kopf.Patch()
    handlers._reconcile(samirun_doc, patch, logging.getLogger(__name__))
    assert events == [("StageAdopted", "evaluate-0: adopted mistral-hh-it0-evaluate")]
    assert patch.status["iterations"][0]["evaluate"]["child"] == "mistral-hh-it0-evaluate"


def test_a_pass_waits_for_the_run_its_last_patch_wrote(monkeypatch):
    """A body older than the operator's last patch of the run is not passed over (it would
    redo what that patch recorded): numeric resource versions are compared, others wait for
    that very version or two intervals."""
    from sami_operator import handlers

    clock = [0.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(handlers, "_written", {"ns/r": ("120", 10.0)})
    assert handlers._older_than_written("ns/r", "119")
    clock[0] = 1000.0  # however late: the watch brings it in the end
    assert handlers._older_than_written("ns/r", "119")
    assert not handlers._older_than_written("ns/r", "121")
    assert "ns/r" not in handlers._written
    handlers._written["ns/r"] = ("b", 1010.0)
    assert handlers._older_than_written("ns/r", "a")
    assert not handlers._older_than_written("ns/r", "b")
    handlers._written["ns/r"] = ("b", 1010.0)
    clock[0] = 1011.0
    assert not handlers._older_than_written("ns/r", "a")
    assert not handlers._older_than_written("ns/other", "1")


def test_creates_are_rate_limited(monkeypatch):
    """Backpressure: a burst, then one create per 1/rate seconds, however many threads ask
    (a clock that moves only when the limiter sleeps)."""
    from sami_operator import kube as kube_module

    clock = [0.0]
    monkeypatch.setattr(kube_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(kube_module.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    limit = kube_module.RateLimit(per_second=10.0, burst=5)
    for _ in range(25):
        limit.acquire()
    assert clock[0] == pytest.approx((25 - 5) / 10.0)


PREFIX = "s3://sami-runs/experiments/team-a/mistral-hh/u1"
FAILED = ChildState(StagePhase.failed, 1, '{"error": "AccessDenied"}')


def test_storage_cleanup_retries_as_new_jobs_then_gives_up(cleanup):
    import kopf

    call, events, kubes = cleanup
    running = {"mistral-hh-it1-generate": ChildState(StagePhase.running)}
    with pytest.raises(kopf.TemporaryError, match="waiting for 1 workloads"):
        call(running)
    with pytest.raises(kopf.TemporaryError, match=f"deleting {PREFIX}"):
        call({})
    assert kubes[-1].created == [("ConfigMap", "mistral-hh-cleanup"), ("Job", "mistral-hh-cleanup")]
    assert events.pop() == ("Normal", "DeletingStorage", PREFIX)

    # A failed attempt is kept (its logs) and the next one is a new Job.
    with pytest.raises(kopf.TemporaryError):
        call({"mistral-hh-cleanup": FAILED})
    assert kubes[-1].created[-1] == ("Job", "mistral-hh-cleanup-r2")
    assert events[0] == (
        "Warning",
        "DeleteStorageFailed",
        "mistral-hh-cleanup: exit code 1: AccessDenied; trying again (2 of 3)",
    )
    events.clear()
    with pytest.raises(kopf.TemporaryError, match=f"deleting {PREFIX}"):
        call(
            {"mistral-hh-cleanup": FAILED, "mistral-hh-cleanup-r2": ChildState(StagePhase.running)}
        )
    assert events == []

    # Three failures (the default): the run goes, its storage left behind and said so.
    three = {
        n: FAILED for n in ("mistral-hh-cleanup", "mistral-hh-cleanup-r2", "mistral-hh-cleanup-r3")
    }
    assert call(three).created == []
    assert events == [
        (
            "Warning",
            "StorageNotDeleted",
            f"{PREFIX} left in storage (the cleanup failed 3 times, last mistral-hh-cleanup-r3: "
            "exit code 1: AccessDenied); delete it by hand",
        )
    ]
    events.clear()
    assert call({"mistral-hh-cleanup-r2": ChildState(StagePhase.succeeded)}).created == []
    assert events == []


def test_storage_cleanup_gives_up_when_refused_or_too_slow(cleanup):
    from sami_operator.kube import CreateRefusedError

    def refused(code: int, message: str) -> CreateRefusedError:
        return CreateRefusedError(CreateRefused("ConfigMap", "mistral-hh-cleanup", code, message))

    call, events, _ = cleanup
    terminating = refused(
        403,
        'configmaps "x" is forbidden: unable to create new content in namespace team-a '
        "because it is being terminated",
    )
    call({}, refusal=terminating)
    assert events.pop() == (
        "Warning",
        "StorageNotDeleted",
        f"{PREFIX} left in storage (namespace team-a is being deleted, so no cleanup Job can be "
        "created there); delete it by hand",
    )
    call({}, refusal=refused(403, 'jobs.batch is forbidden: User "op" cannot create'))
    assert "(the cleanup Job was refused: 403 jobs.batch is forbidden" in events.pop()[2]
    with pytest.raises(CreateRefusedError):  # a passing server trouble: tried again
        call({}, refusal=refused(503, "Unavailable"))

    running = {"mistral-hh-cleanup": ChildState(StagePhase.running)}
    call(running, runtime=601)
    assert events.pop() == (
        "Warning",
        "StorageNotDeleted",
        f"{PREFIX} left in storage (not deleted within 600 s); delete it by hand",
    )


def test_storage_cleanup_attempts_setting():
    assert from_env({}).storage_cleanup_attempts == 3
    assert from_env({"SAMI_STORAGE_CLEANUP_ATTEMPTS": "101"}).storage_cleanup_attempts == 101
    with pytest.raises(ValueError, match="SAMI_STORAGE_CLEANUP_ATTEMPTS: 0 is not between 1"):
        from_env({"SAMI_STORAGE_CLEANUP_ATTEMPTS": "0"})


def test_served_launchers_are_rediscovered(monkeypatch):
    """Discovery is cached for LAUNCHERS_TTL_SECONDS, looked up again after
    LAUNCHERS_RECHECK_SECONDS while a wanted launcher is missing, and a failed lookup keeps
    the last answer."""
    from sami_operator import handlers

    answers = [frozenset({"Job", "PyTorchJob"}), RuntimeError("discovery down")]

    class Discovery:
        calls = 0
        watched: list[frozenset] = []

        def served_launchers(self):
            Discovery.calls += 1
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

        def watch_launchers(self, served):
            Discovery.watched.append(served)

    clock = [1000.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(
        handlers,
        "_state",
        {"kube": Discovery(), "launchers": frozenset({"Job"}), "launchers_at": 1000.0},
    )
    clock[0] += handlers.LAUNCHERS_RECHECK_SECONDS - 1
    assert handlers._served_launchers("PyTorchJob") == {"Job"}  # asked too recently
    assert handlers._served_launchers("Job") == {"Job"}
    clock[0] += 1
    assert handlers._served_launchers("Job") == {"Job"}  # nothing missing: the cache holds
    assert Discovery.calls == 0
    assert handlers._served_launchers("PyTorchJob") == {"Job", "PyTorchJob"}
    assert Discovery.calls == 1
    assert Discovery.watched == [{"Job", "PyTorchJob"}]  # its workloads are watched from now
    clock[0] += handlers.LAUNCHERS_TTL_SECONDS - 1
    assert handlers._served_launchers("JobSet") == {"Job", "PyTorchJob"}  # rechecked...
    assert Discovery.calls == 2  # ...and failed: the last answer stands
    assert handlers._served_launchers("PyTorchJob") == {"Job", "PyTorchJob"}
    assert Discovery.calls == 2
