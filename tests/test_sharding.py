"""Sharded generation (generation.shards) without a cluster: the slices the planner and the
worker cut, the summaries merged, the children built, and the reconcile decisions of both
ways of running shards (an Indexed Job; a Job per shard where Kubernetes predates per-index
retries). The runs on the test control plane and under `sami run` are in test_operator.py
and test_local_runner.py."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta, timezone

import pytest
from kubernetes.client import ApiClient

from sami_operator.builders import build_children
from sami_operator.kube import COMPLETION_INDEX, child_state
from sami_operator.launchers import JOB
from sami_operator.models import Sharding, StagePhase
from sami_operator.planner import plan
from sami_operator.reconcile import (
    ChildState,
    CreateRefused,
    create_refused,
    decide,
    records_from_status,
)
from sami_operator.settings import OperatorSettings
from sami_operator.status import derive_status
from sami_operator.validate import SpecError, parse_samirun
from sami_worker.__main__ import main as worker_main
from sami_worker.contract import merge_shard_summaries
from sami_worker.tasks import TaskError

SETTINGS = OperatorSettings(worker_image="registry.example/sami-worker:test")
INDEXED = dataclasses.replace(SETTINGS, indexed_jobs=True)
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def sharded(samirun_doc, shards: int, train: list[int] = (1000,)):
    """The example run, without its base evaluation (generate-1 comes first), with
    `shards` and data.train as sources of these counts."""
    spec = samirun_doc["spec"]
    spec["data"]["train"] = [
        {"uri": f"s3://data/q{i}.jsonl", "count": c} for i, c in enumerate(train)
    ]
    spec["generation"]["shards"] = shards
    spec["evaluation"] = {**spec.get("evaluation", {}), "includeBase": False}
    spec["evaluation"].pop("judge", None)
    samirun_doc["metadata"]["namespace"] = "team-a"
    return parse_samirun(samirun_doc)


def stage(run, stage_id: str):
    return next(s for s in plan(run, "uid-1") if s.id == stage_id)


def test_shards_are_contiguous_even_slices_and_train_reads_them_in_order(samirun_doc):
    run = sharded(samirun_doc, 3, train=[5, 6])
    generate, train = stage(run, "generate-1"), stage(run, "train-1")
    slices = [(t.query_offset, t.query_count) for t in generate.shards]
    assert slices == [(0, 3), (3, 4), (7, 4)]  # 11 queries of both sources, in order
    outputs = [t.output for t in generate.shards]
    assert outputs == [f"{generate.prefix}/shard-0000{i}-of-00003" for i in range(3)]
    assert train.task.datasets == outputs == generate.outputs
    # The shards differ from the whole task in the slice and the output only.
    for shard in generate.shards:
        same = shard.model_copy(update={"output": generate.task.output, "query_offset": 0,
                                        "query_count": None})  # fmt: skip
        assert same == generate.task
    # One shard: the stage's prefix, as before sharding existed.
    one = stage(sharded(samirun_doc, 1), "generate-1")
    assert one.shards == () and one.outputs == [one.prefix]


def test_a_worker_cuts_the_same_slice_as_the_planner(samirun_doc):
    generate = stage(sharded(samirun_doc, 4, train=[10]), "generate-1")
    assert [generate.task.shard(i, 4) for i in range(4)] == list(generate.shards)
    with pytest.raises(TaskError, match="shard 4 of 4: the index must be 0 to 3"):
        generate.task.shard(4, 4)
    with pytest.raises(TaskError, match="11 shards for 10 queries: use 1 to 10"):
        generate.task.shard(0, 11)


def test_more_shards_than_queries_is_refused_naming_the_field(samirun_doc):
    with pytest.raises(SpecError) as err:
        sharded(samirun_doc, 9, train=[4, 4])
    assert "generation.shards: 9 shards for 8 training queries" in str(err.value)
    assert "use 1 to 8" in str(err.value)
    samirun_doc["spec"]["generation"]["shards"] = 0
    with pytest.raises(SpecError, match="generation.shards"):
        parse_samirun(samirun_doc)


def test_the_shard_option_of_the_worker_is_for_generate_only(tmp_path, samirun_doc):
    evaluate = next(s for s in plan(parse_samirun(samirun_doc), "uid") if s.name == "evaluate")
    path = tmp_path / "task.json"
    path.write_text(evaluate.task.model_dump_json(by_alias=True, exclude_none=True))
    assert worker_main(["evaluate", "--task", str(path), "--shard", "0", "2"]) == 65


def summary(queries, kept, tokens, seconds, mean, dropped=0):
    return {
        "queries": queries, "kept": kept, "responses_generated": 2 * queries,
        "retokenized_responses": 0, "generated_tokens": tokens, "seconds": seconds,
        "mean_response_tokens": mean, "tokens_per_second": tokens / seconds,
        "dropped": {"empty": dropped, "identical": 0, "debris": 0}, "backend": "vllm",
    }  # fmt: skip


def test_shard_summaries_merge_into_the_stage_summary():
    merged = merge_shard_summaries(
        [summary(4, 3, 100, 10.0, 10.0, 1), summary(4, 1, 60, 5.0, 30.0)]
    )
    assert (merged["queries"], merged["kept"], merged["responses_generated"]) == (8, 4, 16)
    assert merged["dropped"] == {"empty": 1, "identical": 0, "debris": 0}
    assert merged["mean_response_tokens"] == pytest.approx((3 * 10 + 1 * 30) / 4)
    # Side by side: the stage took as long as its slowest shard, at their summed output.
    assert merged["seconds"] == 10.0 and merged["tokens_per_second"] == pytest.approx(16.0)
    assert merged["shards"] == 2


def line(summary_doc: dict) -> str:
    return json.dumps({"stage": "generate", "exit_code": 0, "summary": summary_doc})


def done(summary_doc: dict) -> ChildState:
    """A shard's Job that succeeded with this summary in its result line."""
    return ChildState(StagePhase.succeeded, 0, line(summary_doc))


