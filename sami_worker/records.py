"""The generation stage's dataset, one typed record per query (docs/method.md, 'Generation').

`generate` writes it and `train` reads it back in another process, often another pod; both
go through this module, so the file holds what the reader expects, or the reader says which
file, line and field do not. A record is one query's block: the C constitutions sampled for it,
the prompt rendered under each and its token ids, and the response generated under each, as
text and as token ids (EOS kept apart: `ended_with_eos`, scored in training when the model
emitted it). A record checks itself whenever it is made or read: each per-constitution list has
C >= 2 entries and `response_tokens[i] == len(response_token_ids[i])`; reading also checks that
the records of one file share their C.

The files: DATASET_JSONL, one JSON object per line (`json.dumps` of the record's fields in
their order, so a dataset is byte for byte what it was before these types), or DATASET_PARQUET,
one row per record (`output_format: parquet`). A corrupt or mismatched record raises
`DatasetError`, which the worker reports as bad input (exit 65).

Pure on purpose (pydantic; pyarrow only when a Parquet file is read or written; no torch,
vLLM or transformers): benchmarks and tests build datasets with it without a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from sami_worker.datasets import DatasetError

DATASET_JSONL = "dataset.jsonl"
DATASET_PARQUET = "dataset.parquet"
FILES = {"jsonl": DATASET_JSONL, "parquet": DATASET_PARQUET}
MIN_CONSTITUTIONS = 2  # the contrastive matrix is C x C (constitutions.perQuery >= 2)

# The fields that hold one entry per constitution, beside `constitutions` itself.
PER_CONSTITUTION = (
    "constitution_texts",
    "prompt_token_ids",
    "responses",
    "response_token_ids",
    "response_tokens",
    "finish_reasons",
    "ended_with_eos",
)


class ConstitutionItem(BaseModel):
    """One principle of a constitution, as the prompt lists it: its definition (kept) or its
    antithesis (negated)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    principle: StrictStr
    kept: StrictBool


