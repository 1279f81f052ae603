"""The evaluation stage: how much a model's responses reveal their constitution (SAMI.md,
Metrics), on held-out queries.

For each held-out query, the model writes one response under each of the K evaluation
constitutions (fixed, unshuffled: for two principles both kept, both negated, each negated
alone). Every response is then scored under every constitution's prompt (the training
prompt), giving per query a K x K matrix of mean and of summed response log-probs, from which:

- the InfoNCE MI lower bound, log K - loss_col (mean log-probs, as in training), at most log K;
- the paper's plug-in MI (summed log-probs; the number the paper plots, not bounded by log K);
- the mean response length in tokens;

each as a mean over queries with its standard error. Held-out principles (never trained on)
get the same metrics, reported apart. Win rates from an LLM judge have their place in the
metrics (`winRates`) and are filled by the judge stage.

    python -m sami_worker evaluate --task task.json
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path

import torch

from sami_operator.models import (
    ConstitutionMode,
    Estimate,
    Metrics,
    Principle,
    PromptFormat,
)
from sami_worker import storage
from sami_worker.backends import (
    Backend,
    SamplingSettings,
    open_backend,
    request_seed,
    resolve_model_dir,
)
from sami_worker.common import fetch_model, load_principles, load_task_queries, open_uri
from sami_worker.constitutions import Constitution, derive_rng, evaluation_constitutions
from sami_worker.generate import constitution_record, prompt_token_ids
from sami_worker.logprobs import assemble_matrices, block_pairs
from sami_worker.objective import mean_and_stderr, plugin_mi, sami_loss
from sami_worker.prompts import cut_response, render_prompt
from sami_worker.tasks import EvaluateTask, TaskError

log = logging.getLogger(__name__)

RESPONSES_FILE = "responses.jsonl"
METRICS_FILE = "metrics.json"


def constitutions_for(task: EvaluateTask, principles: list[Principle], query_id: int):
    """The K evaluation constitutions of one query."""
    pool = principles
    if task.constitutions.mode == ConstitutionMode.diverse:
        rng = derive_rng(task.constitutions.seed, 0, query_id, stream="evaluation")
        pool = rng.sample(
            principles, min(len(principles), task.constitutions.principles_per_constitution)
        )
    k = task.evaluation.constitutions
    return evaluation_constitutions(pool, k if k in (2, 2 ** len(pool)) else 2)


def estimate(values) -> Estimate:
    mean, stderr = mean_and_stderr(values)
    return Estimate(value=mean, stderr=None if math.isnan(stderr) else stderr)


def evaluate_principles(
    task: EvaluateTask, backend: Backend, queries: list[str], principles: list[Principle]
) -> tuple[Metrics, list[dict]]:
    """Generate under each evaluation constitution, score every (constitution, response)
    pair, and reduce to the metrics."""
    tok = backend.tokenizer
    by_name = {p.name: p for p in principles}
    fmt = "chat" if task.model.prompt_format == PromptFormat.chat else "base"
    items: list[tuple[list[Constitution], list[list[int]]]] = []
    for query_id, query in enumerate(queries):
        constitutions = constitutions_for(task, principles, query_id)
        prompts = [
            render_prompt(task.task.value, fmt, c.render(by_name), query) for c in constitutions
        ]
        items.append((constitutions, [prompt_token_ids(tok, p) for p in prompts]))
    k = len(items[0][0])

    g = task.generation
    max_new = task.evaluation.max_new_tokens or g.max_new_tokens
    settings = SamplingSettings(max_new, g.temperature, g.top_p, tuple(g.stop))
    flat = [ids for _, prompt_ids in items for ids in prompt_ids]
    seeds = [request_seed("evaluate", task.iteration, n) for n in range(len(flat))]
    completions = backend.generate(flat, settings, seeds)

    texts, scored_ids = [], []
    for completion in completions:
        text = cut_response(completion.text, g.stop)
        ids = tok(text, add_special_tokens=False)["input_ids"] if text else []
        # A response that ended (EOS, or an immediate new turn) is scored with its EOS, as
        # in training; an empty one is just the EOS.
        if completion.ended_with_eos or not ids:
            ids = [*ids, tok.eos_token_id]
        texts.append(text)
        scored_ids.append(ids)

    pairs = block_pairs(k, len(items))
    sequences, starts = [], []
    for i, j in pairs:
        prompt = flat[i]
        sequences.append(prompt + scored_ids[j])
        starts.append(len(prompt))
    scores = backend.score(sequences, starts)
    sums = torch.tensor([s for s, _ in scores], dtype=torch.float64)
    counts = torch.tensor([c for _, c in scores], dtype=torch.float64)
    mean_matrices = assemble_matrices(sums / counts, pairs, k, len(items))
    sum_matrices = assemble_matrices(sums, pairs, k, len(items))

    bounds = sami_loss(mean_matrices).block_mi_lower_bound
    plug_in = plugin_mi(sum_matrices)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) if t else 0 for t in texts]
    per_query_length = [sum(lengths[n * k : (n + 1) * k]) / k for n in range(len(items))]
    metrics = Metrics(
        mi_lower_bound=estimate(bounds.tolist()),
        plug_in_mi=estimate(plug_in.tolist()),
        mean_response_tokens=estimate(per_query_length),
    )
    records = [
        {
            "query": queries[n],
            "constitutions": [constitution_record(c) for c in constitutions],
            "responses": texts[n * k : (n + 1) * k],
            "response_tokens": lengths[n * k : (n + 1) * k],
            "mean_logprobs": mean_matrices[n].tolist(),
            "sum_logprobs": sum_matrices[n].tolist(),
        }
        for n, (constitutions, _) in enumerate(items)
    ]
    return metrics, records


def run(task: EvaluateTask) -> dict:
    out = open_uri(task.output, task.storage)
    if storage.is_complete(out, ""):
        log.info("evaluation at %s is already complete", out.uri())
        return storage.read_manifest(out, "").meta
    principles = load_principles(task.principles, task.storage)
    queries = load_task_queries(task.queries, 0, task.storage)
    if not queries:
        raise TaskError("queries: the evaluation source yields no queries")
    model_dir = resolve_model_dir(task.model.uri, lambda uri: fetch_model(uri, task.storage))
    # One engine for generating and scoring; scoring reads prompt log-probs, which vLLM does
    # not compute for prefix-cached positions, so this engine runs without the cache.
    backend = open_backend(
        task.generation.backend,
        model_dir,
        task.model,
        task.generation.engine,
        seed=0,
        scoring=True,
    )
    try:
        metrics, records = evaluate_principles(task, backend, queries, principles)
        held_out, held_records = None, []
        if task.held_out:
            held_out, held_records = evaluate_principles(task, backend, queries, task.held_out)
    finally:
        backend.close()
    meta = {
        "iteration": task.iteration,
        "metrics": metrics.to_api(),
        "heldOutMetrics": held_out.to_api() if held_out else None,
    }
    log.info(
        "iteration %d: MI lower bound %.4f (plug-in MI %.3f), %.1f response tokens",
        task.iteration,
        metrics.mi_lower_bound.value,
        metrics.plug_in_mi.value,
        metrics.mean_response_tokens.value,
    )
    with tempfile.TemporaryDirectory(prefix="sami-evaluate-") as tmp:
        lines = [json.dumps({"set": "training", **r}) for r in records]
        lines += [json.dumps({"set": "heldOut", **r}) for r in held_records]
        (Path(tmp) / RESPONSES_FILE).write_text("\n".join(lines) + "\n")
        (Path(tmp) / METRICS_FILE).write_text(json.dumps(meta, indent=2))
        storage.upload_stage(out, Path(tmp), "", stage="evaluate", meta=meta)
    return meta