def test_a_job_per_shard_retries_the_failed_shard_alone(samirun_doc):
    run = sharded(samirun_doc, 2, train=[8])
    first = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0)
    names = [o["metadata"]["name"] for o in first.create if o["kind"] == "Job"]
    assert names == ["mistral-hh-it1-generate-s0", "mistral-hh-it1-generate-s1"]
    tasks = [json.loads(o["data"]["task.json"]) for o in first.create if o["kind"] == "ConfigMap"]
    assert [(t["queryOffset"], t["queryCount"]) for t in tasks] == [(0, 4), (4, 4)]
    record = first.records["generate-1"]
    assert record.sharding == Sharding.job_per_shard and record.child is None

    # Shard 0 finishes while shard 1's pod is killed (exit 137: retryable).
    observed = {
        "mistral-hh-it1-generate-s0": done(summary(4, 4, 40, 2.0, 5.0)),
        "mistral-hh-it1-generate-s1": ChildState(StagePhase.failed, 137, None, "Error"),
    }  # fmt: skip
    second = decide(run, "uid-1", first.records, observed, SETTINGS, T0, T0)
    assert [o["metadata"]["name"] for o in second.create] == ["mistral-hh-it1-generate-s1-r2"] * 2
    assert [e[1] for e in second.events] == ["StageRetrying", "StageCreated"]
    assert "generate-1 shard 1: exit code 137" in second.events[0][2]

    # Through .status, as the operator reads it back on its next pass (or after a restart).
    status = derive_status(
        run, "uid-1", second.records, "2026-01-01T00:00:00Z", stages=plan(run, "uid-1")
    )
    entry = status.iterations[0].generate
    assert entry.sharding == Sharding.job_per_shard
    assert [(s.phase, s.attempts, s.child) for s in entry.shards] == [
        (StagePhase.succeeded, 1, "mistral-hh-it1-generate-s0"),
        (StagePhase.pending, 2, "mistral-hh-it1-generate-s1-r2"),
    ]
    records = records_from_status(run, "uid-1", status)
    observed = {"mistral-hh-it1-generate-s1-r2": ChildState(StagePhase.running)}
    third = decide(run, "uid-1", records, observed, SETTINGS, T0, T0)
    assert third.create == [] and third.records["generate-1"].phase == StagePhase.running

    observed = {"mistral-hh-it1-generate-s1-r2": done(summary(4, 2, 20, 3.0, 5.0))}
    fourth = decide(run, "uid-1", third.records, observed, SETTINGS, T0, T0)
    assert fourth.records["generate-1"].phase == StagePhase.succeeded
    # Shard 0's summary was lost with the status round trip: no partial stage summary.
    assert fourth.records["generate-1"].meta == {}
    train = [o for o in fourth.create if o["kind"] == "ConfigMap"][0]
    datasets = json.loads(train["data"]["task.json"])["datasets"]
    assert [d.rsplit("/", 1)[1] for d in datasets] == [
        "shard-00000-of-00002",
        "shard-00001-of-00002",
    ]


