"""Data-parallel scaling of the training worker: 1 process vs 2 (FSDP2; gloo on CPU, NCCL on GPU).

Both runs are the real program, `python -m sami_worker train --task TASK` and `torchrun
--standalone --nproc_per_node 2 -m sami_worker train --task TASK`, training SmolLM2-135M-Instruct
(fp32 on CPU, bf16 mixed precision on GPU) on a published generation-stage dataset of "short"
blocks (benchmarks/data.py: 4 sequences of about 130 tokens). Weak scaling: every process
trains one block per optimizer step (microBatchQueries 1, gradientAccumulation 1), so two
processes do twice the work of one per step.

Throughput is the worker's own `tokens_per_s` from the metrics.jsonl it writes (all processes
together), the median over the steps after the first (the first step is warm-up):

    efficiency = tps(2 processes) / (2 x tps(1 process))

On CPU each process is given ONE thread (OMP_NUM_THREADS=1), so one process runs on one core
and two on two: the efficiency measures what sharding costs (parameter all-gathers, gradient
reduce-scatters over gloo, memory bandwidth shared by both cores), not how many cores torch
used. Its baseline (2 x tps1) is the ideal. A control on CPU runs two independent 1-process
trainings at once (no communication at all): their combined tokens/s over 2 x tps1 is the
ceiling the machine itself allows two busy processes (shared caches, memory bandwidth, vCPUs
that are not whole cores, other tenants), to read the FSDP efficiency against.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, entry, unmeasured

N_BLOCKS = 16


class _Run:
    """One launch of the training worker on `nproc` processes (not waited for yet)."""

    def __init__(self, task_doc: dict, workdir: Path, tag: str, nproc: int, device: str, env=None):
        self.output, self.nproc = workdir / f"out-{tag}", nproc
        task = workdir / f"task-{tag}.json"
        task.write_text(json.dumps({**task_doc, "output": str(self.output)}))
        worker = ["-m", "sami_worker", "train", "--task", str(task)]
        if nproc == 1:
            command = [sys.executable, *worker]
        else:
            torchrun = str(Path(sys.executable).parent / "torchrun")
            command = [torchrun, "--standalone", f"--nproc_per_node={nproc}", *worker]
        env = {
            **os.environ,
            **({"OMP_NUM_THREADS": "1"} if device == "cpu" else {}),
            **(env or {}),
        }
        self.log = (workdir / f"log-{tag}.txt").open("w")
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def rows(self) -> list[dict]:
        """Wait for the run; its metrics rows (one per optimizer step)."""
        from sami_worker.train import METRICS_FILE

        code = self.proc.wait(timeout=1200)
        self.log.close()
        if code != 0:
            tail = Path(self.log.name).read_text()[-4000:]
            raise RuntimeError(f"training on {self.nproc} process(es) failed ({code}):\n{tail}")
        lines = (self.output / METRICS_FILE).read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def _tps(rows: list[dict]) -> list[float]:
    return [r["tokens_per_s"] for r in rows[1:]]  # the first step is warm-up


def run(quick: bool, device: str) -> list[dict]:
    import torch
    from transformers import AutoTokenizer

    from benchmarks.data import make_records, write_dataset
    from sami_worker.smollm2 import prepare_smollm2

    backend = "NCCL" if device == "cuda" else "gloo"
    name = f"training scaling 1 -> 2 processes, FSDP2 over {backend} ({device})"
    if device == "cuda" and torch.cuda.device_count() < 2:
        found = torch.cuda.device_count()
        return [unmeasured(name, "skipped", f"needs 2 CUDA devices; found {found}")]

    steps = 3 if quick else 4
    model_dir = str(prepare_smollm2())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory(prefix="sami-bench-scaling-") as tmp:
        workdir = Path(tmp)
        data = write_dataset(make_records(tokenizer, N_BLOCKS, "short"), workdir / "data")
        task_doc = {
            "kind": "train",
            "model": {"uri": model_dir},
            "datasets": [str(data)],
            "iterationSteps": steps,
            "training": {
                "microBatchQueries": 1,
                "gradientAccumulation": 1,
                "precision": "bf16" if device == "cuda" else "fp32",
                "checkpointEvery": steps + 1,
                "optimizer": {"lr": 1e-6},
            },
        }
        print(f"  scaling: 1 process, {steps} steps", file=sys.stderr)
        tps1 = _tps(_Run(task_doc, workdir, "one", 1, device).rows())
        print(f"  scaling: 2 processes (torchrun), {steps} steps", file=sys.stderr)
        tps2 = _tps(_Run(task_doc, workdir, "two", 2, device).rows())
        if device == "cpu":
            print("  scaling: 2 independent 1-process runs at once (control)", file=sys.stderr)
            pair = [_Run(task_doc, workdir, f"alone-{i}", 1, device) for i in range(2)]
            both = [_tps(r.rows()) for r in pair]
    threads = "1 thread per process" if device == "cpu" else "1 GPU per process"
    setup = (
        f"baseline = 2 x tps1 (ideal), tps1 median {statistics.median(tps1):.0f} tokens/s; "
        f"SmolLM2-135M, {threads}, 1 block (4 sequences of ~130 tokens) per process per step, "
        f"median over steps 2..{steps}"
    )
    ideal = [2 * x for x in tps1]
    entries = [entry(name, ideal, tps2, "tokens/s", None, "ratio = efficiency; " + setup)]
    if device == "cpu":
        entries.append(
            entry(
                "scaling ceiling of this machine: 2 independent 1-process runs at once (cpu)",
                ideal,
                [a + b for a, b in zip(*both, strict=True)],
                "tokens/s",
                None,
                "no communication at all: the efficiency the machine itself allows for two "
                "busy processes; read the FSDP efficiency against it; " + setup,
            )
        )
    return entries


def skipped_on_cpu() -> list[dict]:
    name = "training scaling 1 -> 2 GPUs, FSDP2 over NCCL (cuda)"
    return [unmeasured(name, "skipped", "no CUDA device")]
