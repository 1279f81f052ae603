"""Where a run's outputs live in storage, in one place (docs/architecture.md, 'Storage').

Everything a run writes is under its run prefix, <storage uri>/<run_key>; under it each stage
writes to its own prefix, complete once its manifest is there:

    principles/                the principles stage (principles.writer)
    reference/                 the reference model's evaluation (evaluation.judge.reference)
    iterations/<t>/<stage>/    generate, train and evaluate of iteration t (evaluate-0: the
                               base model)
    iterations/<t>/generate/shard-<i>-of-<n>/   with generation.shards n > 1: each shard's
                               dataset, with its own manifest (none for the folder above)
    iterations/<t>/train/checkpoint/   the Hugging Face model trained in iteration t
    iterations/<t>/train/adapter/      with training.lora: its adapter alone (peft's format)

run_key is relative to the storage URI, the other keys to the run prefix. The planner joins
them to it for the tasks it writes, the report parses them back from a listing. Under its own
prefix a worker program lays out its files itself (the train stage's checkpoint/ and state/:
sami_worker/train.py); CHECKPOINT names the one that other stages and the report read.

Pure (no I/O, nothing of the project imported), and in sami_worker so that both sides can
import it, as with contract.py: the operator may import the worker's light modules, the worker
nothing of the operator's but its API models.
"""

from __future__ import annotations

import re

PRINCIPLES = "principles"
REFERENCE = "reference"
ITERATIONS = "iterations"
CHECKPOINT = "checkpoint"  # under the train stage's prefix
ADAPTER = "adapter"  # beside it, with training.lora: the adapter alone, in peft's format

_STAGE_KEY = re.compile(rf"{ITERATIONS}/(\d+)/([a-z]+)")


def namespace_key(namespace: str) -> str:
    """The part of a storage URI that holds one namespace's runs: <namespace>."""
    return namespace


def run_key(namespace: str, name: str, uid: str) -> str:
    """A run's prefix, relative to its storage URI: <namespace>/<name>/<uid>."""
    return f"{namespace_key(namespace)}/{name}/{uid}"


def stage_key(name: str, iteration: int) -> str:
    """The prefix of an iteration's stage (generate, train or evaluate)."""
    return f"{ITERATIONS}/{iteration}/{name}"


def shard_key(index: int, shards: int) -> str:
    """A shard's folder under its stage's prefix (generation.shards)."""
    return f"shard-{index:05d}-of-{shards:05d}"


def checkpoint_key(iteration: int) -> str:
    """The Hugging Face model trained in an iteration."""
    return f"{stage_key('train', iteration)}/{CHECKPOINT}"


def parse_stage_key(key: str) -> tuple[str, int] | None:
    """(stage name, iteration) of an iteration's stage prefix (stage_key's inverse); None for
    any other key, a checkpoint's or a file's among them."""
    match = _STAGE_KEY.fullmatch(key)
    return (match[2], int(match[1])) if match else None
