"""scripts/gpu-smoke.sh: its CPU mode end to end, and how the report decides pass or fail.

The GPU mode needs an NVIDIA GPU; the CPU mode is the same script (gloo, float32, a small
model of the same family), so the code of every check runs on any machine first.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu-smoke.sh"
CHECKS = [
    "model",
    "sdpa_efficient_kernel",
    "vllm_matches_transformers",
    "fsdp_checkpointing",
    "export_reloads_in_vllm",
]


def smoke_module():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "scripts" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    # Registered first: dataclasses look their module up while the class is made.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.vllm
def test_cpu_mode_passes_every_check_it_runs(tmp_path):
    result = subprocess.run(
        ["bash", str(SCRIPT), "--cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    path = tmp_path / "gpu-smoke.json"
    assert path.exists(), result.stdout + result.stderr[-3000:]
    report = json.loads(path.read_text())
    checks = report["checks"]
    assert result.returncode == 0, json.dumps(checks, indent=1)[-8000:]
    assert report["mode"] == "cpu" and report["passed"] is True
    assert list(checks) == CHECKS
    assert report["environment"]["torch"] and report["environment"]["cuda_available"] is False
    assert set(report["tolerances"]) >= {"token_logprob", "packed_vs_padded", "first_loss"}
    for name, check in checks.items():
        assert check["status"] in ("pass", "skipped"), (name, check)
        assert isinstance(check["seconds"], float) and isinstance(check["numbers"], dict)
        if check["status"] == "skipped":
            assert check["reason"], name
        else:
            assert check["reason"] is None, name
        assert (tmp_path / "gpu-smoke-logs" / f"{name}.log").exists()

    assert checks["model"]["status"] == "pass"
    assert checks["model"]["numbers"]["config"]["num_hidden_layers"] == 2

    # No CUDA kernel to select on CPU, but the packed forward and backward ran and matched.
    sdpa = checks["sdpa_efficient_kernel"]
    assert sdpa["status"] == "skipped" and "no CUDA" in sdpa["reason"]
    assert sdpa["numbers"]["packed_vs_padded_max_abs_diff"] < 1e-4
    assert sdpa["numbers"]["gradients_finite"] is True

    train = checks["fsdp_checkpointing"]
    assert train["status"] == "pass"
    runs = train["numbers"]["runs"]
    for name in ("checkpointing_off", "checkpointing_on"):
        assert runs[name]["exit_code"] == 0 and runs[name]["steps"] == 2
        assert runs[name]["train_peak_mb"] > 0
    assert train["numbers"]["memory_compared"] is False
    assert train["numbers"]["first_loss_abs_diff"] <= 1e-4

    # vLLM runs where its CPU build is installed (it is in the project's venv).
    for name in ("vllm_matches_transformers", "export_reloads_in_vllm"):
        check = checks[name]
        if check["status"] == "skipped":
            assert "CPU build" in check["reason"], check
            continue
        assert check["numbers"]["greedy_tokens"] > 0
    compare = checks["vllm_matches_transformers"]
    if compare["status"] == "pass":
        assert compare["numbers"]["tokens_compared"] > 0
        assert compare["numbers"]["per_token_mean_abs_diff"] < 1e-3


def test_a_failed_check_fails_the_run_and_a_gpu_run_allows_no_skips(tmp_path):
    smoke = smoke_module()
    for mode, results, ok in [
        ("cpu", [("a", "pass"), ("b", "skipped")], True),
        ("cpu", [("a", "pass"), ("b", "fail")], False),
        ("gpu", [("a", "pass"), ("b", "pass")], True),
        ("gpu", [("a", "pass"), ("b", "skipped")], False),
    ]:
        report = smoke.Report(tmp_path / f"{mode}-{ok}.json", mode)
        for name, status in results:
            reason = None if status == "pass" else "why"
            report.record(name, smoke.Result(status, reason, {"n": 1}), 1.0)
        assert report.finish() is ok
        written = json.loads(report.path.read_text())
        assert written["passed"] is ok and list(written["checks"]) == ["a", "b"]


def test_train_peak_prefers_the_per_rank_train_phase():
    smoke = smoke_module()
    summary = {
        "peak_memory_mb": 900.0,
        "memory": {"device": "cuda", "ranks": [{"load": 1, "train": 700.0, "export": 2}]},
    }
    assert smoke.train_peak_mb(summary) == (700.0, "memory.ranks[].train")
    assert smoke.train_peak_mb({"peak_memory_mb": 900.0}) == (900.0, "peak_memory_mb")
