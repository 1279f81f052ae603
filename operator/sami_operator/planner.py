"""The SAMI pipeline, planned once (docs/architecture.md, 'One planner, two executors'): from a
SAMIRun and what is already done, the stages in order, each with the typed task its worker
program consumes.

    principles (when a writer is configured)
    evaluate-0 (the base model, when evaluation.includeBase)
    reference  (the reference model, when evaluation.judge.reference; evaluated, never judged)
    for t = 1..T: generate-t -> train-t -> evaluate-t
                  (with evaluation.judge, evaluate-t also judges its responses against
                  evaluate-0's, baseline 'base', and the reference stage's, 'reference')

Stage outputs live under the run prefix: principles/, reference/, iterations/<t>/<stage>/
(sami_worker/layout.py).

generate-t samples from the model of iteration t-1 (the base model for t = 1); train-t starts
from the base model (the paper) or from iteration t-1's checkpoint, and trains
`training.steps_for(t)` optimizer steps. `plan` sequences one function per stage kind
(_principles_stage, _evaluate_stage, _reference_stage, _generate_stage, _train_stage;
cleanup_stage is outside the pipeline). Pure: no processes, no Kubernetes, no storage calls;
the local runner and the operator decide what is done and execute the next stage.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from sami_operator.models import (
    BASELINE_BASE,
    BASELINE_REFERENCE,
    ModelSpec,
    PrincipleWriter,
    ReferenceModelSpec,
    SAMIRun,
    SAMIRunSpec,
)
from sami_worker import layout
from sami_worker.contract import program_of
from sami_worker.tasks import (
    Baseline,
    DeletePrefixTask,
    EvaluateTask,
    GenerateTask,
    PrinciplesRef,
    TrainTask,
    WritePrinciplesTask,
)


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: a worker program and its task."""

    name: str  # "principles" | "reference" | "generate" | "train" | "evaluate" | "cleanup"
    iteration: int | None
    prefix: str  # storage URI of the stage's outputs (complete when its manifest exists)
    task: WritePrinciplesTask | GenerateTask | TrainTask | EvaluateTask | DeletePrefixTask
    # generation.shards > 1: one task per shard, each its slice of the queries, written to
    # a folder of its own under `prefix`; `task` is then the whole generation's.
    shards: tuple[GenerateTask, ...] = ()

    @property
    def id(self) -> str:
        return self.name if self.iteration is None else f"{self.name}-{self.iteration}"

    @property
    def outputs(self) -> list[str]:
        """Where the stage's results are: every shard's output, or the prefix; the stage is
        complete when each has its manifest."""
        return [shard.output for shard in self.shards] or [self.prefix]

    @property
    def program(self) -> str:
        """The `python -m sami_worker <program>` this stage runs: its task's."""
        return program_of(self.task)


def run_prefix(run: SAMIRun, uid: str) -> str:
    """<storage uri>/<namespace>/<name>/<uid>: everything a run produces lives here."""
    key = layout.run_key(run.metadata.namespace or "default", run.metadata.name, uid)
    return f"{run.spec.storage.uri.rstrip('/')}/{key}"


def foreign_uris(run: SAMIRun, shared_root: str) -> list[str]:
    """Tenancy on shared storage: under `shared_root` (the operator's default storage, where
    each namespace's runs live under <root>/<namespace>/), a run may read and write only its
    own namespace's part. One problem per URI of the spec that reaches into another
    namespace's part, or spans the whole shared root."""
    root = shared_root.rstrip("/")
    own = f"{root}/{layout.namespace_key(run.metadata.namespace or 'default')}/"
    problems = []
    spec = run.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    # The run writes under <storage uri>/<namespace>/...: that is what must stay its own.
    spec["storage"]["uri"] = run_prefix(run, "uid")
    for path, uri in _uris(spec):
        u = uri.rstrip("/")
        spans = root == u or root.startswith(f"{u}/")
        if spans or (u.startswith(f"{root}/") and not f"{u}/".startswith(own)):
            problems.append(
                f"spec.{path}: {uri!r} reaches outside this namespace's part of the shared "
                f"storage ({own}): runs may use only their own namespace's prefix there"
            )
    return problems


def _uris(value, path: str = ""):
    """(path, uri) of every s3:// string in a spec document."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _uris(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _uris(item, f"{path}[{i}]")
    elif isinstance(value, str) and value.startswith("s3://"):
        yield path, value


def cleanup_stage(run: SAMIRun, uid: str) -> Stage:
    """Not part of the pipeline: deleting a run whose cleanup.storageOnDelete is `delete`
    runs this to remove its storage prefix."""
    prefix = run_prefix(run, uid)
    return Stage("cleanup", None, prefix, DeletePrefixTask(prefix=prefix, storage=run.spec.storage))


def stage_uri(prefix: str, name: str, iteration: int) -> str:
    """The outputs of an iteration's stage (generate, train or evaluate)."""
    return f"{prefix}/{layout.stage_key(name, iteration)}"


def reference_uri(prefix: str) -> str:
    """The reference model's evaluation (evaluation.judge.reference)."""
    return f"{prefix}/{layout.REFERENCE}"


def checkpoint_uri(prefix: str, iteration: int) -> str:
    """The Hugging Face model trained in an iteration."""
    return f"{prefix}/{layout.checkpoint_key(iteration)}"


