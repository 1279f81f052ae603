"""The SAMIRun API models: examples parse, broken copies fail with precise messages."""

from __future__ import annotations

import copy

import pytest
import yaml

from sami_operator.models import (
    MAX_RUN_NAME,
    EngineOverrides,
    EngineSpec,
    GenerationSpec,
    PodSpec,
    QuerySource,
    SAMIRun,
    TrainingSpec,
    query_sources,
)
from sami_operator.validate import SpecError, load_manifests, parse_samirun
from tests.conftest import example_manifests


@pytest.mark.parametrize("path", example_manifests(), ids=lambda p: p.name)
def test_examples_parse(path):
    docs = load_manifests(path.read_text())
    assert docs
    for doc in docs:
        run = parse_samirun(doc)
        assert isinstance(run, SAMIRun)


def test_round_trip_through_api_form(samirun_doc):
    run = parse_samirun(samirun_doc)
    again = parse_samirun(run.to_api())
    assert again == run
    assert run.spec.training.micro_batch_queries == 1
    assert run.to_api()["spec"]["training"]["microBatchQueries"] == 1


def _set(doc: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    node[last] = value


BROKEN = [
    (
        "spec.training.optimizer.lr",
        5.0,
        "spec.training.optimizer.lr: Input should be less than or equal to 1 (got 5.0)",
    ),
    (
        "spec.constitutions.perQuery",
        1,
        "spec.constitutions.perQuery: Input should be greater than or equal to 2 (got 1)",
    ),
    (
        "spec.constitutions.mode",
        "pairs",
        "spec.constitutions.mode: Input should be 'pair' or 'diverse' (got 'pairs')",
    ),
    (
        "spec.training.launcher",
        "MPIJob",
        "spec.training.launcher: Input should be 'PyTorchJob', 'JobSet', 'TrainJob' or 'Job' "
        "(got 'MPIJob')",
    ),
    ("spec.generation.topP", 0, "spec.generation.topP: Input should be greater than 0 (got 0)"),
    (
        "spec.constitutions.colour",
        "red",
        "spec.constitutions.colour: unknown field; valid fields here: "
        "mode, perQuery, principlesPerConstitution, seed",
    ),
    ("spec.constitutions.per_query", 2, "spec.constitutions.per_query: unknown field"),
    (
        "spec.pods.train.resources.requests.memory",
        "lots",
        "spec.pods.train.resources.requests.memory: 'lots' is not a Kubernetes quantity",
    ),
    (
        "spec.principles.inline.1.name",
        "helpful",
        "spec.principles.inline: principle names must be unique; repeated: ['helpful']",
    ),
    (
        "spec.principles.inline.0.antithesis",
        "The assistant answers the human's request in depth and with clarity, with detailed, "
        "insightful content.",
        "spec.principles.inline[0].antithesis: must differ from the definition",
    ),
    (
        "spec.principles.heldOut",
        [{"name": "helpful", "definition": "a", "antithesis": "b"}],
        "spec.principles.heldOut: must be disjoint from the training principles; "
        "both contain ['helpful']",
    ),
    (
        "spec.constitutions.perQuery",
        5,
        "spec.constitutions.perQuery: pair mode with 2 principle(s) has 3 negating variant(s), "
        "so perQuery must be <= 4, got 5",
    ),
    ("spec.storage.uri", "/data/runs", "spec.storage.credentials: only used with s3:// storage"),
    (
        "spec.data.eval.1.uri",
        "s3://bucket/queries.jsonl",
        "spec.data.eval[1]: set exactly one of 'uri' and 'dataset'",
    ),
    (
        "spec.principles.writer",
        {"model": "x", "instruction": "be nice"},
        "spec.principles: set exactly one of 'inline' and 'writer'",
    ),
    (
        "spec.training.lora.rank",
        0,
        "spec.training.lora.rank: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "spec.training.lora.rank",
        4096,
        "spec.training.lora.rank: Input should be less than or equal to 1024 (got 4096)",
    ),
    ("spec.training.lora.alpha", 0, "spec.training.lora.alpha: Input should be greater than 0"),
    (
        "spec.training.lora.dropout",
        1.0,
        "spec.training.lora.dropout: Input should be less than 1 (got 1.0)",
    ),
    (
        "spec.training.lora.dropout",
        -0.1,
        "spec.training.lora.dropout: Input should be greater than or equal to 0 (got -0.1)",
    ),
    (
        "spec.training.lora.targetModules",
        [],
        "spec.training.lora.targetModules: List should have at least 1 item",
    ),
    (
        "spec.training.lora.targetModules",
        ["q_proj", "lm_head"],
        "spec.training.lora.targetModules: ['lm_head'] are outside the decoder layers and "
        "cannot get an adapter; valid: linear layers inside a decoder layer, such as "
        "['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']",
    ),
    (
        "spec.training.lora.targetModules",
        ["q_proj", "q_proj"],
        "spec.training.lora.targetModules: names a module more than once: ['q_proj']",
    ),
    (
        "spec.training.lora.targetModules",
        ["layers.0.q_proj"],
        "spec.training.lora.targetModules: ['layers.0.q_proj']: a target is one module name",
    ),
    (
        "spec.training.lora.ranks",
        8,
        "spec.training.lora.ranks: unknown field; valid fields here: "
        "alpha, dropout, rank, targetModules",
    ),
]


@pytest.mark.parametrize(
    "path,value,expected", BROKEN, ids=[f"{b[0]}={b[1]!r:.20}" for b in BROKEN]
)
def test_broken_copies_name_the_field(samirun_doc, path, value, expected):
    _set(samirun_doc, path, value)
    with pytest.raises(SpecError) as info:
        parse_samirun(samirun_doc)
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


HELPFUL = {"dataset": "Anthropic/hh-rlhf", "subset": "helpful-base", "adapter": "hh-rlhf"}
HARMLESS = {**HELPFUL, "subset": "harmless-base"}


def test_a_data_source_is_one_source_or_a_list(samirun_doc):
    """One source stays a mapping in the API form (a manifest written for one source is the
    same run as before); a list is read in order, each source with its own count."""
    samirun_doc["spec"]["data"]["train"] = {**HELPFUL, "count": 1000}
    one = parse_samirun(samirun_doc)
    assert isinstance(one.spec.data.train, QuerySource)
    assert one.to_api()["spec"]["data"]["train"] == {
        **HELPFUL,
        "count": 1000,
        "format": "auto",
        "field": "query",
        "split": "train",
    }
    assert query_sources(one.spec.data.train) == [one.spec.data.train]

    samirun_doc["spec"]["data"]["train"] = [{**HELPFUL, "count": 1000}, {**HARMLESS, "count": 500}]
    samirun_doc["spec"]["data"]["eval"] = [
        {**HELPFUL, "split": "test", "count": 250},
        {**HARMLESS, "split": "test", "count": 250},
    ]
    both = parse_samirun(samirun_doc)
    assert [(s.subset, s.count) for s in query_sources(both.spec.data.train)] == [
        ("helpful-base", 1000),
        ("harmless-base", 500),
    ]
    assert [s.split for s in query_sources(both.spec.data.eval)] == ["test", "test"]
    assert parse_samirun(both.to_api()) == both


@pytest.mark.parametrize(
    "train,problem",
    [
        (
            [{**HELPFUL, "count": 1000}, {**HARMLESS, "count": 0}],
            "spec.data.train[1].count: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            [{**HELPFUL, "count": 1000}, {**HARMLESS, "count": 5, "cout": 5}],
            "spec.data.train[1].cout: unknown field; valid fields here: adapter, count, dataset, "
            "field, format, split, subset, uri",
        ),
        (
            [{**HELPFUL, "count": 1000}, {"uri": "s3://b/q.jsonl", "dataset": "x", "count": 5}],
            "spec.data.train[1]: set exactly one of 'uri' and 'dataset'",
        ),
        ([], "spec.data.train: List should have at least 1 item after validation, not 0"),
        ("helpful-base", "spec.data.train: Input should be a query source (a mapping) or a list"),
    ],
    ids=["count", "unknown-field", "two-kinds", "empty", "string"],
)
def test_data_source_errors_name_the_list_index(samirun_doc, train, problem):
    samirun_doc["spec"]["data"]["train"] = train
    with pytest.raises(SpecError) as info:
        parse_samirun(samirun_doc)
    assert [p for p in info.value.problems if p.startswith(problem)], info.value.problems


def test_no_eval_source_reads_a_training_sources_queries(samirun_doc):
    samirun_doc["spec"]["data"]["train"] = [{**HELPFUL, "count": 1000}, {**HARMLESS, "count": 9}]
    samirun_doc["spec"]["data"]["eval"] = [
        {**HELPFUL, "split": "test", "count": 250},
        {**HARMLESS, "count": 250},  # split train: the second training source's queries
    ]
    with pytest.raises(SpecError) as info:
        parse_samirun(samirun_doc)
    assert info.value.problems == [
        "spec.data.eval[1]: reads the same queries as data.train[1] (Anthropic/hh-rlhf subset "
        "'harmless-base', split 'train'), so the evaluation would not be held out: name another "
        "file or split (e.g. split: test)"
    ]


def test_launcher_job_is_single_node(samirun_doc):
    _set(samirun_doc, "spec.training.launcher", "Job")
    _set(samirun_doc, "spec.training.nodes", 2)
    with pytest.raises(SpecError) as info:
        parse_samirun(samirun_doc)
    assert info.value.problems == [
        "spec.training.nodes: launcher Job runs on a single node, got nodes=2; "
        "use PyTorchJob, JobSet or TrainJob for multi-node training"
    ]


def test_launcher_trainjob_refuses_pod_knobs_it_cannot_carry(samirun_doc):
    """A TrainJob's runtimePatches cannot set these pod fields: refused, not dropped."""
    _set(samirun_doc, "spec.training.launcher", "TrainJob")
    _set(samirun_doc, "spec.training.nodes", 2)
    run = parse_samirun(samirun_doc)
    assert run.spec.training.training_runtime == "torch-distributed"
    assert run.spec.training.rendezvous_seconds == 1800
    _set(samirun_doc, "spec.pods.default.runtimeClassName", "nvidia")
    with pytest.raises(SpecError) as info:
        parse_samirun(samirun_doc)
    assert info.value.problems == [
        "spec.pods.default.runtimeClassName: launcher TrainJob cannot set runtimeClassName on "
        "the training pods; set it in the ClusterTrainingRuntime 'torch-distributed' instead "
        "(or set it on the other stages' pods only)"
    ]
    _set(samirun_doc, "spec.training.launcher", "JobSet")
    assert parse_samirun(samirun_doc).spec.pods.default.runtime_class_name == "nvidia"


def test_judge_needs_the_base_model_evaluated(samirun_doc):
    judge = {"endpoint": {"url": "http://judge.svc:8000/v1", "model": "judge"}}
    _set(samirun_doc, "spec.evaluation.judge", judge)
    assert parse_samirun(samirun_doc).spec.evaluation.judge.items == 250  # includeBase default
    _set(samirun_doc, "spec.evaluation.includeBase", False)
    with pytest.raises(SpecError) as info:
        parse_samirun(samirun_doc)
    assert info.value.problems == [
        "spec.evaluation.judge: needs evaluation.includeBase: true, got false; the judge "
        "compares each iteration's responses with the base model's, which includeBase evaluates"
    ]
    del samirun_doc["spec"]["evaluation"]["judge"]
    assert not parse_samirun(samirun_doc).spec.evaluation.include_base


def test_judge_reference_is_a_model(samirun_doc):
    reference = {"uri": "s3://models/mistral-7b-instruct/", "promptFormat": "chat"}
    judge = {"endpoint": {"url": "http://j/v1", "model": "j"}, "reference": reference}
    _set(samirun_doc, "spec.evaluation.judge", judge)
    run = parse_samirun(samirun_doc)
    assert run.spec.evaluation.judge.reference.uri == reference["uri"]
    assert run.spec.evaluation.judge.reference.dtype == "auto"
    assert parse_samirun(run.to_api()) == run
    _set(samirun_doc, "spec.evaluation.judge.reference", {"uri": "x", "lr": 1})
    with pytest.raises(SpecError) as info:
        parse_samirun(samirun_doc)
    assert info.value.problems[0].startswith(
        "spec.evaluation.judge.reference.lr: unknown field; valid fields here: dtype, "
        "promptFormat, revision, tokenizer, trustRemoteCode, uri"
    )


def test_judge_is_an_endpoint_or_a_model(samirun_doc):
    endpoint = {"url": "http://judge.svc:8000/v1", "model": "judge"}
    _set(samirun_doc, "spec.evaluation.judge", {"model": "sami://smollm2-135m-instruct"})
    judge = parse_samirun(samirun_doc).spec.evaluation.judge
    assert (judge.model, judge.endpoint) == ("sami://smollm2-135m-instruct", None)
    message = (
        "spec.evaluation.judge: set exactly one of 'endpoint' (an OpenAI-compatible server) and "
        "'model' (a model the evaluation worker loads itself); {} set"
    )
    for judge, given in (
        ({"model": "sami://smollm2-135m-instruct", "endpoint": endpoint}, "both are"),
        ({"items": 10}, "neither is"),
    ):
        _set(samirun_doc, "spec.evaluation.judge", judge)
        with pytest.raises(SpecError) as info:
            parse_samirun(samirun_doc)
        assert info.value.problems == [message.format(given)]


BRIEF = [{"name": "brief", "definition": "Be brief.", "antithesis": "Ramble."}]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"spec.evaluation.constitutions": 4}, None),  # 2^2 for the example's 2 principles
        ({"spec.evaluation.constitutions": 2}, None),
        (
            {"spec.evaluation.constitutions": 8},
            "spec.evaluation.constitutions: 8 is not 2 (all kept, all negated) or 2^n (every "
            "variant of n principles) for evaluation constitutions of 2 training principles; "
            "valid: [2, 4]",
        ),
        (
            {
                "spec.evaluation.constitutions": 4,
                "spec.principles.heldOut": [
                    {"name": "brief", "definition": "a", "antithesis": "b"}
                ],
            },
            "spec.evaluation.constitutions: 4 is not 2 (all kept, all negated) or 2^n (every "
            "variant of n principles) for evaluation constitutions of 2 training and 1 held-out "
            "principles; valid: [2]",
        ),
        (
            {
                "spec.constitutions.mode": "diverse",
                "spec.constitutions.principlesPerConstitution": 1,
                "spec.evaluation.constitutions": 4,
            },
            "spec.evaluation.constitutions: 4 is not 2 (all kept, all negated) or 2^n (every "
            "variant of n principles) for evaluation constitutions of 1 training principles; "
            "valid: [2]",
        ),
    ],
)
def test_evaluation_constitutions_must_fit_every_principle_set(samirun_doc, changes, problem):
    """No K falls back to another (and with it another MI ceiling): K is 2 or 2^n for the
    training and the held-out principles of an evaluation constitution."""
    for path, value in changes.items():
        _set(samirun_doc, path, value)
    if problem is None:
        assert (
            parse_samirun(samirun_doc).spec.evaluation.constitutions
            == changes["spec.evaluation.constitutions"]
        )
        return
    with pytest.raises(SpecError) as info:
        parse_samirun(samirun_doc)
    assert info.value.problems == [problem]


