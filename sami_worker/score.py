"""Scoring: sum and mean response log-probs of (prompt, response) pairs under a model.

Evaluation uses it for the MI estimators (docs/method.md, 'Mutual-information estimates'): the
InfoNCE bound needs mean log-probs, the paper's plug-in MI needs sums. vLLM computes them with
`prompt_logprobs` on the joined ids; the transformers backend with one forward pass (they agree
within tolerance, see tests/test_generate.py).

    python -m sami_worker score --task task.json
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from sami_worker import storage
from sami_worker.common import open_model_backend, open_uri, read_uri
from sami_worker.tasks import ScorePair, ScoreTask, TaskError

log = logging.getLogger(__name__)

SCORES_FILE = "scores.jsonl"


def score_pairs(backend, pairs: list[ScorePair]) -> list[dict]:
    sequences = [p.prompt_token_ids + p.response_token_ids for p in pairs]
    starts = [len(p.prompt_token_ids) for p in pairs]
    scored = backend.score(sequences, starts)
    return [{"sum": total, "mean": total / count, "count": count} for total, count in scored]


def run(task: ScoreTask) -> dict:
    out = open_uri(task.output, task.storage)
    if task.pairs is not None:
        pairs = task.pairs
    elif task.pairs_uri is not None:
        lines = read_uri(task.pairs_uri, task.storage).decode().splitlines()
        pairs = [ScorePair.model_validate_json(line) for line in lines if line.strip()]
    else:
        raise TaskError("score task: set 'pairs' or 'pairsUri'")
    if not pairs:
        raise TaskError("score task: no pairs to score")
    backend = open_model_backend(task.model, task.generation, task.storage, 0, scoring=True)
    try:
        rows = score_pairs(backend, pairs)
    finally:
        backend.close()
    with tempfile.TemporaryDirectory(prefix="sami-score-") as tmp:
        path = Path(tmp) / SCORES_FILE
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        meta = {"pairs": len(rows)}
        storage.upload_stage(out, Path(tmp), "", stage="score", meta=meta)
    return meta
