"""The planner and status derivation: pure functions of a spec and what is done."""

from __future__ import annotations

import json

import pytest

from sami_operator.models import Phase, StagePhase
from sami_operator.planner import checkpoint_uri, next_stage, plan, run_prefix
from sami_operator.status import StageRecord, derive_status
from sami_operator.validate import parse_samirun
from sami_worker.contract import program_of
from sami_worker.tasks import dump_task, load_task


@pytest.fixture
def run(samirun_doc):
    return parse_samirun(samirun_doc)


def test_stage_order_for_three_iterations(run):
    ids = [s.id for s in plan(run, "u1")]
    assert ids == [
        "evaluate-0",
        "generate-1", "train-1", "evaluate-1",
        "generate-2", "train-2", "evaluate-2",
        "generate-3", "train-3", "evaluate-3",
    ]  # fmt: skip


def test_each_iteration_samples_from_the_previous_model(run):
    stages = {s.id: s for s in plan(run, "u1")}
    prefix = run_prefix(run, "u1")
    assert prefix == "s3://sami-runs/experiments/default/mistral-hh/u1"
    assert stages["generate-1"].task.model.uri == run.spec.model.uri
    assert stages["generate-2"].task.model.uri == checkpoint_uri(prefix, 1)
    assert stages["evaluate-0"].task.model.uri == run.spec.model.uri
    assert stages["evaluate-2"].task.model.uri == checkpoint_uri(prefix, 2)
    assert stages["train-2"].task.datasets == [stages["generate-2"].prefix]


def test_generate_and_evaluate_read_the_data_sources_as_written(samirun_doc):
    """One source or a list goes to every generate (training queries) and evaluate (held-out
    queries) task unchanged; every iteration generates for the same queries (offset 0)."""
    hh = {"dataset": "Anthropic/hh-rlhf", "adapter": "hh-rlhf", "count": 4}
    for train in (
        dict(hh, subset="helpful-base"),
        [dict(hh, subset="helpful-base"), dict(hh, subset="harmless-base", count=2)],
    ):
        samirun_doc["spec"]["data"]["train"] = train
        run = parse_samirun(samirun_doc)
        for stage in plan(run, "u1"):
            if stage.name == "generate":
                assert stage.task.queries == run.spec.data.train
                assert stage.task.query_offset == 0
            if stage.name == "evaluate":
                assert stage.task.queries == run.spec.data.eval


def test_training_steps_grow_and_init_follows_the_spec(run):
    stages = {s.id: s for s in plan(run, "u1")}
    assert [stages[f"train-{t}"].task.iteration_steps for t in (1, 2, 3)] == [2, 4, 6]
    assert all(stages[f"train-{t}"].task.init_uri is None for t in (1, 2, 3))  # from base

    continuing = run.model_copy(deep=True)
    continuing.spec.training.init = "previous"
    stages = {s.id: s for s in plan(continuing, "u1")}
    assert stages["train-1"].task.init_uri is None
    assert stages["train-3"].task.init_uri == checkpoint_uri(run_prefix(run, "u1"), 2)


@pytest.mark.parametrize("lora", [None, {"rank": 4, "targetModules": ["q_proj", "v_proj"]}])
def test_train_tasks_carry_lora_and_leave_it_out_when_unset(samirun_doc, tmp_path, lora):
    """Every train task carries training.lora as the spec has it; without it the task file
    has no `lora` key at all, as before the field existed."""
    if lora is not None:
        samirun_doc["spec"]["training"]["lora"] = lora
    run = parse_samirun(samirun_doc)
    for stage in plan(run, "u1"):
        if stage.name != "train":
            continue
        path = tmp_path / f"{stage.id}.json"
        path.write_text(dump_task(stage.task))
        written = json.loads(path.read_text())["training"]
        assert ("lora" in written) == (lora is not None)
        assert load_task(path, "train").training.lora == run.spec.training.lora


def test_a_principle_writer_comes_first_and_feeds_every_stage(samirun_doc):
    writer = {"model": "s3://models/writer", "instruction": "be good"}
    samirun_doc["spec"]["principles"] = {"writer": writer}
    stages = plan(parse_samirun(samirun_doc), "u1")
    assert stages[0].id == "principles" and stages[0].program == "write-principles"
    assert stages[1].task.principles.uri == stages[0].prefix


JUDGE = {"endpoint": {"url": "http://judge.svc:8000/v1", "model": "judge"}}
REFERENCE = {"uri": "mistralai/Mistral-7B-Instruct-v0.2", "promptFormat": "chat"}


