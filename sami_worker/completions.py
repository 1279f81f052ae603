"""What a generation/scoring backend takes and returns, shared by both backends, and the one
way a prompt becomes token ids.

`sami_worker.backends` (vLLM, and the choice of backend) and `sami_worker.hf` (transformers)
both import these; neither imports the other's module at load time, so there is no cycle
between them (`backends` imports `hf` only when the transformers backend is opened).

Backends take prompts as token ids. `prompt_token_ids` makes them (chat template or plain
text) for generation, evaluation, the local judge and the local principle writer alike, and
`complete_chat` is "chat template, tokenise, generate" for the one-turn questions the judge and
the writer ask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]  # generated ids, EOS excluded
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    ended_with_eos: bool


class NoChatTemplate(ValueError):
    """The tokenizer has no chat template: a base model, which chat prompts cannot be given."""


class Backend(Protocol):
    tokenizer: Any

    def generate(
        self, prompts: Sequence[Sequence[int]], settings: SamplingSettings, seeds: Sequence[int]
    ) -> list[Completion]: ...

    def score(
        self, sequences: Sequence[Sequence[int]], starts: Sequence[int]
    ) -> list[tuple[float, int]]:
        """(sum of log-probs, token count) of tokens[start:] per sequence."""
        ...

    def close(self) -> None: ...


def prompt_token_ids(tokenizer, prompt: str | Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a prompt: plain text with the tokenizer's special tokens (BOS and the like),
    or chat messages through the chat template with the generation prompt, which holds the
    special tokens already. A template that rejects a system role gets the system message in
    the first user turn. NoChatTemplate when messages meet a tokenizer without a template."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if getattr(tokenizer, "chat_template", None) is None:
        raise NoChatTemplate(f"{tokenizer.name_or_path} has no chat template")
    messages = list(prompt)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # jinja2's TemplateError, raised by the template itself
        if len(messages) < 2 or messages[0]["role"] != "system":
            raise
        system, first, *rest = messages
        merged = {"role": "user", "content": f"{system['content']}\n\n{first['content']}"}
        text = tokenizer.apply_chat_template(
            [merged, *rest], add_generation_prompt=True, tokenize=False
        )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def complete_chat(
    backend: Backend, questions: Sequence[str], settings: SamplingSettings, seeds: Sequence[int]
) -> list[Completion]:
    """One user turn per question: chat template, tokenise, generate. NoChatTemplate for a base
    model; the backend's ValueError for a prompt longer than its context."""
    ids = [prompt_token_ids(backend.tokenizer, [{"role": "user", "content": q}]) for q in questions]
    return backend.generate(ids, settings, seeds)


def response_token_ids(tokenizer, completion: Completion, text: str) -> tuple[list[int], bool]:
    """The generated token ids of the response `text` (the completion cut at a stop marker and
    stripped), and whether they are the generated ones: all of them when their decoding strips
    to `text` (a leading space token included, as generated), else the shortest prefix that
    does (the tokens of a stop marker, and the whitespace before it, left out). Where no prefix
    decodes to `text` (one token spans the cut), the tokenisation of `text` alone, and False.
    Training and evaluation score these ids, so they score what the model generated."""
    ids = list(completion.token_ids)

    def decoded(m: int) -> str:
        return tokenizer.decode(ids[:m], skip_special_tokens=True).strip()

    if decoded(len(ids)) == text:
        return ids, True
    for m in range(len(ids)):
        if decoded(m) == text:
            return ids[:m], True
    return tokenizer(text, add_special_tokens=False)["input_ids"], False