def test_diverse_mode_limits(samirun_doc):
    _set(samirun_doc, "spec.constitutions.mode", "diverse")
    _set(samirun_doc, "spec.constitutions.principlesPerConstitution", 3)
    with pytest.raises(SpecError, match="principlesPerConstitution: 3 exceeds the 2 training"):
        parse_samirun(samirun_doc)


def test_missing_and_wrong_kind(samirun_doc):
    doc = copy.deepcopy(samirun_doc)
    del doc["spec"]["data"]
    doc["kind"] = "Job"
    with pytest.raises(SpecError) as info:
        parse_samirun(doc)
    assert "spec.data: required field is missing" in info.value.problems
    assert "kind: Input should be 'SAMIRun' (got 'Job')" in info.value.problems
    with pytest.raises(SpecError, match="expected a mapping"):
        parse_samirun(["not", "a", "mapping"])


def test_repeated_yaml_keys_are_errors():
    with pytest.raises(yaml.YAMLError, match="repeated key 'nodes'"):
        load_manifests("spec:\n  nodes: 1\n  nodes: 2\n")


def test_lora_is_off_unless_set_and_absent_changes_no_digest(samirun_doc):
    """training.lora absent or null is full-weight training, and the spec reads exactly as it
    did before the field existed: to_api (what `sami run` hashes into the run's uid, what the
    API server stores) has no `lora` key. Set, it fills in its defaults."""
    from sami_operator.local import run_uid

    run = parse_samirun(samirun_doc)
    assert run.spec.training.lora is None
    assert "lora" not in run.to_api()["spec"]["training"]
    nulled = copy.deepcopy(samirun_doc)
    nulled["spec"]["training"]["lora"] = None
    assert parse_samirun(nulled).to_api() == run.to_api()
    assert run_uid(parse_samirun(nulled)) == run_uid(run)

    with_lora = copy.deepcopy(samirun_doc)
    with_lora["spec"]["training"]["lora"] = {"rank": 8}
    lora = parse_samirun(with_lora)
    assert lora.to_api()["spec"]["training"]["lora"] == {
        "rank": 8,
        "alpha": 32.0,
        "dropout": 0.0,
        "targetModules": [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
        ],
    }  # fmt: skip
    assert run_uid(lora) != run_uid(run)


