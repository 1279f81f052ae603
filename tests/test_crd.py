"""The generated CRD: committed YAML matches the models, and the schema is structural."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from sami_operator import crd
from sami_operator.validate import load_manifests
from tests.conftest import ROOT, example_manifests

COMMITTED = ROOT / "crds" / crd.CRD_FILE


def test_committed_crd_matches_models():
    assert COMMITTED.read_text() == crd.render_crd_yaml(), (
        "crds/ is out of date with operator/sami_operator/models.py: run `make crds`"
    )


def _nodes(node, path="$"):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


SCHEMA = crd.build_openapi_schema()


def test_schema_is_structural():
    for path, node in _nodes(SCHEMA):
        assert not {"$ref", "anyOf", "allOf", "oneOf", "$defs", "const", "title"} & set(node), path
        assert node.get("additionalProperties") is not False, path
        # Kubernetes lets two kinds of node go untyped: int-or-string, and one that keeps
        # whatever is written (a field that is one object or a list of them).
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        if "properties" in node:
            assert node["type"] == "object", path
        if isinstance(node.get("exclusiveMinimum"), (int, float)) and not isinstance(
            node["exclusiveMinimum"], bool
        ):
            pytest.fail(f"{path}: exclusiveMinimum must be a boolean in OpenAPI 3.0")


def test_every_field_is_described_for_kubectl_explain():
    missing = [
        path
        for path, node in _nodes(SCHEMA)
        if path.startswith(("$.spec", "$.status"))
        and "description" not in node
        and not path.endswith(("{}", "[]"))
    ]
    assert missing == []


def test_printer_columns_read_status_and_spec():
    version = crd.build_crd()["spec"]["versions"][0]
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names[:5] == ["Iteration", "Stage", "Phase", "MI", "Age"]
    assert version["subresources"] == {"status": {}}


def test_cel_rules_are_carried_over():
    principles = SCHEMA["properties"]["spec"]["properties"]["principles"]
    rules = [r["rule"] for r in principles["x-kubernetes-validations"]]
    assert "has(self.inline) != has(self.writer)" in rules
    evaluation = SCHEMA["properties"]["spec"]["properties"]["evaluation"]
    (rule,) = evaluation["x-kubernetes-validations"]
    assert rule["rule"] == "!has(self.judge) || !has(self.includeBase) || self.includeBase"
    judge = evaluation["properties"]["judge"]
    assert [r["rule"] for r in judge["x-kubernetes-validations"]] == [
        "has(self.endpoint) != has(self.model)",
        "!has(self.engine) || has(self.model)",
    ]
    assert "required" not in judge  # endpoint or model
    writer = principles["properties"]["writer"]
    (rule,) = writer["x-kubernetes-validations"]
    assert rule["rule"] == "!has(self.engine) || has(self.model)"
    reference = judge["properties"]["reference"]
    assert reference["required"] == ["uri"] and "promptFormat" in reference["properties"]


def test_crd_schema_accepts_a_judge_model_and_a_reference(samirun_doc):
    samirun_doc["spec"]["evaluation"]["judge"] = {
        "model": "sami://smollm2-135m-instruct",
        "reference": {"uri": "s3://models/instruct/", "promptFormat": "chat"},
    }
    jsonschema.Draft4Validator(SCHEMA).validate(samirun_doc)
    samirun_doc["spec"]["evaluation"]["judge"]["reference"]["promptFormat"] = "plain"
    with pytest.raises(jsonschema.ValidationError, match="'plain' is not one of"):
        jsonschema.Draft4Validator(SCHEMA).validate(samirun_doc)


def test_data_sources_are_one_source_or_a_list_in_the_crd(samirun_doc):
    """The API server takes data.train and data.eval as written, one source or a list (the
    models validate them); `kubectl explain` shows the sources' fields in the description."""
    data = SCHEMA["properties"]["spec"]["properties"]["data"]
    for name in ("train", "eval"):
        node = data["properties"][name]
        assert node["x-kubernetes-preserve-unknown-fields"] is True and "type" not in node
        assert "count (required): How many queries" in node["description"]
        assert "adapter: How a record becomes a query" in node["description"]
    source = samirun_doc["spec"]["data"]["train"]
    source = source if isinstance(source, dict) else source[0]
    for train in (source, [source, dict(source, subset="harmless-base")]):
        samirun_doc["spec"]["data"]["train"] = train
        jsonschema.Draft4Validator(SCHEMA).validate(samirun_doc)


def test_engine_overrides_have_no_defaults_for_the_api_server_to_fill_in():
    """A stage's engine holds only the options its author set: a default the API server wrote
    into evaluation.engine would override generation.engine's value."""
    spec = SCHEMA["properties"]["spec"]["properties"]
    overrides = {
        "evaluation.engine": spec["evaluation"]["properties"]["engine"],
        "evaluation.judge.engine": spec["evaluation"]["properties"]["judge"]["properties"][
            "engine"
        ],
        "principles.writer.engine": spec["principles"]["properties"]["writer"]["properties"][
            "engine"
        ],
    }
    engine = spec["generation"]["properties"]["engine"]["properties"]
    # The same fields and bounds as generation.engine, without its defaults.
    bounds = {
        f: {k: v for k, v in s.items() if k not in ("description", "default")}
        for f, s in engine.items()
    }
    for where, schema in overrides.items():
        assert not [f for f, s in schema["properties"].items() if "default" in s], where
        own = {
            f: {k: v for k, v in s.items() if k != "description"}
            for f, s in schema["properties"].items()
        }
        assert own == bounds, where
    assert engine["tensorParallelSize"]["default"] == 1


@pytest.mark.parametrize("path", example_manifests(), ids=lambda p: p.name)
def test_examples_satisfy_the_crd_schema(path):
    # OpenAPI 3.0 schemas are a Draft 4 dialect (boolean exclusive bounds).
    for doc in load_manifests(path.read_text()):
        jsonschema.Draft4Validator(SCHEMA).validate(doc)


def test_crd_schema_rejects_what_the_models_reject(samirun_doc):
    samirun_doc["spec"]["training"]["optimizer"]["lr"] = 5.0
    with pytest.raises(jsonschema.ValidationError, match="5.0 is greater than the maximum of 1"):
        jsonschema.Draft4Validator(SCHEMA).validate(samirun_doc)
    samirun_doc["spec"]["training"]["optimizer"]["lr"] = 0
    with pytest.raises(jsonschema.ValidationError, match="less than or equal to the minimum"):
        jsonschema.Draft4Validator(SCHEMA).validate(samirun_doc)


def test_crd_yaml_is_one_document():
    docs = list(yaml.safe_load_all(COMMITTED.read_text()))
    assert len(docs) == 1 and docs[0]["metadata"]["name"] == "samiruns.sami.dev"
