"""Training step: our SAMI forward/backward vs the reference code's naive full-vocabulary one.

Both sides train SmolLM2-135M-Instruct (float32 on CPU; bfloat16 weights on CUDA) on the same
query block: C = 2, so 4 sequences (prompt about 150 tokens + response about 100, see
benchmarks/data.py), one block per micro-step as the paper runs it. No FSDP: one process,
the plain model, so the comparison isolates how log-probs are computed.

- OURS (sami_worker.train's forward): `SamiScorer` (each distinct prompt once through the
  trunk with its C responses packed behind it, `share_prompts`; final hidden states -> LM head
  on response positions only, in chunks that compute the log-probs and keep the softmax for
  the fused gradient, `lm_head_logprobs`) -> `assemble_matrices` from explicit pairs
  -> `sami_loss` -> backward.
- NAIVE (the reference code's approach): `model(input_ids).logits` over the full vocabulary at
  every position, `.float().log_softmax(-1)`, gather the targets, mask prompt and padding, mean
  per sequence, reshape the flat batch into the (C, C) matrix, the same `sami_loss`, backward.

Timing: one process loads the model once, warms both variants up, then per repetition trains
one step of each variant on the same block (block r % 3 in repetition r), alternating which
goes first; tokens/s = real (non-padding) tokens / seconds of forward + backward. There is no
optimizer step: it is the same for both sides and would only dilute the comparison.

Memory: one process per variant (a peak meter must not see the other variant's allocations),
with the allocator settings of `benchmarks.common.CPU_MALLOC_ENV`. A small warm-up step
allocates the gradient buffers, kept with zero_grad(set_to_none=False) so they count in
neither side's peak; then per repetition (same blocks as the timing)
1. the peak increase of one whole step (forward + backward);
2. the logits path alone: final hidden states computed without grad, then hidden -> log-probs
   -> matrix -> loss -> backward into hidden and the head weight, with its peak increase.
Peak memory is measured by `benchmarks.common.PeakMemory` (see README.md).
On CUDA the timing child also reports model FLOPs for the MFU entry.

LoRA vs full (`lora_vs_full`, training.lora): the real worker, `torchrun --standalone
--nproc_per_node 2 -m sami_worker train`, FSDP2 over 2 processes, on SmolLM2-135M (fp32 on
CPU, bf16 on CUDA) with the same blocks (`benchmarks.data`, "short", one block per process per
step) and AdamW, once with every weight trained and once with `lora: {}` (rank 16, alpha 32,
the 7 default projections), the order of the two alternating over repetitions. Unlike the
comparison above, each step includes the optimizer step, which is where LoRA saves most.
tokens/s is the worker's own per-step figure (all processes together) over steps 2..N of each
run; memory is the largest rank's peak in the worker's train phase (`summary.json`'s `memory`:
the host's resident high-water mark, reset when the phase starts, on CPU; the CUDA
allocator's peak on a GPU), with the frozen or trained weights, gradients and optimizer state
resident. Both runs set glibc to return freed memory at once (`CPU_MALLOC_ENV`), which slows
both alike.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

N_BLOCKS = 3  # repetition r trains on block r % N_BLOCKS, the same block for both variants
VARIANTS = ("naive", "ours")
PEAK_BF16_TFLOPS = {  # dense bf16 peaks from the vendors' data sheets, matched in this order
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}


def naive_mean_logprobs(logits, input_ids, response_mask):
    """The reference code's scoring: a float32 log-softmax over the whole vocabulary at every
    position, then the targets' log-probs, prompt and padding masked, mean per sequence."""
    labels = input_ids.masked_fill(~response_mask, -100)[:, 1:]
    mask = labels != -100
    log_probs = logits[:, :-1].float().log_softmax(-1)
    per_token = log_probs.gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    per_token = per_token.masked_fill(~mask, 0.0)
    return per_token.sum(-1) / mask.sum(-1)


