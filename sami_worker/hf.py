"""transformers: loading models and tokenizers, and the fallback generation/scoring backend.

transformers is imported in this module only. The fallback backend exists for environments
where vLLM cannot run; it is slower (see `make bench`) but produces the same records.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sami_operator.models import ModelSpec
from sami_worker.completions import Completion, SamplingSettings
from sami_worker.logprobs import response_logprobs

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_tokenizer(model_dir: str, model: ModelSpec):
    return AutoTokenizer.from_pretrained(
        model.tokenizer or model_dir,
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
    )


def load_model(model_dir: str, model: ModelSpec, dtype: torch.dtype | None = None):
    torch_dtype = dtype or _DTYPES.get(model.dtype, "auto")
    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        revision=model.revision,
        dtype=torch_dtype,
        trust_remote_code=model.trust_remote_code,
    )


def build_empty_model(model_dir: str, model: ModelSpec, dtype: torch.dtype):
    """The model's architecture with every parameter on the meta device (no memory) and its
    buffers (rotary frequencies) computed on the CPU: FSDP2 shards it before any weight
    exists, so no process ever holds a full copy (accelerate's empty-weights context)."""
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(
        model_dir, revision=model.revision, trust_remote_code=model.trust_remote_code
    )
    with init_empty_weights(include_buffers=False):
        empty = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=model.trust_remote_code
        )
    # The context registers every parameter anew on the meta device, which unties the LM head
    # from the embeddings: tie them again (a no-op for untied models).
    empty.tie_weights()
    return empty


def has_weight_conversions(model) -> bool:
    """Whether transformers stores this architecture under other names or layouts than it holds
    in memory (e.g. Mixtral's experts, fused on load since transformers 5)."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    return bool(get_model_conversion_mapping(model, add_legacy=False))


def to_checkpoint_format(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory tensors (one decoder layer's, say) under the names and layouts a Hugging Face
    checkpoint of this architecture has: what `save_pretrained` writes. Meta tensors work too,
    which gives the names and shapes without any data."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)


def published_dtype(model_dir: str) -> torch.dtype:
    """The dtype a model folder's weights were saved in (float32 when it does not say)."""
    config = AutoConfig.from_pretrained(model_dir)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


class HFBackend:
    """Batched `model.generate` with left padding; scoring by one forward pass per batch."""

    def __init__(self, model_dir: str, model: ModelSpec, seed: int, batch_size: int = 16):
        self.tokenizer = load_tokenizer(model_dir, model)
        self.model = load_model(model_dir, model).eval()
        self.seed = seed
        self.batch_size = batch_size
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], settings: SamplingSettings, seeds: Sequence[int]
    ) -> list[Completion]:
        eos = self.tokenizer.eos_token_id
        out: list[Completion] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            # One seed per batch: transformers samples a batch from one generator.
            torch.manual_seed(seeds[start])
            sampled = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=settings.max_new_tokens,
                do_sample=settings.temperature > 0,
                temperature=settings.temperature if settings.temperature > 0 else None,
                top_p=settings.top_p if settings.temperature > 0 else None,
                top_k=None,
                pad_token_id=self.pad_id,
                stop_strings=list(settings.stop) or None,
                tokenizer=self.tokenizer,
            )
            for row in sampled[:, width:].tolist():
                ended = eos in row
                row = row[: row.index(eos)] if ended else row
                while row and row[-1] == self.pad_id:
                    row.pop()
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                stopped = ended or len(row) < settings.max_new_tokens
                out.append(Completion(text, tuple(row), "stop" if stopped else "length", ended))
        return out

    @torch.no_grad()
    def score(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int]
    ) -> list[tuple[float, int]]:
        """(sum of log-probs, token count) of tokens[start:] per sequence."""
        result: list[tuple[float, int]] = []
        head = self.model.get_output_embeddings()
        for begin in range(0, len(sequences), self.batch_size):
            batch = sequences[begin : begin + self.batch_size]
            width = max(len(s) for s in batch)
            ids = torch.tensor([list(s) + [self.pad_id] * (width - len(s)) for s in batch])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
            response = torch.zeros_like(ids, dtype=torch.bool)
            for n, (seq, start) in enumerate(zip(batch, starts[begin:], strict=False)):
                response[n, start : len(seq)] = True
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            scored = response_logprobs(hidden, head.weight, ids, response, bias=head.bias)
            result.extend(zip(scored.sum.tolist(), scored.count.tolist(), strict=True))
        return result

    def close(self) -> None:
        del self.model
