"""Worker programs: `python -m sami_worker <stage> --task TASK.json`.

Stages: write-principles, generate, train (under torchrun for several processes), evaluate,
and score; delete-prefix empties a deleted run's storage prefix. The same programs run in
Kubernetes pods and as local processes under `sami run`; they do not know which started them.

Exit codes, so a launcher's failure policy can tell failures apart:
    0   done (or already done: a completed stage is not redone)
    1   unexpected error (a bug; the traceback is printed)
    65  bad task or input: invalid task file, missing dataset or model, bad credentials,
        empty query set, out of memory. Retrying cannot help (sysexits EX_DATAERR).
    75  transient failure: storage or a chat endpoint (judge, principle writer) unreachable
        or failing (429, 5xx) after retries, a peer died. Retrying may help (sysexits EX_TEMPFAIL).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

STAGES = ["write-principles", "generate", "train", "evaluate", "score", "delete-prefix"]
EXIT_OK = 0
EXIT_BUG = 1
EXIT_BAD_INPUT = 65
EXIT_RETRYABLE = 75

log = logging.getLogger("sami_worker")


def _run_stage(stage: str, task_path: Path) -> dict:
    from sami_worker.tasks import load_task

    task = load_task(task_path, stage)
    if stage == "generate":
        from sami_worker import generate

        return generate.run(task)
    if stage == "score":
        from sami_worker import score

        return score.run(task)
    if stage == "evaluate":
        from sami_worker import evaluate

        return evaluate.run(task)
    if stage == "train":
        from sami_worker import train

        return train.run(task)
    if stage == "delete-prefix":
        from sami_worker.common import open_uri

        prefix = open_uri(task.prefix, task.storage)
        objects = len(prefix.list())
        prefix.delete_prefix("")
        log.info("deleted %d objects under %s", objects, task.prefix)
        return {"deleted": objects}
    from sami_worker import principle_writer

    return principle_writer.run(task)


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
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--task", required=True, type=Path, help="Task JSON file.")
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
        summary = _run_stage(args.stage, args.task)
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


# The Kubernetes termination message holds at most 4096 bytes.
SUMMARY_LIMIT = 4000


def _report(stage: str, code: int, summary: dict | None = None, error: str | None = None) -> int:
    """Print the result line (rank 0 only) and, in a pod, leave it as the termination
    message."""
    from sami_worker.settings import summary_file

    if os.environ.get("RANK", "0") != "0":
        return code
    line = json.dumps({"stage": stage, "exit_code": code, "summary": summary, "error": error})
    if len(line) > SUMMARY_LIMIT:
        line = json.dumps(
            {
                "stage": stage,
                "exit_code": code,
                "error": (error or "")[:2000],
                "summary": None,
                "truncated": True,
            }
        )
    print(line)
    path = summary_file()
    if path:
        with open(path, "w") as f:
            f.write(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
