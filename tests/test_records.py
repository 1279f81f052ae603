"""The generation stage's dataset records (sami_worker.records): what generate writes, train
reads back, unchanged on disk, and every bad record named by file, line and field."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sami_worker.datasets import DatasetError
from sami_worker.records import (
    DATASET_JSONL,
    DATASET_PARQUET,
    DatasetRecord,
    encode_jsonl,
    read_dataset,
    token_record,
    write_dataset,
)


def record_dict(query_id: int = 0, c: int = 2) -> dict:
    """A record as generate has always written it: these keys, in this order."""
    return {
        "query_id": query_id,
        "query": f"How do I boil an egg? ({query_id}) é",
        "constitutions": [
            [{"principle": "helpful", "kept": j == 0}, {"principle": "harmless", "kept": True}]
            for j in range(c)
        ],
        "constitution_texts": [f"Be helpful ({j})." for j in range(c)],
        "prompt_token_ids": [[1, 15, 27 + j, 3] for j in range(c)],
        "responses": ["Put it in water." if j == 0 else "" for j in range(c)],
        "response_token_ids": [[9, 8, 7] if j == 0 else [] for j in range(c)],
        "response_tokens": [3 if j == 0 else 0 for j in range(c)],
        "finish_reasons": ["stop" if j == 0 else "length" for j in range(c)],
        "ended_with_eos": [j == 0 for j in range(c)],
    }


def write_lines(directory: Path, lines: list[str]) -> Path:
    path = directory / DATASET_JSONL
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_records_round_trip(tmp_path, fmt):
    records = [DatasetRecord.model_validate(record_dict(n, c=3)) for n in range(4)]
    path = write_dataset(records, tmp_path, fmt)
    assert path == tmp_path / (DATASET_JSONL if fmt == "jsonl" else DATASET_PARQUET)
    assert read_dataset(tmp_path) == records


def test_the_jsonl_file_is_json_dumps_of_each_record_as_before(tmp_path):
    """Byte for byte what generate wrote with plain dicts, so runs' dataset digests still
    compare and existing datasets still read."""
    dicts = [record_dict(n) for n in range(3)]
    before = "".join(json.dumps(d) + "\n" for d in dicts).encode()
    records = [DatasetRecord.model_validate(d) for d in dicts]
    assert encode_jsonl(records) == before
    assert write_dataset(records, tmp_path, "jsonl").read_bytes() == before
    assert [r.to_dict() for r in read_dataset(tmp_path)] == dicts


def test_the_parquet_file_holds_the_dicts_as_before(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    dicts = [record_dict(n) for n in range(3)]
    write_dataset([DatasetRecord.model_validate(d) for d in dicts], tmp_path, "parquet")
    table = pq.read_table(tmp_path / DATASET_PARQUET)
    assert table.schema == pa.Table.from_pylist(dicts).schema
    assert table.to_pylist() == dicts


def test_jsonl_wins_when_both_files_are_there(tmp_path):
    write_dataset([DatasetRecord.model_validate(record_dict(0))], tmp_path, "parquet")
    write_dataset([DatasetRecord.model_validate(record_dict(1))], tmp_path, "jsonl")
    assert [r.query_id for r in read_dataset(tmp_path)] == [1]


def test_blank_lines_are_skipped_and_counted(tmp_path):
    write_lines(tmp_path, [json.dumps(record_dict(0)), "", "  ", json.dumps(record_dict(1))])
    assert [r.query_id for r in read_dataset(tmp_path)] == [0, 1]
    write_lines(tmp_path, [json.dumps(record_dict(0)), "", "{"])
    with pytest.raises(DatasetError, match=r"line 3: Invalid JSON"):
        read_dataset(tmp_path)


def test_a_token_record_is_a_valid_record():
    record = token_record(7, [[1, 2], [1, 3]], [[4, 5, 6], []], [True, False])
    assert record.c == 2 and record.response_tokens == (3, 0)
    assert record.finish_reasons == ("stop", "length")
    assert DatasetRecord.model_validate_json(encode_jsonl([record])) == record


def test_records_are_frozen():
    record = DatasetRecord.model_validate(record_dict())
    with pytest.raises(ValueError, match="frozen"):
        record.query = "other"
    assert hash(record) == hash(DatasetRecord.model_validate(record_dict()))


def _bad(**changes) -> dict:
    record = record_dict()
    for key, value in changes.items():
        if value is None:
            del record[key]
        else:
            record[key] = value
    return record


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            json.dumps(_bad(responses=["only one"])),
            "line 2: responses: one entry per constitution expected (2), got 1",
        ),
        (
            json.dumps(_bad(prompt_token_ids=[[1], [2], [3]])),
            "line 2: prompt_token_ids: one entry per constitution expected (2), got 3",
        ),
        (
            json.dumps(_bad(response_tokens=[3, 1])),
            "line 2: response_tokens: entry 1 is 1, but response_token_ids[1] holds 0 ids",
        ),
        (json.dumps(_bad(ended_with_eos=None)), "line 2: ended_with_eos: Field required"),
        (
            json.dumps(_bad(prompt_token_ids=[[1, "2"], [3]])),
            "line 2: prompt_token_ids.0.1: Input should be a valid integer",
        ),
        (
            json.dumps(_bad(ended_with_eos=[1, 0])),
            "line 2: ended_with_eos.0: Input should be a valid boolean",
        ),
        (json.dumps(_bad(extra=1)), "line 2: extra: Extra inputs are not permitted"),
        (
            json.dumps(record_dict(c=1)),
            "line 2: constitutions: a block needs at least 2, got 1",
        ),
        (
            json.dumps(record_dict(c=3)),
            "line 2: constitutions: 3, but the first record has 2",
        ),
        ("not json", "line 2: Invalid JSON"),
        ("[1, 2]", "line 2: Input should be an object"),
    ],
)
def test_a_bad_jsonl_record_is_named_by_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path, [json.dumps(record_dict()), line])
    with pytest.raises(DatasetError) as err:
        read_dataset(tmp_path)
    assert str(err.value).startswith(f"{path}: {message}"), str(err.value)


def test_a_bad_parquet_row_is_named_by_file_row_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [record_dict(0), _bad(response_tokens=[2, 0])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / DATASET_PARQUET)
    with pytest.raises(DatasetError) as err:
        read_dataset(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / DATASET_PARQUET}: row 2: response_tokens: entry 0 is 2, but "
        "response_token_ids[0] holds 3 ids"
    )
    pq.write_table(pa.Table.from_pylist([_bad(query=None)]), tmp_path / DATASET_PARQUET)
    with pytest.raises(DatasetError, match=r"row 1: query: Field required"):
        read_dataset(tmp_path)
    (tmp_path / DATASET_PARQUET).write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match=r"dataset.parquet: not a readable Parquet file"):
        read_dataset(tmp_path)


def test_no_dataset_file_is_bad_input(tmp_path):
    with pytest.raises(DatasetError, match=r"holds neither dataset.jsonl nor dataset.parquet"):
        read_dataset(tmp_path)


def test_an_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset format 'csv'"):
        write_dataset([], tmp_path, "csv")


@st.composite
def datasets(draw) -> list[DatasetRecord]:
    c = draw(st.integers(2, 4))
    ids = st.lists(st.integers(0, 2**31 - 1), max_size=6)
    records = []
    for query_id in draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=4, unique=True)):
        responses = draw(st.lists(ids, min_size=c, max_size=c))
        principles = st.lists(
            st.fixed_dictionaries({"principle": st.text(max_size=8), "kept": st.booleans()}),
            min_size=1,
            max_size=3,
        )
        records.append(
            DatasetRecord(
                query_id=query_id,
                query=draw(st.text(max_size=20)),
                constitutions=draw(st.lists(principles, min_size=c, max_size=c)),
                constitution_texts=draw(st.lists(st.text(max_size=20), min_size=c, max_size=c)),
                prompt_token_ids=draw(st.lists(ids, min_size=c, max_size=c)),
                responses=draw(st.lists(st.text(max_size=20), min_size=c, max_size=c)),
                response_token_ids=responses,
                response_tokens=[len(r) for r in responses],
                finish_reasons=draw(
                    st.lists(st.sampled_from(["stop", "length"]), min_size=c, max_size=c)
                ),
                ended_with_eos=draw(st.lists(st.booleans(), min_size=c, max_size=c)),
            )
        )
    return records


@settings(max_examples=60, deadline=None)
@given(datasets(), st.sampled_from(["jsonl", "parquet"]))
def test_any_dataset_round_trips(records, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(records, Path(tmp), fmt)
        assert read_dataset(Path(tmp)) == records
    lines = encode_jsonl(records).decode().splitlines()
    assert lines == [json.dumps(r.to_dict()) for r in records]


def test_the_module_needs_no_ml_stack():
    """Benchmarks and tests build datasets with it without loading torch or a model."""
    code = (
        "import sys, sami_worker.records; "
        "print(sorted(m for m in ('torch', 'transformers', 'vllm', 'pyarrow') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