class DatasetRecord(BaseModel):
    """One query's block: entry j of every per-constitution field belongs to constitution j."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    query_id: StrictInt
    query: StrictStr
    constitutions: tuple[tuple[ConstitutionItem, ...], ...]
    constitution_texts: tuple[StrictStr, ...]
    prompt_token_ids: tuple[tuple[StrictInt, ...], ...]
    responses: tuple[StrictStr, ...]
    # The generated token ids of each stored response (completions.response_token_ids), EOS
    # excluded.
    response_token_ids: tuple[tuple[StrictInt, ...], ...]
    response_tokens: tuple[StrictInt, ...]
    finish_reasons: tuple[StrictStr, ...]
    ended_with_eos: tuple[StrictBool, ...]

    @property
    def c(self) -> int:
        """C: the block's constitutions (and prompts, and responses)."""
        return len(self.constitutions)

    @model_validator(mode="after")
    def _one_entry_per_constitution(self) -> DatasetRecord:
        c = len(self.constitutions)
        if c < MIN_CONSTITUTIONS:
            raise PydanticCustomError(
                "constitutions",
                "constitutions: a block needs at least {least}, got {c}",
                {"c": c, "least": MIN_CONSTITUTIONS},
            )
        for name in PER_CONSTITUTION:
            n = len(getattr(self, name))
            if n != c:
                raise PydanticCustomError(
                    "per_constitution",
                    "{name}: one entry per constitution expected ({c}), got {n}",
                    {"name": name, "n": n, "c": c},
                )
        for j, (count, ids) in enumerate(
            zip(self.response_tokens, self.response_token_ids, strict=True)
        ):
            if count != len(ids):
                raise PydanticCustomError(
                    "response_tokens",
                    "response_tokens: entry {j} is {count}, but response_token_ids[{j}] holds "
                    "{n} ids",
                    {"j": j, "count": count, "n": len(ids)},
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The record as the files store it: plain lists and dicts, keys in field order."""
        return self.model_dump(mode="json")


def constitution_record(constitution) -> list[dict]:
    """A constitution (`sami_worker.constitutions.Constitution`) as datasets store it: its
    principles in order, each kept or negated (a list of records, so JSONL and Parquet hold the
    same shape)."""
    return [{"principle": name, "kept": kept} for name, kept in constitution.items]


def token_record(
    query_id: int,
    prompt_token_ids: Sequence[Sequence[int]],
    response_token_ids: Sequence[Sequence[int]],
    ended_with_eos: Sequence[bool],
) -> DatasetRecord:
    """A record of token ids alone, for datasets made without a generation stage (benchmarks,
    tests of training, which reads only the ids): empty texts, one placeholder principle per
    constitution, finish reason "stop" where the response ended with EOS and "length"
    elsewhere."""
    c = len(prompt_token_ids)
    return DatasetRecord(
        query_id=query_id,
        query="",
        constitutions=[[{"principle": f"constitution-{j}", "kept": True}] for j in range(c)],
        constitution_texts=[""] * c,
        prompt_token_ids=prompt_token_ids,
        responses=[""] * c,
        response_token_ids=response_token_ids,
        response_tokens=[len(ids) for ids in response_token_ids],
        finish_reasons=["stop" if eos else "length" for eos in ended_with_eos],
        ended_with_eos=ended_with_eos,
    )


def encode_jsonl(records: Iterable[DatasetRecord]) -> bytes:
    """DATASET_JSONL's bytes: one `json.dumps` of each record's dict per line."""
    return "".join(json.dumps(r.to_dict()) + "\n" for r in records).encode()


def write_dataset(records: Sequence[DatasetRecord], directory: Path, fmt: str) -> Path:
    """Write the records to directory/DATASET_JSONL (fmt "jsonl") or DATASET_PARQUET
    ("parquet"); returns the file's path."""
    if fmt not in FILES:
        raise ValueError(f"unknown dataset format {fmt!r}; use one of {sorted(FILES)}")
    path = Path(directory) / FILES[fmt]
    if fmt == "jsonl":
        path.write_bytes(encode_jsonl(records))
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([r.to_dict() for r in records]), path)
    return path


def read_dataset(directory: Path) -> list[DatasetRecord]:
    """The records of the dataset in directory: DATASET_JSONL when there is one, else
    DATASET_PARQUET. Blank lines are skipped; lines and rows are counted from 1. Raises
    DatasetError naming the file, the line or row and the field of the first bad record."""
    directory = Path(directory)
    jsonl, parquet = directory / DATASET_JSONL, directory / DATASET_PARQUET
    if jsonl.exists():
        rows = _jsonl_rows(jsonl)
    elif parquet.exists():
        rows = _parquet_rows(parquet)
    else:
        raise DatasetError(f"{directory}: holds neither {DATASET_JSONL} nor {DATASET_PARQUET}")
    records: list[DatasetRecord] = []
    for where, record in rows:
        if records and record.c != records[0].c:
            raise DatasetError(
                f"{where}: constitutions: {record.c}, but the first record has {records[0].c} "
                "(the records of a dataset share their C)"
            )
        records.append(record)
    return records


def _jsonl_rows(path: Path) -> Iterable[tuple[str, DatasetRecord]]:
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {n}"
            try:
                yield where, DatasetRecord.model_validate_json(line)
            except ValidationError as err:
                raise DatasetError(f"{where}: {_problems(err)}") from None


def _parquet_rows(path: Path) -> Iterable[tuple[str, DatasetRecord]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DatasetError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from err
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DatasetError(f"{path}: not a readable Parquet file: {err}") from err
    for n, row in enumerate(rows, 1):
        where = f"{path}: row {n}"
        try:
            yield where, DatasetRecord.model_validate(row)
        except ValidationError as err:
            raise DatasetError(f"{where}: {_problems(err)}") from None


def _problems(err: ValidationError) -> str:
    """Each error as 'field.index: message' (the record-wide checks name their fields
    themselves)."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"]
        for e in err.errors(include_url=False)
    )
