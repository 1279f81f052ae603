"""What a generation/scoring backend takes and returns, shared by both backends.

`sami_worker.backends` (vLLM, and the choice of backend) and `sami_worker.hf` (transformers)
both import these; neither imports the other's module at load time, so there is no cycle
between them (`backends` imports `hf` only when the transformers backend is opened).
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
