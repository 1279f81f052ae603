"""Worker programs: `python -m sami_worker <stage> --task TASK.json`.

Stages: write-principles, generate (`--shard INDEX SHARDS`: one slice of its queries), train
(under torchrun for several processes), evaluate, and score; delete-prefix empties a deleted
run's storage prefix. The same programs run in
Kubernetes pods and as local processes under `sami run`; they do not know which started them.

Exit codes (sami_worker.contract), so a launcher's failure policy can tell failures apart:
    0   done (or already done: a completed stage is not redone)
    1   unexpected error (a bug; the traceback is printed)
    65  bad task or input: invalid task file, missing dataset or model, bad credentials,
        empty query set, out of memory. Retrying cannot help (sysexits EX_DATAERR).
    75  transient failure: storage or a chat endpoint (judge, principle writer) unreachable
        or failing (429, 5xx) after retries, a peer died. Retrying may help (sysexits EX_TEMPFAIL).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from sami_worker.contract import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_RETRYABLE,
    PROGRAMS,
    write_result_line,
)

log = logging.getLogger("sami_worker")

# The module under sami_worker whose `run(task) -> summary` each program is; delete-prefix is
# _delete_prefix below.
MODULES = {
    "write-principles": "principle_writer",
    "generate": "generate",
    "train": "train",
    "evaluate": "evaluate",
    "score": "score",
}


def _run_stage(program: str, task_path: Path, shard: tuple[int, int] | None = None) -> dict:
    from sami_worker.tasks import TaskError, load_task

    task = load_task(task_path, program)
    if shard is not None:
        if not hasattr(task, "shard"):
            raise TaskError(f"--shard: the {program} program does not shard its task")
        task = task.shard(*shard)
    done = _completed(program, task)
    if done is not None:
        return done
    if program == "delete-prefix":
        return _delete_prefix(task)
    return importlib.import_module(f"sami_worker.{MODULES[program]}").run(task)


def _completed(program: str, task) -> dict | None:
    """A task whose output is already complete (manifest present, every file it lists there
    with its size) is not redone: its manifest's meta is the summary."""
    if not hasattr(task, "output"):
        return None  # delete-prefix: nothing published
    from sami_worker import storage
    from sami_worker.common import open_uri

    out = open_uri(task.output, task.storage)
    manifest = storage.complete_manifest(out, "")
    if manifest is None:
        return None
    log.info("%s: %s is already complete; nothing to do", program, out.uri())
    hook = AFTER_COMPLETE.get(program)
    if hook is not None and os.environ.get("RANK", "0") == "0":
        hook(out, task)
    return manifest.meta


def _prune_training_states(out, task) -> None:
    from sami_worker.train import prune_states

    prune_states(out, task)  # a crash may have come between the manifest and the pruning


# What a program still does for an output found complete (rank 0 only).
AFTER_COMPLETE = {"train": _prune_training_states}


def _delete_prefix(task) -> dict:
    from sami_worker.common import open_uri

    prefix = open_uri(task.prefix, task.storage)
    objects = len(prefix.list())
    prefix.delete_prefix("")
    log.info("deleted %d objects under %s", objects, task.prefix)
    return {"deleted": objects}


def _dist_error() -> type[BaseException]:
    """torch.distributed's error for a lost peer or store, when torch is installed."""
    try:
        from torch.distributed import DistError
    except ImportError:
        return OSError
    return DistError


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    try:
        from torch import OutOfMemoryError
    except ImportError:
        return (MemoryError,)
    return (MemoryError, OutOfMemoryError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sami_worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=list(PROGRAMS))
    parser.add_argument("--task", required=True, type=Path, help="Task JSON file.")
    parser.add_argument(
        "--shard",
        nargs=2,
        type=int,
        metavar=("INDEX", "SHARDS"),
        help="Run shard INDEX (from 0) of SHARDS of a generate task: its slice of the "
        "queries, to its own folder under the task's output (an Indexed Job's pods pass "
        "their completion index).",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    from sami_worker.chat import EndpointUnavailable
    from sami_worker.datasets import DatasetError
    from sami_worker.storage import StorageError, TransientStorageError

    DistError = _dist_error()
    from sami_worker.tasks import TaskError

    try:
        summary = _run_stage(args.stage, args.task, args.shard)
    except (TransientStorageError, EndpointUnavailable, DistError) as err:
        log.error("%s (retryable)", err)
        return _report(args.stage, EXIT_RETRYABLE, error=str(err))
    except (TaskError, DatasetError, StorageError, FileNotFoundError) as err:
        log.error("%s", err)
        return _report(args.stage, EXIT_BAD_INPUT, error=str(err))
    except _out_of_memory_errors() as err:
        # The model or batch does not fit; a retry on the same resources fails the same way.
        message = f"out of memory: {err}".strip()[:2000]
        log.error("%s; use smaller micro-batches, activation checkpointing or more memory", message)
        return _report(args.stage, EXIT_BAD_INPUT, error=message)
    return _report(args.stage, EXIT_OK, summary=summary)


def _report(stage: str, code: int, summary: dict | None = None, error: str | None = None) -> int:
    """Print the result line (rank 0 only) and, in a pod, leave it as the termination
    message."""
    from sami_worker.settings import summary_file

    if os.environ.get("RANK", "0") == "0":
        write_result_line(stage, code, summary, error, summary_file())
    return code


if __name__ == "__main__":
    sys.exit(main())
