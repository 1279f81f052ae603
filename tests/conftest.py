from pathlib import Path

import pytest

from sami_operator.validate import load_manifests

pytest_plugins = ["tests.s3server", "tests.tinymodel", "tests.k8s.plugin"]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def example_manifests() -> list[Path]:
    """Every example file holding a SAMIRun."""
    return sorted(p for p in EXAMPLES.glob("*.yaml") if "kind: SAMIRun" in p.read_text())


@pytest.fixture
def samirun_doc() -> dict:
    """A fresh, valid SAMIRun manifest (examples/samirun.yaml) as a dict, free to mutate."""
    return load_manifests((EXAMPLES / "samirun.yaml").read_text())[0]
