"""The evaluation stage's spread over generation seeds (evaluation.seeds): the reduction, the
responses of each seed, judging like with like, and the report; on the tiny Llama with the
transformers backend (vLLM evaluation runs in tests/test_judge.py and the local runner's)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sami_operator.models import Metrics
from sami_operator.report import build_report
from sami_worker import evaluate, storage
from sami_worker.evaluate import build_judge_items, estimate
from sami_worker.objective import sami_loss
from sami_worker.tasks import EvaluateTask
from tests.conftest import EXAMPLES
from tests.test_generate import PRINCIPLES


def test_the_estimate_spreads_over_queries_and_over_seeds():
    both = estimate([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    assert both.value == pytest.approx(3.0)
    assert both.stderr == pytest.approx(1 / math.sqrt(3))  # of the query means 2, 3, 4
    assert both.seed_stderr == pytest.approx(1.0)  # of the seed means 2 and 4
    one_seed = estimate([[1.0, 2.0, 3.0]])
    assert (one_seed.value, one_seed.seed_stderr) == (2.0, None)
    assert one_seed.stderr == pytest.approx(1 / math.sqrt(3))
    one_query = estimate([[2.0], [4.0]])
    assert (one_query.value, one_query.stderr, one_query.seed_stderr) == (3.0, None, 1.0)


def evaluation_task(model: Path, output: Path, seeds: int) -> EvaluateTask:
    return EvaluateTask.model_validate(
        {
            "output": str(output),
            "model": {"uri": str(model), "dtype": "float32"},
            "iteration": 1,
            "principles": PRINCIPLES.model_dump(),
            "queries": {"uri": str(EXAMPLES / "data" / "dialogue-eval.jsonl"), "count": 3},
            "evaluation": {"constitutions": 2, "seeds": seeds},
            # Sampled, so that seeds give other responses.
            "generation": {"backend": "transformers", "maxNewTokens": 12, "temperature": 1.0},
        }
    )


def responses(output: Path) -> list[dict]:
    text = (output / evaluate.RESPONSES_FILE).read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_more_seeds_keep_seed_0s_responses_and_report_the_spread_over_seeds(tiny_llama, tmp_path):
    one = evaluate.run(evaluation_task(tiny_llama, tmp_path / "one", seeds=1))
    three = evaluate.run(evaluation_task(tiny_llama, tmp_path / "three", seeds=3))
    records = responses(tmp_path / "three")
    assert [(r["seed"], r["query"]) for r in records] == [
        (s, r["query"]) for s in range(3) for r in responses(tmp_path / "one")
    ]
    # Seed 0 is a one-seed evaluation's; the others sampled other responses.
    assert records[:3] == responses(tmp_path / "one")
    seed_0 = {text for r in records[:3] for text in r["responses"]}
    assert {text for r in records[3:] for text in r["responses"]} - seed_0

    # The metrics reduce every seed's per-query bounds: mean, and the spread over seeds.
    per_seed = [
        sami_loss(
            torch.tensor(
                [r["mean_logprobs"] for r in records if r["seed"] == s], dtype=torch.float64
            )
        ).block_mi_lower_bound.tolist()
        for s in range(3)
    ]
    metrics = Metrics.model_validate(three["metrics"])
    expected = estimate(per_seed)
    assert metrics.mi_lower_bound.value == pytest.approx(expected.value, rel=1e-9)
    assert metrics.mi_lower_bound.stderr == pytest.approx(expected.stderr, rel=1e-9)
    assert metrics.mi_lower_bound.seed_stderr == pytest.approx(expected.seed_stderr, rel=1e-9)
    assert metrics.mi_lower_bound.seed_stderr > 0
    assert metrics.mean_response_tokens.value == pytest.approx(
        sum(t for r in records for t in r["response_tokens"]) / (3 * 3 * 2)
    )
    single = Metrics.model_validate(one["metrics"])
    assert single.mi_lower_bound.value == pytest.approx(estimate(per_seed[:1]).value, rel=1e-9)
    assert single.mi_lower_bound.seed_stderr is None


def test_the_judge_compares_responses_of_the_same_seed(tmp_path):
    constitution = [{"principle": "helpful", "kept": True}]

    def record(seed: int | None, text: str) -> dict:
        record = {"query": "Hi?", "constitutions": [constitution], "responses": [text]}
        return {
            **record,
            "response_tokens": [len(text)],
            **({} if seed is None else {"seed": seed}),
        }

    test = [record(0, "test 0"), record(1, "test 1")]
    items = build_judge_items(
        test, [record(1, "base 1"), record(None, "base 0")], PRINCIPLES.inline
    )
    assert [(i.test, i.baseline) for i in items] == [("test 0", "base 0"), ("test 1", "base 1")]


def test_the_report_shows_the_spread_over_seeds_when_there_is_one(tmp_path):
    run = storage.open_storage(str(tmp_path / "run"))
    for t, seed_stderr in ((0, None), (1, 0.02)):
        estimate = {"value": 0.5, "stderr": 0.1, "seedStderr": seed_stderr}
        meta = {"iteration": t, "metrics": {"miLowerBound": estimate}}
        storage.write_stage_files(run, f"iterations/{t}/evaluate", {}, stage="evaluate", meta=meta)
    markdown = build_report(run, tmp_path / "report")
    assert "| 0 (base) | 0.500 ± 0.100 | - |" in markdown
    assert "| 1 | 0.500 ± 0.100 (seeds ± 0.020) | - |" in markdown
    assert "seeds ±, one standard error over the generation seeds (evaluation.seeds)" in markdown
