"""Environment variables the worker programs read (this module is the only reader).

SAMI_CACHE_DIR    local cache for converted and downloaded models (default ~/.cache/sami)
SAMI_SUMMARY_FILE where to write the stage's result line (set in pods: the termination log)
SAMI_EXPORT_SHARD_BYTES
                  largest safetensors file the training export writes (default 5 GB)
SAMI_API_KEY      API key for OpenAI-compatible endpoints (principle writer, judge) that
                  name an apiKeySecret; the operator fills it from that Secret. When it is
                  unset, OPENAI_API_KEY is used for https endpoints only (see
                  sami_worker.chat.api_key_for).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("SAMI_CACHE_DIR") or Path.home() / ".cache" / "sami")


def api_key(*, over_https: bool) -> str | None:
    """The API key for an endpoint that names an apiKeySecret: SAMI_API_KEY, else (only for a
    key that will travel over https) OPENAI_API_KEY."""
    key = os.environ.get("SAMI_API_KEY")
    if not key and over_https:
        key = os.environ.get("OPENAI_API_KEY")
    return key or None


def summary_file() -> str | None:
    """Where a worker writes its one-line JSON result for whoever started it: in a pod, the
    container's termination message (the operator reads it from the pod status, so it needs
    no access to the bucket)."""
    from sami_worker.contract import RESULT_FILE_ENV

    return os.environ.get(RESULT_FILE_ENV) or None


def export_shard_bytes() -> int | None:
    """Largest weights file of an exported model (None: the default); tests lower it to get
    several files from a small model."""
    value = os.environ.get("SAMI_EXPORT_SHARD_BYTES")
    return int(float(value)) if value else None
