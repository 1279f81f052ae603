"""Reconciliation, decided purely: (spec, recorded stages, observed children) -> what to do.

The operator rebuilds everything from the cluster on every pass: stage records from
`.status` (so a finished stage is never redone, even when its child is gone), children from
the API server. `decide` walks the planned stages in order and returns the new records and the
actions (children to create, events to emit). It runs one stage at a time; a stage's child is
created with a deterministic name, so a pass repeated after an operator crash finds the child
it already created instead of duplicating it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sami_operator.builders import build_children, child_name, summary_from_message
from sami_operator.models import SAMIRun, SAMIRunStatus, StagePhase
from sami_operator.planner import plan
from sami_operator.settings import OperatorSettings
from sami_operator.status import StageRecord

EXIT_BAD_INPUT = 65
EXIT_RETRYABLE = 75


@dataclass(frozen=True)
class ChildState:
    """What the API server shows of a stage's workload."""

    phase: StagePhase  # pending, queued, running, succeeded or failed
    exit_code: int | None = None  # of the (rank 0) worker container, once terminated
    # Terminated: the termination message (the worker's JSON result line). Not yet: why its
    # pods are stuck (a missing Secret, an image pull error), if they are.
    message: str | None = None
    reason: str | None = None  # the container's termination reason (OOMKilled, Error, ...)


@dataclass
class Decision:
    records: dict[str, StageRecord]
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)  # children (workload and ConfigMap)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    failure: str | None = None  # condition reason when the run failed in this pass


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
) -> Decision:
    decision = _walk(run, uid, records, observed, settings, now, created)
    decision.delete += _finished_children(run, uid, decision.records, observed)
    return decision


def _finished_children(run, uid, records, observed) -> list[str]:
    """Children that spec.cleanup.children says to delete now: those of succeeded stages
    (every attempt's) with `delete`, all of them once the run succeeded with
    `deleteOnSuccess`. A stage's results live in storage and its record in .status, so a
    deleted child is never needed again."""
    policy = run.spec.cleanup.children
    stages = plan(run, uid)
    done = [s for s in stages if records.get(s.id, StageRecord()).phase == StagePhase.succeeded]
    if policy == "keep" or (policy == "deleteOnSuccess" and len(done) < len(stages)):
        return []
    names = {
        child_name(run.metadata.name, stage, attempt)
        for stage in done
        for attempt in range(1, records[stage.id].attempts + 1)
    }
    return sorted(names & observed.keys())


def _walk(run, uid, records, observed, settings, now, created) -> Decision:
    """The stages in order: the first unfinished one decides this pass."""
    decision = Decision(records=records)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    deadlines = run.spec.deadlines
    age = (now - created).total_seconds()
    for stage in plan(run, uid):
        record = records.setdefault(stage.id, StageRecord())
        if record.phase == StagePhase.succeeded:
            continue
        if record.phase == StagePhase.failed:
            return decision
        if deadlines.active_seconds and age > deadlines.active_seconds:
            return _fail(
                decision,
                record,
                stamp,
                "ActiveDeadlineExceeded",
                f"the run took longer than {deadlines.active_seconds}s",
            )
        never_started = not any(
            r.phase in (StagePhase.running, StagePhase.succeeded) or r.attempts > 1
            for r in records.values()
        )
        if deadlines.start_seconds and never_started and age > deadlines.start_seconds:
            return _fail(
                decision,
                record,
                stamp,
                "StartDeadlineExceeded",
                f"no stage started within {deadlines.start_seconds}s (image pull "
                "errors or unschedulable pods?)",
            )

        state = observed.get(record.child) if record.child else None
        if record.child is None or state is None:
            if run.spec.suspend:
                return decision
            _create(decision, run, stage, uid, settings, record, stamp)
            return decision
        if state.phase in (StagePhase.pending, StagePhase.queued, StagePhase.running):
            if run.spec.suspend and run.spec.suspend_policy == "stopStage":
                # Stopped now, rerun on resume (training from its last checkpoint).
                decision.delete.append(record.child)
                decision.events.append(("Normal", "StageStopped", f"{stage.id}: suspended"))
                record.child, record.phase, record.message = None, StagePhase.pending, None
                return decision
            record.phase = state.phase
            record.message = state.message
            return decision
        if state.phase == StagePhase.succeeded:
            record.phase = StagePhase.succeeded
            record.completion_time = stamp
            record.meta = summary_from_message(state.message)
            record.message = None
            decision.events.append(("Normal", "StageSucceeded", f"{stage.id} ({record.child})"))
            continue
        # Failed: retry what a retry can fix, within the budget.
        error = error_text(state)
        retryable = _retryable(state)
        if retryable and record.attempts <= run.spec.training.max_restarts:
            decision.events.append(("Warning", "StageRetrying", f"{stage.id}: {error}"))
            if run.spec.suspend:
                record.child = None
                return decision
            _create(decision, run, stage, uid, settings, record, stamp)
            return decision
        reason = "RetriesExhausted" if retryable else "StageFailed"
        return _fail(decision, record, stamp, reason, f"{stage.id}: {error}")
    return decision


def _create(decision, run, stage, uid, settings, record, stamp) -> None:
    record.attempts += 1
    record.child = child_name(run.metadata.name, stage, record.attempts)
    record.phase = StagePhase.pending
    record.start_time = record.start_time or stamp
    record.message = None
    decision.create.extend(build_children(run, stage, uid, settings, record.attempts))
    decision.events.append(("Normal", "StageCreated", f"{stage.id}: created {record.child}"))


def _fail(decision, record, stamp, reason, message) -> Decision:
    record.phase = StagePhase.failed
    record.completion_time = stamp
    record.message = message
    decision.failure = reason
    decision.events.append(("Warning", reason, message))
    return decision


def _result_line(state: ChildState) -> dict[str, Any]:
    try:
        line = json.loads(state.message or "")
    except json.JSONDecodeError:
        return {}
    return line if isinstance(line, dict) else {}


def _exit_code(state: ChildState) -> int | None:
    """The worker's own exit code: launchers such as torchrun exit 1 whatever their child
    returned, so the result line the worker left is the better witness."""
    return _result_line(state).get("exit_code", state.exit_code)


def _retryable(state: ChildState) -> bool:
    """The worker said a retry can help (75), or it never got to say: its pod was lost, or
    killed by a signal (exit 128+N: preemption, eviction, a node going away), except by the
    kernel's OOM killer, which would kill it again on the same resources."""
    code = _exit_code(state)
    if code is None or code == EXIT_RETRYABLE:
        return True
    return code > 128 and state.reason != "OOMKilled"


def error_text(state: ChildState) -> str:
    code = _exit_code(state)
    line = _result_line(state)
    if line.get("error"):
        return f"exit code {code}: {line['error']}"
    if state.message:
        return f"exit code {code}: {state.message.strip()[-300:]}"
    if state.reason and state.reason not in ("Error", "Completed"):
        return f"exit code {code} ({state.reason})"
    return f"exit code {code}" if code is not None else "pod lost"
