"""The import boundaries hold: `lint-imports` (import-linter) checks the contracts in
pyproject.toml's [tool.importlinter] (docs/architecture.md, "Import boundaries").

The second test adds one forbidden import to a copy of the two packages and checks the same
contracts over the copy: the contract it names must break, so a checker that read nothing, or
the wrong code, fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # COLUMNS: one contract per line, not wrapped to a terminal's width.
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "500", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_contracts_are_kept():
    result = lint_imports(ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert " 0 broken." in output, output


@pytest.mark.parametrize(
    ("path", "line", "contract"),
    [
        (
            "sami_worker/tasks.py",
            "import kopf",
            "The worker never imports Kopf or the Kubernetes client, even indirectly",
        ),
        (
            "sami_worker/storage.py",
            "from sami_operator import planner",
            "The worker uses only the operator's API models",
        ),
        (
            "operator/sami_operator/planner.py",
            "from sami_operator import reconcile",
            "The operator's layers: each imports only the layers below it",
        ),
        (
            "operator/sami_operator/status.py",
            "from sami_worker import train",
            "The operator image's modules import nothing of the worker extra, even indirectly",
        ),
        (
            "sami_worker/completions.py",
            "from sami_worker import backends",
            "No import cycles between the modules of a package",
        ),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path, path, line, contract):
    for package in ("sami_worker", "operator/sami_operator"):
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    changed = tmp_path / path
    changed.write_text(changed.read_text() + f"\n{line}\n")
    # The copies come first on the path, before the editable install of the checkout.
    result = lint_imports(
        tmp_path, PYTHONPATH=os.pathsep.join([str(tmp_path), str(tmp_path / "operator")])
    )
    output = result.stdout + result.stderr
    # "<contract name> BROKEN", maybe followed by "(<n> ignored imports)"
    broken = [m[1] for m in re.finditer(r"^(.+) BROKEN\b", output, re.MULTILINE)]
    assert result.returncode == 1, output
    assert contract in broken, output
