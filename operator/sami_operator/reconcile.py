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
from sami_operator.models import Metrics, SAMIRun, SAMIRunStatus, StagePhase
from sami_operator.planner import Stage, plan
from sami_operator.settings import OperatorSettings
from sami_operator.status import StageRecord
from sami_worker.contract import EXIT_RETRYABLE, ResultLine, parse_result_line


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
    names = {
        child_name(ctx.run.metadata.name, stage, attempt)
        for stage in done
        for attempt in range(1, records[stage.id].attempts + 1)
    }
    return sorted(names & ctx.observed.keys())


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
        state = ctx.observed.get(record.child) if record.child else None
        late = _start_overdue(ctx, never_started, state)
        if late is not None:
            detail = (state.message if state else None) or record.message
            why = f" ({detail})" if detail else " (image pull errors or unschedulable pods?)"
            _fail(decision, record, stamp, "StartDeadlineExceeded", late + why)
            return

        decision.wake_at = _next_deadline(ctx, never_started, state)
        if record.child is None or state is None:
            if not run.spec.suspend:
                _create(ctx, decision, stage, record)
            return
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
                record.meta = stage_results(_result_line(state).summary or {})
            except ValueError as err:
                why = f"{stage.id}: its result line does not parse: {err}"
                _fail(decision, record, stamp, "StageFailed", why)
                return
            record.phase = StagePhase.succeeded
            record.completion_time = stamp
            record.message = None
            decision.events.append(("Normal", "StageSucceeded", f"{stage.id} ({record.child})"))
            continue
        # Failed: retry what a retry can fix, within the budget; a disruption (a drained
        # node, preemption) is no fault of the stage and spends none of it.
        error = error_text(state)
        retryable = state.disrupted or _retryable(state)
        if state.disrupted:
            record.disruptions += 1
            error = f"{error}; its pods were disrupted (not counted against maxRestarts)"
        if retryable and record.attempts - record.disruptions <= run.spec.training.max_restarts:
            decision.events.append(("Warning", "StageRetrying", f"{stage.id}: {error}"))
            if run.spec.suspend:
                record.child = None
            else:
                _create(ctx, decision, stage, record)
            return
        reason = "RetriesExhausted" if retryable else "StageFailed"
        _fail(decision, record, stamp, reason, f"{stage.id}: {error}")
        return


def _start_overdue(ctx: _Pass, never_started: bool, state: ChildState | None) -> str | None:
    """deadlines.startSeconds: a stage's pods must run within it, counted from when the
    current child began waiting for them (a retry or a replaced pod starts the clock again);
    and the run's first stage must start within it of the run's creation (a child the API
    server keeps refusing never waits at all). Not while suspended."""
    limit = ctx.run.spec.deadlines.start_seconds
    if not limit or ctx.run.spec.suspend:
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
    stage_id, record = next(
        (sid, r) for sid, r in decision.records.items() if r.child == refused.name
    )
    message = f"creating {refused.kind} {refused.name} was refused: {refused.message}"
    decision.events = [e for e in decision.events if e[1] != "StageCreated"]
    if not refused.waiting_helps():
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        _fail(decision, record, stamp, "CreateRefused", f"{stage_id}: {message}")
        return
    record.attempts -= 1
    record.child = None
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
