"""The contract between the worker programs and whoever starts them (the operator's pods,
`sami run`'s processes), in one place; both sides import it.

- Programs: `python -m sami_worker <program> --task TASK.json`, one per task kind
  (PROGRAMS: a program's name is the `kind` of the task it consumes).
- Exit codes: EXIT_OK (done, or already done), EXIT_BUG (a traceback), EXIT_BAD_INPUT (65,
  sysexits EX_DATAERR: retrying cannot help), EXIT_RETRYABLE (75, EX_TEMPFAIL: it may).
- The result line: one JSON object, `{"stage", "exit_code", "summary", "error"}`, that rank 0
  prints on exit and writes to the file named by RESULT_FILE_ENV (in a pod: the termination
  log, which the operator reads from the pod status). At most RESULT_LIMIT bytes: a longer
  one is replaced by one without `summary`, its `error` cut, and `"truncated": true`.

Light on purpose (the standard library and the task models: no torch, boto3 or Kubernetes
client), so the operator can import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sami_worker.tasks import TASK_TYPES

EXIT_OK = 0
EXIT_BUG = 1
EXIT_BAD_INPUT = 65
EXIT_RETRYABLE = 75

# Program name -> the task class it consumes; the name is the task's `kind`.
PROGRAMS: dict[str, type] = {t.model_fields["kind"].default: t for t in TASK_TYPES}

# The environment variable naming where a worker writes its result line.
RESULT_FILE_ENV = "SAMI_SUMMARY_FILE"
# The Kubernetes termination message holds at most 4096 bytes.
RESULT_LIMIT = 4000
# How much of the error a line over RESULT_LIMIT keeps (less if even that does not fit).
TRUNCATED_ERROR = 2000


def program_of(task: Any) -> str:
    """The program that runs `task`."""
    if task.kind not in PROGRAMS:
        raise ValueError(f"no worker program runs {task.kind!r} tasks")
    return task.kind


@dataclass(frozen=True)
class ResultLine:
    """A worker's result line, as read back: each field None when absent or of the wrong
    type."""

    stage: str | None = None
    exit_code: int | None = None
    summary: dict[str, Any] | None = None
    error: str | None = None
    truncated: bool = False


def format_result_line(
    stage: str, exit_code: int, summary: dict | None = None, error: str | None = None
) -> str:
    """The line, within RESULT_LIMIT bytes (ASCII: JSON escapes anything else)."""
    line = json.dumps({"stage": stage, "exit_code": exit_code, "summary": summary, "error": error})
    if len(line) <= RESULT_LIMIT:
        return line
    kept = (error or "")[:TRUNCATED_ERROR]
    while True:
        line = json.dumps(
            {
                "stage": stage,
                "exit_code": exit_code,
                "error": kept,
                "summary": None,
                "truncated": True,
            }
        )
        if len(line) <= RESULT_LIMIT:
            return line
        kept = kept[: len(kept) // 2]  # escapes (\uXXXX) made it longer than its characters


def write_result_line(
    stage: str,
    exit_code: int,
    summary: dict | None = None,
    error: str | None = None,
    path: str | None = None,
) -> str:
    """Print the line and, when `path` is given (the file RESULT_FILE_ENV names), write it
    there too."""
    line = format_result_line(stage, exit_code, summary, error)
    print(line)
    if path:
        with open(path, "w") as f:
            f.write(line)
    return line


def parse_result_line(text: str | bytes | None) -> ResultLine | None:
    """A result line read back, or None when `text` is none (a worker that never got to
    write one: its logs, a traceback, nothing). Fields it does not know (a newer worker's) are
    ignored; a field of the wrong type reads as absent."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError too), or too deep
        return None
    if not isinstance(data, dict):
        return None

    def typed(key: str, kind: type):
        value = data.get(key)
        return value if type(value) is kind else None  # bool is no int here

    return ResultLine(
        stage=typed("stage", str),
        exit_code=typed("exit_code", int),
        summary=typed("summary", dict),
        error=typed("error", str),
        truncated=data.get("truncated") is True,
    )


def merge_shard_summaries(shards: list[dict]) -> dict:
    """One generation's summary from its shards' (generation.shards; sami_worker.generate
    writes them): counts summed, the mean response length weighted by the queries each
    kept, the wall time the slowest shard's and the throughput all of them together."""

    def total(key: str) -> float:  # a key a shard lacks (another worker version's) counts 0
        return sum(s.get(key) or 0 for s in shards)

    kept = total("kept")
    seconds = max(s.get("seconds") or 0 for s in shards)
    summed = ("queries", "kept", "responses_generated", "retokenized_responses")
    weighted = sum((s.get("mean_response_tokens") or 0) * (s.get("kept") or 0) for s in shards)
    reasons = sorted({r for s in shards for r in s.get("dropped") or {}})
    return {
        **{key: total(key) for key in summed},
        "dropped": {r: sum((s.get("dropped") or {}).get(r, 0) for s in shards) for r in reasons},
        "mean_response_tokens": weighted / kept if kept else 0.0,
        "generated_tokens": total("generated_tokens"),
        "seconds": seconds,
        "tokens_per_second": total("generated_tokens") / seconds if seconds > 0 else 0.0,
        "backend": shards[0].get("backend"),
        "shards": len(shards),
    }
