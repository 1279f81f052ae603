"""`sami run` end to end on CPU: a miniature SAMI run through the real executor."""

from __future__ import annotations

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
    path = write(tmp_path, mini_manifest(tiny_llama, tmp_path / "runs"))
    result = sami_run(path, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| 0 (base) |" in result.stdout and "| 1 |" in result.stdout

    prefix = run_dir(tmp_path / "runs")
    status = json.loads((prefix / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    assert [i["iteration"] for i in status["iterations"]] == [0, 1]
    assert status["iterations"][1]["checkpointUri"].endswith("iterations/1/train/checkpoint")
    assert status["modelUri"] == status["iterations"][1]["checkpointUri"]
    assert (
        status["latestMiLowerBound"] == status["iterations"][1]["metrics"]["miLowerBound"]["value"]
    )
    report = prefix / "report"
    assert {
        "summary.md",
        "mi_lower_bound.png",
        "plug_in_mi.png",
        "response_tokens.png",
        "status.json",
    } <= {p.name for p in report.iterdir()}
    assert (tmp_path / ".sami" / "default" / "mini").is_dir()  # task files and logs

    again = sami_run(path, tmp_path)
    assert again.returncode == 0
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
    manifest["spec"]["training"].update(steps=300, checkpointEvery=50)
    path = write(tmp_path, manifest)
    proc = subprocess.Popen(
        [SAMI, "run", str(path)],
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    logs = tmp_path / ".sami"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = list(logs.glob("**/logs/train-1.log"))
        if found and "step 60/300" in found[0].read_text():
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
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
    assert "resuming from" in train_log and "step 1/300" not in train_log
    # Complete: the states it resumed from are deleted (cleanup.trainingStates: delete).
    assert not (prefix / "iterations" / "1" / "train" / "state").exists()
    assert (prefix / "iterations" / "1" / "train" / "checkpoint" / "_manifest.json").exists()


@pytest.mark.vllm
@pytest.mark.slow
def test_mini_run_on_vllm(tiny_llama, tmp_path):
    path = write(tmp_path, mini_manifest(tiny_llama, tmp_path / "runs", backend="vllm"))
    result = sami_run(path, tmp_path, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = json.loads((run_dir(tmp_path / "runs") / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    assert status["iterations"][1]["metrics"]["meanResponseTokens"]["value"] > 0


def test_without_storage_a_local_run_writes_under_its_workdir(tiny_llama, tmp_path):
    from sami_operator.local import LocalRunner
    from sami_operator.validate import parse_samirun

    manifest = mini_manifest(tiny_llama, tmp_path / "unused")
    del manifest["spec"]["storage"]
    runner = LocalRunner(parse_samirun(manifest), tmp_path / ".sami")
    assert runner.run.spec.storage.uri == str(tmp_path / ".sami" / "storage")
    assert runner.prefix.startswith(f"{tmp_path}/.sami/storage/default/mini/")