def plan(run: SAMIRun, uid: str) -> list[Stage]:
    """Every stage of the run, in execution order."""
    spec = run.spec
    ctx = _context(run, uid)
    stages: list[Stage] = []
    if spec.principles.writer is not None:
        stages.append(_principles_stage(ctx, spec.principles.writer))
    if spec.evaluation.include_base:
        stages.append(_evaluate_stage(ctx, 0, spec.model.uri))
    judge = spec.evaluation.judge
    if judge is not None and judge.reference is not None:
        stages.append(_reference_stage(ctx, judge.reference))
    for t in range(1, spec.training.iterations + 1):
        generate = _generate_stage(ctx, t)
        stages.append(generate)
        stages.append(_train_stage(ctx, t, generate.outputs))
        stages.append(_evaluate_stage(ctx, t, checkpoint_uri(ctx.prefix, t)))
    return stages


@dataclass(frozen=True)
class _Context:
    """What the stages of one run are built from."""

    spec: SAMIRunSpec
    prefix: str  # run_prefix
    principles: PrinciplesRef  # where every stage reads the principles from
    baselines: list[Baseline]  # what evaluate-t (t >= 1) judges its responses against


def _context(run: SAMIRun, uid: str) -> _Context:
    """The run's prefix; its principles: the principles stage's output when a writer writes
    them, else the spec's; and the baselines of evaluate-t (t >= 1)."""
    spec = run.spec
    prefix = run_prefix(run, uid)
    if spec.principles.writer is not None:
        principles = PrinciplesRef(uri=f"{prefix}/{layout.PRINCIPLES}")
    else:
        principles = PrinciplesRef(inline=spec.principles.inline)
    # evaluate-0's responses (the spec requires evaluation.includeBase with a judge) and the
    # reference stage's.
    baselines: list[Baseline] = []
    judge = spec.evaluation.judge
    if judge is not None:
        baselines.append(Baseline(name=BASELINE_BASE, uri=stage_uri(prefix, "evaluate", 0)))
        if judge.reference is not None:
            baselines.append(Baseline(name=BASELINE_REFERENCE, uri=reference_uri(prefix)))
    return _Context(spec, prefix, principles, baselines)


def _principles_stage(ctx: _Context, writer: PrincipleWriter) -> Stage:
    """principles: a writer model writes the principles every later stage reads."""
    spec = ctx.spec
    task = WritePrinciplesTask(
        output=ctx.principles.uri,
        storage=spec.storage,
        writer=writer,
        generation=spec.generation,
        seed=spec.constitutions.seed,
    )
    return Stage("principles", None, ctx.principles.uri, task)


def _evaluate_stage(ctx: _Context, iteration: int, model_uri: str) -> Stage:
    """evaluate-t: the model of iteration t (the base model for t = 0), judged against the
    baselines from t = 1 on."""
    uri = stage_uri(ctx.prefix, "evaluate", iteration)
    model = ctx.spec.model.model_copy(update={"uri": model_uri})
    judged = ctx.baselines if iteration >= 1 else []
    return Stage("evaluate", iteration, uri, _evaluate_task(ctx, uri, model, iteration, judged))


def _reference_stage(ctx: _Context, reference: ReferenceModelSpec) -> Stage:
    """Evaluated like the base model (same queries, constitutions and seeds), never judged."""
    uri = reference_uri(ctx.prefix)
    model = ModelSpec.model_validate(reference.model_dump())
    return Stage("reference", None, uri, _evaluate_task(ctx, uri, model, 0, [], reference=True))


def _evaluate_task(
    ctx: _Context,
    output: str,
    model: ModelSpec,
    iteration: int,
    baselines: list[Baseline],
    reference: bool = False,
) -> EvaluateTask:
    spec = ctx.spec
    return EvaluateTask(
        output=output,
        storage=spec.storage,
        model=model,
        iteration=iteration,
        reference=reference,
        task=spec.task,
        principles=ctx.principles,
        held_out=spec.principles.held_out,
        constitutions=spec.constitutions,
        queries=spec.data.eval,
        evaluation=spec.evaluation,
        generation=spec.generation,
        score_eos=spec.training.score_eos,
        baselines=baselines,
    )


def _generate_stage(ctx: _Context, t: int) -> Stage:
    """generate-t samples from the model of iteration t-1 (the base model for t = 1)."""
    spec = ctx.spec
    previous = spec.model.uri if t == 1 else checkpoint_uri(ctx.prefix, t - 1)
    uri = stage_uri(ctx.prefix, "generate", t)
    task = GenerateTask(
        output=uri,
        storage=spec.storage,
        # Checkpoints carry the tokenizer, so only the weights' location changes.
        model=spec.model.model_copy(update={"uri": previous}),
        task=spec.task,
        principles=ctx.principles,
        constitutions=spec.constitutions,
        queries=spec.data.train,
        iteration=t,
        generation=spec.generation,
    )
    n = spec.generation.shards
    shards = tuple(task.shard(i, n) for i in range(n)) if n > 1 else ()
    return Stage("generate", t, uri, task, shards)


def _train_stage(ctx: _Context, t: int, datasets: list[str]) -> Stage:
    """train-t trains on generate-t's dataset (`datasets`: its shards' in order), from the
    base model or (training.init: previous) from iteration t-1's checkpoint."""
    spec = ctx.spec
    uri = stage_uri(ctx.prefix, "train", t)
    init = checkpoint_uri(ctx.prefix, t - 1) if spec.training.init == "previous" and t > 1 else None
    task = TrainTask(
        output=uri,
        storage=spec.storage,
        model=spec.model,
        init_uri=init,
        datasets=datasets,
        iteration_steps=spec.training.steps_for(t),
        training=spec.training,
        seed=spec.constitutions.seed + t,
        keep_states=spec.cleanup.training_states == "keep",
    )
    return Stage("train", t, uri, task)


def next_stage(run: SAMIRun, uid: str, done: Collection[str]) -> Stage | None:
    """The first stage not yet done (by stage id), or None when the run is finished."""
    return next((s for s in plan(run, uid) if s.id not in done), None)
