"""Reconciliation, decided purely: (spec, recorded stages, observed children) -> what to do.

The operator rebuilds everything from the cluster on every pass: stage records from
`.status` (so a finished stage is never redone, even when its child is gone), children from
the API server. `decide` walks the planned stages in order and returns the new records and the
actions (children to create, events to emit). It runs one stage at a time; a stage's child is
created with a deterministic name, so a pass repeated after an operator crash finds the child
it already created instead of duplicating it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from sami_operator.builders import build_children, child_name
from sami_operator.models import Metrics, SAMIRun, SAMIRunStatus, Sharding, StagePhase
from sami_operator.planner import Stage, plan
from sami_operator.settings import OperatorSettings
from sami_operator.status import ShardRecord, StageRecord
from sami_worker.contract import (
    EXIT_RETRYABLE,
    ResultLine,
    merge_shard_summaries,
    parse_result_line,
)


@dataclass(frozen=True)
class ChildState:
    """What the API server shows of a stage's workload."""

    # pending, queued, running (every pod of it runs: Pending pods do not count), succeeded
    # or failed
    phase: StagePhase
    exit_code: int | None = None  # of the (rank 0) worker container, once terminated
    # Terminated: the termination message (the worker's JSON result line). Not yet: why its
    # pods are stuck (a missing Secret, an image pull error, a refused pod), if they are.
    message: str | None = None
    reason: str | None = None  # the container's termination reason (OOMKilled, Error, ...)
    # Not running yet: since when it has waited for its pods to run (the oldest Pending pod,
    # or the workload itself while it has no pods). Drives deadlines.startSeconds.
    waiting_since: datetime | None = None
    # Why it is stuck, as a condition reason (ImagePullBackOff, Unschedulable, FailedCreate,
    # ...), when it is stuck for a reason someone must act on.
    stalled: str | None = None
    # Failed because its pods were taken away (a node drained or lost, preemption, eviction),
    # not because the worker failed: retried without spending spec.training.maxRestarts.
    disrupted: bool = False
    # An Indexed Job's: the result line of each shard whose pod succeeded, by index.
    shard_messages: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CreateRefused:
    """The API server refused to create a child (a 4xx or 5xx on create)."""

    kind: str
    name: str
    code: int  # the HTTP status
    message: str  # the API server's

    def waiting_helps(self) -> bool:
        """Quota, throttling and server errors may pass; an invalid object, a webhook's or
        Pod Security's denial and a missing permission do not until someone changes them."""
        quota = self.code == 403 and "exceeded quota" in self.message
        return quota or self.code in (404, 429) or self.code >= 500

    def reason(self) -> str:
        return "QuotaExceeded" if "exceeded quota" in self.message else "CreateRefused"


@dataclass
class Decision:
    records: dict[str, StageRecord]
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)  # children (workload and ConfigMap)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    failure: str | None = None  # condition reason when the run failed in this pass
    # The earliest moment a deadline (spec.deadlines) could fail the stage in progress: a
    # pass then has something to decide even if nothing of the run changed.
    wake_at: datetime | None = None


def records_from_status(run: SAMIRun, uid: str, status: SAMIRunStatus | None) -> dict:
    """Stage records as the last status recorded them."""
    records: dict[str, StageRecord] = {}
    if status is None:
        return records
    # The stages outside the iterations (derive_status writes them under their stage id).
    for name in ("principles", "reference"):
        stage_status = getattr(status, name)
        if stage_status is not None:
            records[name] = StageRecord.from_status(stage_status)
    for entry in status.iterations:
        for name in ("generate", "train", "evaluate"):
            stage_status = getattr(entry, name)
            if stage_status is None:
                continue
            record = StageRecord.from_status(stage_status)
            if name == "evaluate" and entry.metrics is not None:
                record.meta = {"metrics": entry.metrics.to_api()}
                if entry.held_out_metrics is not None:
                    record.meta["heldOutMetrics"] = entry.held_out_metrics.to_api()
            records[f"{name}-{entry.iteration}"] = record
    return records


def decide(
    run: SAMIRun,
    uid: str,
    records: dict[str, StageRecord],
    observed: dict[str, ChildState],
    settings: OperatorSettings,
    now: datetime,
    created: datetime,
    stages: Sequence[Stage] | None = None,
) -> Decision:
    """What this pass does. `records` are updated in place (they are the decision's);
    `stages`: the run's plan, when the caller has it already (planner.plan, planned once per
    pass)."""
    stages = plan(run, uid) if stages is None else stages
    ctx = _Pass(run, uid, stages, observed, settings, now, created)
    decision = Decision(records=records)
    _walk(ctx, decision)
    decision.delete += _finished_children(ctx, decision.records)
    return decision