def test_a_shard_that_fails_for_good_fails_the_stage_and_stops_the_others(samirun_doc):
    run = sharded(samirun_doc, 3, train=[9])
    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    bad = json.dumps({"exit_code": 65, "error": "queries: the source yields no queries"})
    observed = {
        "mistral-hh-it1-generate-s0": ChildState(StagePhase.running),
        "mistral-hh-it1-generate-s1": ChildState(StagePhase.failed, 65, bad),
        "mistral-hh-it1-generate-s2": done(summary(3, 3, 9, 1.0, 3.0)),
    }  # fmt: skip
    decision = decide(run, "uid-1", records, observed, SETTINGS, T0, T0)
    assert decision.failure == "StageFailed" and decision.create == []
    assert "generate-1 shard 1: exit code 65: queries" in decision.records["generate-1"].message
    assert "mistral-hh-it1-generate-s0" in decision.delete


def test_a_refused_shard_is_created_again_with_those_after_it(samirun_doc):
    run = sharded(samirun_doc, 3, train=[9])
    decision = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0)
    quota = "exceeded quota: q, requested: nvidia.com/gpu=1"
    create_refused(decision, CreateRefused("Job", "mistral-hh-it1-generate-s1", 403, quota), {}, T0)
    record = decision.records["generate-1"]
    assert decision.failure is None and record.stalled == "QuotaExceeded"
    assert [(s.child, s.attempts) for s in record.shards] == [
        ("mistral-hh-it1-generate-s0", 1), (None, 0), (None, 0)
    ]  # fmt: skip
    running = {"mistral-hh-it1-generate-s0": ChildState(StagePhase.running)}
    again = decide(run, "uid-1", decision.records, running, SETTINGS, T0, T0)
    created = sorted({o["metadata"]["name"] for o in again.create})
    assert created == ["mistral-hh-it1-generate-s1", "mistral-hh-it1-generate-s2"]


def test_an_indexed_job_runs_every_shard_and_its_pods_summaries_merge(samirun_doc):
    run = sharded(samirun_doc, 2, train=[8])
    first = decide(run, "uid-1", {}, {}, INDEXED, T0, T0)
    config_map, job = first.create
    assert job["metadata"]["name"] == "mistral-hh-it1-generate"
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["backoffLimitPerIndex"] == 0 and "backoffLimit" not in spec
    command = spec["template"]["spec"]["containers"][0]["command"]
    assert command[-5:-3] == ["--task", "/etc/sami/task/task.json"]
    assert command[-3:] == ["--shard", "$(JOB_COMPLETION_INDEX)", "2"]
    # The whole stage's task: each pod cuts its slice (GenerateTask.shard).
    task = json.loads(config_map["data"]["task.json"])
    assert task["output"].endswith("/iterations/1/generate") and "queryCount" not in task
    # The Kubernetes client's own model of a Job takes the spec as it is.
    response = type("Response", (), {"data": json.dumps(job)})
    model = ApiClient().deserialize(response, "V1Job")
    assert model.spec.completion_mode == "Indexed" and model.spec.backoff_limit_per_index == 0
    assert first.records["generate-1"].sharding == Sharding.indexed_job

    pods = [
        indexed_pod(0, "Succeeded", line(summary(4, 4, 40, 2.0, 5.0))),
        indexed_pod(1, "Running"),
    ]
    running = child_state(JOB, job_object("Running"), pods, [])
    assert running.shard_messages.keys() == {0}
    second = decide(
        run, "uid-1", first.records, {"mistral-hh-it1-generate": running}, INDEXED, T0, T0
    )
    shards = second.records["generate-1"].shards
    assert [s.phase for s in shards] == [StagePhase.succeeded, StagePhase.running]

    pods[1] = indexed_pod(1, "Succeeded", line(summary(4, 3, 30, 4.0, 5.0)))
    done = child_state(JOB, job_object("Complete"), pods, [])
    third = decide(run, "uid-1", second.records, {"mistral-hh-it1-generate": done}, INDEXED, T0, T0)
    record = third.records["generate-1"]
    assert record.phase == StagePhase.succeeded
    assert (record.meta["kept"], record.meta["generated_tokens"], record.meta["shards"]) == (
        7,
        70,
        2,
    )


