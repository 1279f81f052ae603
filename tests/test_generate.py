"""The generation and scoring workers, on the transformers fallback and on real vLLM (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sami_operator.models import ModelSpec, QuerySource
from sami_worker import storage
from sami_worker.generate import STATS_FILE
from sami_worker.records import DATASET_JSONL, read_dataset
from sami_worker.tasks import GenerateTask, PrinciplesRef, ScoreTask, dump_task
from tests.conftest import EXAMPLES

PRINCIPLES = PrinciplesRef.model_validate(
    {
        "inline": [
            {"name": "helpful", "definition": "Answer directly.", "antithesis": "Dodge."},
            {"name": "harmless", "definition": "Refuse harm.", "antithesis": "Help with harm."},
        ]
    }
)
QUERIES = QuerySource(uri=str(EXAMPLES / "data" / "dialogue-train.jsonl"), count=4)
VLLM_CPU = {"gpuMemoryUtilization": 0.3, "enforceEager": True}


def generate_task(model_dir: Path, output: str, **overrides) -> GenerateTask:
    doc = {
        "output": output,
        "model": {"uri": str(model_dir), "dtype": "float32"},
        "principles": PRINCIPLES.model_dump(),
        "queries": QUERIES.model_dump(),
        "generation": {"backend": "transformers", "maxNewTokens": 8, "engine": VLLM_CPU},
    }
    doc.update(overrides)
    return GenerateTask.model_validate(doc)


def run_worker(stage: str, task, tmp_path: Path, env=None, **kwargs) -> subprocess.CompletedProcess:
    path = tmp_path / f"{stage}-task.json"
    path.write_text(dump_task(task))
    return subprocess.run(
        [sys.executable, "-m", "sami_worker", stage, "--task", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
        **kwargs,
    )


def test_generate_with_transformers_backend(tiny_llama, tmp_path):
    from sami_worker import generate

    task = generate_task(tiny_llama, str(tmp_path / "out"))
    stats = generate.run(task)
    records = read_dataset(tmp_path / "out")
    assert stats["queries"] == 4
    assert stats["kept"] == len(records)
    assert stats["kept"] + sum(stats["dropped"].values()) == 4
    assert storage.is_complete(storage.open_storage(str(tmp_path / "out")), "")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for record in records:
        assert len(record.responses) == len(record.prompt_token_ids) == 2
        # Constitution 0 keeps every principle (pair mode); the other negates some.
        assert all(item.kept for item in record.constitutions[0])
        assert not all(item.kept for item in record.constitutions[1])
        for text, ids, prompt_ids, constitution in zip(
            record.responses,
            record.response_token_ids,
            record.prompt_token_ids,
            record.constitution_texts,
            strict=True,
        ):
            assert tok.decode(ids).strip() == text  # the generated ids: a leading space kept
            assert constitution in tok.decode(prompt_ids)
        assert record.query in tok.decode(record.prompt_token_ids[0])


def test_a_shard_that_keeps_nothing_publishes_an_empty_dataset(tiny_llama, tmp_path):
    """Filters that drop every response: one worker over all the queries fails (bad
    input), while a shard of them publishes its empty dataset, as the other shards may
    keep plenty."""
    every = {"filters": {"debrisMarkers": [" "]}, "backend": "transformers", "maxNewTokens": 8}
    whole = generate_task(tiny_llama, str(tmp_path / "whole"), generation=every)
    result = run_worker("generate", whole, tmp_path)
    assert result.returncode == 65 and "every query was dropped" in result.stderr
    shard = whole.shard(1, 2)
    result = run_worker("generate", shard, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_dataset(Path(shard.output)) == []
    manifest = storage.read_manifest(storage.open_storage(shard.output), "")
    assert (manifest.meta["queries"], manifest.meta["kept"]) == (2, 0)


def test_generation_is_deterministic_and_a_finished_stage_is_not_redone(
    tiny_llama, tmp_path, capsys
):
    from sami_worker import generate
    from sami_worker.__main__ import main

    first = generate_task(
        tiny_llama,
        str(tmp_path / "a"),
        generation={
            "backend": "transformers",
            "maxNewTokens": 8,
            "temperature": 0.9,
        },
    )
    second = first.model_copy(update={"output": str(tmp_path / "b")})
    generate.run(first)
    generate.run(second)
    assert read_dataset(tmp_path / "a") == read_dataset(tmp_path / "b")
    before = (tmp_path / "a" / DATASET_JSONL).stat().st_mtime_ns
    # The program again on the finished stage: its manifest's meta is the result, nothing redone.
    path = tmp_path / "task.json"
    path.write_text(dump_task(first))
    capsys.readouterr()
    assert main(["generate", "--task", str(path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        result["summary"]
        == storage.read_manifest(storage.open_storage(str(tmp_path / "a")), "").meta
    )
    assert (tmp_path / "a" / DATASET_JSONL).stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"model": {"uri": "/nonexistent/model"}},
            "model.uri: '/nonexistent/model' is not a model",
        ),
        ({"queries": {"uri": "/nonexistent/q.jsonl", "count": 4}}, "/nonexistent/q.jsonl"),
    ],
)
def test_bad_tasks_fail_with_a_clear_message(tiny_llama, tmp_path, change, message):
    task = generate_task(tiny_llama, str(tmp_path / "out"), **change)
    result = run_worker("generate", task, tmp_path)
    assert result.returncode == 65, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out").exists() or not storage.is_complete(
        storage.open_storage(str(tmp_path / "out")), ""
    )


def test_empty_query_set_is_rejected(tiny_llama, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    task = generate_task(tiny_llama, str(tmp_path / "out"), queries={"uri": str(empty), "count": 1})
    result = run_worker("generate", task, tmp_path)
    assert result.returncode == 65
    assert "empty" in result.stderr


def test_invalid_task_file_is_rejected(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"kind": "generate", "output": "x"}))
    result = subprocess.run(
        [sys.executable, "-m", "sami_worker", "generate", "--task", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 65
    assert "is invalid" in result.stderr and "model" in result.stderr


@pytest.mark.vllm
def test_vllm_generation_on_tiny_llama_gives_the_same_token_ids_twice(tiny_llama, tmp_path):
    """Sampled (temperature 0.7), in two processes: the same responses, token for token."""
    task = generate_task(
        tiny_llama,
        str(tmp_path / "out"),
        generation={"backend": "vllm", "maxNewTokens": 8, "engine": VLLM_CPU},
    )
    result = run_worker("generate", task, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / STATS_FILE).read_text())
    assert stats["backend"] == "vllm" and stats["queries"] == 4
    assert stats["tokens_per_second"] > 0
    records = read_dataset(tmp_path / "out")
    assert len(records) == stats["kept"]

    again = task.model_copy(update={"output": str(tmp_path / "again")})
    assert run_worker("generate", again, tmp_path).returncode == 0
    assert read_dataset(tmp_path / "again") == records


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_scores_agree_with_transformers(tiny_llama, tmp_path):
    from sami_worker.hf import HFBackend

    hf = HFBackend(str(tiny_llama), ModelSpec(uri=str(tiny_llama), dtype="float32"), seed=0)
    tok = hf.tokenizer
    prompts = [tok(q)["input_ids"] for q in ("How do I boil an egg?", "Plan a trip to Rome.")]
    responses = [tok(r)["input_ids"] for r in ("Put it in water.", "Visit the Forum first.")]
    pairs = [{"promptTokenIds": p, "responseTokenIds": r} for p in prompts for r in responses]
    task = ScoreTask.model_validate(
        {
            "output": str(tmp_path / "scores"),
            "model": {"uri": str(tiny_llama), "dtype": "float32"},
            "generation": {"engine": VLLM_CPU},
            "pairs": pairs,
        }
    )
    result = run_worker("score", task, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (tmp_path / "scores" / "scores.jsonl").read_text().splitlines()
    vllm_scores = [json.loads(line) for line in lines]
    # Scored again in another process: the same log-probs, bit for bit.
    again = task.model_copy(update={"output": str(tmp_path / "again")})
    assert run_worker("score", again, tmp_path).returncode == 0
    assert (tmp_path / "again" / "scores.jsonl").read_text().splitlines() == lines
    expected = hf.score(
        [p["promptTokenIds"] + p["responseTokenIds"] for p in pairs],
        [len(p["promptTokenIds"]) for p in pairs],
    )
    for got, (total, count) in zip(vllm_scores, expected, strict=True):
        assert got["count"] == count
        assert got["sum"] == pytest.approx(total, abs=1e-3 * count)
        assert got["mean"] == pytest.approx(total / count, abs=1e-3)


@pytest.mark.vllm
@pytest.mark.s3
@pytest.mark.slow
def test_smollm2_generation_into_s3_survives_a_kill(
    smollm2, s3_server, s3_bucket, s3_env, tmp_path
):
    """The issue's acceptance run: SmolLM2-135M, 16 queries x 2 constitutions, vLLM on CPU,
    into a real S3 server. Killed midway, nothing is published; re-run completes once."""
    output = f"s3://{s3_bucket}/runs/it1/generate"
    task = generate_task(
        smollm2,
        output,
        model={"uri": str(smollm2), "dtype": "bfloat16"},
        queries={"uri": str(EXAMPLES / "data" / "dialogue-train.jsonl"), "count": 16},
        generation={"backend": "vllm", "maxNewTokens": 48, "engine": VLLM_CPU},
        storage={
            "uri": f"s3://{s3_bucket}",
            "endpointUrl": s3_server.endpoint_url,
            "forcePathStyle": True,
        },
    )
    path = tmp_path / "task.json"
    path.write_text(dump_task(task))
    command = [sys.executable, "-m", "sami_worker", "generate", "--task", str(path)]
    log = tmp_path / "first.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 300
        while "vLLM engine ready" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    remote = storage.open_storage(
        output, storage.StorageSettings(endpoint_url=s3_server.endpoint_url, force_path_style=True)
    )
    assert not storage.is_complete(remote, "")

    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = storage.read_manifest(remote, "")
    assert {f.path for f in manifest.files} == {DATASET_JSONL, STATS_FILE}
    lines = storage.read_stage_file(remote, "", DATASET_JSONL).decode().splitlines()
    ids = [json.loads(line)["query_id"] for line in lines]
    assert len(ids) == len(set(ids)) == manifest.meta["kept"]
    assert manifest.meta["kept"] + sum(manifest.meta["dropped"].values()) == 16
    assert manifest.meta["tokens_per_second"] > 0


@pytest.mark.vllm
@pytest.mark.s3
@pytest.mark.slow
def test_a_model_streamed_from_s3_generates_what_the_downloaded_one_does(
    smollm2, s3_server, s3_bucket, s3_env, tmp_path
):
    """engine.loadFormat: stream: vLLM reads SmolLM2's weights from the S3 server through the
    Run:ai model streamer; nothing of the model lands in the cache volume, and the dataset is
    the one the downloaded model gives."""
    bucket = storage.open_storage(
        f"s3://{s3_bucket}",
        storage.StorageSettings(endpoint_url=s3_server.endpoint_url, force_path_style=True),
    )
    storage.upload_stage(bucket, smollm2, "models/smollm2", stage="model")
    datasets = {}
    for load in ("stream", "download"):
        task = generate_task(
            smollm2,
            f"s3://{s3_bucket}/runs/{load}/generate",
            model={"uri": f"s3://{s3_bucket}/models/smollm2", "dtype": "float32"},
            generation={
                "backend": "vllm",
                "maxNewTokens": 16,
                "engine": {**VLLM_CPU, "loadFormat": load},
            },
            storage={
                "uri": f"s3://{s3_bucket}",
                "endpointUrl": s3_server.endpoint_url,
                "forcePathStyle": True,
            },
        )
        cache = tmp_path / f"cache-{load}"
        result = run_worker("generate", task, tmp_path, env={"SAMI_CACHE_DIR": str(cache)})
        assert result.returncode == 0, result.stderr[-3000:]
        downloaded = list(cache.rglob("*.safetensors"))
        assert bool(downloaded) == (load == "download"), downloaded
        datasets[load] = bucket.read_bytes(f"runs/{load}/generate/{DATASET_JSONL}")
    assert datasets["stream"] == datasets["download"]


@pytest.mark.s3
def test_bad_credentials_fail_without_leaking_them(tiny_llama, s3_server, s3_bucket, tmp_path):
    task = generate_task(
        tiny_llama,
        f"s3://{s3_bucket}/run/generate",
        storage={
            "uri": f"s3://{s3_bucket}",
            "endpointUrl": s3_server.endpoint_url,
            "forcePathStyle": True,
        },
    )
    wrong = {"AWS_ACCESS_KEY_ID": "AKIAWRONGKEY0000", "AWS_SECRET_ACCESS_KEY": "not-the-secret-x"}
    result = run_worker("generate", task, tmp_path, env=wrong)
    assert result.returncode == 65
    assert s3_bucket in result.stderr
    assert "not-the-secret-x" not in result.stderr + result.stdout
    assert "AKIAWRONGKEY0000" not in result.stderr + result.stdout


def test_parquet_datasets_train(tiny_llama, tmp_path):
    from sami_worker import generate
    from sami_worker.records import DATASET_PARQUET
    from sami_worker.train import read_blocks

    task = generate_task(tiny_llama, str(tmp_path / "out"), outputFormat="parquet")
    stats = generate.run(task)
    assert (tmp_path / "out" / DATASET_PARQUET).exists()
    blocks = read_blocks(tmp_path / "out", eos_id=0)
    assert len(blocks) == stats["kept"]
    assert all(len(b.prompts) == len(b.responses) == 2 for b in blocks)