@dataclass(frozen=True)
class _Pass:
    """What one reconcile pass decides from: the run and its plan, what the API server shows
    of its children, the settings and the time."""

    run: SAMIRun
    uid: str
    stages: Sequence[Stage]
    observed: Mapping[str, ChildState]
    settings: OperatorSettings
    now: datetime
    created: datetime  # the SAMIRun's creationTimestamp

    @property
    def stamp(self) -> str:
        return self.now.strftime("%Y-%m-%dT%H:%M:%SZ")

    @property
    def age(self) -> float:
        """Seconds since the run was created."""
        return (self.now - self.created).total_seconds()


def _finished_children(ctx: _Pass, records: dict[str, StageRecord]) -> list[str]:
    """Children that spec.cleanup.children says to delete now: those of succeeded stages
    (every attempt's) with `delete`, all of them once the run succeeded with
    `deleteOnSuccess`. A stage's results live in storage and its record in .status, so a
    deleted child is never needed again."""
    policy = ctx.run.spec.cleanup.children
    stages = ctx.stages
    done = [s for s in stages if records.get(s.id, StageRecord()).phase == StagePhase.succeeded]
    if policy == "keep" or (policy == "deleteOnSuccess" and len(done) < len(stages)):
        return []
    names = {name for stage in done for name in _children(ctx, stage, records[stage.id])}
    return sorted(names & ctx.observed.keys())


def _children(ctx: _Pass, stage: Stage, record: StageRecord) -> list[str]:
    """Every child a stage's attempts created: each shard's, for a Job per shard."""
    run_name = ctx.run.metadata.name
    if record.sharding == Sharding.job_per_shard:
        return [
            child_name(run_name, stage, attempt, shard.index)
            for shard in record.shards
            for attempt in range(1, shard.attempts + 1)
        ]
    return [child_name(run_name, stage, a) for a in range(1, record.attempts + 1)]


def _walk(ctx: _Pass, decision: Decision) -> None:
    """The stages in order: the first unfinished one decides this pass, into `decision`
    (its records, children to create and delete, events, failure)."""
    run, records, stamp = ctx.run, decision.records, ctx.stamp
    deadlines = run.spec.deadlines
    for stage in ctx.stages:
        record = records.setdefault(stage.id, StageRecord())
        if record.phase == StagePhase.succeeded:
            continue
        if record.phase == StagePhase.failed:
            return
        if deadlines.active_seconds and ctx.age > deadlines.active_seconds:
            why = f"the run took longer than {deadlines.active_seconds}s"
            _fail(decision, record, stamp, "ActiveDeadlineExceeded", why)
            return
        never_started = not any(
            r.phase in (StagePhase.running, StagePhase.succeeded) or r.attempts > 1
            for r in records.values()
        )
        per_shard = _per_shard(ctx, stage, record)
        state = _shards_waiting(ctx, record) if per_shard else _observed(ctx, record.child)
        late = _start_overdue(ctx, never_started, state)
        if late is not None:
            detail = (state.message if state else None) or record.message
            why = f" ({detail})" if detail else " (image pull errors or unschedulable pods?)"
            _fail(decision, record, stamp, "StartDeadlineExceeded", late + why)
            return

        decision.wake_at = _next_deadline(ctx, never_started, state)
        if per_shard:
            if _walk_shards(ctx, decision, stage, record):
                continue
            return
        if record.child is None or state is None:
            if not run.spec.suspend:
                _create(ctx, decision, stage, record)
            return
        if stage.shards:
            _indexed_shards(record, stage, state)
        if state.phase in (StagePhase.pending, StagePhase.queued, StagePhase.running):
            if run.spec.suspend and run.spec.suspend_policy == "stopStage":
                # Stopped now, rerun on resume (training from its last checkpoint).
                decision.delete.append(record.child)
                decision.events.append(("Normal", "StageStopped", f"{stage.id}: suspended"))
                record.child, record.phase, record.message = None, StagePhase.pending, None
                return
            if state.stalled and state.message != record.message:
                decision.events.append(("Warning", state.stalled, f"{stage.id}: {state.message}"))
            record.phase = state.phase
            record.message = state.message
            record.stalled = state.stalled
            return
        if state.phase == StagePhase.succeeded:
            try:
                record.meta = stage_results(_summary(stage, state))
            except ValueError as err:
                why = f"{stage.id}: its result line does not parse: {err}"
                _fail(decision, record, stamp, "StageFailed", why)
                return
            record.phase = StagePhase.succeeded
            record.completion_time = stamp
            record.message = None
            decision.events.append(("Normal", "StageSucceeded", f"{stage.id} ({record.child})"))
            continue
        error, retryable, retry = _failed(state, record, run.spec.training.max_restarts)
        if retry:
            decision.events.append(("Warning", "StageRetrying", f"{stage.id}: {error}"))
            if run.spec.suspend:
                record.child = None
            else:
                _create(ctx, decision, stage, record)
            return
        reason = "RetriesExhausted" if retryable else "StageFailed"
        _fail(decision, record, stamp, reason, f"{stage.id}: {error}")
        return


