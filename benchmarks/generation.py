"""Generation throughput: our worker's path vs raw vLLM vs plain transformers `generate`.

Workload: SmolLM2-135M-Instruct, 16 example dialogue queries x C = 2 constitutions = 32
prompts rendered by the worker (`render_prompt` + the chat template), 64 new tokens, greedy.
float32 on CPU (transformers' bfloat16 generate is several times slower than float32 on CPU,
so a bf16 baseline would flatter us), bfloat16 on CUDA. Tokens/s counts generated tokens,
EOS included, over wall time.

- OURS: `sami_worker.generate.build_records` on a `GenerateTask` with a `VLLMBackend`, i.e. the
  worker's real path (constitution sampling, prompt rendering and tokenisation, generation,
  cutting, filtering, re-tokenising the responses) minus process start, model download and
  upload.
- RAW vLLM: `LLM.generate` on the same token prompts (captured from our path) with one plain
  `SamplingParams` (same max tokens, greedy, same stop strings), on the SAME engine as OURS, so
  the engine's start is excluded from both; it is reported as its own entry.
- TRANSFORMERS: `AutoModelForCausalLM.generate` on the same token prompts as one left-padded
  batch of 32, written here (not our `HFBackend`).

All three run in one child process, one of each per repetition, the order rotating from
repetition to repetition so that a noisy machine's load hits all three alike. vLLM runs its
engine in child processes and leaves this process's torch threads alone (checked: 2 before
and after on the 2-core machine); between its calls the idle engine still polls, measured at
about 0.08 of a core, which the transformers side shares (that entry has no target). The
prefix cache is reset before every vLLM call, so each one prefills from scratch as a fresh
worker does. A small warm-up precedes the repetitions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks.common import EXAMPLES

QUERIES = 16
MAX_NEW_TOKENS = 64
SIDES = ("raw", "ours", "transformers")


def make_task(model_dir: str, dtype: str, device: str, max_new_tokens: int = MAX_NEW_TOKENS):
    from benchmarks.data import principles
    from sami_worker.tasks import GenerateTask

    engine = {"gpuMemoryUtilization": 0.3, "enforceEager": device == "cpu"}
    return GenerateTask.model_validate(
        {
            "output": "unused",
            "model": {"uri": model_dir, "dtype": dtype},
            "principles": {"inline": principles("helpful-harmless")},
            "queries": {"uri": str(EXAMPLES / "data" / "dialogue-train.jsonl"), "count": QUERIES},
            "generation": {
                "backend": "vllm",
                "maxNewTokens": max_new_tokens,
                "temperature": 0.0,
                "engine": engine,
            },
        }
    )


class PromptRecorder:
    """A backend wrapper that records the token prompts `build_records` sends."""

    def __init__(self, backend):
        self.tokenizer, self.backend, self.prompts = backend.tokenizer, backend, []

    def generate(self, prompts, settings, seeds):
        self.prompts += [list(p) for p in prompts]
        return self.backend.generate(prompts, settings, seeds)


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad: int, eos: int) -> int:
    """Plain batched greedy `generate` with left padding; returns the generated tokens (EOS
    counted, the padding after it not)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
        )
    rows = out[:, width:].tolist()
    return sum(row.index(eos) + 1 if eos in row else len(row) for row in rows)