def loss_naive(model, batch, c: int, hidden=None):
    """NAIVE: full logits (from the model, or from given hidden states), flat batch reshaped."""
    from sami_worker.objective import sami_loss

    if hidden is None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    else:
        logits = model.get_output_embeddings()(hidden)
    values = naive_mean_logprobs(logits, batch.input_ids, batch.response_mask)
    return sami_loss(values.view(-1, c, c)).loss


def loss_ours(model, batch, c: int, hidden=None):
    """OURS: SamiScorer's chunked response-only log-probs, matrix from explicit pairs."""
    from sami_worker.logprobs import assemble_matrices, response_logprobs
    from sami_worker.objective import sami_loss
    from sami_worker.train import SamiScorer

    if hidden is None:
        scored = SamiScorer(model)(batch.input_ids, batch.attention_mask, batch.response_mask)
    else:
        head = model.get_output_embeddings()
        scored = response_logprobs(
            hidden, head.weight, batch.input_ids, batch.response_mask, bias=head.bias
        )
    blocks = len(batch.pairs) // (c * c)
    return sami_loss(assemble_matrices(scored.mean, batch.pairs, c, blocks)).loss


class Setup:
    """Model, tokenizer and blocks in one process, and a step of either variant."""

    def __init__(self, device: str):
        import torch

        from benchmarks.data import make_blocks
        from sami_operator.models import ModelSpec
        from sami_worker.hf import load_model, load_tokenizer
        from sami_worker.smollm2 import prepare_smollm2

        torch.manual_seed(0)
        self.device = torch.device(device)
        path = str(prepare_smollm2())
        spec = ModelSpec(uri=path)
        tokenizer = load_tokenizer(path, spec)
        self.pad = tokenizer.pad_token_id
        if self.pad is None:
            self.pad = tokenizer.eos_token_id
        dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.model = load_model(path, spec, dtype=dtype).to(self.device)
        self.model.config.use_cache = False
        with tempfile.TemporaryDirectory() as tmp:
            self.blocks = make_blocks(tokenizer, N_BLOCKS, Path(tmp))

    def batch(self, blocks):
        """`collate` (the worker's) on this device."""
        import dataclasses

        from sami_worker.train import collate

        batch, c = collate(blocks, self.pad)
        fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
        for name in ("input_ids", "attention_mask", "response_mask"):
            fields[name] = fields[name].to(self.device)
        return type(batch)(**fields), c

    def warm_up(self, variant: str) -> None:
        """One step on a tiny block (CPU) or a real one (CUDA, where kernels autotune)."""
        from sami_worker.train import Block

        block = self.blocks[0]
        tiny = Block(tuple(p[:16] for p in block.prompts), tuple(r[:8] for r in block.responses))
        self.step(variant, [block] if self.device.type == "cuda" else [tiny])

    def hidden_states(self, blocks):
        """Final hidden states without grad, as a leaf that wants one (the logits path's input)."""
        import torch

        batch, _ = self.batch(blocks)
        with torch.no_grad():
            hidden = self.model.base_model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask
            ).last_hidden_state
        return hidden.requires_grad_(True)

    def step(self, variant: str, blocks, hidden=None) -> float:
        """Forward + backward of one variant, or of its logits path from `hidden`; the loss."""
        batch, c = self.batch(blocks)
        loss_fn = loss_naive if variant == "naive" else loss_ours
        loss = loss_fn(self.model, batch, c, hidden=hidden)
        loss.backward()
        self.model.zero_grad(set_to_none=False)
        return float(loss.detach())

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()