def test_a_judge_compares_every_iteration_with_evaluate_0(samirun_doc):
    samirun_doc["spec"]["evaluation"]["judge"] = JUDGE
    run = parse_samirun(samirun_doc)
    stages = {s.id: s for s in plan(run, "u1")}
    assert "reference" not in stages
    base = stages["evaluate-0"].prefix
    assert base == f"{run_prefix(run, 'u1')}/iterations/0/evaluate"
    assert stages["evaluate-0"].task.baselines == []
    for t in (1, 2, 3):
        assert [(b.name, b.uri) for b in stages[f"evaluate-{t}"].task.baselines] == [("base", base)]
    # The task file the worker reads carries it.
    dumped = stages["evaluate-2"].task.model_dump(by_alias=True)
    assert dumped["baselines"] == [{"name": "base", "uri": base}]


@pytest.mark.parametrize("score_eos", [True, False])
def test_evaluation_scores_eos_as_training_does(samirun_doc, score_eos):
    samirun_doc["spec"]["training"]["scoreEos"] = score_eos
    stages = plan(parse_samirun(samirun_doc), "u1")
    evaluations = [s.task for s in stages if s.id.startswith("evaluate-")]
    assert evaluations and {task.score_eos for task in evaluations} == {score_eos}
    assert {s.task.training.score_eos for s in stages if s.id.startswith("train-")} == {score_eos}


def test_a_reference_model_is_evaluated_once_after_the_base_model(samirun_doc):
    samirun_doc["spec"]["evaluation"]["judge"] = {**JUDGE, "reference": REFERENCE}
    run = parse_samirun(samirun_doc)
    ids = [s.id for s in plan(run, "u1")]
    assert ids[:3] == ["evaluate-0", "reference", "generate-1"]
    assert ids.count("reference") == 1 and len(ids) == 11
    stages = {s.id: s for s in plan(run, "u1")}
    reference, base = stages["reference"], stages["evaluate-0"]
    assert reference.prefix == f"{run_prefix(run, 'u1')}/reference"
    assert (reference.name, reference.iteration, reference.program) == (
        "reference",
        None,
        "evaluate",
    )
    # Its own model, evaluated exactly like the base model: same queries, constitutions,
    # principles, seeds (iteration 0) and evaluation settings; never judged itself.
    task = reference.task
    assert task.model.uri == REFERENCE["uri"] and task.model.prompt_format.value == "chat"
    assert run.spec.model.prompt_format.value == "base"  # the base model is prompted differently
    assert task.reference and not base.task.reference
    assert task.baselines == []
    same = ("iteration", "queries", "constitutions", "principles", "held_out", "evaluation")
    assert all(getattr(task, f) == getattr(base.task, f) for f in same)
    for t in (1, 2, 3):
        baselines = stages[f"evaluate-{t}"].task.baselines
        assert [(b.name, b.uri) for b in baselines] == [
            ("base", base.prefix),
            ("reference", reference.prefix),
        ]


def _engines(stages, tmp_path) -> dict[str, tuple]:
    """Per stage id, the vLLM engines its worker builds, read from the task file it gets
    (written and loaded as the worker does): (its model's engine, the judge model's)."""
    engines = {}
    for stage in stages:
        if stage.name == "train":
            continue
        path = tmp_path / f"{stage.id}.json"
        path.write_text(dump_task(stage.task))
        task = load_task(path, program_of(stage.task))
        engines[stage.id] = (task.engine, getattr(task, "judge_engine", None))
    return engines


def test_without_engine_overrides_every_engine_is_the_generation_engine(samirun_doc, tmp_path):
    samirun_doc["spec"]["principles"] = {"writer": {"model": "s3://m/w", "instruction": "x"}}
    samirun_doc["spec"]["evaluation"]["judge"] = {"model": "s3://m/judge", "reference": REFERENCE}
    samirun_doc["spec"]["generation"]["engine"] = {"maxModelLen": 4096, "enforceEager": True}
    run = parse_samirun(samirun_doc)
    stages = plan(run, "u1")
    engine = run.spec.generation.engine
    engines = _engines(stages, tmp_path)
    assert {"principles", "reference", "generate-1", "evaluate-3"} <= engines.keys()
    for stage_id, (own, judge) in engines.items():
        assert own == engine, stage_id
        assert judge in (None, engine), stage_id
    # The task files are as before: no engine beside generation.engine.
    docs = [json.loads(dump_task(s.task)) for s in stages if s.name != "train"]
    for doc in docs:
        evaluation = doc.get("evaluation", {})
        assert "engine" not in evaluation and "engine" not in evaluation.get("judge", {})
        assert "engine" not in doc.get("writer", {})