def _per_shard(ctx: _Pass, stage: Stage, record: StageRecord) -> bool:
    """Whether a sharded stage runs a Job per shard: as it started (an operator restarted
    mid-stage keeps the way its children were made), else as this cluster allows."""
    if not stage.shards:
        return False
    if record.sharding is not None:
        return record.sharding == Sharding.job_per_shard
    return not ctx.settings.indexed_jobs


def _observed(ctx: _Pass, child: str | None) -> ChildState | None:
    return ctx.observed.get(child) if child else None


def _shards_waiting(ctx: _Pass, record: StageRecord) -> ChildState | None:
    """For the deadlines, a Job per shard: a running shard's state once one runs (a cluster
    that places some shards at a time is making progress), else the shard that has waited
    longest for its pods, else any shard's."""
    states = [s for r in record.shards if (s := _observed(ctx, r.child)) is not None]
    running = [s for s in states if s.phase == StagePhase.running]
    if running:
        return running[0]
    waiting = [s for s in states if s.phase in _WAITING and s.waiting_since is not None]
    if waiting:
        return min(waiting, key=lambda s: s.waiting_since)
    return states[0] if states else None


def _indexed_shards(record: StageRecord, stage: Stage, state: ChildState) -> None:
    """An Indexed Job's shards, as its pods show them."""
    record.sharding = Sharding.indexed_job
    for index in range(len(stage.shards)):
        shard = record.shard(index)
        if shard.phase == StagePhase.succeeded:
            continue  # done in an earlier attempt: its pod of this one only looked
        shard.child = None
        shard.attempts = record.attempts
        done = index in state.shard_messages
        shard.phase = StagePhase.succeeded if done else state.phase
        if state.phase == StagePhase.succeeded and not done:
            shard.phase = StagePhase.pending  # its pod is gone: the summary says nothing


def _summary(stage: Stage, state: ChildState) -> dict[str, Any]:
    """The stage's summary: its worker's, or an Indexed Job's shards' merged."""
    if not stage.shards:
        return _result_line(state).summary or {}
    lines = [parse_result_line(m) for m in state.shard_messages.values()]
    summaries = [line.summary for line in lines if line is not None and line.summary]
    if len(summaries) < len(stage.shards):
        return {}
    return merge_shard_summaries(summaries)


def _walk_shards(ctx: _Pass, decision: Decision, stage: Stage, record: StageRecord) -> bool:
    """generation.shards on a cluster without per-index retries: a Job per shard, each
    created, watched and retried on its own (a finished shard is never run again); whether
    the stage succeeded, every shard having. A shard that fails for good fails the stage
    and stops the others."""
    run, stamp = ctx.run, ctx.stamp
    record.sharding = Sharding.job_per_shard
    states: list[ChildState] = []
    for index in range(len(stage.shards)):
        shard = record.shard(index)
        if shard.phase == StagePhase.succeeded:
            continue
        state = _observed(ctx, shard.child)
        if state is None:
            if not run.spec.suspend:
                _create_shard(ctx, decision, stage, record, index)
            continue
        if state.phase in (StagePhase.pending, StagePhase.queued, StagePhase.running):
            if run.spec.suspend and run.spec.suspend_policy == "stopStage":
                decision.delete.append(shard.child)
                decision.events.append(("Normal", "StageStopped", f"{stage.id}: suspended"))
                shard.child, shard.phase, shard.message = None, StagePhase.pending, None
                continue
            shard.phase, shard.message = state.phase, state.message
            states.append(state)
            continue
        if state.phase == StagePhase.succeeded:
            shard.meta = _result_line(state).summary or {}
            shard.phase, shard.message = StagePhase.succeeded, None
            continue
        error, retryable, retry = _failed(state, shard, run.spec.training.max_restarts)
        where = f"{stage.id} shard {index}"
        if retry:
            decision.events.append(("Warning", "StageRetrying", f"{where}: {error}"))
            if run.spec.suspend:
                shard.child = None
            else:
                _create_shard(ctx, decision, stage, record, index)
            continue
        shard.phase, shard.message = StagePhase.failed, error
        _stop_shards(decision, record)
        reason = "RetriesExhausted" if retryable else "StageFailed"
        _fail(decision, record, stamp, reason, f"{where}: {error}")
        return False
    if all(r.phase == StagePhase.succeeded for r in record.shards):
        metas = [r.meta for r in record.shards]
        record.meta = stage_results(merge_shard_summaries(metas)) if all(metas) else {}
        record.phase, record.completion_time, record.message = StagePhase.succeeded, stamp, None
        decision.events.append(("Normal", "StageSucceeded", f"{stage.id} ({len(metas)} shards)"))
        return True
    running = any(r.phase == StagePhase.running for r in record.shards)
    record.phase = StagePhase.running if running else StagePhase.pending
    stuck = next((s for s in states if s.stalled), None)
    if stuck is not None and stuck.message != record.message:
        decision.events.append(("Warning", stuck.stalled, f"{stage.id}: {stuck.message}"))
    record.message = stuck.message if stuck else None
    record.stalled = stuck.stalled if stuck else None
    return False


