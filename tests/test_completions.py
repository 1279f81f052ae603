"""How prompts become token ids (sami_worker.completions.prompt_token_ids, complete_chat) for
generation, evaluation, the local judge and the local principle writer, and which ids of a
response are kept (response_token_ids); on the tiny Llama's real byte-level BPE tokenizer (and,
for complete_chat, its real transformers backend) and a real SentencePiece-style tokenizer."""

from __future__ import annotations

import jinja2
import pytest
from tokenizers import SentencePieceBPETokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sami_operator.models import GenerationSpec, ModelSpec, PrincipleWriter
from sami_worker import principle_writer
from sami_worker.common import open_model_backend, query_prompt_ids
from sami_worker.completions import (
    Completion,
    NoChatTemplate,
    SamplingSettings,
    complete_chat,
    prompt_token_ids,
    response_token_ids,
)
from sami_worker.prompts import cut_response
from sami_worker.tasks import TaskError, WritePrinciplesTask
from tests.conftest import EXAMPLES

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


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE tokenizer ('▁' marks a word start), trained on the project's
    example queries: the other family of tokenizers (Llama 2, Mistral) beside byte-level BPE."""
    corpus = [line for path in sorted((EXAMPLES / "data").glob("*.jsonl")) for line in path.open()]
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(corpus, vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=sp._tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# (prompt, response as generated): a byte-level BPE model writes ' Sure' after 'Assistant:',
# a SentencePiece one 'Sure' without a word-start marker after a newline.
BOUNDARIES = {
    "byte-level BPE": ("Human: Hi?\n\nAssistant:", " Sure, here it is."),
    "SentencePiece": ("<|im_start|>assistant\n", "Sure, here it is."),
}


@pytest.fixture(params=sorted(BOUNDARIES))
def boundary(request, tokenizer):
    tok = tokenizer if request.param == "byte-level BPE" else sentencepiece_tokenizer()
    return (tok, *BOUNDARIES[request.param])


def generated(tok, prompt: str, continuation: str) -> tuple[list[int], Completion]:
    """The prompt's ids and a completion as a model writing `continuation` after it: the ids
    that follow the prompt's in the joint tokenisation."""
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    joint = tok(prompt + continuation, add_special_tokens=False)["input_ids"]
    assert joint[: len(prompt_ids)] == prompt_ids  # the boundary falls between tokens
    ids = tuple(joint[len(prompt_ids) :])
    return prompt_ids, Completion(tok.decode(ids), ids, "stop", ended_with_eos=True)


def test_a_response_keeps_the_ids_the_model_generated(boundary):
    tok, prompt, response = boundary
    prompt_ids, completion = generated(tok, prompt, response)
    text = cut_response(completion.text)
    ids, generated_ids = response_token_ids(tok, completion, text)
    assert (ids, generated_ids) == (list(completion.token_ids), True)
    # Joined as ids, prompt and response are the sequence the model saw and wrote, which
    # re-tokenising the stored (stripped) text would not give.
    assert prompt_ids + ids == tok(prompt + response, add_special_tokens=False)["input_ids"]
    assert tok(text, add_special_tokens=False)["input_ids"] != ids


def test_a_response_cut_at_a_stop_marker_keeps_the_generated_ids_before_it(boundary):
    tok, prompt, response = boundary
    _, whole = generated(tok, prompt, response)
    _, completion = generated(tok, prompt, response + "\n\nHuman: And then?")
    text = cut_response(completion.text)
    assert text == response.strip()
    ids, generated_ids = response_token_ids(tok, completion, text)
    assert (ids, generated_ids) == (list(whole.token_ids), True)


def test_where_a_token_spans_the_cut_the_text_is_tokenised_alone(tokenizer):
    tok = tokenizer
    ids = tuple(tok("Sure thing", add_special_tokens=False)["input_ids"])
    completion = Completion(tok.decode(ids), ids, "length", ended_with_eos=False)
    text = "Sure thi"  # a cut inside the last token
    assert response_token_ids(tok, completion, text) == (
        tok(text, add_special_tokens=False)["input_ids"],
        False,
    )
