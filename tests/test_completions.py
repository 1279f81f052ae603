"""How prompts become token ids (sami_worker.completions.prompt_token_ids, complete_chat) for
generation, evaluation, the local judge and the local principle writer, on the tiny Llama's
real tokenizer and, for complete_chat, its real transformers backend."""

from __future__ import annotations

import jinja2
import pytest
from transformers import AutoTokenizer

from sami_operator.models import GenerationSpec, ModelSpec, PrincipleWriter
from sami_worker import principle_writer
from sami_worker.common import open_model_backend, query_prompt_ids
from sami_worker.completions import (
    NoChatTemplate,
    SamplingSettings,
    complete_chat,
    prompt_token_ids,
)
from sami_worker.tasks import TaskError, WritePrinciplesTask

NO_SYSTEM_ROLE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_plain_text_gets_the_tokenizers_special_tokens(tokenizer):
    ids = prompt_token_ids(tokenizer, "Human: hi\n\nAssistant:")
    assert ids == tokenizer("Human: hi\n\nAssistant:", add_special_tokens=True)["input_ids"]


def test_chat_messages_go_through_the_template_without_special_tokens_added_twice(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = prompt_token_ids(tokenizer, messages)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert text.endswith("<|im_start|>assistant\n")  # the generation prompt


def test_a_template_that_rejects_a_system_role_gets_it_in_the_first_user_turn(tokenizer):
    tokenizer.chat_template = NO_SYSTEM_ROLE
    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}
    ids = prompt_token_ids(tokenizer, [system, user])
    expected = "<|im_start|>user\nBe brief.\n\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(ids) == expected
    with pytest.raises(jinja2.TemplateError, match="System role not supported"):
        prompt_token_ids(tokenizer, [system])  # nothing to merge it into


def test_chat_messages_for_a_model_without_a_template_name_the_field(plain_llama):
    tokenizer = AutoTokenizer.from_pretrained(plain_llama)
    with pytest.raises(NoChatTemplate, match="has no chat template"):
        prompt_token_ids(tokenizer, [{"role": "user", "content": "Hi?"}])
    chat = ModelSpec(uri=str(plain_llama))
    with pytest.raises(TaskError, match=r"^model\.promptFormat: chat, but .* base model$"):
        query_prompt_ids(chat, "dialogue", tokenizer, ["1. Be brief."], "Hi?")
    base = ModelSpec(uri=str(plain_llama), promptFormat="base")
    (ids,) = query_prompt_ids(base, "dialogue", tokenizer, ["1. Be brief."], "Hi?")
    assert "Be brief." in tokenizer.decode(ids)


def test_complete_chat_generates_from_the_templated_prompt(tiny_llama):
    backend = open_model_backend(
        ModelSpec(uri=str(tiny_llama)), GenerationSpec(backend="transformers"), None, 0
    )
    try:
        settings = SamplingSettings(6, 0.0, 1.0, ())
        questions = ["Which principle?", "Say hi."]
        chat = complete_chat(backend, questions, settings, [1, 2])
        ids = [
            prompt_token_ids(backend.tokenizer, [{"role": "user", "content": q}]) for q in questions
        ]
        assert chat == backend.generate(ids, settings, [1, 2])
        assert all(c.token_ids for c in chat)
    finally:
        backend.close()


def test_the_local_principle_writer_on_a_base_model_is_bad_input(plain_llama, tmp_path):
    task = WritePrinciplesTask(
        output=str(tmp_path / "principles"),
        writer=PrincipleWriter(model=str(plain_llama), instruction="Be kind."),
        generation=GenerationSpec(backend="transformers"),
    )
    with pytest.raises(TaskError, match=r"^principles\.writer\.model: .* use an instruct model$"):
        principle_writer.run(task)
    assert not (tmp_path / "principles").exists()  # nothing published
