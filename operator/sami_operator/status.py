"""SAMIRun status, derived from what an executor observed of each stage (pure).

Both executors (the local runner and the operator) record per stage a `StageRecord` and call
`derive_status`, so `status.json` on one machine and `.status` on a cluster have the same
shape and meaning. Conditions keep their lastTransitionTime while their status is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sami_operator.models import (
    Condition,
    IterationStatus,
    Metrics,
    Phase,
    SAMIRun,
    SAMIRunStatus,
    Sharding,
    ShardStatus,
    StagePhase,
    StageStatus,
)
from sami_operator.planner import Stage, checkpoint_uri, plan, run_prefix

CONDITION_TYPES = ("Running", "Succeeded", "Failed", "Suspended")
# Besides the phase conditions: True while the current stage cannot progress until someone
# acts (pods that cannot pull or be placed, a refused child), with the reason and message.
STALLED = "Stalled"


@dataclass
class ShardRecord:
    """What an executor knows about one shard of a sharded stage (generation.shards)."""

    index: int
    phase: StagePhase = StagePhase.pending
    child: str | None = None  # its own workload (JobPerShard)
    attempts: int = 0
    disruptions: int = 0
    message: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # its manifest's summary

    @classmethod
    def from_status(cls, s: ShardStatus) -> ShardRecord:
        return cls(s.index, s.phase, s.child, s.attempts, s.disruptions, s.message)

    def as_status(self) -> ShardStatus:
        return ShardStatus(
            index=self.index,
            phase=self.phase,
            child=self.child,
            attempts=self.attempts,
            disruptions=self.disruptions,
            message=self.message,
        )


@dataclass
class StageRecord:
    """What an executor knows about one stage."""

    phase: StagePhase = StagePhase.pending
    child: str | None = None
    attempts: int = 0
    disruptions: int = 0  # attempts that ended in a disruption (not counted as failures)
    start_time: str | None = None
    completion_time: str | None = None
    message: str | None = None
    reason: str | None = None  # why it failed, as a condition reason
    meta: dict[str, Any] = field(default_factory=dict)  # the stage manifest's summary
    stalled: str | None = None  # observed on this pass, not kept: a condition reason
    sharding: Sharding | None = None  # how a sharded stage runs its shards
    shards: list[ShardRecord] = field(default_factory=list)

    @classmethod
    def from_status(cls, s: StageStatus) -> StageRecord:
        """The record a status entry was written from (metrics aside: they live elsewhere)."""
        return cls(
            phase=s.phase,
            child=s.child,
            attempts=s.attempts,
            disruptions=s.disruptions,
            start_time=s.start_time,
            completion_time=s.completion_time,
            message=s.message,
            reason=s.reason,
            sharding=s.sharding,
            shards=[ShardRecord.from_status(shard) for shard in s.shards],
        )

    def shard(self, index: int) -> ShardRecord:
        """The record of shard `index`, added when it has none yet."""
        found = next((r for r in self.shards if r.index == index), None)
        if found is None:
            found = ShardRecord(index)
            self.shards.append(found)
            self.shards.sort(key=lambda r: r.index)
        return found

    def as_status(self) -> StageStatus:
        return StageStatus(
            phase=self.phase,
            child=self.child,
            attempts=self.attempts,
            disruptions=self.disruptions,
            start_time=self.start_time,
            completion_time=self.completion_time,
            message=self.message,
            reason=self.reason,
            sharding=self.sharding,
            shards=[shard.as_status() for shard in self.shards],
        )


def derive_status(
    run: SAMIRun,
    uid: str,
    records: dict[str, StageRecord],
    now: str,
    previous: SAMIRunStatus | None = None,
    stages: Sequence[Stage] | None = None,
) -> SAMIRunStatus:
    """The run's status from its stage records; `stages`: its plan, when the caller has it
    already (planner.plan, planned once per pass)."""
    stages = plan(run, uid) if stages is None else stages
    prefix = run_prefix(run, uid)
    get = lambda stage_id: records.get(stage_id, StageRecord())  # noqa: E731

    failed = next((s for s in stages if get(s.id).phase == StagePhase.failed), None)
    current = next((s for s in stages if get(s.id).phase != StagePhase.succeeded), None)
    started = [r.start_time for r in records.values() if r.start_time]
    if failed is not None:
        phase, reason = Phase.failed, get(failed.id).reason or "StageFailed"
        message = f"{failed.id} failed: {get(failed.id).message or 'see its logs'}"
    elif current is None:
        phase, reason, message = Phase.succeeded, "AllStagesSucceeded", "all stages succeeded"
    elif run.spec.suspend:
        phase, reason, message = Phase.suspended, "Suspended", f"suspended before {current.id}"
    elif started:
        phase, reason, message = Phase.running, "StageRunning", f"running {current.id}"
    else:
        phase, reason, message = Phase.pending, "Pending", "waiting for the first stage"
    stalled = None
    if phase in (Phase.running, Phase.pending) and get(current.id).message:
        message += f" ({get(current.id).message})"  # e.g. why its pods are stuck
        if get(current.id).stalled:
            stalled = (get(current.id).stalled, f"{current.id}: {get(current.id).message}")

    iterations: dict[int, IterationStatus] = {}
    for stage in stages:
        if stage.iteration is None:
            continue
        entry = iterations.setdefault(stage.iteration, IterationStatus(iteration=stage.iteration))
        record = get(stage.id)
        setattr(entry, stage.name, record.as_status())
        if stage.name == "train" and record.phase == StagePhase.succeeded:
            entry.checkpoint_uri = checkpoint_uri(prefix, stage.iteration)
        if stage.name == "evaluate" and record.meta.get("metrics"):
            entry.metrics = Metrics.model_validate(record.meta["metrics"])
            if record.meta.get("heldOutMetrics"):
                entry.held_out_metrics = Metrics.model_validate(record.meta["heldOutMetrics"])
    trained = [i for i in iterations.values() if i.checkpoint_uri]
    evaluated = [i for i in iterations.values() if i.metrics and i.metrics.mi_lower_bound]
    latest = max(evaluated, key=lambda i: i.iteration, default=None)

    # Stages outside the iterations, shown when planned.
    planned = {s.id for s in stages}
    principles = get("principles").as_status() if "principles" in planned else None
    reference = get("reference").as_status() if "reference" in planned else None
    return SAMIRunStatus(
        phase=phase,
        message=message,
        observed_generation=(run.metadata.model_extra or {}).get("generation"),
        conditions=_conditions(phase, reason, message, now, previous, run, stalled),
        iteration=(current.iteration or 0) if current else run.spec.training.iterations,
        stage=current.id if current and phase != Phase.failed else None,
        latest_mi_lower_bound=latest.metrics.mi_lower_bound.value if latest else None,
        storage_uri=prefix,
        model_uri=max(trained, key=lambda i: i.iteration).checkpoint_uri if trained else None,
        principles=principles,
        reference=reference,
        iterations=[iterations[t] for t in sorted(iterations)],
        start_time=min(started) if started else None,
        completion_time=_completion_time(phase, now, previous),
    )


def _completion_time(phase: Phase, now: str, previous: SAMIRunStatus | None) -> str | None:
    """When the run finished: kept from the status once set (finished runs are still
    reconciled, e.g. to delete their children)."""
    if phase not in (Phase.succeeded, Phase.failed):
        return None
    if previous is not None and previous.phase == phase and previous.completion_time:
        return previous.completion_time
    return now


def _conditions(phase, reason, message, now, previous, run, stalled) -> list[Condition]:
    """One condition per phase (True for the current one) and Stalled; `stalled`: (reason,
    message) while the current stage is stuck."""
    before = {c.type: c for c in (previous.conditions if previous else [])}
    generation = (run.metadata.model_extra or {}).get("generation")
    states = [(kind, phase.value == kind, reason, message) for kind in CONDITION_TYPES]
    states.append((STALLED, stalled is not None, *(stalled or (None, None))))
    out = []
    for kind, true, why, text in states:
        status = "True" if true else "False"
        old = before.get(kind)
        changed = old is None or old.status != status
        out.append(
            Condition(
                type=kind,
                status=status,
                reason=why if true else (old.reason if old else "NotApplicable"),
                message=text if true else "",
                last_transition_time=now if changed else old.last_transition_time,
                observed_generation=generation,
            )
        )
    return out
