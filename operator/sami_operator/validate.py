"""Parse SAMIRun manifests through the API models, with errors a user can act on.

Every entry point (the operator, `sami run`, `sami validate`) goes through `parse_samirun`, so
a bad spec gets the same message everywhere: the field path, the bad value, what is valid.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sami_operator.models import ONE_SOURCE, SOURCE_LIST, SAMIRun

_FIELD_RE = re.compile(r"^[A-Za-z][\w/.\[\]-]*$")
# Names pydantic gives the branches of a union in an error's location: not fields.
_BRANCHES = (ONE_SOURCE, SOURCE_LIST, "int", "str")


class SpecError(ValueError):
    """A manifest that does not parse; the message lists one problem per line."""

    def __init__(self, problems: list[str], source: str = "SAMIRun"):
        self.problems = problems
        super().__init__(f"{source} is invalid:\n" + "\n".join(f"  {p}" for p in problems))


# Bounds on what a manifest may make the parser do: a SAMIRun nests about 10 levels and has a
# few thousand nodes; aliases may repeat a subtree, but not blow it up (the "billion laughs").
MAX_DEPTH = 64
MAX_NODES = 200_000


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects repeated keys (plain YAML keeps the last one silently), keys
    that are lists or mappings, and nesting deeper than MAX_DEPTH."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a string, not a list or mapping", key_node.start_mark
                )
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"repeated key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many nodes `node` stands for once aliases are expanded (each shared subtree counted
    once per reference, computed once); raises past MAX_NODES or on an alias to itself."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise yaml.composer.ComposerError(None, None, "an alias refers to itself", node.start_mark)
    open_.add(key)
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    size = 1 + sum(_expanded_size(child, sizes, open_) for child in children)
    open_.discard(key)
    if size > MAX_NODES:
        raise yaml.composer.ComposerError(
            None, None, f"expands to more than {MAX_NODES} values (aliases?)", node.start_mark
        )
    sizes[key] = size
    return size


def load_manifests(text: str) -> list[Any]:
    """The non-empty YAML documents in `text`; raises yaml.YAMLError on bad or repeated keys,
    complex keys, and documents too deep or too large once aliases are expanded."""
    loader = _StrictLoader(text)
    docs = []
    try:
        while loader.check_node():
            node = loader.get_node()
            _expanded_size(node, {}, set())
            doc = loader.construct_document(node)
            if doc is not None:
                docs.append(doc)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply (through aliases)") from None
    finally:
        loader.dispose()
    return docs


def decode_manifest(data: bytes, source: str) -> str:
    """A manifest file's text; SpecError when it is not UTF-8 (as Kubernetes requires)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(
            [f"not UTF-8 text: byte {data[err.start]:#04x} at offset {err.start}"], source
        ) from None


def parse_samirun(obj: Any, source: str = "SAMIRun") -> SAMIRun:
    """Validate a decoded manifest (a dict) into a SAMIRun or raise SpecError."""
    if not isinstance(obj, dict):
        got = type(obj).__name__
        raise SpecError([f"expected a mapping with apiVersion, kind and spec, got {got}"], source)
    try:
        # As JSON, strictly: the API server takes neither "3" for an integer nor "yes" for a
        # boolean. YAML's own scalars (dates) go in as the strings they were written as.
        text = json.dumps(obj, default=str, allow_nan=False)
    except ValueError as err:
        raise SpecError([f"not representable as JSON: {err}"], source) from None
    try:
        return SAMIRun.model_validate_json(text, strict=True, by_alias=True, by_name=False)
    except ValidationError as err:
        raise SpecError([describe_error(e) for e in err.errors()], source) from None


def describe_error(error: dict[str, Any]) -> str:
    """One pydantic error as 'path: problem (got value)'."""
    loc = error["loc"]
    path = _render_path(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = _fields_at(SAMIRun, loc[:-1])
        hint = f"; valid fields here: {', '.join(valid)}" if valid else ""
        return f"{path}: unknown field{hint}"
    if kind == "missing":
        return f"{path}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        # Cross-field rules sit on the object and start their message with the field they blame.
        field, sep, rest = message.partition(": ")
        if sep and _FIELD_RE.match(field):
            return f"{path}.{field}: {rest}" if path else f"{field}: {rest}"
        return f"{path or 'manifest'}: {message}"
    return f"{path}: {message} (got {_short(error.get('input'))})"


def _render_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "lax-or-strict")) or part in _BRANCHES:
            continue  # pydantic's union/validator branch names, not fields
        else:
            out += f".{part}" if out else str(part)
    return out


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names (aliases) accepted at `loc`, following nested models."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or part in _BRANCHES:
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = next(
            (f for name, f in current.model_fields.items() if (f.alias or name) == part), None
        )
        if field is None:
            return []
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(f.alias or name for name, f in current.model_fields.items())
    return []


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside X, X | None, list[X]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
