"""The `sami` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from sami_operator import __version__
from sami_operator.cli import main
from tests.conftest import ROOT, example_manifests


def test_console_script_is_installed():
    sami = Path(sys.executable).parent / "sami"
    out = subprocess.run([sami, "version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == __version__


def test_validate_accepts_the_examples():
    result = CliRunner().invoke(main, ["validate", *map(str, example_manifests())])
    assert result.exit_code == 0, result.output
    assert result.output.count(": valid") == len(example_manifests())


def test_validate_reports_each_problem_and_fails(tmp_path):
    text = (ROOT / "examples" / "samirun.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("lr: 5.0e-7", "lr: -1").replace("perQuery: 2", "perQuery: 40"))
    good = tmp_path / "good.yaml"
    good.write_text(text)
    result = CliRunner().invoke(main, ["validate", str(bad), str(good)])
    assert result.exit_code == 1
    assert f"{bad} is invalid:" in result.output
    assert "spec.training.optimizer.lr: Input should be greater than 0 (got -1)" in result.output
    assert "spec.constitutions.perQuery: Input should be less than or equal to 16" in result.output
    assert f"{good}: valid" in result.output


def test_validate_refuses_processes_and_engines_the_pods_have_no_gpus_for(tmp_path):
    text = (ROOT / "examples" / "samirun.yaml").read_text()
    assert "procsPerNode: 8" in text and "tensorParallelSize: 1" in text
    too_many = tmp_path / "procs.yaml"
    too_many.write_text(text.replace("procsPerNode: 8", "procsPerNode: 16"))
    no_gpus = tmp_path / "tp.yaml"
    no_gpus.write_text(text.replace("tensorParallelSize: 1", "tensorParallelSize: 2"))
    result = CliRunner().invoke(main, ["validate", str(too_many), str(no_gpus)])
    assert result.exit_code == 1
    assert (
        "spec.training.procsPerNode: 16 processes per node but spec.pods.train asks for 8 "
        "nvidia.com/gpu; set procsPerNode <= 8 or ask for more GPUs"
    ) in result.output
    assert (
        "spec.generation.engine.tensorParallelSize: 2 GPUs per vLLM engine but "
        "spec.pods.generate asks for 1 nvidia.com/gpu; set tensorParallelSize <= 1 or ask for "
        "more GPUs"
    ) in result.output


def test_validate_rejects_unreadable_and_non_yaml(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    result = CliRunner().invoke(main, ["validate", str(broken), str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1
    assert "not valid YAML" in result.output
    assert "missing.yaml: cannot read" in result.output


def test_crd_writes_what_the_models_generate(tmp_path):
    result = CliRunner().invoke(main, ["crd", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    written = (tmp_path / "sami.dev_samiruns.yaml").read_text()
    assert written == (ROOT / "crds" / "sami.dev_samiruns.yaml").read_text()


def test_validate_refuses_run_names_the_launchers_would_refuse(tmp_path):
    text = (ROOT / "examples" / "samirun.yaml").read_text()
    assert "name: mistral-hh\n" in text
    digit = tmp_path / "digit.yaml"
    digit.write_text(text.replace("name: mistral-hh\n", "name: 7b-hh\n"))
    long = tmp_path / "long.yaml"
    long.write_text(text.replace("name: mistral-hh\n", f"name: mistral-hh-{'x' * 30}\n"))
    result = CliRunner().invoke(main, ["validate", str(digit), str(long)])
    assert result.exit_code == 1
    assert "metadata.name: '7b-hh' is not a DNS-1035 label" in result.output
    shown = f"mistral-hh-{'x' * 26}..."  # the first 37 characters
    assert f"metadata.name: '{shown}' is 41 characters; at most 31, so that" in result.output


def _validate(tmp_path, content: bytes | str):
    path = tmp_path / "run.yaml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def _example_with(old: str, new: str) -> str:
    text = (ROOT / "examples" / "samirun.yaml").read_text()
    assert old in text
    return text.replace(old, new, 1)


def test_validate_refuses_hostile_files_clearly_and_quickly(tmp_path):
    """Each used to end in a traceback or take seconds and hundreds of MB."""
    bomb = "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n"
    for level in "bcdefghij":
        previous = chr(ord(level) - 1)
        bomb += f"{level}: &{level} [{', '.join([f'*{previous}'] * 9)}]\n"
    cases = {
        b"apiVersion: \xff\n": "not UTF-8 text: byte 0xff at offset 12",
        "a: " + "[" * 20000 + "]" * 20000: "nested deeper than 64 levels",
        "? [a, b]\n: c\n": "a key must be a string, not a list or mapping",
        bomb: "expands to more than 200000 values",
        "a: &a [*a]\n": "an alias refers to itself",
    }
    for content, message in cases.items():
        result = _validate(tmp_path, content)
        assert result.exit_code == 1 and message in result.output, (message, result.output)


def test_validate_reads_scalars_and_names_as_the_api_server_does(tmp_path):
    cases = {
        ("iterations: 3", 'iterations: "3"'): "spec.training.iterations: Input should be a "
        "valid integer",
        ("iterations: 3", 'iterations: 3\n    activationCheckpointing: "yes"'): (
            "spec.training.activationCheckpointing: Input should be a valid boolean"
        ),
        ("name: mistral-hh", "name: mistral-hh\n  namespace: ../../../tmp/x"): (
            "metadata.namespace: '../../../tmp/x' is not a namespace name"
        ),
    }
    for (old, new), message in cases.items():
        result = _validate(tmp_path, _example_with(old, new))
        assert result.exit_code == 1 and message in result.output, (message, result.output)


def test_report_on_a_folder_that_is_no_run_fails_and_names_the_runs_below(tmp_path):
    from sami_worker import storage

    runs = tmp_path / "runs" / "default" / "mini"
    store = storage.open_storage(str(runs / "1234"))
    storage.write_stage_files(
        store, "iterations/1/train", {"x": b"1"}, stage="train_1", meta={"final_loss": 1.0}
    )
    result = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "no finished stage of a SAMI run here" in result.output
    assert f"runs below it: file://{runs / '1234'}" in result.output
    assert not (tmp_path / "out").exists()  # nothing written


def test_report_on_s3_without_credentials_is_one_line(tmp_path, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    args = ["report", "s3://bucket/runs/x", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, [*args, "--endpoint-url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("sami report: ") and result.output.count("\n") == 1


def test_validate_skips_other_apis_beside_the_runs(tmp_path):
    runtime = ROOT / "examples" / "clustertrainingruntime-sami.yaml"
    both = tmp_path / "both.yaml"
    both.write_text(
        runtime.read_text() + "\n---\n" + (ROOT / "examples" / "samirun.yaml").read_text()
    )
    result = CliRunner().invoke(main, ["validate", str(both)])
    assert result.exit_code == 0, result.output
    assert (
        "(document 1): skipped (trainer.kubeflow.org/v1alpha1 ClusterTrainingRuntime"
        in result.output
    )
    assert f"{both}: valid" in result.output
    typo = tmp_path / "typo.yaml"
    typo.write_text(
        (ROOT / "examples" / "samirun.yaml").read_text().replace("kind: SAMIRun", "kind: SamiRun")
    )
    assert CliRunner().invoke(main, ["validate", str(typo)]).exit_code == 1  # our API: checked


def test_run_names_each_local_path_missing_beside_the_manifest(tmp_path, monkeypatch):
    """Relative paths are looked up in the manifest's folder, not the current directory: the
    data files there are found, the missing model folder and eval file are named, with the
    path they resolved to, and nothing starts."""
    import yaml

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.jsonl").write_text('{"query": "hi"}\n')
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["model"]["uri"] = "./model"
    doc["spec"]["data"]["train"]["uri"] = "data/train.jsonl"
    doc["spec"]["data"]["eval"]["uri"] = "data/eval.jsonl"
    (project / "run.yaml").write_text(yaml.safe_dump(doc))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "data" / "eval.jsonl").write_text('{"query": "hi"}\n')  # not this one
    monkeypatch.chdir(elsewhere)

    result = CliRunner().invoke(main, ["run", "../project/run.yaml"])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines() == [
        f"../project/run.yaml: cannot run (relative paths resolve against {project}):",
        f"  spec.model.uri: no model folder at {project / 'model'}",
        f"  spec.data.eval.uri: no such file: {project / 'data' / 'eval.jsonl'}",
    ]
    assert not (elsewhere / ".sami").exists() and not (tmp_path / "runs").exists()


def test_the_quickstart_names_its_data_relative_to_its_folder(tmp_path, monkeypatch):
    from sami_operator.cli import load_for_run
    from sami_operator.local import missing_local_paths, run_uid

    monkeypatch.chdir(tmp_path)
    quickstart = load_for_run(ROOT / "examples" / "quickstart.yaml")
    assert missing_local_paths(quickstart) == []
    assert quickstart.spec.storage.uri == str(ROOT / "runs")  # as `make quickstart` had it
    monkeypatch.chdir(ROOT)
    assert run_uid(load_for_run(Path("examples/quickstart.yaml"))) == run_uid(quickstart)
