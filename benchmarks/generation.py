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

The prefix cache is reset before every vLLM repetition, so each one prefills from scratch as
the worker does. vLLM and transformers run in separate processes (an idle vLLM engine keeps
worker processes alive); the transformers repetitions are split before and after the vLLM
process so that both sides see the same stretch of a noisy machine.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from benchmarks.common import EXAMPLES

QUERIES = 16
MAX_NEW_TOKENS = 64


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

    def __init__(self, tokenizer, backend=None):
        self.tokenizer, self.backend, self.prompts = tokenizer, backend, []

    def generate(self, prompts, settings, seeds):
        from sami_worker.backends import Completion

        self.prompts += [list(p) for p in prompts]
        if self.backend is not None:
            return self.backend.generate(prompts, settings, seeds)
        return [Completion("", (), "length", False) for _ in prompts]


def transformers_child(args) -> dict:
    """Plain batched greedy `generate` with left padding, `args.reps` times."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sami_worker.common import load_principles, load_task_queries
    from sami_worker.generate import build_records
    from sami_worker.smollm2 import prepare_smollm2

    model_dir = str(prepare_smollm2())
    task = make_task(model_dir, args.dtype, args.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    recorder = PromptRecorder(tokenizer)
    queries = load_task_queries(task.queries, 0, None)
    build_records(task, recorder, queries, load_principles(task.principles, None))
    prompts = recorder.prompts

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    load_s = time.perf_counter() - started
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    @torch.no_grad()
    def generate(batch: list[list[int]], new_tokens: int) -> int:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask.to(args.device),
            max_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
        )
        rows = out[:, width:].tolist()
        return sum(row.index(eos) + 1 if eos in row else len(row) for row in rows)

    generate(prompts[:2], 4)  # warm-up
    tps, tokens = [], []
    for _ in range(args.reps):
        started = time.perf_counter()
        n = generate(prompts, MAX_NEW_TOKENS)
        if args.device == "cuda":
            torch.cuda.synchronize()
        tps.append(n / (time.perf_counter() - started))
        tokens.append(n)
    return {"load_s": load_s, "tps": tps, "tokens": tokens, "prompts": prompts}


def vllm_child(args) -> dict:
    """One engine; per repetition, raw `LLM.generate` and our `build_records`, alternating."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from sami_worker.backends import open_backend
    from sami_worker.common import load_principles, load_task_queries
    from sami_worker.generate import build_records
    from sami_worker.smollm2 import prepare_smollm2

    model_dir = str(prepare_smollm2())
    task = make_task(model_dir, args.dtype, args.device)
    queries = load_task_queries(task.queries, 0, None)
    principles = load_principles(task.principles, None)
    started = time.perf_counter()
    backend = open_backend(
        "vllm", model_dir, task.model, task.generation.engine, seed=task.constitutions.seed
    )
    start_s = time.perf_counter() - started

    # Warm-up through our path with a few tokens; it also captures the token prompts.
    recorder = PromptRecorder(backend.tokenizer, backend)
    short = task.generation.model_copy(update={"max_new_tokens": 4})
    warm = task.model_copy(update={"generation": short})
    build_records(warm, recorder, queries, principles)
    prompts = recorder.prompts
    g = task.generation
    params = SamplingParams(
        max_tokens=g.max_new_tokens, temperature=0.0, top_p=1.0, stop=list(g.stop)
    )
    result = {"start_s": start_s, "raw": [], "ours": [], "raw_tokens": [], "ours_tokens": []}
    for rep in range(args.reps):
        for side in ("raw", "ours") if rep % 2 == 0 else ("ours", "raw"):
            backend.llm.reset_prefix_cache()
            started = time.perf_counter()
            if side == "raw":
                outs = backend.llm.generate(
                    [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
                )
                n = sum(len(o.outputs[0].token_ids) for o in outs)
            else:
                _, stats = build_records(task, backend, queries, principles)
                n = stats["generated_tokens"]
            result[side].append(n / (time.perf_counter() - started))
            result[f"{side}_tokens"].append(n)
    backend.close()
    return {**result, "prompts": prompts}


def run(quick: bool, device: str) -> list[dict]:
    from benchmarks.common import entry, run_child

    reps = 2 if quick else 3
    dtype = "float32" if device == "cpu" else "bfloat16"
    common = ["--device", device, "--dtype", dtype]
    before = math.ceil(reps / 2)
    print(f"  generation: transformers, {before} rep(s)", file=sys.stderr)
    hf = [run_child("generation", ["transformers", "--reps", str(before), *common])]
    print(f"  generation: vLLM engine, {reps} rep(s) of raw and ours", file=sys.stderr)
    vl = run_child("generation", ["vllm", "--reps", str(reps), *common])
    if reps > before:
        print(f"  generation: transformers, {reps - before} rep(s)", file=sys.stderr)
        hf.append(run_child("generation", ["transformers", "--reps", str(reps - before), *common]))
    hf_tps = [x for h in hf for x in h["tps"]]
    tokens = {
        "transformers": sorted({n for h in hf for n in h["tokens"]}),
        "raw vLLM": sorted(set(vl["raw_tokens"])),
        "ours": sorted(set(vl["ours_tokens"])),
    }
    same = "same" if hf[0]["prompts"] == vl["prompts"] else "DIFFERENT"
    setup = (
        f"SmolLM2-135M {dtype}, {len(vl['prompts'])} chat prompts ({same} token ids on both "
        f"sides), {MAX_NEW_TOKENS} new tokens, greedy; generated tokens per rep {tokens}"
    )
    return [
        entry(
            f"generation tokens/s: ours vs transformers generate ({device}, {dtype})",
            hf_tps,
            vl["ours"],
            "tokens/s",
            None,
            setup + "; transformers: one left-padded batch",
        ),
        entry(
            f"generation overhead: ours vs raw vLLM LLM.generate ({device}, {dtype})",
            vl["raw"],
            vl["ours"],
            "tokens/s",
            ">= 0.9",
            setup + "; one shared engine, prefix cache reset before each rep",
        ),
        entry(
            f"generation startup: vLLM engine start vs transformers model load ({device})",
            [h["load_s"] for h in hf],
            [vl["start_s"]],
            "s",
            None,
            "lower is better; excluded from the throughput entries",
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
    parser.add_argument("side", choices=["transformers", "vllm"])
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", required=True)
    arguments = parser.parse_args()
    child = transformers_child if arguments.side == "transformers" else vllm_child
    write_json(arguments.out, child(arguments))