def timing_child(args) -> dict:
    """Both variants in this process, alternating; tokens/s per repetition."""
    s = Setup(args.device)
    for variant in VARIANTS:
        s.warm_up(variant)
    config = s.model.config
    n_params = sum(p.numel() for p in s.model.parameters())
    out = {v: [] for v in VARIANTS} | {"flops": []}
    out |= {"loss": {v: [] for v in VARIANTS}, "seconds": {v: [] for v in VARIANTS}}
    for rep in range(args.reps):
        block = s.blocks[rep % N_BLOCKS]
        batch, _ = s.batch([block])
        tokens = int(batch.attention_mask.sum())
        # 6 N per token (forward + backward) plus attention scores (PaLM's MFU appendix).
        width = batch.input_ids.shape[1]
        out["flops"].append(
            tokens * (6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * width)
        )
        for variant in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
            s.sync()
            started = time.perf_counter()
            out["loss"][variant].append(s.step(variant, [block]))
            s.sync()
            seconds = time.perf_counter() - started
            out["seconds"][variant].append(seconds)
            out[variant].append(tokens / seconds)
    out["tokens"] = tokens
    out["gpu"] = None
    if s.device.type == "cuda":
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def memory_child(args) -> dict:
    """One variant's peak increases: whole step and logits path, per repetition."""
    from benchmarks.common import PeakMemory

    s = Setup(args.device)
    s.warm_up(args.variant)
    meter = PeakMemory(s.device.type)
    out = {"step_mib": [], "head_mib": []}
    for rep in range(args.reps):
        blocks = [s.blocks[rep % N_BLOCKS]]
        meter.start()
        s.step(args.variant, blocks)
        out["step_mib"].append(meter.stop())
        hidden = s.hidden_states(blocks)
        meter.start()
        s.step(args.variant, blocks, hidden=hidden)
        out["head_mib"].append(meter.stop())
        del hidden
    return out | {"method": meter.method}


def peak_tflops(gpu: str | None) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if gpu and k in gpu), None)


def run(quick: bool, device: str) -> list[dict]:
    from benchmarks.common import CPU_MALLOC_ENV, entry, run_child

    reps = 2 if quick else 3
    dtype = "fp32" if device == "cpu" else "bf16"
    common = ["--reps", str(reps), "--device", device]
    print(f"  training: timing, {reps} rep(s) of both variants", file=sys.stderr)
    t = run_child("training", ["timing", *common])
    memory = {}
    for variant in VARIANTS:
        print(f"  training: peak memory of {variant}, {reps} rep(s)", file=sys.stderr)
        env = CPU_MALLOC_ENV if device == "cpu" else None
        memory[variant] = run_child("training", ["memory", "--variant", variant, *common], env=env)
    gap = max(abs(a - b) for a, b in zip(*t["loss"].values(), strict=True))
    setup = (
        f"SmolLM2-135M {dtype}, 1 block of C=2 (4 sequences, {t['tokens']} tokens in the last "
        f"rep), forward+backward, no optimizer step, both variants alternating in one "
        f"process; their losses differ by at most {gap:.1e}"
    )
    method = f"peak increase over the level before, {memory['ours']['method']}"
    entries = [
        entry(
            f"training step tokens/s: ours vs naive full-vocab logits ({device}, {dtype})",
            t["naive"],
            t["ours"],
            "tokens/s",
            ">= 1.3",
            setup,
        ),
        entry(
            f"training logits-path peak memory: ours vs naive ({device}, {dtype})",
            memory["naive"]["head_mib"],
            memory["ours"]["head_mib"],
            "MiB",
            "<= 0.5",
            "hidden states -> log-probs -> matrix -> loss -> backward (lower is better); " + method,
        ),
        entry(
            f"training step peak memory (forward+backward): ours vs naive ({device}, {dtype})",
            memory["naive"]["step_mib"],
            memory["ours"]["step_mib"],
            "MiB",
            None,
            "includes the trunk's activations, the same on both sides (lower is better); " + method,
        ),
    ]
    if device == "cuda":
        peak = peak_tflops(t["gpu"])
        name = f"training MFU vs bf16 peak ({t['gpu']})"
        if peak is None:
            from benchmarks.common import unmeasured

            entries.append(unmeasured(name, "skipped", "unknown bf16 peak for this GPU"))
        else:
            pairs = zip(t["flops"], t["seconds"]["ours"], strict=True)
            achieved = [flops / seconds / 1e12 for flops, seconds in pairs]
            note = (
                "model FLOPs 6N + attention per real token of the C x C sequences over the OURS "
                "step (prompt sharing does fewer, so this counts useful work); no FSDP"
            )
            entries.append(entry(name, [peak] * len(achieved), achieved, "TFLOP/s", None, note))
    return entries + lora_vs_full(quick, device)