def test_steps_grow_per_iteration():
    assert [TrainingSpec(steps=3).steps_for(t) for t in (1, 2, 3)] == [3, 6, 9]
    constant = TrainingSpec(steps=3, steps_growth="constant")
    assert [constant.steps_for(t) for t in (1, 2, 3)] == [3, 3, 3]


def test_stage_pod_settings_override_the_default_field_by_field():
    default = PodSpec(service_account_name="sami-worker", shm_size="2Gi")
    train = PodSpec(shm_size="32Gi")
    merged = train.merged_over(default)
    assert merged.service_account_name == "sami-worker"
    assert merged.shm_size == "32Gi"


def test_training_precision_and_gradient_sync(samirun_doc):
    training = parse_samirun(samirun_doc).spec.training
    assert (training.precision, training.gradient_sync) == ("bf16", "microStep")
    _set(samirun_doc, "spec.training.precision", "bf16-mixed")
    _set(samirun_doc, "spec.training.gradientSync", "step")
    run = parse_samirun(samirun_doc)
    assert (run.spec.training.precision, run.spec.training.gradient_sync) == ("bf16-mixed", "step")
    assert run.to_api()["spec"]["training"]["gradientSync"] == "step"
    _set(samirun_doc, "spec.training.gradientSync", "epoch")
    with pytest.raises(SpecError) as info:
        parse_samirun(samirun_doc)
    assert info.value.problems == [
        "spec.training.gradientSync: Input should be 'microStep' or 'step' (got 'epoch')"
    ]


