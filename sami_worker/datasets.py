"""Queries and principles from files: a SAMIRun `QuerySource` becomes a list of query strings.

A source is a file (`uri`: JSONL or Parquet, local, file:// or s3://) or a Hugging Face hub
dataset (`dataset`, needs the optional `datasets` package). Each record becomes one query
through an adapter:
- "field":   `record[source.field]`; dotted paths reach into nested records ("info.post").
- "hh-rlhf": the first human turn of `chosen` (Anthropic/hh-rlhf records); the paper's dialogue
  runs prompt with the opening question, not the whole transcript.
- "tldr":    `info.post` (openai/summarize_from_feedback records), or a flat `post`.
The hh-rlhf and tldr adapters ignore `source.field`. Empty queries are skipped and repeats
dropped (the TL;DR comparison sets hold each post once per comparison), then `count` queries are
taken from `offset` on, so successive iterations could rotate through one file (the planner
passes offset 0: every iteration generates for the same queries).

A data field may list several sources (`load_query_sources`): each gives its own `count`
queries, from the same `offset` on, and the lists are concatenated in order; repeats are
dropped within each source, not across sources. Rotating a list by an offset therefore moves
every source's window by that many queries.

Parsing (`parse_records`, `build_queries`, `parse_principles`) is pure; only `load_queries` reads
files or the hub. S3 stays with the caller, which passes storage's reader as `read_bytes`.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml
from pydantic import ValidationError

from sami_operator.models import HFAdapter, Principle, QuerySource

log = logging.getLogger(__name__)

ReadBytes = Callable[[str], bytes]
Record = Mapping[str, Any]

EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
HUMAN_TURN = "\n\nHuman:"
ASSISTANT_TURN = "\n\nAssistant:"


class DatasetError(ValueError):
    """A data file or source cannot give what was asked; the message says which and why."""


def describe_source(source: QuerySource) -> str:
    """The source as messages name it, e.g. "dataset 'Anthropic/hh-rlhf' (split 'test')"."""
    if source.uri is not None:
        return f"uri {source.uri!r}"
    subset = f"subset {source.subset!r}, " if source.subset else ""
    return f"dataset {source.dataset!r} ({subset}split {source.split!r})"


# ---------------------------------------------------------------------------------------------
# Pure parsing


def resolve_format(uri: str, fmt: str = "auto") -> str:
    """The file format: `fmt` unless "auto", else "jsonl" or "parquet" by `uri`'s extension."""
    if fmt != "auto":
        return fmt
    suffix = Path(urlparse(uri).path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise DatasetError(
            f"uri {uri!r}: cannot tell the format from the extension {suffix or '(none)'!r}; "
            f"use one of {sorted(EXTENSIONS)} or set format: jsonl or parquet"
        )
    return EXTENSIONS[suffix]


def parse_records(data: bytes, fmt: str, *, name: str = "data") -> list[dict[str, Any]]:
    """Records of a JSONL file (or a JSON array, as some .json files hold) or a Parquet file."""
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise DatasetError(
                f"{name}: reading Parquet needs pyarrow (pip install pyarrow)"
            ) from err
        try:
            return pq.read_table(io.BytesIO(data)).to_pylist()
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise DatasetError(f"{name}: not a readable Parquet file: {err}") from err
    if fmt != "jsonl":
        raise DatasetError(f"{name}: unknown format {fmt!r}; use jsonl or parquet")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{name}: not UTF-8 text ({err})") from err
    if text.lstrip().startswith("["):
        array = _json(text, name)
        rows = [(f"element {i}", row) for i, row in enumerate(array)]
    else:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        rows = [(f"line {n}", _json(line, f"{name}: line {n}")) for n, line in lines]
    for where, row in rows:
        if not isinstance(row, dict):
            raise DatasetError(f"{name}: {where} is a JSON {type(row).__name__}, not an object")
    return [row for _, row in rows]


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{where}: invalid JSON ({err})") from err


def get_path(record: Record, path: str) -> Any:
    """`record["a"]["b"]` for path "a.b"; KeyError naming the first missing part."""
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(part)
        value = value[part]
    return value


def first_human_turn(transcript: str) -> str:
    """The text after the first HUMAN_TURN up to the next ASSISTANT_TURN (or the end), stripped.

    "" when the transcript has no human turn.
    """
    start = transcript.find(HUMAN_TURN)
    if start == -1:
        return ""
    start += len(HUMAN_TURN)
    end = transcript.find(ASSISTANT_TURN, start)
    return transcript[start : end if end != -1 else None].strip()


def extract_query(record: Record, source: QuerySource, index: int) -> str:
    """The query of one record under `source.adapter` ("" when the record has none)."""
    adapter = HFAdapter(source.adapter)
    paths = {
        HFAdapter.field: [source.field],
        HFAdapter.hh_rlhf: ["chosen"],
        HFAdapter.tldr: ["info.post", "post"],
    }[adapter]
    found = list(_lookup(record, paths))
    if not found:
        raise DatasetError(
            f"{describe_source(source)}: record {index} has no field "
            f"{' or '.join(map(repr, paths))} (adapter {adapter.value!r}; "
            f"record keys: {sorted(record)[:10]})"
        )
    path, value = found[0]
    if value is None:  # Parquet fills a column missing from some rows with nulls
        return ""
    if not isinstance(value, str):
        raise DatasetError(
            f"{describe_source(source)}: record {index} field {path!r} is a "
            f"{type(value).__name__}, expected a string"
        )
    return first_human_turn(value) if adapter == HFAdapter.hh_rlhf else value.strip()


def _lookup(record: Record, paths: list[str]) -> Iterator[tuple[str, Any]]:
    """(path, value) for each of `paths` present in `record`, in order."""
    for path in paths:
        try:
            yield path, get_path(record, path)
        except KeyError:
            continue


def build_queries(
    records: Iterable[Record], source: QuerySource, *, limit: int | None = None
) -> list[str]:
    """Non-empty, distinct queries in record order; stops once `limit` are found."""
    queries: list[str] = []
    seen: set[str] = set()
    scanned = empty = duplicates = 0
    for index, record in enumerate(records):
        if limit is not None and len(queries) >= limit:
            break
        scanned += 1
        query = extract_query(record, source, index)
        if not query:
            empty += 1
        elif query in seen:
            duplicates += 1
        else:
            seen.add(query)
            queries.append(query)
    if scanned == 0:
        raise DatasetError(f"{describe_source(source)}: has no records (the file is empty)")
    if empty or duplicates:
        log.info(
            "%s: skipped %d empty and %d duplicate queries in %d records",
            describe_source(source),
            empty,
            duplicates,
            scanned,
        )
    return queries


def select_queries(queries: list[str], source: QuerySource, offset: int = 0) -> list[str]:
    """`source.count` queries from `offset` (>= 0) on; an error when there are not enough."""
    needed = offset + source.count
    if len(queries) < needed:
        raise DatasetError(
            f"{describe_source(source)}: has {len(queries)} usable queries (non-empty, "
            f"distinct), but count {source.count} from offset {offset} needs {needed}"
        )
    return queries[offset:needed]


def parse_principles(text: str, *, name: str = "principle file") -> list[Principle]:
    """Principles of a YAML list of {name, definition, antithesis} mappings."""
    try:
        entries = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise DatasetError(f"{name}: invalid YAML ({err})") from err
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{name}: expected a non-empty YAML list of principles")
    principles: list[Principle] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise DatasetError(
                f"{name}: entry {index} is not a mapping of name/definition/antithesis"
            )
        try:
            principles.append(Principle.model_validate(entry))
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in err.errors()
            )
            raise DatasetError(f"{name}: entry {index}: {problems}") from err
    names = [p.name for p in principles]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DatasetError(f"{name}: principle names must be unique; repeated: {repeated}")
    return principles


