"""The generation stage: the model writes its own SAMI training data (docs/method.md,
'Constitutions' and 'Generation').

For every query, sample C constitutions, render one prompt per constitution, generate one
response per prompt, post-process (cut at turn markers, drop empty / identical / debris
pairs), and publish the dataset (one typed record per query: `sami_worker.records`) with its
stats under the stage prefix, manifest last.

Differences from the paper's code: prompts are tokenised once here and the dataset records
the prompt ids and the generated response ids (up to a stop marker), so training scores
precisely what was generated (prompt and response joined as ids, EOS scored when generation
ended with it), not a re-tokenisation of the stripped text.

    python -m sami_worker generate --task task.json

A completed stage is not redone (sami_worker.__main__ checks); an interrupted one is redone
whole.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sami_worker import storage
from sami_worker.backends import (
    Backend,
    SamplingSettings,
    request_seed,
)
from sami_worker.common import (
    load_principles,
    load_task_queries,
    open_model_backend,
    open_uri,
    query_prompt_ids,
)
from sami_worker.completions import response_token_ids
from sami_worker.constitutions import derive_rng, sample_constitutions
from sami_worker.prompts import cut_response, filter_reason
from sami_worker.records import DatasetRecord, constitution_record, write_dataset
from sami_worker.tasks import GenerateTask, TaskError

log = logging.getLogger(__name__)

STATS_FILE = "stats.json"
BATCH_PROMPTS = 256  # prompts per engine call: progress is logged after each


@dataclass(frozen=True)
class PromptItem:
    """One query ready for the engine: its sampled constitutions, their rendered texts, the
    token ids of the prompt made from each, and the request seed of each prompt."""

    query_id: int
    query: str
    constitutions: list
    texts: list[str]
    ids: list[list[int]]
    seeds: list[int]


def sample_items(task: GenerateTask, tokenizer, queries: list[str], principles) -> list[PromptItem]:
    """Sample C constitutions per query and render and tokenise one prompt per constitution
    (deterministic in the task's seed, iteration and query ids)."""
    by_name = {p.name: p for p in principles}
    c = task.constitutions.per_query
    items = []
    for index, query in enumerate(queries):
        query_id = task.query_offset + index
        rng = derive_rng(task.constitutions.seed, task.iteration, query_id)
        constitutions = sample_constitutions(
            principles,
            task.constitutions.mode.value,
            c,
            rng,
            per_constitution=task.constitutions.principles_per_constitution,
        )
        texts = [con.render(by_name) for con in constitutions]
        ids = query_prompt_ids(task.model, task.task.value, tokenizer, texts, query)
        seeds = [
            request_seed(task.constitutions.seed, task.iteration, query_id, j) for j in range(c)
        ]
        items.append(PromptItem(query_id, query, constitutions, texts, ids, seeds))
    return items


def generate_completions(
    backend: Backend, settings: SamplingSettings, items: list[PromptItem]
) -> tuple[list, int, float]:
    """Run every prompt through the engine, BATCH_PROMPTS at a time, logging progress after
    each call; returns (completions in prompt order, generated tokens, seconds)."""
    flat_prompts = [ids for item in items for ids in item.ids]
    seeds = [seed for item in items for seed in item.seeds]
    completions = []
    started = time.monotonic()
    generated_tokens = 0
    for begin in range(0, len(flat_prompts), BATCH_PROMPTS):
        chunk = backend.generate(
            flat_prompts[begin : begin + BATCH_PROMPTS],
            settings,
            seeds[begin : begin + BATCH_PROMPTS],
        )
        completions.extend(chunk)
        generated_tokens += sum(len(x.token_ids) + x.ended_with_eos for x in chunk)
        elapsed = time.monotonic() - started
        log.info(
            "generated %d/%d responses, %.1f tokens/s",
            len(completions),
            len(flat_prompts),
            generated_tokens / max(elapsed, 1e-9),
        )
    return completions, generated_tokens, time.monotonic() - started


def postprocess(
    task: GenerateTask,
    tokenizer,
    items: list[PromptItem],
    completions: list,
    generated_tokens: int,
    elapsed: float,
) -> tuple[list[DatasetRecord], dict]:
    """Cut each response at turn markers, drop the queries the filters reject, and build the
    dataset records; returns (kept records, stats)."""
    g = task.generation
    c = task.constitutions.per_query
    dropped: Counter[str] = Counter()
    records = []
    retokenized = 0
    for n, item in enumerate(items):
        outs = completions[n * c : (n + 1) * c]
        responses = [cut_response(o.text, g.stop) for o in outs]
        reason = filter_reason(responses, g.filters.debris_markers)
        if reason == "empty" and not g.filters.drop_empty:
            reason = None
        if reason == "identical" and not g.filters.drop_identical:
            reason = None
        if reason is not None:
            dropped[reason] += 1
            continue
        # The stored response ids are the generated ones (completions.response_token_ids);
        # EOS is kept apart (ended_with_eos) and scored in training when the model emitted it.
        kept = [response_token_ids(tokenizer, o, r) for o, r in zip(outs, responses, strict=True)]
        response_ids = [ids for ids, _ in kept]
        retokenized += sum(not generated for _, generated in kept)
        records.append(
            DatasetRecord(
                query_id=item.query_id,
                query=item.query,
                constitutions=[constitution_record(k) for k in item.constitutions],
                constitution_texts=item.texts,
                prompt_token_ids=item.ids,
                responses=responses,
                response_token_ids=response_ids,
                response_tokens=[len(r) for r in response_ids],
                finish_reasons=[o.finish_reason for o in outs],
                ended_with_eos=[
                    o.ended_with_eos and r == o.text.strip()
                    for o, r in zip(outs, responses, strict=True)
                ],
            )
        )
    kept_tokens = [t for r in records for t in r.response_tokens]
    stats = {
        "queries": len(items),
        "kept": len(records),
        "dropped": {reason: dropped.get(reason, 0) for reason in ("empty", "identical", "debris")},
        "responses_generated": len(completions),
        "mean_response_tokens": sum(kept_tokens) / len(kept_tokens) if kept_tokens else 0.0,
        # Kept responses whose generated ids could not be cut at their stop marker (one token
        # spanned it), stored as their text's own tokenisation instead.
        "retokenized_responses": retokenized,
        "generated_tokens": generated_tokens,
        "seconds": round(elapsed, 3),
        "tokens_per_second": generated_tokens / elapsed if elapsed > 0 else 0.0,
        "backend": g.backend,
    }
    return records, stats


def build_records(task: GenerateTask, backend: Backend, queries: list[str], principles):
    """Sample, generate and post-process; returns (kept records, stats)."""
    g = task.generation
    items = sample_items(task, backend.tokenizer, queries, principles)
    settings = SamplingSettings(g.max_new_tokens, g.temperature, g.top_p, tuple(g.stop))
    completions, generated_tokens, elapsed = generate_completions(backend, settings, items)
    return postprocess(task, backend.tokenizer, items, completions, generated_tokens, elapsed)


def run(task: GenerateTask) -> dict:
    out = open_uri(task.output, task.storage)
    principles = load_principles(task.principles, task.storage)
    queries = load_task_queries(task.queries, task.storage, task.query_offset, task.query_count)
    if not queries:
        raise TaskError(f"queries: the source yields no queries ({task.queries.uri})")
    backend = open_model_backend(
        task.model, task.generation, task.storage, seed=task.constitutions.seed, engine=task.engine
    )
    try:
        records, stats = build_records(task, backend, queries, principles)
    finally:
        backend.close()
    # A shard (query_count set) may keep none of its slice: the others may keep plenty, as
    # one worker over all the queries would; training says so if nothing is kept anywhere.
    if not records and task.query_count is None:
        raise TaskError(f"every query was dropped by the filters: {stats['dropped']}")
    with tempfile.TemporaryDirectory(prefix="sami-generate-") as tmp:
        write_dataset(records, Path(tmp), task.output_format)
        (Path(tmp) / STATS_FILE).write_text(json.dumps(stats, indent=2))
        storage.upload_stage(out, Path(tmp), "", stage="generate", meta=stats)
    log.info(
        "published %d of %d queries to %s (%.1f tokens/s)",
        stats["kept"],
        stats["queries"],
        out.uri(),
        stats["tokens_per_second"],
    )
    return stats
