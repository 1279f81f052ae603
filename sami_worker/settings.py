"""Environment variables the worker programs read (this module is the only reader).

SAMI_CACHE_DIR    local cache for converted and downloaded models (default ~/.cache/sami)
SAMI_SUMMARY_FILE where to write the stage's result line (set in pods: the termination log)
SAMI_EXPORT_SHARD_BYTES
                  largest safetensors file the training export writes (default 5 GB)
SAMI_API_KEY      API key for OpenAI-compatible endpoints (principle writer, judge); the
                  operator fills it from the Secret named in the spec. OPENAI_API_KEY is
                  used when it is unset.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("SAMI_CACHE_DIR") or Path.home() / ".cache" / "sami")


def api_key() -> str | None:
    return os.environ.get("SAMI_API_KEY") or os.environ.get("OPENAI_API_KEY")


def summary_file() -> str | None:
    """Where a worker writes its one-line JSON result for whoever started it: in a pod, the
    container's termination message (the operator reads it from the pod status, so it needs
    no access to the bucket)."""
    return os.environ.get("SAMI_SUMMARY_FILE") or None


def export_shard_bytes() -> int | None:
    """Largest weights file of an exported model (None: the default); tests lower it to get
    several files from a small model."""
    value = os.environ.get("SAMI_EXPORT_SHARD_BYTES")
    return int(float(value)) if value else None