def _problems(doc) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_samirun(doc)
    return info.value.problems


def test_procs_per_node_fit_the_train_pods_gpus(samirun_doc):
    # examples/samirun.yaml: 8 processes on 8 GPUs; fewer processes than GPUs is allowed.
    _set(samirun_doc, "spec.training.procsPerNode", 4)
    assert parse_samirun(samirun_doc).spec.training.procs_per_node == 4
    _set(samirun_doc, "spec.training.procsPerNode", 8)
    _set(samirun_doc, "spec.pods.train.resources.limits", {"nvidia.com/gpu": 4})
    assert _problems(samirun_doc) == [
        "spec.training.procsPerNode: 8 processes per node but spec.pods.train asks for 4 "
        "nvidia.com/gpu; set procsPerNode <= 4 or ask for more GPUs"
    ]
    # A request counts like a limit, and any vendor's */gpu resource is a GPU.
    _set(samirun_doc, "spec.pods.train.resources", {"requests": {"amd.com/gpu": "2"}})
    assert _problems(samirun_doc)[0].startswith(
        "spec.training.procsPerNode: 8 processes per node but spec.pods.train asks for 2 "
        "amd.com/gpu;"
    )


def test_procs_per_node_use_the_default_pods_gpus(samirun_doc):
    del samirun_doc["spec"]["pods"]["train"]["resources"]
    _set(samirun_doc, "spec.pods.default.resources", {"limits": {"nvidia.com/gpu": 2}})
    assert _problems(samirun_doc)[0].startswith(
        "spec.training.procsPerNode: 8 processes per node but spec.pods.default asks for 2 "
        "nvidia.com/gpu;"
    )
    # Train pods without GPUs run CPU processes: any number of them.
    _set(samirun_doc, "spec.pods.train.resources", {"requests": {"cpu": 8}})
    assert parse_samirun(samirun_doc).spec.training.procs_per_node == 8


