"""The SAMI pipeline, planned once (ARCHITECTURE.md): from a SAMIRun and what is already done,
the stages in order, each with the typed task its worker program consumes.

    principles (when a writer is configured)
    evaluate-0 (the base model, when evaluation.includeBase)
    for t = 1..T: generate-t -> train-t -> evaluate-t
                  (with evaluation.judge, evaluate-t also judges against evaluate-0's responses)

generate-t samples from the model of iteration t-1 (the base model for t = 1); train-t starts
from the base model (the paper) or from iteration t-1's checkpoint, and trains
`training.steps_for(t)` optimizer steps. Pure: no processes, no Kubernetes, no storage calls;
the local runner and the operator decide what is done and execute the next stage.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from sami_operator.models import SAMIRun
from sami_worker.tasks import (
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

    name: str  # "principles" | "generate" | "train" | "evaluate" | "cleanup"
    iteration: int | None
    prefix: str  # storage URI of the stage's outputs (complete when its manifest exists)
    task: WritePrinciplesTask | GenerateTask | TrainTask | EvaluateTask | DeletePrefixTask

    @property
    def id(self) -> str:
        return self.name if self.iteration is None else f"{self.name}-{self.iteration}"

    @property
    def program(self) -> str:
        """The `python -m sami_worker <program>` this stage runs."""
        return {"principles": "write-principles", "cleanup": "delete-prefix"}.get(
            self.name, self.name
        )


def run_prefix(run: SAMIRun, uid: str) -> str:
    """<storage uri>/<namespace>/<name>/<uid>: everything a run produces lives here."""
    namespace = run.metadata.namespace or "default"
    return f"{run.spec.storage.uri.rstrip('/')}/{namespace}/{run.metadata.name}/{uid}"


def cleanup_stage(run: SAMIRun, uid: str) -> Stage:
    """Not part of the pipeline: deleting a run whose cleanup.storageOnDelete is `delete`
    runs this to remove its storage prefix."""
    prefix = run_prefix(run, uid)
    return Stage("cleanup", None, prefix, DeletePrefixTask(prefix=prefix, storage=run.spec.storage))


def checkpoint_uri(prefix: str, iteration: int) -> str:
    """The Hugging Face model trained in an iteration."""
    return f"{prefix}/iterations/{iteration}/train/checkpoint"


def plan(run: SAMIRun, uid: str) -> list[Stage]:
    """Every stage of the run, in execution order."""
    spec = run.spec
    prefix = run_prefix(run, uid)
    stages: list[Stage] = []

    if spec.principles.writer is not None:
        principles = PrinciplesRef(uri=f"{prefix}/principles")
        stages.append(
            Stage(
                "principles",
                None,
                principles.uri,
                WritePrinciplesTask(
                    output=principles.uri,
                    storage=spec.storage,
                    writer=spec.principles.writer,
                    generation=spec.generation,
                    seed=spec.constitutions.seed,
                ),
            )
        )
    else:
        principles = PrinciplesRef(inline=spec.principles.inline)

    def stage_uri(name: str, iteration: int) -> str:
        return f"{prefix}/iterations/{iteration}/{name}"

    def evaluate(iteration: int, model_uri: str) -> Stage:
        uri = stage_uri("evaluate", iteration)
        # The judge compares with the base model's responses, from evaluate-0 (the spec
        # requires evaluation.includeBase with a judge).
        baseline = None
        if spec.evaluation.judge is not None and iteration >= 1:
            baseline = stage_uri("evaluate", 0)
        return Stage(
            "evaluate",
            iteration,
            uri,
            EvaluateTask(
                output=uri,
                storage=spec.storage,
                model=spec.model.model_copy(update={"uri": model_uri}),
                iteration=iteration,
                task=spec.task,
                principles=principles,
                held_out=spec.principles.held_out,
                constitutions=spec.constitutions,
                queries=spec.data.eval,
                evaluation=spec.evaluation,
                generation=spec.generation,
                baseline_responses_uri=baseline,
            ),
        )

    if spec.evaluation.include_base:
        stages.append(evaluate(0, spec.model.uri))

    for t in range(1, spec.training.iterations + 1):
        previous = spec.model.uri if t == 1 else checkpoint_uri(prefix, t - 1)
        # Checkpoints carry the tokenizer, so only the weights' location changes.
        sampler = spec.model.model_copy(update={"uri": previous})
        generate_uri = stage_uri("generate", t)
        stages.append(
            Stage(
                "generate",
                t,
                generate_uri,
                GenerateTask(
                    output=generate_uri,
                    storage=spec.storage,
                    model=sampler,
                    task=spec.task,
                    principles=principles,
                    constitutions=spec.constitutions,
                    queries=spec.data.train,
                    iteration=t,
                    generation=spec.generation,
                ),
            )
        )
        train_uri = stage_uri("train", t)
        init = checkpoint_uri(prefix, t - 1) if spec.training.init == "previous" and t > 1 else None
        stages.append(
            Stage(
                "train",
                t,
                train_uri,
                TrainTask(
                    output=train_uri,
                    storage=spec.storage,
                    model=spec.model,
                    init_uri=init,
                    datasets=[generate_uri],
                    steps=spec.training.steps_for(t),
                    training=spec.training,
                    seed=spec.constitutions.seed + t,
                ),
            )
        )
        stages.append(evaluate(t, checkpoint_uri(prefix, t)))
    return stages


def next_stage(run: SAMIRun, uid: str, done: Collection[str]) -> Stage | None:
    """The first stage not yet done (by stage id), or None when the run is finished."""
    return next((s for s in plan(run, uid) if s.id not in done), None)
