"""The worker-operator contract (sami_worker.contract): the result line both sides read and
write, the exit codes, the program table, and the worker's "already complete" check."""

from __future__ import annotations

import json
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sami_operator.models import StagePhase
from sami_operator.planner import cleanup_stage, plan
from sami_operator.reconcile import ChildState, _retryable, error_text
from sami_worker import storage, tasks
from sami_worker.__main__ import MODULES, main
from sami_worker.contract import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    EXIT_RETRYABLE,
    PROGRAMS,
    RESULT_FILE_ENV,
    RESULT_LIMIT,
    ResultLine,
    format_result_line,
    parse_result_line,
    program_of,
    write_result_line,
)
from sami_worker.tasks import dump_task

# --- the result line ---------------------------------------------------------------------------


def test_result_line_round_trip(tmp_path, capsys):
    summary = {"kept": 3, "metrics": {"miLowerBound": {"value": 0.3}}}
    path = tmp_path / "termination-log"
    line = write_result_line("generate", EXIT_OK, summary, None, str(path))
    assert capsys.readouterr().out == line + "\n"
    assert path.read_text() == line
    assert json.loads(line) == {
        "stage": "generate",
        "exit_code": 0,
        "summary": summary,
        "error": None,
    }
    assert parse_result_line(line) == ResultLine("generate", 0, summary, None, False)
    assert parse_result_line(line.encode()) == parse_result_line(line)
    failed = parse_result_line(format_result_line("train", EXIT_RETRYABLE, error="peer died"))
    assert failed == ResultLine("train", 75, None, "peer died", False)


def test_no_file_without_a_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_result_line("score", EXIT_OK, {"pairs": 1})
    assert json.loads(capsys.readouterr().out)["summary"] == {"pairs": 1}
    assert list(tmp_path.iterdir()) == []


def test_unknown_fields_are_ignored():
    newer = {"stage": "evaluate", "exit_code": 0, "summary": {"x": 1}, "new": [1, {"y": 2}]}
    assert parse_result_line(json.dumps(newer)) == ResultLine("evaluate", 0, {"x": 1})
    assert parse_result_line("{}") == ResultLine()


@pytest.mark.parametrize(
    "field, value",
    [
        ("exit_code", "75"),
        ("exit_code", True),  # a bool is no exit code
        ("exit_code", 75.0),
        ("exit_code", None),
        ("summary", [1]),
        ("summary", "kept"),
        ("error", ["boom"]),
        ("error", 3),
        ("stage", 1),
    ],
)
def test_a_field_of_the_wrong_type_reads_as_absent(field, value):
    line = parse_result_line(json.dumps({field: value}))
    assert line is not None and getattr(line, field) is None


@pytest.mark.parametrize(
    "text",
    [None, "", "Traceback (most recent call last): ...", "[]", "3", '"text"', "null", b"\xff\xfe"],
)
def test_what_is_no_result_line_parses_to_none(text):
    assert parse_result_line(text) is None


def test_a_deeply_nested_message_parses_to_none():
    assert parse_result_line("[" * 4000 + "]" * 4000) is None
    assert parse_result_line('{"summary": ' + "[" * 2000 + "]" * 2000 + "}") is None


def test_a_long_line_is_cut_to_the_termination_message_bound():
    summary = {"rows": list(range(2000))}
    line = format_result_line("evaluate", EXIT_OK, summary, "e" * 5000)
    assert len(line.encode()) <= RESULT_LIMIT
    parsed = parse_result_line(line)
    assert parsed == ResultLine("evaluate", 0, None, "e" * 2000, True)
    # Short enough: kept whole, no truncated field.
    fits = format_result_line("evaluate", EXIT_OK, {"rows": list(range(100))})
    assert "truncated" not in json.loads(fits)


def test_the_bound_holds_for_errors_whose_escapes_are_longer_than_their_characters():
    line = format_result_line("generate", EXIT_BAD_INPUT, None, "é\n" * 3000)
    assert len(line.encode()) <= RESULT_LIMIT
    parsed = parse_result_line(line)
    assert parsed.truncated and parsed.exit_code == 65 and parsed.error.startswith("é\né")


@settings(max_examples=100, deadline=2000)
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_any_text_parses_or_is_none(text):
    assert parse_result_line(text) is None or isinstance(parse_result_line(text), ResultLine)


@settings(max_examples=50, deadline=2000)
@given(st.text(max_size=6000), st.integers(0, 255))
def test_any_error_round_trips_within_the_bound(error, code):
    line = format_result_line("train", code, None, error)
    assert len(line.encode()) <= RESULT_LIMIT
    parsed = parse_result_line(line)
    assert parsed.exit_code == code and error.startswith(parsed.error)


