"""`sami run` end to end on CPU: a miniature SAMI run through the real executor."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLES

SAMI = str(Path(sys.executable).with_name("sami"))


def mini_manifest(model: Path, storage_dir: Path, backend="transformers", iterations=1) -> dict:
    return {
        "apiVersion": "sami.dev/v1alpha1",
        "kind": "SAMIRun",
        "metadata": {"name": "mini"},
        "spec": {
            "model": {"uri": str(model), "dtype": "float32"},
            "principles": {"inline": [
                {"name": "helpful", "definition": "Answer directly.", "antithesis": "Dodge."},
                {"name": "harmless", "definition": "Refuse harm.", "antithesis": "Help harm."},
            ]},
            "data": {
                "train": {"uri": str(EXAMPLES / "data" / "dialogue-train.jsonl"), "count": 8},
                "eval": {"uri": str(EXAMPLES / "data" / "dialogue-eval.jsonl"), "count": 4},
            },
            "generation": {
                "backend": backend, "maxNewTokens": 8,
                "engine": {"gpuMemoryUtilization": 0.3, "enforceEager": True},
            },
            "training": {
                "iterations": iterations, "steps": 2, "optimizer": {"lr": 1e-3},
                "microBatchQueries": 2, "gradientAccumulation": 1, "precision": "fp32",
                "launcher": "Job",
            },
            "storage": {"uri": str(storage_dir)},
        },
    }  # fmt: skip


def write(tmp_path: Path, manifest: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def sami_run(path: Path, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SAMI, "run", str(path)], capture_output=True, text=True, cwd=cwd, timeout=900, **kwargs
    )


def run_dir(storage_dir: Path) -> Path:
    (found,) = (storage_dir / "default" / "mini").iterdir()
    return found


def test_mini_run_end_to_end_and_rerun_is_a_no_op(tiny_llama, tmp_path):
    """Run from another directory, a manifest's relative paths (model, data, storage) are
    its folder's; rerun from its folder, it is the same run (the same uid), resumed."""
    project = tmp_path / "project"
    project.mkdir()
    manifest = mini_manifest(os.path.relpath(tiny_llama, project), "runs")
    for source in manifest["spec"]["data"].values():
        source["uri"] = os.path.relpath(source["uri"], project)
    path = write(project, manifest)
    result = sami_run(path, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| 0 (base) |" in result.stdout and "| 1 |" in result.stdout

    prefix = run_dir(project / "runs")
    uid = prefix.name
    assert f"new run default/mini {uid} in .sami/default/mini/{uid}\n" in result.stdout
    status = json.loads((prefix / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    assert [i["iteration"] for i in status["iterations"]] == [0, 1]
    assert status["iterations"][1]["checkpointUri"].endswith("iterations/1/train/checkpoint")
    assert status["modelUri"] == status["iterations"][1]["checkpointUri"]
    assert (
        status["latestMiLowerBound"] == status["iterations"][1]["metrics"]["miLowerBound"]["value"]
    )
    # What the numbers depend on beyond the spec, as the workers had it.
    recorded = status["reproducibility"]
    assert recorded["seed"] == 0
    assert {"python", "torch", "transformers", "vllm", "sami-align"} <= set(recorded["versions"])
    assert recorded["settings"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert recorded["settings"]["cpus"] == str(os.cpu_count())
    report = prefix / "report"
    assert {
        "summary.md",
        "mi_lower_bound.png",
        "plug_in_mi.png",
        "response_tokens.png",
        "status.json",
    } <= {p.name for p in report.iterdir()}
    assert (tmp_path / ".sami" / "default" / "mini" / uid).is_dir()  # task files and logs

    again = sami_run(path, project)
    assert again.returncode == 0
    assert f"resuming default/mini {uid} in .sami/default/mini/{uid}: 4 of 4 stages done" in (
        again.stdout
    )
    assert again.stdout.count("already done") == 4

    rebuilt = subprocess.run(
        [SAMI, "report", str(prefix), "--out", str(tmp_path / "rebuilt")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "| 1 |" in rebuilt.stdout
    assert (tmp_path / "rebuilt" / "mi_lower_bound.png").stat().st_size > 1000


def test_mini_run_with_a_judge_model_and_a_reference_model(tiny_llama, other_llama, tmp_path):
    """The reference stage runs once after evaluate-0, the judge model is loaded by the
    evaluation worker (no server), and status, console and report show both baselines."""
    manifest = mini_manifest(tiny_llama, tmp_path / "runs")
    manifest["spec"]["evaluation"] = {
        "constitutions": 2,
        "judge": {"model": str(tiny_llama), "items": 3, "reference": {"uri": str(other_llama)}},
    }
    path = write(tmp_path, manifest)
    result = sami_run(path, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = re.findall(r"^\[\d/5\] (\S+): done", result.stdout, re.M)
    assert stages == ["evaluate-0", "reference", "generate-1", "train-1", "evaluate-1"]
    assert re.search(
        r"evaluate-1: done .*win rate vs base \d\.\d\d; win rate vs reference", result.stdout
    )

    prefix = run_dir(tmp_path / "runs")
    status = json.loads((prefix / "status.json").read_text())
    assert status["phase"] == "Succeeded" and status["reference"]["phase"] == "Succeeded"
    assert [i["iteration"] for i in status["iterations"]] == [0, 1]
    rates = status["iterations"][1]["metrics"]["winRates"]
    assert [(w["baseline"], w["items"]) for w in rates] == [("base", 3), ("reference", 3)]
    assert json.loads((prefix / "reference" / "metrics.json").read_text())["model"] == str(
        other_llama
    )
    assert "| reference |" in result.stdout and "| win rate vs reference |" in result.stdout
    assert {"win_rate.png", "win_rate_reference.png"} <= {
        p.name for p in (prefix / "report").iterdir()
    }

    again = sami_run(path, tmp_path)
    assert again.returncode == 0 and again.stdout.count("already done") == 5


def test_a_broken_file_fails_before_any_work(tiny_llama, tmp_path):
    manifest = mini_manifest(tiny_llama, tmp_path / "runs")
    manifest["spec"]["training"]["optimizer"]["lr"] = 7
    result = sami_run(write(tmp_path, manifest), tmp_path)
    assert result.returncode == 1
    assert "spec.training.optimizer.lr: Input should be less than or equal to 1" in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".sami").exists()


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tiny_llama, tmp_path):
    manifest = mini_manifest(tiny_llama, tmp_path / "runs")
    # Long enough to interrupt mid-training, with checkpoints to resume from.
    manifest["spec"]["training"].update(steps=600, checkpointEvery=50)
    path = write(tmp_path, manifest)
    proc = subprocess.Popen(
        [SAMI, "run", str(path)],
        cwd=tmp_path,
        text=True,
        stdout=subprocess.DEVNULL,  # not read while it runs: a full pipe would stall it
        stderr=subprocess.PIPE,
        # As in a terminal: a shell without job control starts background commands (a CI
        # script run with `&`, and everything under it) with SIGINT ignored, and Python then
        # raises no KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    logs = tmp_path / ".sami"
    # Interrupt once a training state is saved (training runs at tens of steps a second here):
    # waits follow progress, not the clock.
    states = "default/mini/*/iterations/1/train/state/step-*/_manifest.json"
    while not list((tmp_path / "runs").glob(states)):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    prefix = run_dir(tmp_path / "runs")
    assert not (prefix / "iterations" / "1" / "train" / "_manifest.json").exists()
    # The training processes are gone with the runner.
    leftover = subprocess.run(["pgrep", "-f", str(logs)], capture_output=True, text=True)
    assert leftover.stdout == ""

    result = sami_run(path, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "generate-1: already done" in result.stdout
    assert "train-1: done" in result.stdout
    train_log = next(logs.glob("**/logs/train-1.log")).read_text()
    assert "resuming from" in train_log and "step 1/600" not in train_log
    # Complete: the states it resumed from are deleted (cleanup.trainingStates: delete).
    assert not (prefix / "iterations" / "1" / "train" / "state").exists()
    assert (prefix / "iterations" / "1" / "train" / "checkpoint" / "_manifest.json").exists()


# Outputs that must not depend on the run: datasets, responses with their log-prob matrices,
# weights. (metrics.json names the evaluated model's path, which is the run's own; the metrics
# are compared in status.json.)
REPRODUCED = ("dataset.jsonl", "responses.jsonl", "model.safetensors")


def reproduced_files(prefix: Path) -> dict[str, str]:
    """sha256 of each output a run must reproduce, by its path under the run prefix."""
    return {
        str(path.relative_to(prefix)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(prefix.rglob("*"))
        if path.name in REPRODUCED
    }


@pytest.mark.vllm
@pytest.mark.slow
def test_a_vllm_run_twice_from_scratch_gives_the_same_files_and_metrics(tiny_llama, tmp_path):
    """The same spec run twice on one machine, each from scratch (its own storage): vLLM
    generation and scoring, training and evaluation give byte-identical datasets, responses,
    weights and metrics, sampling at temperature 0.7, with two evaluation seeds whose spread
    the metrics report."""
    runs = []
    for name in ("first", "second"):
        manifest = mini_manifest(tiny_llama, tmp_path / name, backend="vllm")
        manifest["spec"]["generation"]["temperature"] = 0.7  # sampled, not greedy
        manifest["spec"]["evaluation"] = {"seeds": 2}
        (tmp_path / name).mkdir()
        path = write(tmp_path / name, manifest)
        result = sami_run(path, tmp_path / name)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs.append(run_dir(tmp_path / name))
    first, second = (json.loads((p / "status.json").read_text()) for p in runs)
    assert first["phase"] == second["phase"] == "Succeeded"
    assert first["iterations"][1]["metrics"]["meanResponseTokens"]["value"] > 0
    # Sampled (temperature 0.7): vLLM's second seed on CPU gives other responses.
    assert all(i["metrics"]["miLowerBound"]["seedStderr"] > 0 for i in first["iterations"])
    assert first["reproducibility"] == second["reproducibility"]
    assert [(i["metrics"], i.get("heldOutMetrics")) for i in first["iterations"]] == [
        (i["metrics"], i.get("heldOutMetrics")) for i in second["iterations"]
    ]
    files = reproduced_files(runs[0])
    assert {Path(k).name for k in files} == set(REPRODUCED)
    assert files == reproduced_files(runs[1])


def test_more_shards_than_gpus_is_refused_before_anything_runs(tiny_llama, tmp_path):
    """On a machine with GPUs each local shard gets its own; too few for every shard at once
    stops `sami run` before a stage starts, naming the field."""
    manifest = mini_manifest(tiny_llama, tmp_path / "runs", backend="vllm")
    manifest["spec"]["generation"]["shards"] = 3
    path = write(tmp_path, manifest)
    result = sami_run(path, tmp_path, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"})
    assert result.returncode == 1
    assert "cannot run on this machine" in result.stderr
    assert "spec.generation.shards: 3 shards of 1 GPU(s) each" in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".sami").exists()


def dataset_lines(folder: Path) -> list[dict]:
    return [json.loads(row) for row in (folder / "dataset.jsonl").read_text().splitlines()]


@pytest.mark.vllm
@pytest.mark.slow
def test_two_shards_with_one_killed_once_give_the_one_worker_dataset(tiny_llama, tmp_path):
    """generation.shards 2 under `sami run`: shard 1's process is killed once; the run
    stops after shard 0 has finished, and the same command then runs shard 1 alone (shard
    0 is not started again) and the rest of the run. The two shards' datasets, in order,
    are the dataset one worker generates from the whole task. Greedy: sampled responses
    are the same only where vLLM seeds each request (on GPUs; sami_worker.backends)."""
    manifest = mini_manifest(tiny_llama, tmp_path / "runs", backend="vllm")
    manifest["spec"]["generation"]["shards"] = 2
    manifest["spec"]["evaluation"] = {"includeBase": False}
    path = write(tmp_path, manifest)
    proc = subprocess.Popen(
        [SAMI, "run", str(path)], cwd=tmp_path, text=True, stdout=subprocess.PIPE
    )
    shard_1 = "tasks/generate-1-shard-1.json"
    while not (pids := pgrep(shard_1)):  # waits follow progress: the process is there
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.kill(int(pids[0]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode != 0, out
    assert "generate-1: FAILED (shard 1: exit code -9" in out
    prefix = run_dir(tmp_path / "runs")
    generated = prefix / "iterations" / "1" / "generate"
    shards = [generated / f"shard-0000{i}-of-00002" for i in range(2)]
    assert (shards[0] / "_manifest.json").exists()  # the survivor finished and published
    assert not (shards[1] / "_manifest.json").exists()
    (shard_0_log,) = (tmp_path / ".sami").glob("**/logs/generate-1-shard-0.log")
    first_log = shard_0_log.read_text()
    assert "published" in first_log
    shards_of = lambda status: [  # noqa: E731
        (s["index"], s["phase"], s["attempts"])
        for s in status["iterations"][0]["generate"]["shards"]
    ]
    status = json.loads((prefix / "status.json").read_text())
    assert shards_of(status) == [(0, "Succeeded", 1), (1, "Failed", 1)]

    result = sami_run(path, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert shard_0_log.read_text() == first_log  # shard 0 did not run again
    status = json.loads((prefix / "status.json").read_text())
    assert status["iterations"][0]["generate"]["sharding"] == "Processes"
    # This run started shard 1 only (a local run counts its own attempts).
    assert shards_of(status) == [(0, "Succeeded", 0), (1, "Succeeded", 1)]
    assert status["phase"] == "Succeeded"

    # The whole task, as one worker: the same records, in the same order.
    (task_file,) = (tmp_path / ".sami").glob("**/tasks/generate-1-shard-0.json")
    whole = json.loads(task_file.read_text())
    whole.update(output=str(tmp_path / "one-worker"), queryOffset=0)
    del whole["queryCount"]
    (tmp_path / "whole.json").write_text(json.dumps(whole))
    one = subprocess.run(
        [sys.executable, "-m", "sami_worker", "generate", "--task", str(tmp_path / "whole.json")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    records = dataset_lines(shards[0]) + dataset_lines(shards[1])
    ids = [r["query_id"] for r in records]
    assert ids == sorted(set(ids)) and len(ids) > 1  # each query once, in order
    assert records == dataset_lines(tmp_path / "one-worker")


def pgrep(pattern: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return found.stdout.split()


def test_without_storage_a_local_run_writes_under_its_workdir(tiny_llama, tmp_path):
    from sami_operator.local import LocalRunner, run_uid
    from sami_operator.validate import parse_samirun

    manifest = mini_manifest(tiny_llama, tmp_path / "unused")
    del manifest["spec"]["storage"]
    run = parse_samirun(manifest)
    runner = LocalRunner(run, tmp_path / ".sami")
    assert runner.run.spec.storage.uri == str(tmp_path / ".sami" / "storage")
    # The uid of the spec as written (the workdir's), not of the default storage's path.
    assert runner.uid == run_uid(run)
    assert runner.prefix == f"{tmp_path}/.sami/storage/default/mini/{runner.uid}"


def relative_manifest(project: Path) -> dict:
    """A manifest in `project` naming its data, model and storage by paths relative to it."""
    (project / "data").mkdir(parents=True)
    for name in ("dialogue-train.jsonl", "dialogue-eval.jsonl"):
        (project / "data" / name).write_bytes((EXAMPLES / "data" / name).read_bytes())
    (project / "model").mkdir()
    manifest = mini_manifest("./model", "runs")
    manifest["spec"]["data"]["train"]["uri"] = "data/dialogue-train.jsonl"
    manifest["spec"]["data"]["eval"]["uri"] = "data/dialogue-eval.jsonl"
    return manifest


def test_relative_paths_resolve_against_the_manifest_folder(tmp_path):
    from sami_operator.local import resolve_relative_paths
    from sami_operator.validate import parse_samirun

    project = tmp_path / "project"
    manifest = relative_manifest(project)
    (project / "tokenizer").mkdir()
    spec = manifest["spec"]
    spec["model"]["tokenizer"] = "tokenizer"  # exists beside the manifest: a path
    spec["data"]["eval"]["uri"] = str(tmp_path / "eval.jsonl")  # absolute: as written
    spec["evaluation"] = {
        "constitutions": 2,
        "judge": {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",  # no such path: a hub name
            "reference": {"uri": "../models/reference", "tokenizer": "sami://x"},
        },
    }
    run = parse_samirun(manifest)
    resolved = resolve_relative_paths(run, project)

    s = resolved.spec
    assert s.model.uri == str(project / "model")
    assert s.model.tokenizer == str(project / "tokenizer")
    assert s.data.train.uri == str(project / "data" / "dialogue-train.jsonl")
    assert s.data.eval.uri == str(tmp_path / "eval.jsonl")
    assert s.evaluation.judge.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert s.evaluation.judge.reference.uri == str(tmp_path / "models" / "reference")
    assert s.evaluation.judge.reference.tokenizer == "sami://x"
    assert s.storage.uri == str(project / "runs")
    assert run.spec.model.uri == "./model" and run.spec.storage.uri == "runs"  # a copy

    spec["storage"]["uri"] = "s3://bucket/runs"
    spec["principles"] = {"writer": {"model": "./writer", "instruction": "be helpful"}}
    other = resolve_relative_paths(parse_samirun(manifest), project)
    assert other.spec.storage.uri == "s3://bucket/runs"
    assert other.spec.principles.writer.model == str(project / "writer")


def test_relative_paths_of_a_list_of_sources_resolve_each_and_missing_ones_are_named(tmp_path):
    from sami_operator.local import missing_local_paths, resolve_relative_paths
    from sami_operator.validate import parse_samirun

    project = tmp_path / "project"
    manifest = relative_manifest(project)
    data = manifest["spec"]["data"]
    data["train"] = [
        data["train"],
        {"uri": "data/absent.jsonl", "count": 2},
        {"uri": "s3://bucket/q.jsonl", "count": 2},  # a URI: as written
        {"dataset": "Anthropic/hh-rlhf", "subset": "harmless-base", "count": 2},
    ]
    resolved = resolve_relative_paths(parse_samirun(manifest), project)

    train = resolved.spec.data.train
    assert [s.uri for s in train] == [
        str(project / "data" / "dialogue-train.jsonl"),
        str(project / "data" / "absent.jsonl"),
        "s3://bucket/q.jsonl",
        None,
    ]
    assert resolved.spec.data.eval.uri == str(project / "data" / "dialogue-eval.jsonl")
    assert missing_local_paths(resolved) == [
        f"spec.data.train[1].uri: no such file: {project / 'data' / 'absent.jsonl'}"
    ]


def test_the_same_manifest_is_the_same_run_from_any_directory(tmp_path, monkeypatch):
    from sami_operator.cli import load_for_run
    from sami_operator.local import missing_local_paths, run_uid

    project = tmp_path / "project"
    path = project / "run.yaml"
    path.write_text(yaml.safe_dump(relative_manifest(project)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    monkeypatch.chdir(elsewhere)
    from_elsewhere = load_for_run(Path("../project/run.yaml"))
    assert missing_local_paths(from_elsewhere) == []  # found beside the manifest, not here
    monkeypatch.chdir(project)
    from_project = load_for_run(Path("run.yaml"))
    assert from_project == from_elsewhere
    assert run_uid(from_project) == run_uid(from_elsewhere)

    # An edit is another run.
    path.write_text(path.read_text().replace("count: 8", "count: 7"))
    assert run_uid(load_for_run(Path("run.yaml"))) != run_uid(from_project)


def test_a_run_says_whether_it_is_new_resumed_or_changed(tmp_path):
    from sami_operator.local import LocalRunner, default_workdir, run_uid
    from sami_operator.planner import plan
    from sami_operator.validate import parse_samirun
    from sami_worker import storage

    run = parse_samirun(mini_manifest("some/model", tmp_path / "runs"))
    uid = run_uid(run)
    workdir = tmp_path / default_workdir(run, uid)
    runner = LocalRunner(run, workdir)
    assert runner.uid == uid
    assert runner.start_lines(workdir.parent) == [f"new run default/mini {uid} in {workdir}"]

    earlier = workdir.parent / "0123456789ab"  # a run of an earlier version of the spec
    earlier.mkdir(parents=True)
    lines = runner.start_lines(workdir.parent)
    assert lines == [
        f"new run default/mini {uid} in {workdir}",
        f"the spec changed since the run in {earlier}: a new uid, so this run starts from "
        "its first stage",
    ]

    first = plan(runner.run, uid)[0]
    store = storage.open_storage(first.prefix)
    storage.write_stage_files(store, "", {"metrics.json": b"{}"}, stage=first.id)
    assert runner.start_lines(workdir.parent) == [
        f"resuming default/mini {uid} in {workdir}: 1 of 4 stages done"
    ]