def _stop_shards(decision: Decision, record: StageRecord) -> None:
    """The stage has failed: delete its shards' Jobs that have not finished (a Job per
    shard; created in this pass or before)."""
    for shard in record.shards:
        if shard.child and shard.phase in (
            StagePhase.pending,
            StagePhase.queued,
            StagePhase.running,
        ):
            decision.delete.append(shard.child)


def _create_shard(
    ctx: _Pass, decision: Decision, stage: Stage, record: StageRecord, index: int
) -> None:
    shard = record.shard(index)
    shard.attempts += 1
    shard.child = child_name(ctx.run.metadata.name, stage, shard.attempts, index)
    shard.phase, shard.message = StagePhase.pending, None
    record.attempts = max(record.attempts, shard.attempts)
    record.start_time = record.start_time or ctx.stamp
    children = build_children(ctx.run, stage, ctx.uid, ctx.settings, shard.attempts, index)
    decision.create.extend(children)
    decision.events.append(("Normal", "StageCreated", f"{stage.id}: created {shard.child}"))


def _failed(
    state: ChildState, attempt: StageRecord | ShardRecord, max_restarts: int
) -> tuple[str, bool, bool]:
    """(error text, whether a retry can fix it, whether to retry now) for a failed child of
    `attempt` (a stage's record, or a shard's): retry what a retry can fix, within the
    budget; a disruption (a drained node, preemption) is no fault of the stage and spends
    none of it, counted on `attempt`."""
    error = error_text(state)
    retryable = state.disrupted or _retryable(state)
    if state.disrupted:
        attempt.disruptions += 1
        error = f"{error}; its pods were disrupted (not counted against maxRestarts)"
    within = attempt.attempts - attempt.disruptions <= max_restarts
    return error, retryable, retryable and within


def _start_overdue(ctx: _Pass, never_started: bool, state: ChildState | None) -> str | None:
    """deadlines.startSeconds: a stage's pods must run within it, counted from when the
    current child began waiting for them (a retry or a replaced pod starts the clock again);
    and the run's first stage must start within it of the run's creation (a child the API
    server keeps refusing never waits at all). Not while suspended."""
    limit = ctx.run.spec.deadlines.start_seconds
    if not limit or ctx.run.spec.suspend or (state and state.phase == StagePhase.running):
        return None
    waiting = state.waiting_since if state and state.phase in _WAITING else None
    if waiting is not None:
        late = (ctx.now - waiting).total_seconds() > limit
        return f"its pods did not run within {limit}s" if late else None
    if never_started and ctx.age > limit:
        return f"no stage started within {limit}s"
    return None


_WAITING = (StagePhase.pending, StagePhase.queued)


def _next_deadline(ctx: _Pass, never_started: bool, state: ChildState | None) -> datetime | None:
    """When deadlines.activeSeconds or deadlines.startSeconds would next fail the stage in
    progress as it stands (the same clocks as the checks above), or None."""
    deadlines = ctx.run.spec.deadlines
    moments = []
    if deadlines.active_seconds:
        moments.append(ctx.created + timedelta(seconds=deadlines.active_seconds))
    if deadlines.start_seconds and not ctx.run.spec.suspend:
        limit = timedelta(seconds=deadlines.start_seconds)
        waiting = state.waiting_since if state and state.phase in _WAITING else None
        if waiting is not None:
            moments.append(waiting + limit)
        elif never_started:
            moments.append(ctx.created + limit)
    return min(moments, default=None)