def test_a_failed_indexed_job_reports_the_failed_shard_not_a_finished_one(samirun_doc):
    pods = [
        indexed_pod(0, "Succeeded", line(summary(4, 4, 40, 2.0, 5.0))),
        indexed_pod(1, "Failed", json.dumps({"exit_code": 75, "error": "S3 unreachable"}), 75),
    ]
    state = child_state(JOB, job_object("Failed"), pods, [])
    assert state.phase == StagePhase.failed and state.exit_code == 75
    run = sharded(samirun_doc, 2, train=[8])
    records = decide(run, "uid-1", {}, {}, INDEXED, T0, T0).records
    retry = decide(run, "uid-1", records, {"mistral-hh-it1-generate": state}, INDEXED, T0, T0)
    assert [o["metadata"]["name"] for o in retry.create] == ["mistral-hh-it1-generate-r2"] * 2
    assert "S3 unreachable" in retry.events[0][2]


def job_object(condition: str) -> dict:
    conditions = [] if condition == "Running" else [{"type": condition, "status": "True"}]
    meta = {"name": "mistral-hh-it1-generate", "creationTimestamp": "2026-01-01T00:00:00Z"}
    return {"kind": "Job", "metadata": meta, "status": {"conditions": conditions}}


def indexed_pod(index: int, phase: str, message: str | None = None, code: int = 0) -> dict:
    state = (
        {"running": {}}
        if phase == "Running"
        else {"terminated": {"exitCode": code, "message": message}}
    )
    return {
        "metadata": {
            "name": f"mistral-hh-it1-generate-{index}-x",
            "labels": {COMPLETION_INDEX: str(index)},
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "status": {"phase": phase, "containerStatuses": [{"name": "worker", "state": state}]},
    }  # fmt: skip


def test_shard_children_of_a_stage_are_built_with_their_own_task(samirun_doc):
    run = sharded(samirun_doc, 2, train=[8])
    generate = stage(run, "generate-1")
    config_map, job = build_children(run, generate, "uid-1", SETTINGS, attempt=3, shard=1)
    assert job["metadata"]["name"] == "mistral-hh-it1-generate-s1-r3"
    assert job["spec"]["backoffLimit"] == 0 and "completionMode" not in job["spec"]
    task = json.loads(config_map["data"]["task.json"])
    assert task["output"].endswith("/shard-00001-of-00002") and task["queryOffset"] == 4


def test_local_shards_get_gpus_of_their_own(samirun_doc, monkeypatch):
    from sami_operator.local import local_gpus, shard_envs

    samirun_doc["spec"]["generation"]["engine"]["tensorParallelSize"] = 2
    samirun_doc["spec"]["evaluation"]["engine"] = {"tensorParallelSize": 1}
    samirun_doc["spec"]["pods"]["generate"]["resources"]["limits"]["nvidia.com/gpu"] = 2
    run = sharded(samirun_doc, 2, train=[8])
    envs = shard_envs(run, ["0", "1", "2", "3"])
    assert envs == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert shard_envs(run, []) == [{}, {}]  # no GPUs: the shards share the cores
    with pytest.raises(ValueError) as err:
        shard_envs(run, ["4", "5", "6"])
    assert "spec.generation.shards: 2 shards of 2 GPU(s) each" in str(err.value)
    assert "need 4 GPUs side by side, this machine has 3 (4,5,6); use at most 1" in str(err.value)
    for visible, gpus in (("2,3", ["2", "3"]), ("", []), ("-1", [])):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert local_gpus() == gpus


def test_an_indexed_job_tells_a_shard_s_failure_from_a_replaced_pod(samirun_doc):
    """Index 0's first pod was preempted (DisruptionTarget) and its replacement succeeded;
    index 1 failed on bad input: not a disruption, and not retried."""
    preempted = indexed_pod(0, "Failed", None, 143)
    preempted["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True"}]
    replaced = indexed_pod(0, "Succeeded", line(summary(4, 4, 40, 2.0, 5.0)))
    replaced["metadata"]["creationTimestamp"] = "2026-01-01T00:05:00Z"
    bad = json.dumps({"exit_code": 65, "error": "queries: the source yields no queries"})
    pods = [preempted, replaced, indexed_pod(1, "Failed", bad, 65)]
    state = child_state(JOB, job_object("Failed"), pods, [])
    assert (state.disrupted, state.exit_code) == (False, 65)
    run = sharded(samirun_doc, 2, train=[8])
    records = decide(run, "uid-1", {}, {}, INDEXED, T0, T0).records
    decision = decide(run, "uid-1", records, {"mistral-hh-it1-generate": state}, INDEXED, T0, T0)
    assert decision.failure == "StageFailed" and decision.create == []