def lora_vs_full(quick: bool, device: str) -> list[dict]:
    """Two entries, LoRA / full: tokens/s of a training step and the largest rank's peak
    memory in training, same model, blocks and processes."""
    import json

    from transformers import AutoTokenizer

    from benchmarks.common import CPU_MALLOC_ENV, entry
    from benchmarks.data import make_records, write_dataset
    from benchmarks.scaling import _Run, _tps
    from sami_worker.smollm2 import prepare_smollm2

    steps, reps = (3, 1) if quick else (4, 2)
    dtype = "fp32" if device == "cpu" else "bf16"
    model_dir = str(prepare_smollm2())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sides = {"full": None, "lora": {}}
    tps = {side: [] for side in sides}
    peak = {side: [] for side in sides}
    trainable = {}
    with tempfile.TemporaryDirectory(prefix="sami-bench-lora-") as tmp:
        workdir = Path(tmp)
        data = write_dataset(make_records(tokenizer, 16, "short"), workdir / "data")
        for rep in range(reps):
            for side in sides if rep % 2 == 0 else list(sides)[::-1]:
                training = {
                    "microBatchQueries": 1,
                    "gradientAccumulation": 1,
                    "precision": dtype,
                    "checkpointEvery": steps + 1,
                    "optimizer": {"name": "adamw", "lr": 1e-6},
                }
                if sides[side] is not None:
                    training["lora"] = sides[side]
                task_doc = {
                    "kind": "train",
                    "model": {"uri": model_dir},
                    "datasets": [str(data)],
                    "iterationSteps": steps,
                    "training": training,
                }
                print(f"  training: {side}, 2 processes, {steps} steps", file=sys.stderr)
                run_ = _Run(task_doc, workdir, f"{side}-{rep}", 2, device, env=CPU_MALLOC_ENV)
                tps[side] += _tps(run_.rows())
                summary = json.loads((run_.output / "summary.json").read_text())
                peak[side].append(max(r["train"] for r in summary["memory"]["ranks"]))
                trainable[side] = summary["trainable_parameters"]
    setup = (
        f"SmolLM2-135M {dtype}, AdamW, 2 processes (FSDP2), 1 block per process per step, "
        f"steps 2..{steps} of {reps} run(s) per side; trainable parameters: full "
        f"{trainable['full']:,}, LoRA {trainable['lora']:,} (rank 16, 7 projections)"
    )
    where = "host resident high-water mark" if device == "cpu" else "CUDA allocated"
    return [
        entry(
            f"LoRA vs full training step tokens/s ({device}, {dtype})",
            tps["full"],
            tps["lora"],
            "tokens/s",
            None,
            "forward + backward + optimizer step, the worker's own figure; " + setup,
        ),
        entry(
            f"LoRA vs full training peak memory per rank ({device}, {dtype})",
            peak["full"],
            peak["lora"],
            "MiB",
            None,
            f"largest rank's train-phase peak ({where}; lower is better), weights, gradients "
            "and optimizer state included; " + setup,
        ),
    ]


def skipped_on_cpu() -> list[dict]:
    from benchmarks.common import unmeasured

    names = [
        "training step tokens/s: ours vs naive full-vocab logits (cuda, bf16)",
        "training logits-path peak memory: ours vs naive (cuda, bf16)",
        "training MFU vs bf16 peak (cuda)",
    ]
    return [unmeasured(n, "skipped", "no CUDA device") for n in names]


if __name__ == "__main__":
    from benchmarks.common import write_json

    parser = argparse.ArgumentParser(description="One training-step measurement (a child).")
    parser.add_argument("mode", choices=["timing", "memory"])
    parser.add_argument("--variant", choices=VARIANTS, help="memory mode: which variant")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    arguments = parser.parse_args()
    child = timing_child if arguments.mode == "timing" else memory_child
    write_json(arguments.out, child(arguments))
