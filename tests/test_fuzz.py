"""Property-based fuzzing of everything that reads outside input: `sami validate` (manifest
files), the worker's task files, and the result lines the operator reads from terminated pods.
Whatever the input, each fails the documented way (exit 1 with a message, TaskError, a failed
stage) within the per-example deadline, never with a traceback."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sami_operator.cli import main
from sami_operator.models import StagePhase
from sami_operator.reconcile import ChildState, decide
from sami_operator.settings import OperatorSettings
from sami_operator.validate import SpecError, parse_samirun
from sami_worker.tasks import TaskError, load_task
from tests.conftest import ROOT

FUZZ = settings(
    max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
EXAMPLE = yaml.safe_load((ROOT / "examples" / "samirun.yaml").read_text())
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


def _paths(doc, prefix=()):
    """Every (path, value) of a nested document."""
    yield prefix, doc
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, (*prefix, i))


PATHS = [path for path, _ in _paths(EXAMPLE) if path]


def _replaced(doc, path, value):
    doc = json.loads(json.dumps(doc))
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return doc


@FUZZ
@given(st.binary(max_size=400))
def test_validate_never_tracebacks_on_bytes(tmp_path, data):
    path = tmp_path / "run.yaml"
    path.write_bytes(data)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>?'\"#, \n\t0123")), max_size=200))
def test_validate_never_tracebacks_on_yaml_syntax(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code in (0, 1) and isinstance(result.exception, SystemExit), result.output


@FUZZ
@given(st.sampled_from(PATHS), json_values)
def test_any_value_anywhere_in_a_manifest_is_accepted_or_refused_by_field(path, value):
    """A wrong value at any field of the example is a SpecError whose message names a field
    (the one replaced, or one that depends on it), never another exception."""
    doc = _replaced(EXAMPLE, path, value)
    try:
        parse_samirun(doc)
    except SpecError as err:
        assert err.problems and all(p.strip() for p in err.problems)


@FUZZ
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_task_files_parse_or_fail_as_bad_input(tmp_path, data):
    path = tmp_path / "task.json"
    path.write_bytes(data)
    with pytest.raises(TaskError):
        load_task(path, "generate")


@pytest.fixture(scope="module")
def run():
    doc = json.loads(json.dumps(EXAMPLE))
    doc["metadata"]["namespace"] = "team-a"
    return parse_samirun(doc)


@FUZZ
@given(
    st.sampled_from([StagePhase.succeeded, StagePhase.failed]),
    st.integers(-300, 300) | st.none(),
    st.text(max_size=200) | json_values.map(json.dumps),
)
def test_any_result_line_settles_the_stage_without_raising(run, phase, code, message):
    """Whatever a terminated pod left as its termination message, the pass decides: the stage
    succeeds, fails, or is retried."""
    settings_ = OperatorSettings()
    first = decide(run, "uid-1", {}, {}, settings_, T0, T0)
    child = first.records["evaluate-0"].child
    state = ChildState(phase, code, message)
    decision = decide(run, "uid-1", first.records, {child: state}, settings_, T0, T0)
    record = decision.records["evaluate-0"]
    assert record.phase in (StagePhase.succeeded, StagePhase.failed, StagePhase.pending)