def test_a_refused_shard_that_waiting_cannot_fix_stops_the_others(samirun_doc):
    run = sharded(samirun_doc, 3, train=[9])
    decision = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0)
    invalid = CreateRefused("Job", "mistral-hh-it1-generate-s1", 422, "spec: Invalid value")
    create_refused(decision, invalid, {}, T0)
    assert decision.failure == "CreateRefused"
    assert decision.delete == ["mistral-hh-it1-generate-s0"]  # created before it this pass


def test_the_start_deadline_counts_until_a_shard_runs_and_the_way_shards_run_is_kept(
    samirun_doc,
):
    samirun_doc["spec"]["deadlines"] = {"startSeconds": 60}
    run = sharded(samirun_doc, 2, train=[8])
    records = decide(run, "uid-1", {}, {}, SETTINGS, T0, T0).records
    later = T0 + timedelta(seconds=600)
    observed = {
        "mistral-hh-it1-generate-s0": ChildState(StagePhase.running),
        "mistral-hh-it1-generate-s1": ChildState(StagePhase.pending, waiting_since=T0),
    }
    decision = decide(run, "uid-1", records, observed, SETTINGS, later, T0)
    assert decision.failure is None  # the cluster places one shard at a time
    del observed["mistral-hh-it1-generate-s0"]
    observed["mistral-hh-it1-generate-s1"] = ChildState(StagePhase.pending, waiting_since=T0)
    records["generate-1"].shards[0].phase = StagePhase.pending
    stuck = decide(run, "uid-1", records, observed, SETTINGS, later, T0)
    assert stuck.failure == "StartDeadlineExceeded"
    # An operator restarted on a cluster it now finds able to run Indexed Jobs keeps the
    # Jobs per shard it made: no Indexed Job beside them.
    restored = records_from_status(run, "uid-1", derive_status(run, "uid-1", records, "t"))
    again = decide(run, "uid-1", restored, {}, INDEXED, T0, T0)
    assert all("-s" in o["metadata"]["name"] for o in again.create)


def test_summaries_from_another_worker_version_merge_without_failing():
    old = {"queries": 4, "kept": 3, "seconds": 2.0, "generated_tokens": 30}
    merged = merge_shard_summaries([old, summary(4, 1, 10, 1.0, 10.0)])
    assert (merged["queries"], merged["kept"], merged["generated_tokens"]) == (8, 4, 40)
    assert merged["dropped"] == {"debris": 0, "empty": 0, "identical": 0}
