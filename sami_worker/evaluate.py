"""The evaluation stage: how much a model's responses reveal their constitution, on held-out
queries (docs/method.md, 'Evaluation and win rates').

For each held-out query, the model writes one response under each of the K evaluation
constitutions (fixed, unshuffled: for two principles both kept, both negated, each negated
alone). Every response is then scored under every constitution's prompt (the training
prompt), giving per query a K x K matrix of mean and of summed response log-probs, from which:

- the InfoNCE MI lower bound, log K - loss_col (mean log-probs, as in training), at most log K;
- the paper's plug-in MI (summed log-probs; the number the paper plots, not bounded by log K);
- the mean response length in tokens;

each as a mean over queries with its standard error. With `evaluation.seeds` S > 1 the
responses are generated and scored S times, with S sets of request seeds (seed 0's are those
of a one-seed evaluation); the metrics average over seeds too, and report the standard error
over seeds (seedStderr) beside the one over queries, so that an iteration's change can be told
from generation noise. Held-out principles (never trained on) get the same metrics, reported
apart.

The same program evaluates the reference model (evaluation.judge.reference, the planner's
'reference' stage): same queries, constitutions and seeds as the base model.

With `evaluation.judge` set, iteration t >= 1 is also compared with each of the task's
`baselines`: the base model ('base', iteration 0's responses.jsonl) and, when configured, the
reference model ('reference'). An LLM judge sees both models' responses to the same query
under the same constitution (and generation seed), and the win rate vs each baseline, raw and
length-corrected with 95% intervals, goes into the metrics' `winRates`, for training and
held-out principles apart (sami_worker.judge, sami_worker.winrate). The responses judged are
those written under the constitution with every principle kept, as in the paper;
`evaluation.judge.constitutions: all` judges every evaluation constitution's, negated ones too:
the question is always which response follows the constitution it was written under. The judge
is an OpenAI-compatible endpoint or a model this worker loads itself once its own engine is
closed (evaluation.judge.model). judgments.jsonl keeps every prompt's answer and verdict; the
win rates count ties and unparsable verdicts. Two files outside the manifest let a failed
attempt (judge unreachable: exit 75) be retried cheaply: judge-inputs.json, the metrics and
responses saved before judging, which a rerun of the same task reuses instead of generating
again, and judge-cache.jsonl, the judge's answers so far.

    python -m sami_worker evaluate --task task.json
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sami_operator.models import (
    BASELINE_BASE,
    BASELINE_REFERENCE,
    ConstitutionMode,
    Estimate,
    Metrics,
    ModelSpec,
    Principle,
    WinRate,
)
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
from sami_worker.constitutions import Constitution, derive_rng, evaluation_constitutions
from sami_worker.judge import (
    Judge,
    JudgeCache,
    JudgeClient,
    JudgeItem,
    LocalJudge,
    judge_items,
    sample_items,
)
from sami_worker.logprobs import assemble_matrices, block_pairs
from sami_worker.objective import mean_and_stderr, plugin_mi, sami_loss
from sami_worker.prompts import cut_response
from sami_worker.records import constitution_record
from sami_worker.tasks import EvaluateTask, TaskError
from sami_worker.winrate import compute_win_rate

log = logging.getLogger(__name__)

RESPONSES_FILE = "responses.jsonl"
METRICS_FILE = "metrics.json"
JUDGMENTS_FILE = "judgments.jsonl"
# Kept beside the stage's outputs but outside its manifest: they must outlive a failed attempt.
JUDGE_CACHE_FILE = "judge-cache.jsonl"  # the judge's answers (sami_worker.judge.JudgeCache)
JUDGE_INPUTS_FILE = "judge-inputs.json"  # metrics and responses, saved before judging


def constitutions_for(task: EvaluateTask, principles: list[Principle], query_id: int):
    """The K evaluation constitutions of one query."""
    pool = principles
    if task.constitutions.mode == ConstitutionMode.diverse:
        rng = derive_rng(task.constitutions.seed, 0, query_id, stream="evaluation")
        pool = rng.sample(
            principles, min(len(principles), task.constitutions.principles_per_constitution)
        )
    try:
        return evaluation_constitutions(pool, task.evaluation.constitutions)
    except ValueError as err:  # a spec that bypassed validation: no silent other K
        raise TaskError(f"evaluation.constitutions: {err}") from None


def estimate(per_seed: Sequence[Sequence[float]]) -> Estimate:
    """Mean over queries and generation seeds (per_seed[s][q]), with the standard error over
    queries of each query's mean over seeds, and over seeds of each seed's mean over queries
    (None where there is one query, or one seed)."""
    values = torch.tensor(per_seed, dtype=torch.float64)
    mean, stderr = mean_and_stderr(values.mean(dim=0))
    _, seed_stderr = mean_and_stderr(values.mean(dim=1))
    return Estimate(
        value=mean,
        stderr=None if math.isnan(stderr) else stderr,
        seed_stderr=None if math.isnan(seed_stderr) else seed_stderr,
    )


@dataclass(frozen=True)
class Sample:
    """One generation seed's responses to every prompt, and what scoring them gave: per
    query, K x K matrices of mean and summed response log-probs, the InfoNCE bound and the
    plug-in MI, and the response lengths."""

    texts: list[str]
    lengths: list[int]
    mean_matrices: torch.Tensor
    sum_matrices: torch.Tensor
    bounds: list[float]
    plug_in: list[float]


def sample_and_score(
    task: EvaluateTask, backend: Backend, prompts: list[list[int]], k: int, seed_index: int
) -> Sample:
    """Generate one response per prompt (k prompts per query, in query order) with the
    request seeds of `seed_index` (seed 0's are those of an evaluation with one seed), then
    score every response under every prompt of its query."""
    tok = backend.tokenizer
    g = task.generation
    max_new = task.evaluation.max_new_tokens or g.max_new_tokens
    settings = SamplingSettings(max_new, g.temperature, g.top_p, tuple(g.stop))
    extra = (seed_index,) if seed_index else ()
    seeds = [request_seed("evaluate", task.iteration, n, *extra) for n in range(len(prompts))]
    completions = backend.generate(prompts, settings, seeds)

    texts, lengths, scored_ids = [], [], []
    for completion in completions:
        text = cut_response(completion.text, g.stop)
        ids, _ = response_token_ids(tok, completion, text)
        texts.append(text)
        lengths.append(len(ids))
        # A response that ended (EOS, or an immediate new turn) is scored with its EOS, as
        # in training (training.scoreEos); an empty one is just the EOS.
        if (completion.ended_with_eos and task.score_eos) or not ids:
            ids = [*ids, tok.eos_token_id]
        scored_ids.append(ids)

    queries = len(prompts) // k
    pairs = block_pairs(k, queries)
    sequences, starts = [], []
    for i, j in pairs:
        sequences.append(prompts[i] + scored_ids[j])
        starts.append(len(prompts[i]))
    scores = backend.score(sequences, starts)
    sums = torch.tensor([s for s, _ in scores], dtype=torch.float64)
    counts = torch.tensor([c for _, c in scores], dtype=torch.float64)
    mean_matrices = assemble_matrices(sums / counts, pairs, k, queries)
    sum_matrices = assemble_matrices(sums, pairs, k, queries)
    return Sample(
        texts=texts,
        lengths=lengths,
        mean_matrices=mean_matrices,
        sum_matrices=sum_matrices,
        bounds=sami_loss(mean_matrices).block_mi_lower_bound.tolist(),
        plug_in=plugin_mi(sum_matrices).tolist(),
    )


def evaluate_principles(
    task: EvaluateTask, backend: Backend, queries: list[str], principles: list[Principle]
) -> tuple[Metrics, list[dict]]:
    """Generate under each evaluation constitution, score every (constitution, response)
    pair, and reduce to the metrics; once per generation seed (evaluation.seeds), each
    seed's responses a record per query."""
    by_name = {p.name: p for p in principles}
    constitutions, prompts = [], []
    for query_id, query in enumerate(queries):
        query_constitutions = constitutions_for(task, principles, query_id)
        texts = [c.render(by_name) for c in query_constitutions]
        constitutions.append(query_constitutions)
        prompts += query_prompt_ids(task.model, task.task.value, backend.tokenizer, texts, query)
    k = len(constitutions[0])
    samples = [sample_and_score(task, backend, prompts, k, s) for s in range(task.evaluation.seeds)]

    def per_query_length(sample: Sample) -> list[float]:
        return [sum(sample.lengths[n * k : (n + 1) * k]) / k for n in range(len(queries))]

    metrics = Metrics(
        mi_lower_bound=estimate([sample.bounds for sample in samples]),
        plug_in_mi=estimate([sample.plug_in for sample in samples]),
        mean_response_tokens=estimate([per_query_length(sample) for sample in samples]),
    )
    records = [
        {
            "seed": s,
            "query": query,
            "constitutions": [constitution_record(c) for c in constitutions[n]],
            "responses": sample.texts[n * k : (n + 1) * k],
            "response_tokens": sample.lengths[n * k : (n + 1) * k],
            "mean_logprobs": sample.mean_matrices[n].tolist(),
            "sum_logprobs": sample.sum_matrices[n].tolist(),
        }
        for s, sample in enumerate(samples)
        for n, query in enumerate(queries)
    ]
    return metrics, records


def build_judge_items(
    records: list[dict],
    baseline_records: list[dict],
    principles: list[Principle],
    constitutions: str = "kept",
) -> list[JudgeItem]:
    """Pair each response with the baseline's response to the same query under the same
    constitution (same principles, same order: the same prompt) and the same generation seed
    (records from before evaluation.seeds have seed 0); the responses of every evaluation
    constitution, or with `constitutions` "kept" only those of the one with every principle
    kept."""
    baseline = {
        (r.get("seed", 0), r["query"], json.dumps(c)): (text, tokens)
        for r in baseline_records
        for c, text, tokens in zip(
            r["constitutions"], r["responses"], r["response_tokens"], strict=True
        )
    }
    by_name = {p.name: p for p in principles}
    items = []
    for r in records:
        for c, text, tokens in zip(
            r["constitutions"], r["responses"], r["response_tokens"], strict=True
        ):
            if constitutions == "kept" and not all(i["kept"] for i in c):
                continue
            match = baseline.get((r.get("seed", 0), r["query"], json.dumps(c)))
            if match is not None:
                constitution = Constitution(tuple((i["principle"], i["kept"]) for i in c))
                items.append(
                    JudgeItem(
                        r["query"], constitution.render(by_name), text, match[0], tokens, match[1]
                    )
                )
    return items


def judge_against_baseline(
    task: EvaluateTask, judge: Judge, items: list[JudgeItem], baseline: str, set_name: str
) -> tuple[WinRate, dict, list[dict]]:
    """Win rate vs one baseline over a seeded sample of `evaluation.judge.items` items, the
    judgment counts, and one record per judgment."""
    spec = task.evaluation.judge
    seed = task.constitutions.seed
    sampled = sample_items(items, spec.items, seed)
    result = judge_items(
        sampled, judge.complete_many, task=task.task.value, seed=seed, both_orders=spec.both_orders
    )
    estimate = compute_win_rate(
        result.outcomes, [i.test_length for i in sampled], [i.baseline_length for i in sampled]
    )
    raw, corrected = estimate.raw, estimate.length_corrected
    counts = result.counts()
    win_rate = WinRate(
        baseline=baseline,
        constitutions=spec.constitutions,
        rate=raw.value,
        low=raw.low,
        high=raw.high,
        length_corrected=corrected.value if corrected else None,
        length_corrected_low=corrected.low if corrected else None,
        length_corrected_high=corrected.high if corrected else None,
        items=estimate.items,
        ties=counts["ties"],
        unparsable=counts["unparsable"],
    )
    log.info(
        "iteration %d vs %s (%s principles): win rate %.3f [%.3f, %.3f], length-corrected %s; "
        "%d ties, %d unparsable of %d judgments",
        task.iteration,
        baseline,
        set_name,
        raw.value,
        raw.low,
        raw.high,
        f"{corrected.value:.3f} [{corrected.low:.3f}, {corrected.high:.3f}]" if corrected else "-",
        counts["ties"],
        counts["unparsable"],
        counts["judgments"],
    )
    lines = [
        {
            "set": set_name,
            "baseline": baseline,
            **j.record(),
            "query": sampled[j.item].query,
            "constitution": sampled[j.item].constitution,
            "test": sampled[j.item].test,
            "baseline_response": sampled[j.item].baseline,
            "test_tokens": sampled[j.item].test_length,
            "baseline_tokens": sampled[j.item].baseline_length,
        }
        for j in result.judgments
    ]
    return win_rate, counts, lines


@dataclass
class BaselineResponses:
    """A baseline's evaluation responses (the base model's, the reference model's), read
    before anything else runs."""

    name: str
    uri: str
    records: list[dict]


_BASELINE_MODELS = {BASELINE_BASE: "base model", BASELINE_REFERENCE: "reference model"}


def read_baselines(task: EvaluateTask) -> list[BaselineResponses]:
    """The responses of every baseline the task is judged against; fails (before any
    generation) when one is missing."""
    out = []
    for baseline in task.baselines:
        stage = open_uri(baseline.uri, task.storage)
        text = storage.read_stage_file(stage, "", RESPONSES_FILE)
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        out.append(BaselineResponses(baseline.name, stage.uri(RESPONSES_FILE), records))
    return out


def open_judge(task: EvaluateTask, out: storage.Storage) -> Judge:
    """The judge (cache at JUDGE_CACHE_FILE in the stage): a client of the endpoint, or a
    local judge that loads evaluation.judge.model when it is first asked."""
    spec = task.evaluation.judge
    cache = JudgeCache(out, JUDGE_CACHE_FILE)
    if spec.endpoint is not None:
        return JudgeClient(spec.endpoint, spec.max_concurrency, cache)

    def open_judge_model(model: ModelSpec):
        # The evaluated model's engine is closed by now (generate_and_score).
        return open_model_backend(model, task.generation, task.storage, 0, engine=task.judge_engine)

    return LocalJudge(spec.model, open_judge_model, cache)


def add_win_rates(
    task: EvaluateTask,
    judge: Judge,
    baselines: list[BaselineResponses],
    principles: list[Principle],
    sets: dict[str, tuple[Metrics, list[dict]]],
) -> tuple[dict[str, Metrics], dict, list[dict]]:
    """Judge each set of records ("training", "heldOut") against each baseline's responses;
    return the metrics with their win rates (one per baseline, in order), the judge's stage
    meta and judgments.jsonl."""
    updated, counts, lines = {}, {}, []
    for set_name, (metrics, records) in sets.items():
        set_principles = principles if set_name == "training" else task.held_out
        win_rates = list(metrics.win_rates)
        for baseline in baselines:
            responses = [r for r in baseline.records if r.get("set", "training") == set_name]
            items = build_judge_items(
                records, responses, set_principles, task.evaluation.judge.constitutions
            )
            if not items:
                model = _BASELINE_MODELS.get(baseline.name, baseline.name)
                raise TaskError(
                    f"evaluation.judge: none of the {set_name} responses has a {model} "
                    f"response to the same query and constitution in {baseline.uri} (was that "
                    "stage run with other queries or principles?)"
                )
            win_rate, set_counts, set_lines = judge_against_baseline(
                task, judge, items, baseline.name, set_name
            )
            win_rates.append(win_rate)
            counts.setdefault(baseline.name, {})[set_name] = set_counts
            lines += set_lines
        updated[set_name] = metrics.model_copy(update={"win_rates": win_rates})
    meta = {
        "model": judge.model,
        "baselines": counts,
        "requests": judge.requests,
        "cache_hits": judge.cache_hits,
    }
    return updated, meta, lines


Evaluated = tuple[Metrics, list[dict], Metrics | None, list[dict]]


def _task_digest(task: EvaluateTask) -> str:
    return hashlib.sha256(task.model_dump_json().encode()).hexdigest()


def load_judge_inputs(out: storage.Storage, task: EvaluateTask) -> Evaluated | None:
    """What an earlier attempt of this very task generated and scored, if it got that far."""
    if not out.exists(JUDGE_INPUTS_FILE):
        return None
    saved = json.loads(out.read_bytes(JUDGE_INPUTS_FILE))
    if saved.get("task") != _task_digest(task):
        log.warning("ignoring %s: written for another task", out.uri(JUDGE_INPUTS_FILE))
        return None
    log.info("reusing the responses of an earlier attempt: %s", out.uri(JUDGE_INPUTS_FILE))
    held_out = saved["heldOutMetrics"]
    return (
        Metrics.model_validate(saved["metrics"]),
        saved["records"],
        Metrics.model_validate(held_out) if held_out else None,
        saved["heldOutRecords"],
    )


def save_judge_inputs(out: storage.Storage, task: EvaluateTask, evaluated: Evaluated) -> None:
    metrics, records, held_out, held_records = evaluated
    saved = {
        "task": _task_digest(task),
        "metrics": metrics.to_api(),
        "records": records,
        "heldOutMetrics": held_out.to_api() if held_out else None,
        "heldOutRecords": held_records,
    }
    out.write_bytes(JUDGE_INPUTS_FILE, json.dumps(saved).encode())


def generate_and_score(task: EvaluateTask, principles: list[Principle]) -> Evaluated:
    queries = load_task_queries(task.queries, task.storage)
    if not queries:
        raise TaskError("queries: the evaluation source yields no queries")
    # One engine for generating and scoring; scoring reads prompt log-probs, which vLLM does
    # not compute for prefix-cached positions, so this engine runs without the cache.
    backend = open_model_backend(
        task.model, task.generation, task.storage, 0, scoring=True, engine=task.engine
    )
    try:
        metrics, records = evaluate_principles(task, backend, queries, principles)
        held_out, held_records = None, []
        if task.held_out:
            held_out, held_records = evaluate_principles(task, backend, queries, task.held_out)
    finally:
        backend.close()
    return metrics, records, held_out, held_records


def run(task: EvaluateTask) -> dict:
    out = open_uri(task.output, task.storage)
    principles = load_principles(task.principles, task.storage)
    judging = bool(task.baselines)  # the planner sets them for iterations >= 1 with a judge
    # Baselines and judge first, so that a missing baseline or API key fails before any
    # generation; a judge model is only loaded when first asked, after generation.
    baselines = read_baselines(task) if judging else []
    judge = open_judge(task, out) if judging else None
    try:
        evaluated = load_judge_inputs(out, task) if judging else None
        if evaluated is None:
            evaluated = generate_and_score(task, principles)
            if judging:
                # Before judging: a rerun after a judge failure judges these same responses,
                # so its prompts hit the judge cache (and nothing is generated twice).
                save_judge_inputs(out, task, evaluated)
        metrics, records, held_out, held_records = evaluated
        judge_meta, judgment_lines = None, []
        if judge is not None:
            sets = {"training": (metrics, records)}
            if held_out is not None:
                sets["heldOut"] = (held_out, held_records)
            updated, judge_meta, judgment_lines = add_win_rates(
                task, judge, baselines, principles, sets
            )
            metrics, held_out = updated["training"], updated.get("heldOut")
    finally:
        if judge is not None:
            judge.close()
    meta = {
        "iteration": task.iteration,
        "model": task.model.uri,
        "metrics": metrics.to_api(),
        "heldOutMetrics": held_out.to_api() if held_out else None,
    }
    if task.reference:
        meta["reference"] = True
    if judge_meta is not None:
        meta["judge"] = judge_meta
    log.info(
        "%s: MI lower bound %.4f (plug-in MI %.3f), %.1f response tokens",
        "reference model" if task.reference else f"iteration {task.iteration}",
        metrics.mi_lower_bound.value,
        metrics.plug_in_mi.value,
        metrics.mean_response_tokens.value,
    )
    with tempfile.TemporaryDirectory(prefix="sami-evaluate-") as tmp:
        lines = [json.dumps({"set": "training", **r}) for r in records]
        lines += [json.dumps({"set": "heldOut", **r}) for r in held_records]
        (Path(tmp) / RESPONSES_FILE).write_text("\n".join(lines) + "\n")
        (Path(tmp) / METRICS_FILE).write_text(json.dumps(meta, indent=2))
        if judgment_lines:
            text = "\n".join(json.dumps(line) for line in judgment_lines) + "\n"
            (Path(tmp) / JUDGMENTS_FILE).write_text(text)
        storage.upload_stage(out, Path(tmp), "", stage="evaluate", meta=meta)
    return meta