def test_each_stage_task_carries_its_own_engine(samirun_doc, tmp_path):
    """A 70B policy on 8 GPUs, evaluated with more memory headroom, judged by a model on 1 GPU,
    principles written by a model on 2."""
    spec = samirun_doc["spec"]
    spec["generation"]["engine"] = {"tensorParallelSize": 8, "maxModelLen": 4096}
    spec["pods"] = {"default": {"resources": {"limits": {"nvidia.com/gpu": 8}}}}
    spec["evaluation"]["engine"] = {"gpuMemoryUtilization": 0.7}
    spec["evaluation"]["judge"] = {
        "model": "s3://m/judge",
        "reference": REFERENCE,
        "engine": {"tensorParallelSize": 1, "enforceEager": True},
    }
    writer = {"model": "s3://m/w", "instruction": "x", "engine": {"tensorParallelSize": 2}}
    spec["principles"] = {"writer": writer}
    run = parse_samirun(samirun_doc)
    generation = run.spec.generation.engine
    evaluation = generation.model_copy(update={"gpu_memory_utilization": 0.7})
    judge = generation.model_copy(update={"tensor_parallel_size": 1, "enforce_eager": True})
    writer = generation.model_copy(update={"tensor_parallel_size": 2})
    # The reference model is evaluated like the others: with the evaluation's engine.
    expected = {
        "principles": (writer, None),
        "generate": (generation, None),
        "evaluate": (evaluation, judge),
        "reference": (evaluation, judge),
    }
    engines = _engines(plan(run, "u1"), tmp_path)
    assert len(engines) == 9  # principles, evaluate-0, reference, 3 x (generate, evaluate)
    for stage_id, got in engines.items():
        assert got == expected[stage_id.split("-")[0]], stage_id


def test_without_a_judge_no_baseline_is_planned(run):
    assert all(s.task.baselines == [] for s in plan(run, "u1") if s.name == "evaluate")
    assert "reference" not in {s.id for s in plan(run, "u1")}


def test_next_stage_skips_what_is_done(run):
    assert next_stage(run, "u1", set()).id == "evaluate-0"
    assert next_stage(run, "u1", {"evaluate-0", "generate-1"}).id == "train-1"
    everything = {s.id for s in plan(run, "u1")}
    assert next_stage(run, "u1", everything) is None


def test_status_follows_the_records(run):
    evaluated = {
        "metrics": {
            "miLowerBound": {"value": 0.2, "stderr": 0.01},
            "plugInMi": {"value": 1.5},
            "meanResponseTokens": {"value": 40.0},
        }
    }
    records = {
        "evaluate-0": StageRecord(StagePhase.succeeded, start_time="t0", meta=evaluated),
        "generate-1": StageRecord(StagePhase.succeeded, start_time="t1"),
        "train-1": StageRecord(StagePhase.running, start_time="t2", child="mistral-hh-it1-train"),
    }
    status = derive_status(run, "u1", records, now="t3")
    assert status.phase == Phase.running
    assert (status.iteration, status.stage) == (1, "train-1")
    assert status.latest_mi_lower_bound == 0.2
    assert status.iterations[0].metrics.plug_in_mi.value == 1.5
    assert status.iterations[1].train.child == "mistral-hh-it1-train"
    assert status.model_uri is None  # nothing trained yet
    running = next(c for c in status.conditions if c.type == "Running")
    assert running.status == "True" and running.last_transition_time == "t3"

    records["train-1"] = StageRecord(StagePhase.failed, start_time="t2", message="exit code 65")
    failed = derive_status(run, "u1", records, now="t4", previous=status)
    assert failed.phase == Phase.failed
    assert failed.message == "train-1 failed: exit code 65"
    assert failed.completion_time == "t4"
    by_type = {c.type: c for c in failed.conditions}
    assert by_type["Failed"].status == "True" and by_type["Running"].status == "False"
    # A condition whose status did not change keeps its transition time.
    assert by_type["Succeeded"].last_transition_time == "t3"


def test_status_is_bounded_and_serialisable(run):
    records = {s.id: StageRecord(StagePhase.succeeded, start_time="t") for s in plan(run, "u")}
    status = derive_status(run, "u", records, now="t9")
    assert status.phase == Phase.succeeded
    assert len(status.iterations) == 4
    assert status.iterations[3].checkpoint_uri.endswith("/iterations/3/train/checkpoint")
    assert status.model_uri == status.iterations[3].checkpoint_uri  # the last iteration's
    assert len(status.model_dump_json()) < 20_000