def child(args) -> dict:
    """Start the engine and load the transformers model (both timed), then `args.reps`
    repetitions of raw vLLM, ours and transformers in rotating order."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from sami_worker.backends import open_backend
    from sami_worker.common import load_principles, load_task_queries
    from sami_worker.generate import build_records
    from sami_worker.smollm2 import prepare_smollm2

    model_dir = str(prepare_smollm2())
    task = make_task(model_dir, args.dtype, args.device)
    queries = load_task_queries(task.queries, None)
    principles = load_principles(task.principles, None)
    started = time.perf_counter()
    backend = open_backend(
        "vllm", model_dir, task.model, task.generation.engine, seed=task.constitutions.seed
    )
    start_s = time.perf_counter() - started
    started = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    hf = hf.to(args.device).eval()
    load_s = time.perf_counter() - started

    # Warm-up of all three with a few tokens; our path also yields the token prompts.
    recorder = PromptRecorder(backend)
    short = task.generation.model_copy(update={"max_new_tokens": 4})
    build_records(task.model_copy(update={"generation": short}), recorder, queries, principles)
    prompts = recorder.prompts
    g, tokenizer = task.generation, backend.tokenizer
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    hf_generate(hf, prompts[:2], 4, pad, eos)
    params = SamplingParams(
        max_tokens=g.max_new_tokens, temperature=0.0, top_p=1.0, stop=list(g.stop)
    )
    tokens_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    backend.llm.generate(tokens_prompts[:2], params, use_tqdm=False)

    result = {side: [] for side in SIDES} | {f"{side}_tokens": [] for side in SIDES}
    for rep in range(args.reps):
        for side in SIDES[rep % 3 :] + SIDES[: rep % 3]:
            backend.llm.reset_prefix_cache()
            started = time.perf_counter()
            if side == "raw":
                outs = backend.llm.generate(tokens_prompts, params, use_tqdm=False)
                n = sum(len(o.outputs[0].token_ids) for o in outs)
            elif side == "ours":
                n = build_records(task, backend, queries, principles)[1]["generated_tokens"]
            else:
                n = hf_generate(hf, prompts, g.max_new_tokens, pad, eos)
                if args.device == "cuda":
                    torch.cuda.synchronize()
            result[side].append(n / (time.perf_counter() - started))
            result[f"{side}_tokens"].append(n)
            print(f"  generation rep {rep + 1} {side}: {result[side][-1]:.0f} tokens/s", flush=True)
    backend.close()
    return {**result, "start_s": start_s, "load_s": load_s, "prompts": len(prompts)}


def run(quick: bool, device: str) -> list[dict]:
    from benchmarks.common import entry, run_child

    reps = 2 if quick else 3
    dtype = "float32" if device == "cpu" else "bfloat16"
    print(f"  generation: {reps} rep(s) of raw vLLM, ours, transformers", file=sys.stderr)
    r = run_child("generation", ["--reps", str(reps), "--device", device, "--dtype", dtype])
    tokens = {side: sorted(set(r[f"{side}_tokens"])) for side in SIDES}
    setup = (
        f"SmolLM2-135M {dtype}, {r['prompts']} chat prompts (the same token ids on every side), "
        f"{MAX_NEW_TOKENS} new tokens, greedy; generated tokens per rep {tokens}"
    )
    return [
        entry(
            f"generation tokens/s: ours vs transformers generate ({device}, {dtype})",
            r["transformers"],
            r["ours"],
            "tokens/s",
            None,
            setup + "; transformers: one left-padded batch",
        ),
        entry(
            f"generation overhead: ours vs raw vLLM LLM.generate ({device}, {dtype})",
            r["raw"],
            r["ours"],
            "tokens/s",
            ">= 0.9",
            setup + "; one shared engine, prefix cache reset before each call",
        ),
        entry(
            f"generation startup: vLLM engine start vs transformers model load ({device})",
            [r["load_s"]],
            [r["start_s"]],
            "s",
            None,
            "lower is better; once per run; excluded from the throughput entries",
        ),
    ]


def skipped_on_cpu() -> list[dict]:
    from benchmarks.common import unmeasured

    names = [
        "generation tokens/s: ours vs transformers generate (cuda, bfloat16)",
        "generation overhead: ours vs raw vLLM LLM.generate (cuda, bfloat16)",
    ]
    return [unmeasured(n, "skipped", "no CUDA device") for n in names]


if __name__ == "__main__":
    from benchmarks.common import write_json

    parser = argparse.ArgumentParser(description="One generation measurement (a child).")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", required=True)
    arguments = parser.parse_args()
    write_json(arguments.out, child(arguments))
