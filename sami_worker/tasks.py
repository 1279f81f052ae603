"""Typed tasks: the JSON documents a worker program consumes (`--task task.json`).

The planner writes them, the operator mounts them from a ConfigMap, `sami run` passes a file;
the worker does not know which. Tasks reuse the SAMIRun API models for their settings, so a
setting means the same thing in the manifest and in the task.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, TypeAdapter, ValidationError, model_validator

from sami_operator.models import (
    APIModel,
    ConstitutionsSpec,
    EngineSpec,
    EvaluationSpec,
    GenerationSpec,
    ModelSpec,
    Principle,
    PrincipleWriter,
    QuerySources,
    StorageSpec,
    Task,
    TrainingSpec,
    query_sources,
)
from sami_worker import layout


class TaskError(ValueError):
    """A task document that does not parse or cannot be carried out (not retryable)."""


class PrinciplesRef(APIModel):
    """Principles given inline or as the output of the principles stage."""

    inline: list[Principle] | None = Field(default=None, description="Principles as written.")
    uri: str | None = Field(default=None, description="Stage prefix written by `write-principles`.")


class GenerateTask(APIModel):
    """Generate one response per (query, constitution) with the model of iteration t-1."""

    kind: Literal["generate"] = "generate"
    output: str = Field(description="Stage prefix (s3:// or local) for the dataset.")
    storage: StorageSpec | None = Field(
        default=None, description="Connection settings for s3:// URIs in this task."
    )
    model: ModelSpec = Field(description="The model to sample from (base or a checkpoint).")
    task: Task = Task.dialogue
    principles: PrinciplesRef
    constitutions: ConstitutionsSpec = Field(default_factory=ConstitutionsSpec)
    queries: QuerySources
    query_offset: int = Field(
        default=0,
        ge=0,
        description="This task's slice of the queries (a shard of generation.shards) starts "
        "here, a position in the concatenated list of every source's queries; query ids are "
        "positions in that list, so a shard's records are the same as one whole task's.",
    )
    query_count: int | None = Field(
        default=None, ge=1, description="The slice's length; none: to the end of the list."
    )
    iteration: int = Field(default=1, ge=0, description="SAMI iteration (seeds depend on it).")
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    output_format: Literal["jsonl", "parquet"] = Field(default="jsonl")

    @property
    def engine(self) -> EngineSpec:
        """The vLLM engine options of the sampled model: generation.engine."""
        return self.generation.engine

    def shard(self, index: int, shards: int) -> GenerateTask:
        """Shard `index` of `shards` (generation.shards): a contiguous slice of the queries,
        as even as the slices go, written to <output>/shard-<i>-of-<n>. The planner makes
        each shard's task with it, and a worker of an Indexed Job its own from the whole."""
        if not 0 <= index < shards:
            raise TaskError(f"shard {index} of {shards}: the index must be 0 to {shards - 1}")
        total = sum(q.count for q in query_sources(self.queries))
        if shards > total:
            raise TaskError(f"{shards} shards for {total} queries: use 1 to {total}")
        begin, end = total * index // shards, total * (index + 1) // shards
        return self.model_copy(
            update={
                "output": f"{self.output}/{layout.shard_key(index, shards)}",
                "query_offset": self.query_offset + begin,
                "query_count": end - begin,
            }
        )


class ScorePair(APIModel):
    """One (prompt, response) to score, as token ids."""

    prompt_token_ids: list[int] = Field(min_length=1)
    response_token_ids: list[int] = Field(min_length=1)


class ScoreTask(APIModel):
    """Sum and mean response log-probs of (prompt, response) pairs under a model."""

    kind: Literal["score"] = "score"
    output: str = Field(description="Stage prefix for scores.jsonl.")
    storage: StorageSpec | None = None
    model: ModelSpec
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    pairs: list[ScorePair] | None = Field(default=None, description="Pairs given inline.")
    pairs_uri: str | None = Field(default=None, description="JSONL of ScorePair records.")


class WritePrinciplesTask(APIModel):
    """Ask an LM to write principles with antitheses."""

    kind: Literal["write-principles"] = "write-principles"
    output: str
    storage: StorageSpec | None = None
    writer: PrincipleWriter
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    seed: int = 0

    @property
    def engine(self) -> EngineSpec:
        """The vLLM engine options of the writer model: principles.writer.engine over
        generation.engine."""
        return self.generation.engine_with(self.writer.engine)


