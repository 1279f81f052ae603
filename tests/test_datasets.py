"""Query sources and principle files (sami_worker.datasets) on small files and the examples."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import pytest

from sami_operator.models import QuerySource
from sami_worker.datasets import (
    DatasetError,
    first_human_turn,
    load_queries,
    load_query_sources,
    parse_principles,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
PRINCIPLES = Path(__file__).resolve().parents[1] / "examples" / "principles"

# name -> (records, the field holding the query, the adapter)
EXAMPLE_FILES = {
    "dialogue-train.jsonl": (100, "query", "field"),
    "dialogue-eval.jsonl": (24, "query", "field"),
    "posts-train.jsonl": (40, "post", "field"),
    "posts-eval.jsonl": (12, "post", "field"),
    "hh-rlhf-sample.jsonl": (5, "chosen", "hh-rlhf"),
    "tldr-sample.jsonl": (5, "info.post", "tldr"),
}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def source(uri: str | Path, count: int, **kwargs) -> QuerySource:
    return QuerySource(uri=str(uri), count=count, **kwargs)


# ---------------------------------------------------------------------------------------------
# Formats and field mapping


def test_jsonl_reads_the_named_field_in_order(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a?", "x": 1}, {"prompt": " b? "}])
    assert load_queries(source(path, 2, field="prompt")) == ["a?", "b?"]


def test_file_uri_and_blank_lines(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"query": "a"}\n\n{"query": "b"}\n', encoding="utf-8")
    assert load_queries(source(path.as_uri(), 2)) == ["a", "b"]


def test_dotted_path_reaches_nested_fields(tmp_path):
    records = [{"info": {"post": "first post"}}, {"info": {"post": "second post"}}]
    path = write_jsonl(tmp_path / "q.jsonl", records)
    assert load_queries(source(path, 2, field="info.post")) == ["first post", "second post"]


def test_parquet_with_nested_field(tmp_path):
    table = pa.table(
        {
            "info": [{"post": "p1", "title": "t1"}, {"post": "p2", "title": "t2"}],
            "choice": [0, 1],
        }
    )
    path = tmp_path / "comparisons.parquet"
    pq.write_table(table, path)
    assert load_queries(source(path, 2, field="info.post")) == ["p1", "p2"]


def test_explicit_format_overrides_the_extension(tmp_path):
    path = tmp_path / "queries.txt"
    pq.write_table(pa.table({"query": ["x", "y"]}), path)
    assert load_queries(source(path, 1, format="parquet")) == ["x"]


def test_json_array_file(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"query": "a"}, {"query": "b"}]), encoding="utf-8")
    assert load_queries(source(path, 2)) == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# Adapters on the sample files shaped like the hub datasets


def test_first_human_turn():
    transcript = "\n\nHuman:  Hi there?\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Bye."
    assert first_human_turn(transcript) == "Hi there?"
    assert first_human_turn("\n\nHuman: only a question") == "only a question"
    assert first_human_turn("no turns at all") == ""


def test_hh_rlhf_adapter_takes_the_first_human_turn():
    queries = load_queries(source(DATA / "hh-rlhf-sample.jsonl", 5, adapter="hh-rlhf"))
    assert queries[0] == "What's a good way to keep my basil plant alive indoors?"
    # Surrounding spaces are stripped; later turns never leak in.
    assert queries[4] == "What's the fastest way to learn to type without looking at the keyboard?"
    assert not any("Human:" in q or "Assistant:" in q for q in queries)


def test_tldr_adapter_takes_info_post():
    queries = load_queries(source(DATA / "tldr-sample.jsonl", 5, adapter="tldr"))
    first = json.loads((DATA / "tldr-sample.jsonl").read_text().splitlines()[0])
    assert queries[0] == first["info"]["post"]
    assert queries[1].startswith("I made pizza dough for the first time")


def test_tldr_adapter_accepts_a_flat_post():
    queries = load_queries(source(DATA / "posts-eval.jsonl", 12, adapter="tldr"))
    assert queries[0].startswith("I just received an inheritance")


def test_adapters_ignore_field(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: q\n\nAssistant: a"}])
    assert load_queries(source(path, 1, adapter="hh-rlhf", field="nonexistent")) == ["q"]


# ---------------------------------------------------------------------------------------------
# Selection: empties, repeats, count and offset


def test_offset_rotates_through_the_file(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"query": f"q{i}"} for i in range(10)])
    src = source(path, 3)
    assert load_queries(src) == ["q0", "q1", "q2"]
    assert load_queries(src, offset=3) == ["q3", "q4", "q5"]
    assert load_queries(src, offset=7) == ["q7", "q8", "q9"]


def test_a_list_of_sources_is_concatenated_each_with_its_count():
    """Two example files, each with its own count and field, read in order."""
    dialogue = source(DATA / "dialogue-train.jsonl", 3)
    posts = source(DATA / "posts-train.jsonl", 2, field="post")
    queries = load_query_sources([dialogue, posts])
    assert queries == load_queries(dialogue) + load_queries(posts)
    assert len(queries) == 5 and queries[3].startswith("My girlfriend (27F)")
    assert load_query_sources(dialogue) == load_queries(dialogue)  # one source as before


def test_an_offset_moves_every_sources_window(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"query": f"a{i}"} for i in range(6)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"query": f"b{i}"} for i in range(6)])
    sources = [source(a, 2), source(b, 1)]
    assert load_query_sources(sources) == ["a0", "a1", "b0"]
    assert load_query_sources(sources, offset=2) == ["a2", "a3", "b2"]


def test_repeats_are_dropped_within_a_source_not_across(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"query": q} for q in ["x", "x", "y"]])
    b = write_jsonl(tmp_path / "b.jsonl", [{"query": q} for q in ["y", "z"]])
    assert load_query_sources([source(a, 2), source(b, 2)]) == ["x", "y", "y", "z"]


def test_a_source_of_a_list_that_falls_short_is_named_by_its_index(tmp_path):
    short = write_jsonl(tmp_path / "short.jsonl", [{"query": "only"}])
    with pytest.raises(DatasetError, match=r"^queries\[1\]: uri .*short.jsonl.* has 1 usable"):
        load_query_sources([source(DATA / "dialogue-train.jsonl", 3), source(short, 2)])


def test_empty_and_repeated_queries_are_dropped_keeping_the_first(tmp_path, caplog):
    records = [
        {"query": "a"},
        {"query": "  "},
        {"query": "b"},
        {"query": "a"},
        {"query": None},
        {"query": " b"},
        {"query": "c"},
    ]
    path = write_jsonl(tmp_path / "q.jsonl", records)
    with caplog.at_level(logging.INFO, logger="sami_worker.datasets"):
        assert load_queries(source(path, 3)) == ["a", "b", "c"]
    assert "skipped 2 empty and 2 duplicate" in caplog.text


def test_tldr_comparisons_repeat_posts(tmp_path):
    # summarize_from_feedback holds one record per comparison, so each post appears many times.
    record = {"info": {"post": "same post"}, "summaries": [{"text": "a"}, {"text": "b"}]}
    other = {"info": {"post": "other post"}, "summaries": [{"text": "c"}, {"text": "d"}]}
    path = write_jsonl(tmp_path / "cmp.jsonl", [record, record, other])
    assert load_queries(source(path, 2, adapter="tldr")) == ["same post", "other post"]


# ---------------------------------------------------------------------------------------------
# Errors a user can act on


def test_missing_field_names_the_record_and_field(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"query": "a"}, {"question": "b"}])
    with pytest.raises(DatasetError, match=r"record 1 has no field 'query'") as err:
        load_queries(source(path, 2))
    assert str(path) in str(err.value)
    assert "question" in str(err.value)  # the keys it does have


def test_missing_nested_field(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"info": {"title": "t"}}])
    with pytest.raises(DatasetError, match=r"record 0 has no field 'info.post' or 'post'"):
        load_queries(source(path, 1, adapter="tldr"))


def test_non_string_field(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"query": ["a", "b"]}])
    with pytest.raises(DatasetError, match=r"record 0 field 'query' is a list"):
        load_queries(source(path, 1))


def test_too_few_queries_says_how_many_there_are(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"query": q} for q in ["a", "b", "a", "c"]])
    with pytest.raises(DatasetError, match=r"has 3 usable queries.*count 2 from offset 2 needs 4"):
        load_queries(source(path, 2), offset=2)


def test_unknown_extension(tmp_path):
    path = tmp_path / "queries.csv"
    path.write_text("query\na\n")
    with pytest.raises(DatasetError, match=r"queries\.csv.*'\.csv'.*\.jsonl.*\.parquet"):
        load_queries(source(path, 1))


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.parquet"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty"):
        load_queries(source(path, 1))


def test_blank_jsonl_has_no_records(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(DatasetError, match="has no records"):
        load_queries(source(path, 1))


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"query": "a"}\n{"query": \n')
    with pytest.raises(DatasetError, match=r"line 2: invalid JSON"):
        load_queries(source(path, 1))


def test_missing_local_file(tmp_path):
    with pytest.raises(DatasetError, match=r"cannot read"):
        load_queries(source(tmp_path / "absent.jsonl", 1))


def test_negative_offset(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"query": "a"}])
    with pytest.raises(DatasetError, match=r"offset must be >= 0"):
        load_queries(source(path, 1), offset=-1)


# ---------------------------------------------------------------------------------------------
# Injected reader for s3:// URIs


def test_s3_uri_is_read_through_the_given_reader():
    objects = {"s3://bucket/data/q.jsonl": b'{"query": "from s3"}\n{"query": "again"}\n'}
    calls: list[str] = []

    def read_bytes(uri: str) -> bytes:
        calls.append(uri)
        return objects[uri]

    src = source("s3://bucket/data/q.jsonl", 2)
    assert load_queries(src, read_bytes=read_bytes) == ["from s3", "again"]
    assert calls == ["s3://bucket/data/q.jsonl"]


def test_s3_parquet_through_the_given_reader(tmp_path):
    pq.write_table(pa.table({"query": ["p"]}), tmp_path / "q.parquet")
    objects = {"s3://b/q.parquet": (tmp_path / "q.parquet").read_bytes()}
    assert load_queries(source("s3://b/q.parquet", 1), read_bytes=objects.__getitem__) == ["p"]


def test_s3_uri_without_a_reader():
    with pytest.raises(DatasetError, match=r"s3://b/q.jsonl.*read_bytes"):
        load_queries(source("s3://b/q.jsonl", 1))


def test_hub_source_without_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    src = QuerySource(dataset="Anthropic/hh-rlhf", subset="helpful-base", count=1)
    with pytest.raises(DatasetError, match=r"Anthropic/hh-rlhf.*pip install datasets.*uri"):
        load_queries(src)


@pytest.mark.parametrize(
    ("subset", "expected"),
    [("helpful-base", {"data_dir": "helpful-base"}), ("comparisons", {"name": "comparisons"})],
)
def test_hub_subset_is_a_config_name_or_a_data_dir(monkeypatch, subset, expected):
    # A stand-in for the two `datasets` functions used, recording the call: the real hub is
    # out of reach here. Anthropic/hh-rlhf picks parts by data_dir, most datasets by config.
    calls = []
    hub = types.ModuleType("datasets")
    hub.get_dataset_config_names = lambda name: ["default", "comparisons"]

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return [{"chosen": "\n\nHuman: from the hub\n\nAssistant: ok"}]

    hub.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", hub)
    src = QuerySource(dataset="org/set", subset=subset, split="test", adapter="hh-rlhf", count=1)
    assert load_queries(src) == ["from the hub"]
    assert calls == [("org/set", {"split": "test", **expected})]


# ---------------------------------------------------------------------------------------------
# Principle files


def test_parse_principles():
    text = "- name: concise\n  definition: Short.\n  antithesis: Long.\n"
    [principle] = parse_principles(text)
    assert (principle.name, principle.definition, principle.antithesis) == (
        "concise",
        "Short.",
        "Long.",
    )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("- name: a\n  definition: x\n  antithesis: y\n- name: b\n  definition: x\n", "entry 1"),
        ("- name: Bad Name\n  definition: x\n  antithesis: y\n", r"entry 0: name"),
        ("- name: a\n  definition: x\n  antithesis: x\n", r"entry 0.*must differ"),
        ("- just a string\n", "entry 0 is not a mapping"),
        ("name: a\n", "non-empty YAML list"),
        ("", "non-empty YAML list"),
        ("- name: a\n  definition: x\n  antithesis: y\n" * 2, "repeated: \\['a'\\]"),
        ("- [unclosed\n", "invalid YAML"),
    ],
)
def test_load_principles_errors(text, match):
    with pytest.raises(DatasetError, match=match):
        parse_principles(text)


# ---------------------------------------------------------------------------------------------
# The example files


@pytest.mark.parametrize("name", sorted(EXAMPLE_FILES))
def test_example_file_loads_every_record(name):
    size, field, adapter = EXAMPLE_FILES[name]
    kwargs = {"field": field} if adapter == "field" else {"adapter": adapter}
    queries = load_queries(source(DATA / name, size, **kwargs))
    assert len(queries) == size
    with pytest.raises(DatasetError, match=f"has {size} usable queries"):
        load_queries(source(DATA / name, size + 1, **kwargs))


def test_example_data_is_utf8_jsonl_of_objects():
    files = sorted(DATA.glob("*"))
    assert {f.name for f in files} == set(EXAMPLE_FILES)
    for path in files:
        lines = path.read_bytes().decode("utf-8").splitlines()
        assert all(isinstance(json.loads(line), dict) for line in lines), path.name


def test_example_queries_are_distinct_across_train_and_eval():
    def texts(name: str, field: str) -> list[str]:
        return [json.loads(line)[field] for line in (DATA / name).read_text().splitlines()]

    for train, held_out, field in [
        ("dialogue-train.jsonl", "dialogue-eval.jsonl", "query"),
        ("posts-train.jsonl", "posts-eval.jsonl", "post"),
    ]:
        every = texts(train, field) + texts(held_out, field)
        assert len({t.strip().lower() for t in every}) == len(every)


def test_example_posts_are_short_reddit_posts():
    for name in ["posts-train.jsonl", "posts-eval.jsonl"]:
        for line in (DATA / name).read_text().splitlines():
            record = json.loads(line)
            assert set(record) == {"post", "subreddit"}
            assert 60 <= len(record["post"].split()) <= 150


@pytest.mark.parametrize("name", sorted(p.name for p in PRINCIPLES.glob("*.yaml")))
def test_example_principle_files_parse(name):
    principles = parse_principles((PRINCIPLES / name).read_text(), name=name)
    assert len(principles) == 2


def test_held_out_principles_are_not_training_principles():
    def names(name: str) -> set[str]:
        return {p.name for p in parse_principles((PRINCIPLES / name).read_text())}

    assert names("heldout-dialogue.yaml").isdisjoint(names("helpful-harmless.yaml"))


@pytest.mark.parametrize(
    "content, match",
    [
        (b'{"name": "a"}', "expected a non-empty YAML list"),
        (b"[1, 2]", "entry 0 is not a mapping"),
        (b'[{"name": "a"}]', "entry 0: definition"),
        (b"\xff\xfe[", "not UTF-8 text"),
    ],
)
def test_a_malformed_published_principles_file_is_bad_input(tmp_path, content, match):
    """The worker reads a principle writer's output as it reads any principle file: a wrong
    shape is bad input (exit 65) with the file named, never a traceback."""
    from sami_worker import storage
    from sami_worker.common import PRINCIPLES_FILE, load_principles
    from sami_worker.tasks import PrinciplesRef

    store = storage.open_storage(str(tmp_path))
    storage.write_stage_files(store, "principles", {PRINCIPLES_FILE: content}, stage="principles")
    ref = PrinciplesRef(uri=str(tmp_path / "principles"))
    with pytest.raises(DatasetError, match=match) as err:
        load_principles(ref, None)
    assert "principles/principles.json" in str(err.value)
