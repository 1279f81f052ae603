"""The SAMIRun CustomResourceDefinition, generated from the pydantic models.

Kubernetes wants a *structural* OpenAPI v3 schema: every node typed, no $ref, no anyOf for
optional fields, OpenAPI 3.0 exclusive bounds. `build_crd` derives one from
`SAMIRun.model_json_schema()` so the CRD can never drift from the models; `make crds` writes it
and a test fails when the committed YAML differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sami_operator import models

CRD_FILE = "sami.dev_samiruns.yaml"

# Keys of pydantic's JSON schema that a CRD schema keeps as they are.
_KEEP = {
    "type",
    "description",
    "enum",
    "format",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "required",
    "default",
}

PRINTER_COLUMNS = [
    {
        "name": "Iteration",
        "type": "integer",
        "jsonPath": ".status.iteration",
        "description": "Iteration in progress or last done.",
    },
    {
        "name": "Stage",
        "type": "string",
        "jsonPath": ".status.stage",
        "description": "Stage in progress.",
    },
    {
        "name": "Phase",
        "type": "string",
        "jsonPath": ".status.phase",
        "description": "Pending, Running, Succeeded, Failed or Suspended.",
    },
    {
        "name": "MI",
        "type": "number",
        "jsonPath": ".status.latestMiLowerBound",
        "description": "InfoNCE MI lower bound (nats) of the latest evaluated iteration.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {
        "name": "Model",
        "type": "string",
        "jsonPath": ".spec.model.uri",
        "priority": 1,
        "description": "Base model.",
    },
    {
        "name": "Message",
        "type": "string",
        "jsonPath": ".status.message",
        "priority": 1,
        "description": "Last error or summary.",
    },
]


def build_structural_schema(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Turn one pydantic JSON-schema node into a structural OpenAPI v3 node."""
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return build_structural_schema(merged, defs)

    if node.get("x-kubernetes-int-or-string"):
        out: dict[str, Any] = {"x-kubernetes-int-or-string": True}
        if "description" in node:
            out["description"] = node["description"]
        return out

    if "oneOf" in node and node.get("x-kubernetes-preserve-unknown-fields"):
        return _one_or_list(node, defs)

    if "anyOf" in node:
        # Optional[X] is anyOf [X, null]: an omitted (or pruned null) field is the same thing.
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {node['anyOf']} structurally")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if rest.get("default", ...) is None:
            del rest["default"]
        return build_structural_schema({**options[0], **rest}, defs)

    out = {k: v for k, v in node.items() if k in _KEEP}
    if "const" in node:
        out["enum"] = [node["const"]]
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    # JSON Schema 2020 exclusive bounds are numbers; OpenAPI 3.0 wants booleans.
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if key in node:
            out[bound] = node[key]
            out[key] = True
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            out[key] = value

    if out.get("x-kubernetes-preserve-unknown-fields"):
        out["type"] = "object"
    elif "properties" in node:
        out["type"] = "object"
        out["properties"] = {
            name: build_structural_schema(child, defs) for name, child in node["properties"].items()
        }
    elif isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = build_structural_schema(node["additionalProperties"], defs)
    if "items" in node:
        out["items"] = build_structural_schema(node["items"], defs)
    return _ordered(out)


def _one_or_list(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """A field that is one object or a list of them (models.QuerySources). A structural schema
    cannot type it, so it has no type and keeps what is written
    (x-kubernetes-preserve-unknown-fields): the models validate it, `sami validate` before
    applying and the operator on every pass. `kubectl explain` shows only this node's
    description, so the object's fields are listed in it."""
    one, many = node["oneOf"]
    if "$ref" not in one or many.get("type") != "array" or many.get("items") != one:
        raise ValueError(f"cannot express oneOf {node['oneOf']} structurally")
    target = defs[one["$ref"].rsplit("/", 1)[-1]]
    required = set(target.get("required", []))
    fields = "; ".join(
        f"{name}{' (required)' if name in required else ''}: "
        + child.get("description", "").rstrip(".")
        for name, child in target["properties"].items()
    )
    return {
        "description": f"{node['description']} Fields of a source: {fields}.",
        "x-kubernetes-preserve-unknown-fields": True,
    }


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """Stable, readable key order: type and description first, nested schemas last."""
    first = [k for k in ("type", "description") if k in node]
    last = [k for k in ("required", "properties", "additionalProperties", "items") if k in node]
    middle = sorted(k for k in node if k not in first and k not in last)
    return {k: node[k] for k in first + middle + last}


def build_metadata_schema() -> dict[str, Any]:
    """metadata, restricted to the run-name rule (models.check_run_name): a structural schema
    may restrict metadata.name, and the API server then refuses other names at apply time."""
    return {
        "type": "object",
        "properties": {
            "name": {
                "type": "string",
                "description": (
                    f"The run's name: a DNS-1035 label (lower-case letters, digits and '-', "
                    f"starting with a letter, ending with a letter or digit) of at most "
                    f"{models.MAX_RUN_NAME} characters, as its children and their pods are "
                    "named after it."
                ),
                "maxLength": models.MAX_RUN_NAME,
                "pattern": models.DNS_1035_LABEL,
            }
        },
    }


def build_openapi_schema() -> dict[str, Any]:
    """The SAMIRun version's openAPIV3Schema."""
    raw = models.SAMIRun.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    props = raw["properties"]
    return {
        "type": "object",
        "description": models.SAMIRun.__doc__,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "sami.dev/v1alpha1"},
            "kind": {"type": "string", "description": "SAMIRun"},
            "metadata": build_metadata_schema(),
            "spec": build_structural_schema(props["spec"], defs),
            "status": build_structural_schema(props["status"], defs),
        },
    }


def build_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{models.PLURAL}.{models.GROUP}"},
        "spec": {
            "group": models.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": models.KIND,
                "listKind": f"{models.KIND}List",
                "plural": models.PLURAL,
                "singular": models.SINGULAR,
                "shortNames": models.SHORT_NAMES,
                "categories": ["sami"],
            },
            "versions": [
                {
                    "name": models.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": build_openapi_schema()},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    header = "# GENERATED by `sami crd` from operator/sami_operator/models.py. Do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def write_crd(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CRD_FILE
    path.write_text(render_crd_yaml())
    return path


def write_chart_crd(path: Path) -> Path:
    """The Helm chart's copy of the CRD (byte-identical; checked by tests/test_chart.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_crd_yaml())
    return path
