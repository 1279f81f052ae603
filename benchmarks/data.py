"""Benchmark inputs built from the project's example data with the worker's own prompt code.

Training blocks are what a generation stage would publish: C = 2 constitutions per query,
prompts rendered by `render_prompt` and tokenised by `prompt_token_ids` (chat template), and
token-id responses, the first of each block ending with EOS. Responses are other example posts,
not generated text: the content does not change the cost, only the lengths do.

- "long" (the training-step comparison): TL;DR summarisation prompts of about 150 tokens (the
  post cut to its first 70 tokens) with 90-125-token responses: 4 sequences of about 250.
- "short" (the scaling runs): dialogue prompts, about 90 tokens, with 40-token responses.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from benchmarks.common import EXAMPLES
from sami_operator.models import Principle
from sami_worker.completions import prompt_token_ids
from sami_worker.constitutions import derive_rng, sample_constitutions
from sami_worker.prompts import render_prompt
from sami_worker.records import DATASET_JSONL, DatasetRecord, encode_jsonl, token_record

C = 2
LONG_POST_TOKENS = 70
SHORT_RESPONSE_TOKENS = 40


def principles(name: str) -> list[dict]:
    """A principle file from examples/principles as plain dicts (for task documents)."""
    return yaml.safe_load((EXAMPLES / "principles" / f"{name}.yaml").read_text())


def _lines(name: str) -> list[dict]:
    text = (EXAMPLES / "data" / f"{name}.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def make_records(tokenizer, n: int, kind: str = "long") -> list[DatasetRecord]:
    """n dataset records (the generation stage's format) of C = 2 prompts and responses."""
    posts = [row["post"] for row in _lines("posts-train")]
    if kind == "long":
        task = "summarization"
        queries = [
            tokenizer.decode(tokenizer(p, add_special_tokens=False)["input_ids"][:LONG_POST_TOKENS])
            for p in posts
        ]
        chosen = principles("concise-comprehensive")
    else:
        task, queries = "dialogue", [row["query"] for row in _lines("dialogue-train")]
        chosen = principles("helpful-harmless")
    models = [Principle.model_validate(p) for p in chosen]
    by_name = {p.name: p for p in models}
    records = []
    for b in range(n):
        query = queries[b % len(queries)]
        constitutions = sample_constitutions(models, "pair", C, derive_rng(0, 1, b))
        prompts = [
            prompt_token_ids(tokenizer, render_prompt(task, "chat", k.render(by_name), query))
            for k in constitutions
        ]
        responses = []
        for j in range(C):
            ids = tokenizer(posts[(b + 1 + j) % len(posts)], add_special_tokens=False)["input_ids"]
            responses.append(ids if kind == "long" else ids[:SHORT_RESPONSE_TOKENS])
        records.append(token_record(b, prompts, responses, [j == 0 for j in range(C)]))
    return records


def write_dataset(records: list[DatasetRecord], directory: Path) -> Path:
    """Publish records as a complete generation stage (dataset and manifest) in a folder."""
    from sami_worker import storage

    stage = storage.open_storage(str(directory))
    storage.write_stage_files(stage, "", {DATASET_JSONL: encode_jsonl(records)}, stage="generate")
    return directory


def make_blocks(tokenizer, n: int, directory: Path, kind: str = "long"):
    """Blocks exactly as the training worker reads them (`read_blocks`: EOS appended)."""
    from sami_worker.train import read_blocks

    write_dataset(make_records(tokenizer, n, kind), directory)
    return read_blocks(directory, tokenizer.eos_token_id)