def _create(ctx: _Pass, decision: Decision, stage: Stage, record: StageRecord) -> None:
    record.attempts += 1
    record.child = child_name(ctx.run.metadata.name, stage, record.attempts)
    record.phase = StagePhase.pending
    record.start_time = record.start_time or ctx.stamp
    record.message = record.stalled = None
    if stage.shards:
        record.sharding = Sharding.indexed_job
    decision.create.extend(build_children(ctx.run, stage, ctx.uid, ctx.settings, record.attempts))
    decision.events.append(("Normal", "StageCreated", f"{stage.id}: created {record.child}"))


def _fail(decision: Decision, record: StageRecord, stamp: str, reason: str, message: str) -> None:
    record.phase = StagePhase.failed
    record.completion_time = stamp
    record.message = message
    record.reason = reason
    decision.failure = reason
    decision.events.append(("Warning", reason, message))


def create_refused(
    decision: Decision, refused: CreateRefused, before: dict[str, str | None], now: datetime
) -> None:
    """A child this pass created was refused: the stage fails with the API server's message,
    or, where waiting can help (quota), it is created again on a later pass without spending
    an attempt. Either way the message reaches the status, and an event is emitted once per
    new message (`before`: each stage's message before this pass)."""
    stage_id, record, attempt = next(
        (sid, r, a)
        for sid, r in decision.records.items()
        for a in (r, *r.shards)
        if a.child == refused.name
    )
    message = f"creating {refused.kind} {refused.name} was refused: {refused.message}"
    decision.events = [e for e in decision.events if e[1] != "StageCreated"]
    # `attempt`: the stage's record, or a shard's (a Job per shard) with the same fields.
    # Neither it nor the shards after it in this pass were created.
    uncreated = [attempt]
    if record is not attempt:
        created = {o["metadata"]["name"] for o in decision.create}
        later = record.shards[record.shards.index(attempt) + 1 :]
        uncreated += [r for r in later if r.child in created]
    for r in uncreated:
        r.attempts -= 1
        r.child, r.phase = None, StagePhase.pending
    if record is not attempt:
        record.attempts = max(r.attempts for r in record.shards)
    if not refused.waiting_helps():
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        _fail(decision, record, stamp, "CreateRefused", f"{stage_id}: {message}")
        _stop_shards(decision, record)
        return
    if record.attempts == 0:
        record.start_time = None  # it has not started yet
    record.phase = StagePhase.pending
    record.message = f"{message} (retrying)"
    record.stalled = refused.reason()
    if record.message != before.get(stage_id):
        decision.events.append(("Warning", record.stalled, f"{stage_id}: {record.message}"))


def _result_line(state: ChildState) -> ResultLine:
    """The worker's result line, from the termination message (empty when it is none)."""
    return parse_result_line(state.message) or ResultLine()


def _exit_code(state: ChildState, line: ResultLine) -> int | None:
    """The worker's own exit code: launchers such as torchrun exit 1 whatever their child
    returned, so the result line the worker left is the better witness (when it is one)."""
    return line.exit_code if line.exit_code is not None else state.exit_code


def stage_results(summary: dict[str, Any]) -> dict[str, Any]:
    """A stage's summary with its metrics checked against the API: fields this operator does
    not know (a newer worker's) are dropped; a value of the wrong type raises ValueError
    naming it."""
    out = dict(summary)
    for key in ("metrics", "heldOutMetrics"):
        if out.get(key) is None:
            out.pop(key, None)
            continue
        try:
            out[key] = Metrics.model_validate(out[key], extra="ignore").to_api()
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in (key, *first["loc"]))
            raise ValueError(f"{where}: {first['msg']}") from None
    return out


def _retryable(state: ChildState) -> bool:
    """The worker said a retry can help (75), or it never got to say: its pod was lost, or
    killed by a signal (exit 128+N: preemption, eviction, a node going away), except by the
    kernel's OOM killer, which would kill it again on the same resources."""
    code = _exit_code(state, _result_line(state))
    if code is None or code == EXIT_RETRYABLE:
        return True
    return code > 128 and state.reason != "OOMKilled"


def error_text(state: ChildState) -> str:
    line = _result_line(state)
    code = _exit_code(state, line)
    if line.error:
        return f"exit code {code}: {line.error}"
    if state.message:
        return f"exit code {code}: {state.message.strip()[-300:]}"
    if state.reason and state.reason not in ("Error", "Completed"):
        return f"exit code {code} ({state.reason})"
    return f"exit code {code}" if code is not None else "pod lost"
