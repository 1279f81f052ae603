"""The principles stage: an LM writes principles with antitheses from a short instruction.

The writer is a local model (vLLM) or any OpenAI-compatible chat endpoint, asked through
chat.ChatClient as the judge is (retries, exit 75 when it stays unavailable, exit 65 for a
client error, the API key only over https). Its answer is
parsed robustly (a JSON list, possibly inside prose or a code fence, or numbered lines of
"name | definition | antithesis"), validated (non-empty, distinct, antithesis differs from the
definition), and on failure asked again with a stricter prompt. The result is published as
principles.json with a manifest.

    python -m sami_worker write-principles --task task.json
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

from pydantic import ValidationError

from sami_operator.models import ModelSpec, Principle
from sami_worker import storage
from sami_worker.backends import SamplingSettings
from sami_worker.chat import ChatClient
from sami_worker.common import PRINCIPLES_FILE, open_model_backend, open_uri
from sami_worker.completions import NoChatTemplate, complete_chat
from sami_worker.tasks import TaskError, WritePrinciplesTask

log = logging.getLogger(__name__)

ATTEMPTS = 3  # answers asked for, each retried by the chat client on transient errors

_PROMPT = """Write {count} principles for {instruction}

Each principle describes one behaviour in one sentence. Give each a short lower-case name and
an antithesis: one sentence describing the opposite behaviour.

Answer with a JSON list only, like:
[{{"name": "concise", "definition": "The response is brief and to the point.", \
"antithesis": "The response is long-winded and padded."}}]"""

_STRICT = """

Your previous answer could not be used: {problem}
Answer with exactly {count} objects in one JSON list and nothing else: no prose, no code fence."""


class ParseError(ValueError):
    pass


def build_prompt(instruction: str, count: int, problem: str | None = None) -> str:
    text = _PROMPT.format(count=count, instruction=instruction.strip().rstrip("."))
    if problem:
        text += _STRICT.format(problem=problem, count=count)
    return text


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:63].strip("-")


def parse_principles(answer: str, count: int) -> list[Principle]:
    """Principles from an LM answer; raises ParseError saying what is wrong."""
    raw = _json_list(answer)
    if raw is None:
        raw = _lines(answer)
    if not raw:
        raise ParseError("no JSON list and no 'name | definition | antithesis' lines found")
    principles = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ParseError(f"item {index} is not an object")
        name = _slug(str(item.get("name") or ""))
        try:
            principles.append(
                Principle(
                    name=name,
                    definition=str(item.get("definition") or "").strip(),
                    antithesis=str(item.get("antithesis") or "").strip(),
                )
            )
        except ValidationError as err:
            problem = err.errors(include_url=False)[0]
            field = ".".join(map(str, problem["loc"]))
            message = problem["msg"].removeprefix("Value error, ")
            raise ParseError(f"item {index} ({name or 'unnamed'}): {field} {message}") from None
    names = [p.name for p in principles]
    if len(set(names)) != len(names):
        raise ParseError(f"names are not distinct: {names}")
    definitions = [p.definition.lower() for p in principles]
    if len(set(definitions)) != len(definitions):
        raise ParseError("two principles have the same definition")
    if len(principles) < count:
        raise ParseError(f"asked for {count} principles, got {len(principles)}")
    return principles[:count]


def _json_list(answer: str) -> list | None:
    start = answer.find("[")
    while start != -1:
        end = answer.rfind("]")
        while end > start:
            try:
                value = json.loads(answer[start : end + 1])
            except json.JSONDecodeError:
                end = answer.rfind("]", start, end)
                continue
            if isinstance(value, list):
                return value
            break
        start = answer.find("[", start + 1)
    return None


def _lines(answer: str) -> list[dict]:
    items = []
    for line in answer.splitlines():
        parts = [p.strip() for p in re.sub(r"^\s*(\d+[.)]|[-*])\s*", "", line).split("|")]
        if len(parts) == 3 and all(parts):
            items.append(dict(zip(("name", "definition", "antithesis"), parts, strict=True)))
    return items


class _LocalWriter:
    def __init__(self, task: WritePrinciplesTask):
        self.model = task.writer.model
        model = ModelSpec(uri=self.model)
        self.backend = open_model_backend(
            model, task.generation, task.storage, seed=task.seed, engine=task.engine
        )
        self.settings = SamplingSettings(task.writer.max_tokens, task.writer.temperature, 1.0, ())

    def __call__(self, prompt: str, attempt: int) -> str:
        try:
            return complete_chat(self.backend, [prompt], self.settings, [attempt])[0].text
        except NoChatTemplate as err:
            raise TaskError(
                f"principles.writer.model: {self.model} cannot be prompted as a chat model "
                f"({err}); use an instruct model"
            ) from None


def write_principles(ask, instruction: str, count: int) -> list[Principle]:
    """Ask, parse, validate; ask again more strictly on failure."""
    problem = None
    for attempt in range(ATTEMPTS):
        answer = ask(build_prompt(instruction, count, problem), attempt)
        try:
            return parse_principles(answer, count)
        except ParseError as err:
            problem = str(err)
            log.warning("writer answer %d unusable: %s", attempt + 1, problem)
    raise TaskError(
        f"principles.writer: no usable principles after {ATTEMPTS} attempts; last problem: "
        f"{problem}"
    )


def run(task: WritePrinciplesTask) -> dict:
    out = open_uri(task.output, task.storage)
    w = task.writer
    if w.endpoint is not None:
        client = ChatClient(w.endpoint, "principles.writer.endpoint")

        def ask(prompt: str, attempt: int) -> str:
            return client.complete(prompt, temperature=w.temperature, max_tokens=w.max_tokens)

        principles = write_principles(ask, w.instruction, w.count)
    else:
        local = _LocalWriter(task)
        try:
            principles = write_principles(local, w.instruction, w.count)
        finally:
            local.backend.close()
    data = json.dumps([p.model_dump(mode="json") for p in principles], indent=2)
    meta = {"principles": [p.name for p in principles]}
    with tempfile.TemporaryDirectory(prefix="sami-principles-") as tmp:
        (Path(tmp) / PRINCIPLES_FILE).write_text(data)
        storage.upload_stage(out, Path(tmp), "", stage="principles", meta=meta)
    return meta