def test_status_shows_the_reference_stage(samirun_doc):
    samirun_doc["spec"]["evaluation"]["judge"] = {**JUDGE, "reference": REFERENCE}
    run = parse_samirun(samirun_doc)
    records = {
        "evaluate-0": StageRecord(StagePhase.succeeded, start_time="t0"),
        "reference": StageRecord(StagePhase.running, start_time="t1", child="mistral-hh-reference"),
    }
    status = derive_status(run, "u1", records, now="t2")
    assert (status.phase, status.stage, status.iteration) == (Phase.running, "reference", 0)
    assert status.message == "running reference"
    assert status.reference.phase == StagePhase.running
    assert status.reference.child == "mistral-hh-reference"
    assert status.to_api()["reference"]["phase"] == "Running"
    # Not an iteration: the iterations list is unchanged by it.
    assert [i.iteration for i in status.iterations] == [0, 1, 2, 3]
    records["reference"] = StageRecord(StagePhase.succeeded, start_time="t1")
    assert derive_status(run, "u1", records, now="t3").stage == "generate-1"

    samirun_doc["spec"]["evaluation"]["judge"] = JUDGE  # no reference: no such status
    assert derive_status(parse_samirun(samirun_doc), "u1", records, now="t3").reference is None


def test_runs_stay_in_their_namespace_of_the_shared_storage(samirun_doc):
    from sami_operator.planner import foreign_uris

    samirun_doc["metadata"]["namespace"] = "team-a"
    samirun_doc["spec"]["storage"]["uri"] = "s3://shared/runs"
    samirun_doc["spec"]["model"]["uri"] = "s3://models/mistral-7b/"  # another bucket: fine
    samirun_doc["spec"]["data"]["train"] = {"uri": "s3://shared/runs/team-a/x.jsonl", "count": 8}
    run = parse_samirun(samirun_doc)
    assert foreign_uris(run, "s3://shared/runs/") == []
    assert foreign_uris(run, "s3://shared/run") == []  # a sibling prefix is not the root

    samirun_doc["spec"]["data"]["train"]["uri"] = "s3://shared/runs/team-b/r/u/x.jsonl"
    samirun_doc["spec"]["model"]["uri"] = "s3://shared/"
    problems = foreign_uris(parse_samirun(samirun_doc), "s3://shared/runs")
    assert len(problems) == 2
    assert problems[0].startswith("spec.model.uri: 's3://shared/' reaches outside")
    assert "spec.data.train.uri" in problems[1] and "s3://shared/runs/team-a/" in problems[1]
    samirun_doc["spec"]["model"]["uri"] = "s3://models/m/"
    samirun_doc["spec"]["data"]["train"]["uri"] = "s3://elsewhere/x.jsonl"
    samirun_doc["spec"]["storage"]["uri"] = "s3://shared/runs/team-b"  # writes into team-b's part
    [problem] = foreign_uris(parse_samirun(samirun_doc), "s3://shared/runs")
    assert problem.startswith("spec.storage.uri: 's3://shared/runs/team-b/team-a/mistral-hh/uid'")


def test_the_layout_reads_back_what_the_planner_plans(samirun_doc):
    """Stage prefixes are the run prefix and sami_worker.layout's keys, which parse back to
    the stage (the report reads a run's listing so)."""
    from sami_worker import layout

    samirun_doc["spec"]["principles"] = {"writer": {"model": "s3://m/w", "instruction": "x"}}
    samirun_doc["spec"]["evaluation"]["judge"] = {**JUDGE, "reference": REFERENCE}
    run = parse_samirun(samirun_doc)
    prefix = run_prefix(run, "u1")
    assert prefix == f"{run.spec.storage.uri.rstrip('/')}/default/mistral-hh/u1"
    for stage in plan(run, "u1"):
        key = stage.prefix.removeprefix(f"{prefix}/")
        if stage.iteration is None:
            assert key == stage.name and layout.parse_stage_key(key) is None
        else:
            assert layout.parse_stage_key(key) == (stage.name, stage.iteration)
    assert checkpoint_uri(prefix, 2) == f"{prefix}/iterations/2/train/checkpoint"
    for other in ("iterations/2/train/checkpoint", "iterations/x/train", "iterations/2"):
        assert layout.parse_stage_key(other) is None