def _gpus(n: int) -> dict:
    return {"limits": {"nvidia.com/gpu": n}}


def test_tensor_parallelism_needs_gpus_in_generate_and_evaluate_pods(samirun_doc):
    _set(samirun_doc, "spec.generation.engine.tensorParallelSize", 2)
    _set(samirun_doc, "spec.pods.generate.resources", _gpus(2))
    _set(samirun_doc, "spec.pods.evaluate.resources", _gpus(4))  # more than needed is fine
    assert parse_samirun(samirun_doc).spec.generation.engine.tensor_parallel_size == 2
    _set(samirun_doc, "spec.pods.evaluate.resources", _gpus(1))
    assert _problems(samirun_doc) == [
        "spec.generation.engine.tensorParallelSize: 2 GPUs per vLLM engine but "
        "spec.pods.evaluate asks for 1 nvidia.com/gpu; set tensorParallelSize <= 1 or ask for "
        "more GPUs"
    ]
    del samirun_doc["spec"]["pods"]["generate"]
    assert _problems(samirun_doc) == [
        "spec.generation.engine.tensorParallelSize: 2 GPUs per vLLM engine but "
        "spec.pods.generate asks for no GPUs; ask for at least 2 GPUs (e.g. nvidia.com/gpu: 2) "
        "or set tensorParallelSize: 1"
    ]
    # Both from spec.pods.default.
    del samirun_doc["spec"]["pods"]["evaluate"]
    _set(samirun_doc, "spec.pods.default.resources", _gpus(2))
    assert parse_samirun(samirun_doc).spec.pods.default.gpus() == (2, "nvidia.com/gpu")
    # The transformers backend has no tensor parallelism: nothing to fit.
    del samirun_doc["spec"]["pods"]["default"]["resources"]
    _set(samirun_doc, "spec.generation.backend", "transformers")
    assert parse_samirun(samirun_doc).spec.generation.backend == "transformers"


def test_tensor_parallelism_needs_gpus_for_a_principle_writer_model(samirun_doc):
    _set(samirun_doc, "spec.generation.engine.tensorParallelSize", 2)
    for stage in ("generate", "evaluate"):
        del samirun_doc["spec"]["pods"][stage]
    _set(samirun_doc, "spec.pods.default.resources", _gpus(2))
    writer = {"model": "s3://models/writer/", "instruction": "Be good."}
    _set(samirun_doc, "spec.principles", {"writer": writer})
    _set(samirun_doc, "spec.pods.principles.resources", {"requests": {"cpu": 4}})
    assert _problems(samirun_doc) == [
        "spec.generation.engine.tensorParallelSize: 2 GPUs per vLLM engine but "
        "spec.pods.principles asks for no GPUs; ask for at least 2 GPUs (e.g. nvidia.com/gpu: "
        "2) or set tensorParallelSize: 1"
    ]
    # A writer behind an endpoint runs no engine in the principles pod.
    endpoint = {"url": "http://writer.svc:8000/v1", "model": "writer"}
    _set(samirun_doc, "spec.principles", {"writer": {"endpoint": endpoint, "instruction": "x"}})
    assert parse_samirun(samirun_doc).spec.principles.writer.endpoint is not None


JUDGE_MODEL = {"model": "s3://models/judge-8b/"}
WRITER_MODEL = {"model": "s3://models/writer/", "instruction": "Be good."}