class TrainTask(APIModel):
    """Fine-tune with the SAMI objective on one iteration's dataset(s)."""

    kind: Literal["train"] = "train"
    output: str = Field(
        description="Stage prefix: checkpoint/ (Hugging Face model), state/ (resumable "
        "sharded training state) and metrics.jsonl go under it."
    )
    storage: StorageSpec | None = None
    model: ModelSpec = Field(description="The base model (tokenizer and architecture).")
    init_uri: str | None = Field(
        default=None,
        description="Start from these weights (the previous iteration's checkpoint) instead "
        "of model.uri.",
    )
    datasets: list[str] = Field(min_length=1, description="Generation stage prefixes.")
    iteration_steps: int = Field(
        ge=1,
        description="Optimizer steps of this iteration, as the planner resolved them from "
        "training.steps (the count for iteration 1) and training.stepsGrowth.",
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    seed: int = Field(default=0, ge=0)
    keep_states: bool = Field(
        default=False,
        description="Keep state/ once the stage is complete (cleanup.trainingStates: keep); "
        "by default the resumable states are deleted then.",
    )


class Baseline(APIModel):
    """Another model's evaluation whose responses the judge compares this model's with."""

    name: str = Field(
        min_length=1, description="The win rate's baseline label: 'base' or 'reference'."
    )
    uri: str = Field(
        description="Stage prefix of that evaluation (evaluate-0, or the reference stage); "
        "the judge reads its responses.jsonl."
    )


class EvaluateTask(APIModel):
    """Evaluate one model (iteration t's checkpoint, the base model as iteration 0, or the
    reference model) on held-out queries under the K evaluation constitutions."""

    kind: Literal["evaluate"] = "evaluate"
    output: str = Field(description="Stage prefix for responses, scores and metrics.")
    storage: StorageSpec | None = None
    model: ModelSpec = Field(
        description="The model evaluated (uri: a checkpoint, the base or the reference model)."
    )
    iteration: int = Field(
        ge=0, description="SAMI iteration (0: the base model, and the reference model)."
    )
    reference: bool = Field(
        default=False,
        description="This evaluates evaluation.judge.reference, not an iteration; it is seeded "
        "as iteration 0.",
    )
    task: Task = Task.dialogue
    principles: PrinciplesRef
    held_out: list[Principle] = Field(default_factory=list)
    constitutions: ConstitutionsSpec = Field(default_factory=ConstitutionsSpec)
    queries: QuerySources
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    score_eos: bool = Field(
        default=True, description="training.scoreEos: EOS scored after a response, as in training."
    )
    baselines: list[Baseline] = Field(
        default_factory=list,
        description="Evaluations to judge this model's responses against with "
        "evaluation.judge (the base model's and the reference model's, for iteration >= 1); "
        "none: no judging.",
    )

    @property
    def engine(self) -> EngineSpec:
        """The vLLM engine options of the evaluated model (generating and scoring):
        evaluation.engine over generation.engine."""
        return self.generation.engine_with(self.evaluation.engine)

    @property
    def judge_engine(self) -> EngineSpec:
        """The vLLM engine options of a judge model: evaluation.judge.engine over
        generation.engine (evaluation.engine does not apply to the judge)."""
        judge = self.evaluation.judge
        return self.generation.engine_with(judge.engine if judge is not None else None)

    @model_validator(mode="after")
    def _baselines(self) -> EvaluateTask:
        names = [b.name for b in self.baselines]
        if len(set(names)) != len(names):
            raise ValueError(f"baselines: names must be unique, got {names}")
        if self.baselines and self.evaluation.judge is None:
            raise ValueError("baselines: set, but evaluation.judge is not")
        return self


class DeletePrefixTask(APIModel):
    """Delete everything under a run's storage prefix (cleanup.storageOnDelete: delete)."""

    kind: Literal["delete-prefix"] = "delete-prefix"
    prefix: str = Field(description="The run's storage prefix (s3:// or local).")
    storage: StorageSpec | None = None


# Every task a worker program consumes; each kind is a program's name (contract.PROGRAMS).
TASK_TYPES = (
    WritePrinciplesTask,
    GenerateTask,
    TrainTask,
    EvaluateTask,
    ScoreTask,
    DeletePrefixTask,
)
AnyTask = Annotated[Union[TASK_TYPES], Field(discriminator="kind")]  # noqa: UP007
_ADAPTER: TypeAdapter[AnyTask] = TypeAdapter(AnyTask)


def load_task(path: Path, expected: str):
    """Parse a task file and check it is the kind the program expects."""
    try:
        task = _ADAPTER.validate_json(path.read_bytes())
    except OSError as err:
        raise TaskError(f"cannot read task file {path}: {err.strerror}") from None
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors(include_url=False)
        )
        raise TaskError(f"task file {path} is invalid: {problems}") from None
    if task.kind != expected:
        raise TaskError(f"task file {path} is a {task.kind!r} task, expected {expected!r}")
    return task


def dump_task(task: APIModel) -> str:
    return json.dumps(task.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2)
