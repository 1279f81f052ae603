"""Prompts and response post-processing (docs/method.md, 'Generation').

One prompt serves generation and training: SAMI scores a response under the very prompt its
constitution produced, so `render_prompt` is the only place prompt text is written.

Formats:
- "base": the paper's short format prompt for pretrained models, a system line, the
  constitution and the query, ending where the model should continue. Returns a string.
- "chat": messages for the caller's tokenizer chat template (this module never imports
  transformers). Returns a list of {"role", "content"} dicts.

Tasks:
- "dialogue": `query` is an HH-RLHF style conversation in "Human:" / "Assistant:" turns that
  ends with a human turn (a bare question is read as one human turn; a trailing "Assistant:"
  is dropped, since the prompt adds its own).
- "summarization": `query` is a TL;DR post (subreddit, title and text, as the data set gives).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

Task = Literal["dialogue", "summarization"]
Format = Literal["base", "chat"]
TASKS: tuple[str, ...] = ("dialogue", "summarization")
FORMATS: tuple[str, ...] = ("base", "chat")

HUMAN = "Human:"
ASSISTANT = "Assistant:"

_INSTRUCTIONS = {
    "dialogue": "Write the assistant's next reply so that it follows the principles in the "
    "constitution.",
    "summarization": "Summarize the post so that the summary follows the principles in the "
    "constitution.",
}
_CONSTITUTION_HEADERS = {
    "dialogue": "### Assistant Constitution:",
    "summarization": "### Summarization Constitution:",
}

# Where a base model's continuation leaves the response: a new turn or a new template section
# (docs/method.md, 'Generation'). Also usable as the generator's stop strings.
STOP_MARKERS: tuple[str, ...] = (HUMAN, ASSISTANT, "###", "System:", "SUBREDDIT:", "POST:")
# Placeholders copied from instruction-style text; a response holding one is not a real answer.
DEBRIS_MARKERS: tuple[str, ...] = ("[insert", "<insert", "[your ", "[name]")

REASON_EMPTY = "empty"
REASON_IDENTICAL = "identical"
REASON_DEBRIS = "debris"
FILTER_REASONS: tuple[str, ...] = (REASON_EMPTY, REASON_IDENTICAL, REASON_DEBRIS)

_TURN = re.compile(r"(Human|Assistant):")


def _dialogue_turns(query: str) -> list[tuple[str, str]]:
    """(role, text) turns of a conversation, role "user" or "assistant"; ends with a user turn."""
    text = query.strip()
    if not text.startswith(HUMAN):
        text = f"{HUMAN} {text}"
    parts = _TURN.split(text)
    # re.split with one group gives ["", "Human", text, "Assistant", text, ...].
    turns = [
        ("user" if speaker == "Human" else "assistant", body.strip())
        for speaker, body in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if turns[-1] == ("assistant", ""):
        turns.pop()
    if turns[-1][0] != "user" or any(not body for _, body in turns):
        raise ValueError(
            f"a dialogue query needs nonempty Human/Assistant turns and must end with a Human "
            f"turn; got {query!r}"
        )
    return turns


def _format_dialogue(turns: Sequence[tuple[str, str]]) -> str:
    return "\n\n".join(f"{HUMAN if role == 'user' else ASSISTANT} {body}" for role, body in turns)


def render_prompt(
    task: Task,
    fmt: Format,
    constitution_text: str,
    query: str,
    *,
    system_role: bool = True,
) -> str | list[dict[str, str]]:
    """The prompt for one (constitution, query); see the module docstring for the formats.

    `constitution_text` is `Constitution.render(...)`. For "chat", `system_role=False` puts the
    instruction and constitution at the top of the first user message instead, for templates
    that reject a system role.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}; got {fmt!r}")
    if not constitution_text.strip():
        raise ValueError("constitution_text is empty; render a Constitution first")
    if not query.strip():
        raise ValueError("query is empty")
    instruction = _INSTRUCTIONS[task]
    header = _CONSTITUTION_HEADERS[task]
    constitution_text = constitution_text.strip()

    if fmt == "base":
        if task == "dialogue":
            body = f"{_format_dialogue(_dialogue_turns(query))}\n\n{ASSISTANT}"
        else:
            body = f"### Post:\n{query.strip()}\n\n### Summary:"
        return f"System: {instruction}\n\n{header}\n{constitution_text}\n\n{body}"

    system = f"{instruction}\n\nConstitution:\n{constitution_text}"
    if task == "dialogue":
        messages = [{"role": role, "content": body} for role, body in _dialogue_turns(query)]
    else:
        messages = [{"role": "user", "content": f"Summarize this post.\n\n{query.strip()}"}]
    if system_role:
        return [{"role": "system", "content": system}, *messages]
    first = messages[0]
    return [{"role": "user", "content": f"{system}\n\n{first['content']}"}, *messages[1:]]


def cut_response(text: str, stop_markers: Sequence[str] = STOP_MARKERS) -> str:
    """The response up to the first stop marker, whitespace stripped."""
    end = len(text)
    for marker in stop_markers:
        position = text.find(marker)
        if position != -1:
            end = min(end, position)
    return text[:end].strip()


def filter_reason(
    responses: Sequence[str], debris_markers: Sequence[str] = DEBRIS_MARKERS
) -> str | None:
    """Why a query's C responses (one per constitution) must be dropped, or None to keep them.

    Checked in order: REASON_EMPTY (a response is blank), REASON_IDENTICAL (two responses are
    equal, so the contrastive matrix cannot tell their constitutions apart), REASON_DEBRIS (a
    response holds template debris; markers match case-insensitively).
    """
    stripped = [r.strip() for r in responses]
    if not stripped or any(not r for r in stripped):
        return REASON_EMPTY
    if len(set(stripped)) < len(stripped):
        return REASON_IDENTICAL
    lowered = [m.lower() for m in debris_markers]
    if any(m in r.lower() for r in stripped for m in lowered):
        return REASON_DEBRIS
    return None