def test_stage_engines_override_the_generation_engine_field_by_field(samirun_doc):
    generation = {"tensorParallelSize": 2, "maxModelLen": 4096, "gpuMemoryUtilization": 0.9}
    _set(samirun_doc, "spec.generation.engine", generation)
    _set(samirun_doc, "spec.pods.default.resources", _gpus(2))
    for stage in ("generate", "evaluate"):
        del samirun_doc["spec"]["pods"][stage]
    _set(samirun_doc, "spec.evaluation.engine", {"gpuMemoryUtilization": 0.8})
    _set(samirun_doc, "spec.evaluation.judge", {**JUDGE_MODEL, "engine": {"tensorParallelSize": 1}})
    _set(
        samirun_doc,
        "spec.principles",
        {"writer": {**WRITER_MODEL, "engine": {"enforceEager": True}}},
    )
    run = parse_samirun(samirun_doc)
    spec = run.spec
    base = EngineSpec(tensor_parallel_size=2, max_model_len=4096, gpu_memory_utilization=0.9)
    assert spec.generation.engine == base
    assert spec.generation.engine_with(None) == base  # no overrides: generation.engine
    assert spec.generation.engine_with(spec.evaluation.engine) == base.model_copy(
        update={"gpu_memory_utilization": 0.8}
    )
    # The judge's engine is over generation.engine, not over evaluation.engine.
    assert spec.generation.engine_with(spec.evaluation.judge.engine) == base.model_copy(
        update={"tensor_parallel_size": 1}
    )
    assert spec.generation.engine_with(spec.principles.writer.engine) == base.model_copy(
        update={"enforce_eager": True}
    )
    # The API form keeps only what was set, so nothing fills in the rest on the way back.
    api = run.to_api()["spec"]
    assert api["evaluation"]["engine"] == {"gpuMemoryUtilization": 0.8}
    assert api["evaluation"]["judge"]["engine"] == {"tensorParallelSize": 1}
    assert parse_samirun(run.to_api()) == run


def test_engine_overrides_fall_back_on_what_they_leave_unset():
    base = GenerationSpec(engine=EngineSpec(max_model_len=2048, enforce_eager=True))
    assert base.engine_with(EngineOverrides()) == base.engine
    # A null is unset (the API server drops nulls): maxModelLen stays generation.engine's.
    overrides = EngineOverrides.model_validate({"maxModelLen": None, "enforceEager": False})
    assert base.engine_with(overrides) == EngineSpec(max_model_len=2048, enforce_eager=False)


def test_a_judge_or_writer_engine_needs_a_model_it_loads(samirun_doc):
    endpoint = {"url": "http://judge.svc:8000/v1", "model": "judge"}
    _set(samirun_doc, "spec.evaluation.judge", {"endpoint": endpoint, "engine": {}})
    assert _problems(samirun_doc) == [
        "spec.evaluation.judge.engine: vLLM options for a judge model that the evaluation "
        "worker loads itself (evaluation.judge.model), but the judge is an endpoint; remove "
        "evaluation.judge.engine"
    ]
    _set(samirun_doc, "spec.evaluation.judge", {**JUDGE_MODEL, "engine": {}})
    assert parse_samirun(samirun_doc).spec.evaluation.judge.engine == EngineOverrides()
    writer = {"endpoint": endpoint, "instruction": "x", "engine": {"enforceEager": True}}
    _set(samirun_doc, "spec.principles", {"writer": writer})
    assert _problems(samirun_doc) == [
        "spec.principles.writer.engine: vLLM options for a writer model that the principles "
        "worker loads itself (principles.writer.model), but the writer is an endpoint; remove "
        "principles.writer.engine"
    ]
    _set(samirun_doc, "spec.evaluation.engine", {"tensorParallelSize": 0})
    assert (
        "spec.evaluation.engine.tensorParallelSize: Input should be greater than or equal to 1 "
        "(got 0)"
    ) in _problems(samirun_doc)


