"""Training step: our SAMI forward/backward vs the reference code's naive full-vocabulary one.

Both sides train SmolLM2-135M-Instruct (float32 on CPU; bfloat16 weights on CUDA) on the same
query block: C = 2, so 4 sequences (prompt about 150 tokens + response about 100, see
benchmarks/data.py), one block per micro-step as the paper runs it. No FSDP: one process,
the plain model, so the comparison isolates how log-probs are computed.

- OURS (sami_worker.train's forward): `SamiScorer` (trunk -> final hidden states -> LM head on
  response positions only, in checkpointed chunks) -> `assemble_matrices` from explicit pairs
  -> `sami_loss` -> backward.
- NAIVE (the reference code's approach): `model(input_ids).logits` over the full vocabulary at
  every position, `.float().log_softmax(-1)`, gather the targets, mask prompt and padding, mean
  per sequence, reshape the flat batch into the (C, C) matrix, the same `sami_loss`, backward.

Each (variant, repetition) runs in its own process, alternating which variant goes first:
load the model, one small warm-up step (which also allocates the gradient buffers, kept with
zero_grad(set_to_none=False) so they count in neither side's peak), then
1. one timed step over the block: tokens/s = real (non-padding) tokens / seconds;
2. the peak memory increase of that step (whole forward + backward);
3. the logits path alone: final hidden states computed without grad, then hidden -> log-probs
   -> matrix -> loss -> backward into hidden and the head weight, with its peak increase.
Peak memory is measured by `benchmarks.common.PeakMemory` (see README.md). There is no
optimizer step: it is the same for both sides and would only dilute the comparison.
On CUDA the child also reports model FLOPs/s for the MFU entry.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

N_BLOCKS = 3  # repetition r trains on block r % N_BLOCKS, the same block for both variants
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


def child(args) -> dict:
    """One variant, one repetition, in this process; see the module docstring."""
    import dataclasses

    import torch

    from benchmarks.common import PeakMemory
    from benchmarks.data import make_blocks
    from sami_operator.models import ModelSpec
    from sami_worker.hf import load_model, load_tokenizer
    from sami_worker.smollm2 import prepare_smollm2
    from sami_worker.train import Block, collate

    torch.manual_seed(0)
    device = torch.device(args.device)
    path = str(prepare_smollm2())
    spec = ModelSpec(uri=path)
    tokenizer = load_tokenizer(path, spec)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = load_model(path, spec, dtype=dtype).to(device)
    model.config.use_cache = False
    with tempfile.TemporaryDirectory() as tmp:
        block = make_blocks(tokenizer, N_BLOCKS, Path(tmp))[args.block]

    def on_device(blocks):
        batch, c = collate(blocks, pad)
        moved = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
        for name in ("input_ids", "attention_mask", "response_mask"):
            moved[name] = moved[name].to(device)
        return type(batch)(**moved), c

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    loss_fn = loss_naive if args.variant == "naive" else loss_ours
    tiny = Block(tuple(p[:16] for p in block.prompts), tuple(r[:8] for r in block.responses))
    warm, c = on_device([block] if device.type == "cuda" else [tiny])
    loss_fn(model, warm, c).backward()
    model.zero_grad(set_to_none=False)

    batch, c = on_device([block])
    meter = PeakMemory(device.type)
    meter.start()
    started = time.perf_counter()
    loss = loss_fn(model, batch, c)
    loss.backward()
    sync()
    seconds = time.perf_counter() - started
    step_mib = meter.stop()
    model.zero_grad(set_to_none=False)

    with torch.no_grad():
        hidden = model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
    hidden.requires_grad_(True)
    meter.start()
    loss_fn(model, batch, c, hidden=hidden).backward()
    head_mib = meter.stop()

    tokens = int(batch.attention_mask.sum())
    layers, width = model.config.num_hidden_layers, model.config.hidden_size
    n_params = sum(p.numel() for p in model.parameters())
    # 6 N per token (forward + backward) plus attention scores, as in the PaLM MFU appendix.
    flops = tokens * (6 * n_params + 12 * layers * width * batch.input_ids.shape[1])
    return {
        "tokens": tokens,
        "seconds": seconds,
        "step_mib": step_mib,
        "head_mib": head_mib,
        "memory_method": meter.method,
        "loss": float(loss.detach()),
        "flops": flops,
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
    }


def peak_tflops(gpu: str | None) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if gpu and k in gpu), None)


def run(quick: bool, device: str) -> list[dict]:
    from benchmarks.common import CPU_MALLOC_ENV, entry, run_child

    reps = 2 if quick else 3
    dtype = "fp32" if device == "cpu" else "bf16"
    rows: dict[str, list[dict]] = {"naive": [], "ours": []}
    for r in range(reps):
        for variant in ("naive", "ours") if r % 2 == 0 else ("ours", "naive"):
            args = ["--variant", variant, "--block", str(r % N_BLOCKS), "--device", device]
            row = run_child("training", args, env=CPU_MALLOC_ENV if device == "cpu" else None)
            rows[variant].append(row)
            print(
                f"  training rep {r + 1}/{reps} {variant}: {row['tokens'] / row['seconds']:.0f}"
                f" tokens/s, step +{row['step_mib']:.0f} MiB, logits +{row['head_mib']:.0f} MiB",
                file=sys.stderr,
            )
    naive, ours = rows["naive"], rows["ours"]
    gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(naive, ours, strict=True))
    setup = (
        f"SmolLM2-135M {dtype}, 1 block of C=2 (4 sequences, {ours[0]['tokens']} tokens in "
        f"rep 1), forward+backward, no optimizer step; one process per variant and rep; "
        f"losses of the two sides differ by at most {gap:.1e}"
    )
    method = f"peak increase over the level before, {ours[0]['memory_method']}"
    entries = [
        entry(
            f"training step tokens/s: ours vs naive full-vocab logits ({device}, {dtype})",
            [x["tokens"] / x["seconds"] for x in naive],
            [x["tokens"] / x["seconds"] for x in ours],
            "tokens/s",
            ">= 1.3",
            setup,
        ),
        entry(
            f"training logits-path peak memory: ours vs naive ({device}, {dtype})",
            [x["head_mib"] for x in naive],
            [x["head_mib"] for x in ours],
            "MiB",
            "<= 0.5",
            "hidden states -> log-probs -> matrix -> loss -> backward (lower is better); " + method,
        ),
        entry(
            f"training step peak memory (forward+backward): ours vs naive ({device}, {dtype})",
            [x["step_mib"] for x in naive],
            [x["step_mib"] for x in ours],
            "MiB",
            None,
            "includes the trunk's activations, the same on both sides (lower is better); " + method,
        ),
    ]
    if device == "cuda":
        peak = peak_tflops(ours[0]["gpu"])
        name = f"training MFU vs bf16 peak ({ours[0]['gpu']})"
        if peak is None:
            from benchmarks.common import unmeasured

            entries.append(unmeasured(name, "skipped", "unknown bf16 peak for this GPU"))
        else:
            achieved = [x["flops"] / x["seconds"] / 1e12 for x in ours]
            note = "model FLOPs 6N + attention per token over the OURS step; no FSDP"
            entries.append(entry(name, [peak] * len(achieved), achieved, "TFLOP/s", None, note))
    return entries


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
    parser.add_argument("--variant", choices=["naive", "ours"], required=True)
    parser.add_argument("--block", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    arguments = parser.parse_args()
    write_json(arguments.out, child(arguments))
