"""Plumbing shared by the worker programs: storage from a task, models, principles, queries."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

from sami_operator.models import (
    EngineSpec,
    GenerationSpec,
    ModelSpec,
    Principle,
    PromptFormat,
    QuerySource,
    StorageSpec,
)
from sami_worker import storage
from sami_worker.backends import Backend, open_backend, resolve_model_dir
from sami_worker.completions import NoChatTemplate, prompt_token_ids
from sami_worker.datasets import DatasetError, load_query_sources, parse_principles
from sami_worker.prompts import render_prompt
from sami_worker.settings import cache_dir
from sami_worker.tasks import PrinciplesRef, TaskError

log = logging.getLogger(__name__)

PRINCIPLES_FILE = "principles.json"


def storage_settings(spec: StorageSpec | None) -> storage.StorageSettings:
    if spec is None:
        return storage.StorageSettings()
    return storage.StorageSettings(
        endpoint_url=spec.endpoint_url, region=spec.region, force_path_style=spec.force_path_style
    )


def open_uri(uri: str, spec: StorageSpec | None) -> storage.Storage:
    return storage.open_storage(uri, storage_settings(spec))


def read_uri(uri: str, spec: StorageSpec | None) -> bytes:
    """The bytes of one object or file, named by its full URI."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    return open_uri(parent or ".", spec).read_bytes(name)


def open_model_backend(
    model: ModelSpec,
    generation: GenerationSpec,
    storage_spec: StorageSpec | None,
    seed: int,
    scoring: bool = False,
    engine: EngineSpec | None = None,
) -> Backend:
    """The generation backend (vLLM or transformers) on `model`, fetched first when it lives
    in storage, or streamed from it by vLLM (engine.loadFormat: stream); vLLM with `engine`
    (the task's resolved engine), default generation.engine."""
    engine = generation.engine if engine is None else engine
    streamed = engine.load_format == "stream" and generation.backend == "vllm"
    if streamed and model.uri.startswith("s3://"):
        prepare_streaming(storage_spec)
        model_dir = model.uri
    else:
        model_dir = resolve_model_dir(model.uri, lambda uri: fetch_model(uri, storage_spec))
    return open_backend(generation.backend, model_dir, model, engine, seed=seed, scoring=scoring)


def prepare_streaming(spec: StorageSpec | None) -> None:
    """Point the Run:ai model streamer, which vLLM loads s3:// weights with, at the task's
    S3: its endpoint, addressing style and region, from the environment it reads (the
    credentials it takes from boto3's chain, as storage does)."""
    if spec is None:
        return
    if spec.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = spec.endpoint_url
    if spec.force_path_style:
        os.environ["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] = "0"
    if spec.region:
        os.environ["AWS_REGION"] = os.environ["AWS_DEFAULT_REGION"] = spec.region


def query_prompt_ids(
    model: ModelSpec, task: str, tokenizer, constitution_texts: Sequence[str], query: str
) -> list[list[int]]:
    """Token ids of one query's prompts, one per rendered constitution, in the model's prompt
    format (docs/method.md, 'Generation'); a chat prompt for a model without a chat template
    is bad input that names model.promptFormat."""
    fmt = "chat" if model.prompt_format == PromptFormat.chat else "base"
    prompts = [render_prompt(task, fmt, text, query) for text in constitution_texts]
    try:
        return [prompt_token_ids(tokenizer, p) for p in prompts]
    except NoChatTemplate as err:
        raise TaskError(
            f"model.promptFormat: chat, but {err}; use promptFormat: base for a base model"
        ) from None


def fetch_model(uri: str, spec: StorageSpec | None) -> Path:
    """A model (or checkpoint) folder from s3:// in the local cache, fetched once per machine:
    every rank of a pod, and every pod or stage sharing the cache volume, may call this at once
    (storage.fetch_folder). Verified against the stage manifest when sami wrote the folder."""
    target = cache_dir() / "downloads" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    return storage.fetch_folder(open_uri(uri, spec), target)


def load_principles(ref: PrinciplesRef, spec: StorageSpec | None) -> list[Principle]:
    if ref.inline is not None:
        principles = ref.inline
    elif ref.uri is not None:
        data = storage.read_stage_file(open_uri(ref.uri, spec), "", PRINCIPLES_FILE)
        name = f"{ref.uri.rstrip('/')}/{PRINCIPLES_FILE}"
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DatasetError(f"{name}: not UTF-8 text ({err})") from None
        principles = parse_principles(text, name=name)
    else:
        raise TaskError("principles: set 'inline' or 'uri'")
    if not principles:
        raise TaskError("principles: the list is empty")
    return list(principles)


def load_task_queries(
    sources: QuerySource | list[QuerySource],
    spec: StorageSpec | None,
    offset: int = 0,
    count: int | None = None,
) -> list[str]:
    """A task's queries: one source's, or each listed source's in order, concatenated; then
    `count` of them (none: all) from position `offset` on, a shard's slice."""
    queries = load_query_sources(sources, read_bytes=lambda uri: read_uri(uri, spec))
    end = len(queries) if count is None else offset + count
    if end > len(queries):
        raise TaskError(
            f"query_offset {offset} and query_count {count} reach past the {len(queries)} "
            "queries of the sources"
        )
    return queries[offset:end]


def scratch_dir(stage: str) -> tempfile.TemporaryDirectory:
    """Scratch space on the cache volume (which pods size for it), removed on exit. A process
    that is killed leaves its folder behind, so the folders of processes that are gone are
    removed first: each folder's name carries the process id that made it. Under a folder of
    this host's (a pod's name): a cache volume shared by pods (pods.*.cacheVolume) holds
    other hosts' folders, whose process ids mean nothing here."""
    root = cache_dir() / "scratch" / socket.gethostname()
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(f"sami-{stage}-*"):
        match = re.match(rf"sami-{stage}-(\d+)-", old.name)
        if match and old.is_dir() and not _alive(int(match.group(1))):
            log.info("removing %s, left by a process that is gone", old)
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"sami-{stage}-{os.getpid()}-", dir=root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