def test_tensor_parallelism_fits_each_stages_own_engine(samirun_doc):
    """A 70B policy on 8 GPUs per engine, evaluated on 4, judged by a small model on 1."""
    _set(samirun_doc, "spec.generation.engine.tensorParallelSize", 8)
    _set(samirun_doc, "spec.pods.generate.resources", _gpus(8))
    _set(samirun_doc, "spec.pods.evaluate.resources", _gpus(4))
    assert _problems(samirun_doc) == [
        "spec.generation.engine.tensorParallelSize: 8 GPUs per vLLM engine but "
        "spec.pods.evaluate asks for 4 nvidia.com/gpu; set tensorParallelSize <= 4 or ask for "
        "more GPUs"
    ]
    _set(samirun_doc, "spec.evaluation.engine", {"tensorParallelSize": 4})
    assert parse_samirun(samirun_doc).spec.evaluation.engine.tensor_parallel_size == 4
    # The judge model's engine takes generation.engine's 8 unless its own says otherwise.
    _set(samirun_doc, "spec.evaluation.judge", JUDGE_MODEL)
    assert _problems(samirun_doc) == [
        "spec.generation.engine.tensorParallelSize: 8 GPUs per vLLM engine but "
        "spec.pods.evaluate asks for 4 nvidia.com/gpu; set tensorParallelSize <= 4 or ask for "
        "more GPUs"
    ]
    _set(samirun_doc, "spec.evaluation.judge.engine", {"tensorParallelSize": 8})
    assert _problems(samirun_doc) == [
        "spec.evaluation.judge.engine.tensorParallelSize: 8 GPUs per vLLM engine but "
        "spec.pods.evaluate asks for 4 nvidia.com/gpu; set tensorParallelSize <= 4 or ask for "
        "more GPUs"
    ]
    _set(samirun_doc, "spec.evaluation.judge.engine", {"tensorParallelSize": 1})
    assert parse_samirun(samirun_doc).spec.evaluation.judge.engine.tensor_parallel_size == 1
    _set(samirun_doc, "spec.evaluation.engine.tensorParallelSize", 8)
    assert _problems(samirun_doc) == [
        "spec.evaluation.engine.tensorParallelSize: 8 GPUs per vLLM engine but "
        "spec.pods.evaluate asks for 4 nvidia.com/gpu; set tensorParallelSize <= 4 or ask for "
        "more GPUs"
    ]
    # Evaluate pods without GPUs: only an engine without tensor parallelism fits them.
    _set(samirun_doc, "spec.evaluation.engine.tensorParallelSize", 1)
    _set(samirun_doc, "spec.pods.evaluate.resources", {"requests": {"cpu": 8}})
    assert parse_samirun(samirun_doc).spec.pods.evaluate.gpus() is None
    _set(samirun_doc, "spec.evaluation.judge.engine.tensorParallelSize", 2)
    assert _problems(samirun_doc) == [
        "spec.evaluation.judge.engine.tensorParallelSize: 2 GPUs per vLLM engine but "
        "spec.pods.evaluate asks for no GPUs; ask for at least 2 GPUs (e.g. nvidia.com/gpu: 2) "
        "or set tensorParallelSize: 1"
    ]


def test_tensor_parallelism_fits_the_writer_models_own_engine(samirun_doc):
    _set(samirun_doc, "spec.generation.engine.tensorParallelSize", 2)
    for stage in ("generate", "evaluate"):
        _set(samirun_doc, f"spec.pods.{stage}.resources", _gpus(2))
    writer = {**WRITER_MODEL, "engine": {"tensorParallelSize": 4}}
    _set(samirun_doc, "spec.principles", {"writer": writer})
    _set(samirun_doc, "spec.pods.principles.resources", _gpus(2))
    assert _problems(samirun_doc) == [
        "spec.principles.writer.engine.tensorParallelSize: 4 GPUs per vLLM engine but "
        "spec.pods.principles asks for 2 nvidia.com/gpu; set tensorParallelSize <= 2 or ask for "
        "more GPUs"
    ]
    # A writer on one GPU fits principles pods of one GPU, whatever generation.engine asks.
    _set(samirun_doc, "spec.principles.writer.engine.tensorParallelSize", 1)
    _set(samirun_doc, "spec.pods.principles.resources", _gpus(1))
    assert parse_samirun(samirun_doc).spec.principles.writer.engine.tensor_parallel_size == 1
    # The transformers backend has no tensor parallelism: nothing to fit.
    _set(samirun_doc, "spec.principles.writer.engine.tensorParallelSize", 4)
    _set(samirun_doc, "spec.generation.backend", "transformers")
    assert parse_samirun(samirun_doc).spec.generation.backend == "transformers"


@pytest.mark.parametrize("field", ["cacheSize", "shmSize"])
def test_pod_sizes_are_quantities(samirun_doc, field):
    _set(samirun_doc, f"spec.pods.train.{field}", "150G")
    assert parse_samirun(samirun_doc)
    _set(samirun_doc, f"spec.pods.train.{field}", "lots")
    assert _problems(samirun_doc) == [
        f"spec.pods.train.{field}: 'lots' is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)"
    ]


def test_gpu_counts_read_quantities():
    assert PodSpec().gpus() is None
    assert PodSpec(resources={"requests": {"cpu": 8, "memory": "64Gi"}}).gpus() is None
    assert PodSpec(resources={"limits": {"nvidia.com/gpu": 0}}).gpus() is None
    pod = PodSpec(resources={"requests": {"nvidia.com/gpu": "4"}, "limits": {"nvidia.com/gpu": 8}})
    assert pod.gpus() == (8, "nvidia.com/gpu")
    assert PodSpec(resources={"limits": {"nvidia.com/gpu": "1e1"}}).gpus() == (10, "nvidia.com/gpu")


DNS_1035 = (
    "is not a DNS-1035 label: use lower-case letters, digits and '-', starting with a letter "
    "and ending with a letter or digit (the PyTorchJob and JobSet of its training stages are "
    "named after it and must be DNS-1035 labels)"
)