def test_the_operator_reads_what_the_worker_writes():
    """Through the pod: torchrun exits 1 whatever its child returned, so the line decides."""
    retry = format_result_line("train", EXIT_RETRYABLE, error="peer died")
    bad = format_result_line("train", EXIT_BAD_INPUT, error="no such dataset")
    assert _retryable(ChildState(StagePhase.failed, 1, retry, "Error"))
    assert not _retryable(ChildState(StagePhase.failed, 1, bad, "Error"))
    assert error_text(ChildState(StagePhase.failed, 1, bad)) == "exit code 65: no such dataset"


def test_the_operator_names_the_result_file_the_worker_writes(monkeypatch, tmp_path):
    from sami_worker.settings import summary_file

    monkeypatch.setenv(RESULT_FILE_ENV, str(tmp_path / "log"))
    assert summary_file() == str(tmp_path / "log")


# --- programs ------------------------------------------------------------------------------------


def test_the_program_table_covers_every_task_kind(samirun_doc):
    from sami_operator.validate import parse_samirun

    union = typing.get_args(tasks.AnyTask)[0]  # Annotated[Union[...], discriminator]
    kinds = {t.model_fields["kind"].default for t in typing.get_args(union)}
    assert set(PROGRAMS) == kinds == set(MODULES) | {"delete-prefix"}
    for name, task_type in PROGRAMS.items():
        assert typing.get_args(task_type.model_fields["kind"].annotation) == (name,)
    run = parse_samirun(samirun_doc)
    stages = [*plan(run, "uid-1"), cleanup_stage(run, "uid-1")]
    for stage in stages:
        assert stage.program == program_of(stage.task) == stage.task.kind
        assert isinstance(stage.task, PROGRAMS[stage.program])
    programs = {s.name: s.program for s in stages}
    assert programs["cleanup"] == "delete-prefix"
    assert programs["generate"] == "generate" and programs["train"] == "train"


def test_the_worker_accepts_exactly_the_programs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-program", "--task", str(tmp_path / "t.json")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert all(repr(program) in err for program in PROGRAMS)


# --- "already complete" -----------------------------------------------------------------------


def _score_task(out) -> tasks.ScoreTask:
    pair = {"promptTokenIds": [1], "responseTokenIds": [2]}
    return tasks.ScoreTask.model_validate(
        {"output": str(out), "model": {"uri": "m"}, "pairs": [pair]}
    )


def test_a_complete_output_is_reported_not_redone(tmp_path, capsys, monkeypatch):
    out = storage.open_storage(str(tmp_path / "out"))
    storage.write_stage_files(out, "", {"scores.jsonl": b"{}\n"}, stage="score", meta={"pairs": 1})
    path = tmp_path / "task.json"
    path.write_text(dump_task(_score_task(tmp_path / "out")))
    monkeypatch.setitem(MODULES, "score", "no_such_module")  # dispatching would fail
    assert main(["score", "--task", str(path)]) == EXIT_OK
    result = parse_result_line(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == ResultLine("score", 0, {"pairs": 1}, None)

    # A file the manifest lists is missing: not complete, so the program runs.
    (tmp_path / "out" / "scores.jsonl").unlink()
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        main(["score", "--task", str(path)])


def test_a_complete_training_output_still_loses_its_states(tmp_path, capsys, monkeypatch):
    """A crash between the stage manifest and the pruning leaves states behind: the rerun
    that finds the stage complete deletes them (rank 0 only), unless the task keeps them."""
    out = storage.open_storage(str(tmp_path / "out"))
    storage.write_stage_files(out, "state/step-00000003", {"a.distcp": b"x"}, stage="state")
    storage.write_stage_files(out, "", {"summary.json": b"{}"}, stage="train", meta={"loss": 1})
    task = tasks.TrainTask.model_validate(
        {
            "output": str(tmp_path / "out"),
            "model": {"uri": "m"},
            "datasets": ["d"],
            "iterationSteps": 3,
        }
    )
    path = tmp_path / "task.json"
    monkeypatch.setitem(MODULES, "train", "no_such_module")

    path.write_text(dump_task(task.model_copy(update={"keep_states": True})))
    assert main(["train", "--task", str(path)]) == EXIT_OK
    assert out.list("state")
    monkeypatch.setenv("RANK", "1")
    path.write_text(dump_task(task))
    assert main(["train", "--task", str(path)]) == EXIT_OK
    assert out.list("state")  # not rank 0's job
    monkeypatch.setenv("RANK", "0")
    capsys.readouterr()
    assert main(["train", "--task", str(path)]) == EXIT_OK
    assert out.list("state") == [] and storage.is_complete(out, "")
    assert parse_result_line(capsys.readouterr().out.splitlines()[-1]).summary == {"loss": 1}
