"""Host memory of the training worker, 1 process vs 2: what sharding saves at load, in training
and in the export (issue: paper-scale training).

The model is a randomly initialised Llama-shaped model of 0.53B parameters (hidden 1536, 20
layers, grouped-query attention, untied embeddings), made from a config and saved in bfloat16
in 256 MB safetensors files, as published models are: no download. Its proportions are the
paper's models': a vocabulary of 8,192 makes the two embedding tables 4.8% of the parameters
(Mistral-7B: 3.6%, Llama-3-70B: 3.0%; SmolLM2's 49,152 at this size would make them 28%, and
the unsharded transients of one table would be measured instead of the decoder layers), and
a 1 GB model in 256 MB files maps at most a quarter of itself while a rank reads its slices
(a 70B model: 30 files of 5 GB). The tokenizer is SmolLM2's (only its special tokens are used:
the training blocks are synthetic token ids below 8,192). Both runs are the real program with
the paper's precision (`precision: bf16`, AdamW), 2 optimizer steps of one short block per
process, and the streamed export: `python -m sami_worker train` and `torchrun --standalone
--nproc_per_node 2 -m sami_worker train`. The worker measures itself (`summary.json`'s
`memory`): per rank and phase, the peak resident memory (the kernel's high-water mark, reset at
each phase) and the resident memory the phase started from.

Entries:
- whole-run peak of the largest 2-process rank / the 1-process peak (target <= 0.65: the
  parameters, gradients and optimizer state halve; the interpreter and libraries do not);
- load peak of the largest 2-process rank / the model's full float32 size (target <= 0.6: no
  rank ever holds the whole model, which is built empty, sharded, then filled slice by slice);
- rank 0's added peak during the export (peak minus where the phase started) / the exported
  model's size (target <= 0.5: tensors are gathered one decoder layer at a time and streamed
  into the safetensors files).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from benchmarks.common import CPU_MALLOC_ENV, entry
from benchmarks.scaling import _Run

PROMPT_TOKENS, RESPONSE_TOKENS, N_BLOCKS, VOCAB = 24, 8, 8, 8192


def build_model(target: Path) -> int:
    """The 0.53B-parameter Llama-shaped model, saved in bfloat16; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sami_worker.smollm2 import prepare_smollm2

    tokenizer = AutoTokenizer.from_pretrained(prepare_smollm2())
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=20,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(target, max_shard_size="256MB")
    tokenizer.save_pretrained(target)
    return count


def write_blocks(target: Path, vocab: int) -> Path:
    """A generation-stage dataset of short blocks (C = 2): the cost under test is the model's
    state, not activations, so the sequences are kept short."""
    from sami_worker import storage
    from sami_worker.records import DATASET_JSONL, encode_jsonl, token_record

    records = []
    for q in range(N_BLOCKS):
        ids = [
            [(q * 97 + c * 31 + i * 7) % (vocab - 10) + 5 for i in range(n)]
            for c, n in (
                (0, PROMPT_TOKENS),
                (1, PROMPT_TOKENS + 2),
            )
        ]
        responses = [
            [(q + c + i) % (vocab - 10) + 5 for i in range(RESPONSE_TOKENS)]
            for c in (
                0,
                1,
            )
        ]
        records.append(token_record(q, ids, responses, [True, False]))
    storage.write_stage_files(
        storage.open_storage(str(target)),
        "",
        {DATASET_JSONL: encode_jsonl(records)},
        stage="generate",
    )
    return target


def run(quick: bool, device: str) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="sami-bench-memory-") as tmp:
        workdir = Path(tmp)
        print("  memory: building a 0.53B Llama-shaped model", file=sys.stderr)
        params = build_model(workdir / "model")
        data = write_blocks(workdir / "data", VOCAB)
        task_doc = {
            "kind": "train",
            "model": {"uri": str(workdir / "model")},
            "datasets": [str(data)],
            "iterationSteps": 2,
            "training": {
                "microBatchQueries": 1,
                "gradientAccumulation": 1,
                "precision": "bf16",
                "checkpointEvery": 100,
                "optimizer": {"name": "adamw", "lr": 1e-6},
            },
        }
        memory = {}
        for tag, nproc in (("one", 1), ("two", 2)):
            print(f"  memory: {nproc} process(es), load + 2 steps + export", file=sys.stderr)
            # glibc returns freed memory at once, so no phase looks small by reusing the last
            # phase's (README: Peak memory on CPU).
            run_ = _Run(task_doc, workdir, tag, nproc, device, env=CPU_MALLOC_ENV)
            run_.rows()
            summary = json.loads((run_.output / "summary.json").read_text())
            memory[nproc] = summary["memory"]["ranks"]

    def host(rank: dict, phase: str) -> float:
        return rank["host"][phase]

    def whole(rank: dict) -> float:
        return max(rank["host"].values())

    fp32_mb = params * 4 / 2**20
    exported_mb = params * 2 / 2**20
    one, two = memory[1], memory[2]
    rank0 = two[0]
    export_added = host(rank0, "export") - rank0["start"]["export"]
    setup = (
        f"{params / 1e9:.2f}B parameters, precision bf16, AdamW, 2 steps; per-rank host peaks "
        f"(MiB) 1 process {json.dumps(one[0]['host'])}, 2 processes "
        f"{[r['host'] for r in two]}"
    )
    return [
        entry(
            "training host memory: peak of one rank, 2 processes vs 1 (cpu)",
            [whole(one[0])],
            [max(whole(r) for r in two)],
            "MiB",
            "<= 0.65",
            "load + 2 training steps + export; " + setup,
        ),
        entry(
            "training load: peak of the largest rank (2 processes) vs the model's float32 size",
            [fp32_mb],
            [max(host(r, "load") for r in two)],
            "MiB",
            "<= 0.6",
            "built on the meta device, sharded, filled slice by slice; includes the "
            "interpreter and libraries (about 0.5 GiB)",
        ),
        entry(
            "training export: rank 0's added peak vs the exported model's size",
            [exported_mb],
            [export_added],
            "MiB",
            "<= 0.5",
            "2 processes; added = export peak - resident memory when the export began; "
            f"exported in bfloat16 ({exported_mb:.0f} MiB)",
        ),
    ]


def skipped_on_cpu() -> list[dict]:
    return []