@pytest.mark.parametrize(
    "name,problem",
    [
        ("7b-hh", f"metadata.name: '7b-hh' {DNS_1035}"),
        ("Mistral-HH", f"metadata.name: 'Mistral-HH' {DNS_1035}"),
        ("mistral.hh", f"metadata.name: 'mistral.hh' {DNS_1035}"),
        ("mistral-hh-", f"metadata.name: 'mistral-hh-' {DNS_1035}"),
        (
            "a" * 200,
            "metadata.name: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...' is 200 characters; at "
            f"most {MAX_RUN_NAME}, so that child names such as <run>-it100-generate-r101 stay "
            "within 51 characters and the pod names launchers derive from them, such as "
            "<child>-worker-1022, within 63",
        ),
    ],
    ids=["digit-first", "uppercase", "dot", "dash-last", "200-characters"],
)
def test_run_names_are_short_dns_1035_labels(samirun_doc, name, problem):
    _set(samirun_doc, "metadata.name", name)
    assert _problems(samirun_doc) == [problem]


def test_the_longest_allowed_run_name(samirun_doc):
    assert MAX_RUN_NAME == 31  # 51 - len("-it100-generate-r101"); 51 = 63 - len("-worker-1022")
    _set(samirun_doc, "metadata.name", "m" + "1" * (MAX_RUN_NAME - 1))
    assert len(parse_samirun(samirun_doc).metadata.name) == MAX_RUN_NAME
    _set(samirun_doc, "metadata.name", "m" + "1" * MAX_RUN_NAME)
    assert _problems(samirun_doc)[0].startswith(
        f"metadata.name: 'm{'1' * MAX_RUN_NAME}' is 32 characters; at most 31,"
    )


@pytest.mark.parametrize(
    "key,problem",
    [
        (
            "sami.dev/run",
            "'sami.dev/run' is set by the operator on every stage pod (keys under sami.dev/, "
            "app.kubernetes.io/managed-by and app.kubernetes.io/name); choose another key",
        ),
        (
            "app.kubernetes.io/managed-by",
            "'app.kubernetes.io/managed-by' is set by the operator on every stage pod",
        ),
        (
            "kueue.x-k8s.io/queue-name",
            "'kueue.x-k8s.io/queue-name' cannot be a pod label: Kueue admits each stage's Job, "
            "PyTorchJob or JobSet as a whole, and a pod with a Kueue label is queued on its "
            "own; set spec.queueName (or the label on the SAMIRun) instead",
        ),
        ("has space", "key 'has space' is not a label key: an optional DNS subdomain prefix"),
        ("-team", "key '-team' is not a label key"),
    ],
)
def test_pod_labels_refuse_the_operators_keys(samirun_doc, key, problem):
    _set(samirun_doc, "spec.pods.train.labels", {"example.com/team": "a", key: "x"})
    problems = _problems(samirun_doc)
    assert len(problems) == 1 and problems[0].startswith(f"spec.pods.train.labels: {problem}")


def test_pod_label_values_are_label_values(samirun_doc):
    _set(samirun_doc, "spec.pods.default.labels", {"team": "x" * 64})
    assert _problems(samirun_doc)[0].startswith(
        f"spec.pods.default.labels: value '{'x' * 64}' of 'team' is not a label value: at most "
        "63 letters"
    )
    _set(samirun_doc, "spec.pods.default.labels", {"team": "", "example.com/cost-centre": "a.b_c"})
    assert parse_samirun(samirun_doc).spec.pods.default.labels["team"] == ""


def test_new_pod_knobs_override_the_default_field_by_field(samirun_doc):
    _set(samirun_doc, "spec.pods.default.securityContext", {"runAsUser": 2000})
    _set(samirun_doc, "spec.pods.default.runtimeClassName", "nvidia")
    _set(
        samirun_doc,
        "spec.pods.train.containerSecurityContext",
        {"capabilities": {"add": ["IPC_LOCK"]}},
    )
    _set(samirun_doc, "spec.pods.train.hostNetwork", True)
    _set(samirun_doc, "spec.pods.train.automountServiceAccountToken", True)
    run = parse_samirun(samirun_doc)
    pods = run.spec.pods
    train = pods.train.merged_over(pods.default)
    assert train.security_context == {"runAsUser": 2000}
    assert train.runtime_class_name == "nvidia"
    assert train.container_security_context == {"capabilities": {"add": ["IPC_LOCK"]}}
    assert (train.host_network, train.automount_service_account_token) == (True, True)
    generate = pods.generate.merged_over(pods.default)
    assert generate.host_network is None and generate.automount_service_account_token is None
    assert generate.container_security_context is None
    assert parse_samirun(run.to_api()) == run
    _set(samirun_doc, "spec.pods.train.dnsPolicy", "ClusterFirstWithHostNetwork")
    assert _problems(samirun_doc)[0].startswith(
        "spec.pods.train.dnsPolicy: Input should be 'ClusterFirst', 'ClusterFirstWithHostNet', "
        "'Default' or 'None'"
    )
