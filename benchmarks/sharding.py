"""Sharded generation: a generate stage run by 2 workers side by side (generation.shards 2)
vs by one worker, as `sami run` runs them.

Workload: SmolLM2-135M-Instruct, 32 example dialogue queries x C = 2 constitutions, 64 new
tokens, greedy, vLLM. Each side runs `python -m sami_worker generate` as processes, from
process start to published dataset (engine start, model load from a local folder,
generation, writing the dataset to local storage):

- BASELINE: one worker with the whole task.
- OURS: two workers at once, `--shard 0 2` and `--shard 1 2` of the same task, as an
  Indexed Job's pods run it; its wall time is the slower worker's.

Two entries: the stage's throughput (generated tokens over the stage's wall time, startup
included), and the engines' (the tokens over the generation time each worker reports, the
slowest worker's for the shards). Both sides generate the same tokens, so the ratios are
speed-ups. Generation on CPU is bound by cores: each vLLM engine uses every core it is given,
so on a machine of few cores two engines share them and the ratio says what sharding buys
there; the notes give the core count. On GPUs each shard has its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import entry

QUERIES = 32
MAX_NEW_TOKENS = 64
SHARDS = 2


def write_task(model_dir: str, device: str, out: Path) -> Path:
    """The generation benchmark's task (benchmarks.generation.make_task) over QUERIES queries,
    written to `out`."""
    from benchmarks.generation import make_task
    from sami_worker.tasks import dump_task

    dtype = "float32" if device == "cpu" else "bfloat16"
    task = make_task(model_dir, dtype, device, MAX_NEW_TOKENS)
    queries = task.queries.model_copy(update={"count": QUERIES})
    task = task.model_copy(update={"output": str(out), "queries": queries})
    path = out.with_suffix(".json")
    path.write_text(dump_task(task))
    return path


def workers(task: Path, shards: list[list[str]]) -> float:
    """Run one worker per argument list at once; the wall time until the last one is done."""
    command = [sys.executable, "-m", "sami_worker", "generate", "--task", str(task)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    started = time.perf_counter()
    procs = [
        subprocess.Popen([*command, *extra], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
        for extra in shards
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"a generate worker failed: {err[-2000:]}")
    return time.perf_counter() - started


def stats(folders: list[Path]) -> tuple[int, float]:
    """(generated tokens of all workers, the slowest worker's generation seconds)."""
    found = [json.loads((f / "stats.json").read_text()) for f in folders]
    return sum(s["generated_tokens"] for s in found), max(s["seconds"] for s in found)


def run(quick: bool, device: str) -> list[dict]:
    from sami_worker.smollm2 import prepare_smollm2

    reps = 1 if quick else 3
    model_dir = str(prepare_smollm2())
    stage = {"baseline": [], "ours": []}
    engine = {"baseline": [], "ours": []}
    tokens = set()
    with tempfile.TemporaryDirectory(prefix="sami-bench-shards-") as tmp:
        for rep in range(reps):
            for side in ("baseline", "ours") if rep % 2 == 0 else ("ours", "baseline"):
                print(f"  sharding: rep {rep + 1}/{reps}, {side}", file=sys.stderr)
                out = Path(tmp) / f"{side}-{rep}"
                task = write_task(model_dir, device, out)
                if side == "baseline":
                    wall = workers(task, [[]])
                    folders = [out]
                else:
                    wall = workers(task, [["--shard", str(i), str(SHARDS)] for i in range(SHARDS)])
                    folders = sorted(out.glob("shard-*"))
                generated, seconds = stats(folders)
                tokens.add(generated)
                stage[side].append(generated / wall)
                engine[side].append(generated / seconds)
    cores = os.cpu_count()
    setup = (
        f"SmolLM2-135M on {device}, {cores} cores; {QUERIES} queries x 2 constitutions, "
        f"{MAX_NEW_TOKENS} new tokens, greedy; generated tokens per run {sorted(tokens)}; "
        f"baseline: 1 worker, ours: {SHARDS} workers at once (generation.shards {SHARDS})"
    )
    return [
        entry(
            f"sharded generation: stage tokens/s, {SHARDS} shards vs 1 ({device})",
            stage["baseline"],
            stage["ours"],
            "tokens/s",
            None,
            setup + "; from process start to the published dataset, engine start included",
        ),
        entry(
            f"sharded generation: engine tokens/s, {SHARDS} shards vs 1 ({device})",
            engine["baseline"],
            engine["ours"],
            "tokens/s",
            None,
            setup + "; generation time only, the slowest shard's",
        ),
    ]


def skipped_on_cpu() -> list[dict]:
    from benchmarks.common import unmeasured

    names = [f"sharded generation: {what} tokens/s, {SHARDS} shards vs 1 (cuda)"
             for what in ("stage", "engine")]  # fmt: skip
    return [unmeasured(name, "skipped", "no CUDA device") for name in names]