# ---------------------------------------------------------------------------------------------
# I/O


def read_local(uri: str) -> bytes:
    """The bytes of a local path or file:// URI."""
    path = Path(unquote(urlparse(uri).path)) if uri.startswith("file://") else Path(uri)
    try:
        return path.read_bytes()
    except OSError as err:
        raise DatasetError(f"uri {uri!r}: cannot read {path} ({err.strerror or err})") from err


def download_hub_records(source: QuerySource) -> Iterable[Record]:
    """Records of a Hugging Face hub dataset split (needs the `datasets` package and network)."""
    try:
        import datasets
    except ImportError as err:
        raise DatasetError(
            f"{describe_source(source)}: reading hub datasets needs the `datasets` package "
            "(pip install datasets), or export the split to JSONL/Parquet and set `uri` instead"
        ) from err
    # `subset` is a configuration name for most datasets, but Anthropic/hh-rlhf splits its
    # parts by folder ("helpful-base"), which load_dataset takes as data_dir.
    kwargs: dict[str, Any] = {"split": source.split}
    if source.subset:
        configs = datasets.get_dataset_config_names(source.dataset)
        kwargs["name" if source.subset in configs else "data_dir"] = source.subset
    return datasets.load_dataset(source.dataset, **kwargs)


def load_queries(
    source: QuerySource, *, read_bytes: ReadBytes | None = None, offset: int = 0
) -> list[str]:
    """`source.count` distinct queries from `source`, starting at the `offset`-th.

    `read_bytes(uri)` reads a file URI; the caller passes storage's reader for s3:// URIs. When
    None, local paths and file:// URIs are read directly.
    """
    name = describe_source(source)
    if offset < 0:
        raise DatasetError(f"{name}: offset must be >= 0, got {offset}")
    if source.uri is not None:
        fmt = resolve_format(source.uri, source.format)
        if read_bytes is None:
            if "://" in source.uri and not source.uri.startswith("file://"):
                raise DatasetError(f"{name}: needs a reader for this scheme (pass read_bytes)")
            read_bytes = read_local
        data = read_bytes(source.uri)
        if not data:
            raise DatasetError(f"{name}: the file is empty")
        records: Iterable[Record] = parse_records(data, fmt, name=name)
    else:
        records = download_hub_records(source)
    queries = build_queries(records, source, limit=offset + source.count)
    selected = select_queries(queries, source, offset)
    log.info("%s: %d queries from offset %d", name, len(selected), offset)
    return selected


def load_query_sources(
    sources: QuerySource | list[QuerySource],
    *,
    read_bytes: ReadBytes | None = None,
    offset: int = 0,
) -> list[str]:
    """The queries of one source, or of each source of a list in order, concatenated: each
    gives its own `count` from `offset` on (load_queries). A source that cannot give them
    fails, named by its index in the list (`queries[1]: ...`)."""
    if isinstance(sources, QuerySource):
        return load_queries(sources, read_bytes=read_bytes, offset=offset)
    queries: list[str] = []
    for index, source in enumerate(sources):
        try:
            queries += load_queries(source, read_bytes=read_bytes, offset=offset)
        except DatasetError as err:
            raise DatasetError(f"queries[{index}]: {err}") from err
    return queries
