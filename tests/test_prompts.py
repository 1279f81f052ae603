"""Prompt rendering and response post-processing."""

from __future__ import annotations

import pytest

from sami_worker.prompts import (
    REASON_DEBRIS,
    REASON_EMPTY,
    REASON_IDENTICAL,
    cut_response,
    filter_reason,
    render_prompt,
)

CONSTITUTION = "1. Be helpful.\n2. Be harmless."


def test_dialogue_base_prompt():
    prompt = render_prompt("dialogue", "base", CONSTITUTION, "Human: How do I boil an egg?")
    assert prompt == (
        "System: Write the assistant's next reply so that it follows the principles in the "
        "constitution.\n\n"
        "### Assistant Constitution:\n1. Be helpful.\n2. Be harmless.\n\n"
        "Human: How do I boil an egg?\n\n"
        "Assistant:"
    )


def test_dialogue_query_forms_render_the_same():
    # HH-RLHF prompts come as "\n\nHuman: ...\n\nAssistant:"; a bare question is one human turn.
    hh = render_prompt("dialogue", "base", CONSTITUTION, "\n\nHuman: Hi?\n\nAssistant:")
    bare = render_prompt("dialogue", "base", CONSTITUTION, "Hi?")
    assert hh == bare
    assert hh.endswith("Human: Hi?\n\nAssistant:")


def test_dialogue_multi_turn_chat_messages():
    query = "Human: Hi.\n\nAssistant: Hello!\n\nHuman: Tell me a joke."
    messages = render_prompt("dialogue", "chat", CONSTITUTION, query)
    assert messages[0]["role"] == "system"
    assert messages[0]["content"].endswith("Constitution:\n1. Be helpful.\n2. Be harmless.")
    assert messages[1:] == [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    base = render_prompt("dialogue", "base", CONSTITUTION, query)
    assert base.endswith("Human: Hi.\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant:")


def test_chat_without_system_role_folds_it_into_first_user_message():
    messages = render_prompt("dialogue", "chat", CONSTITUTION, "Hi?", system_role=False)
    assert [m["role"] for m in messages] == ["user"]
    assert messages[0]["content"].startswith("Write the assistant's next reply")
    assert messages[0]["content"].endswith("2. Be harmless.\n\nHi?")


def test_summarization_prompts():
    post = "SUBREDDIT: r/cooking\nTITLE: Eggs\nPOST: I boiled eggs for an hour."
    base = render_prompt("summarization", "base", CONSTITUTION, post)
    assert base.startswith("System: Summarize the post")
    assert "### Summarization Constitution:\n1. Be helpful." in base
    assert base.endswith(f"### Post:\n{post}\n\n### Summary:")
    messages = render_prompt("summarization", "chat", CONSTITUTION, post)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"].endswith(post)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("poetry", "base", CONSTITUTION, "q"), "task must be one of"),
        (("dialogue", "raw", CONSTITUTION, "q"), "fmt must be one of"),
        (("dialogue", "base", " ", "q"), "constitution_text is empty"),
        (("dialogue", "base", CONSTITUTION, ""), "query is empty"),
        (("dialogue", "base", CONSTITUTION, "Human: Hi.\n\nAssistant: Yo."), "end with a Human"),
    ],
)
def test_render_prompt_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        render_prompt(*args)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" Boil it for 8 minutes.\n\nHuman: Thanks!", "Boil it for 8 minutes."),
        ("Sure.\n### Assistant Constitution:\n1.", "Sure."),
        ("Sure. Human: a ### b", "Sure."),
        ("  No marker here.  ", "No marker here."),
        ("Human: only a new turn", ""),
    ],
)
def test_cut_response_at_first_marker(text, expected):
    assert cut_response(text) == expected


def test_cut_response_with_custom_markers():
    assert cut_response("a STOP b", stop_markers=("STOP",)) == "a"


@pytest.mark.parametrize(
    ("responses", "reason"),
    [
        (["Yes.", "No."], None),
        (["Yes.", "  "], REASON_EMPTY),
        ([], REASON_EMPTY),
        (["Same.", " Same. "], REASON_IDENTICAL),
        (["A.", "B.", "A."], REASON_IDENTICAL),
        (["Dear [Insert name], hi.", "No."], REASON_DEBRIS),
        (["", ""], REASON_EMPTY),  # empty wins over identical
    ],
)
def test_filter_reason(responses, reason):
    assert filter_reason(responses) == reason


def test_filter_reason_custom_debris():
    assert filter_reason(["ok TODO", "fine"], debris_markers=("todo",)) == REASON_DEBRIS
